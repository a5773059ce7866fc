//! The job type registry: a type registered with its protobuf schema takes JSON payloads (from
//! grpcurl too) checked field by field, example payloads by slug, its defaults, and versions
//! with a `latest`; reads render payload and result as JSON; an SDK worker runs such a job with
//! its typed payload.

use jobwire::{JobType, Worker};
use jobwire_proto::v1::{
    self as pb, job_service_client::JobServiceClient, job_type_service_client::JobTypeServiceClient,
};
use jobwire_tests::{ServerProcess, grpcurl, test_db};
use prost::Message as _;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};
use tonic::{Code, transport::Channel};

/// The payload as a Rust producer or worker would have it, generated from the same schema.
#[derive(Clone, PartialEq, prost::Message)]
struct Resize {
    #[prost(string, tag = "1")]
    url: String,
    #[prost(int32, tag = "2")]
    width: i32,
    #[prost(int32, tag = "3")]
    mode: i32,
    #[prost(string, repeated, tag = "4")]
    tags: Vec<String>,
    #[prost(message, optional, tag = "5")]
    inner: Option<Inner>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Inner {
    #[prost(int32, tag = "1")]
    depth: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Resized {
    #[prost(int32, tag = "1")]
    width: i32,
}

impl prost::Name for Resize {
    const NAME: &'static str = "Resize";
    const PACKAGE: &'static str = "demo.v1";
}

impl prost::Name for Resized {
    const NAME: &'static str = "Resized";
    const PACKAGE: &'static str = "demo.v1";
}

impl JobType for Resize {
    const JOB_TYPE: &'static str = "demo.resize";
    type Output = Resized;
}

fn field(name: &str, number: i32, ty: Type, type_name: Option<&str>) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        r#type: Some(ty as i32),
        type_name: type_name.map(Into::into),
        label: Some(Label::Optional as i32),
        json_name: Some(name.into()),
        ..Default::default()
    }
}

/// The schema of `demo.v1.Resize`, as `protoc --include_imports` would write it; version 2
/// adds a field.
fn descriptor_set(with_quality: bool) -> Vec<u8> {
    let mut resize = vec![
        field("url", 1, Type::String, None),
        field("width", 2, Type::Int32, None),
        field("mode", 3, Type::Enum, Some(".demo.v1.Mode")),
        FieldDescriptorProto {
            label: Some(Label::Repeated as i32),
            ..field("tags", 4, Type::String, None)
        },
        field("inner", 5, Type::Message, Some(".demo.v1.Inner")),
    ];
    if with_quality {
        resize.push(field("quality", 6, Type::Int32, None));
    }
    let message = |name: &str, fields: Vec<FieldDescriptorProto>| DescriptorProto {
        name: Some(name.into()),
        field: fields,
        ..Default::default()
    };
    let value = |name: &str, number: i32| EnumValueDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        ..Default::default()
    };
    FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("demo/v1/resize.proto".into()),
            package: Some("demo.v1".into()),
            syntax: Some("proto3".into()),
            message_type: vec![
                message("Resize", resize),
                message("Inner", vec![field("depth", 1, Type::Int32, None)]),
                message("Resized", vec![field("width", 1, Type::Int32, None)]),
            ],
            enum_type: vec![EnumDescriptorProto {
                name: Some("Mode".into()),
                value: vec![
                    value("MODE_UNSPECIFIED", 0),
                    value("MODE_FIT", 1),
                    value("MODE_FILL", 2),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn json_struct(value: serde_json::Value) -> prost_types::Struct {
    let text = value.to_string();
    let parsed: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).expect("object");
    prost_types::Struct {
        fields: parsed
            .into_iter()
            .map(|(k, v)| (k, json_value(v)))
            .collect(),
    }
}

fn json_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().expect("number")),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_value).collect(),
        }),
        o @ serde_json::Value::Object(_) => Kind::StructValue(json_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

fn registration(with_quality: bool) -> pb::RegisterJobTypeRequest {
    pb::RegisterJobTypeRequest {
        job_type: Some(pb::JobType {
            name: "demo.resize".into(),
            payload_type: "demo.v1.Resize".into(),
            output_type: "demo.v1.Resized".into(),
            descriptor_set: descriptor_set(with_quality),
            defaults: Some(pb::JobTypeDefaults {
                queue: "images".into(),
                priority: Some(80),
                retry_policy: Some(pb::RetryPolicy {
                    max_attempts: Some(5),
                    ..Default::default()
                }),
                timeout: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            examples: vec![pb::ExamplePayload {
                slug: "small".into(),
                name: "a small thumbnail".into(),
                payload: Some(json_struct(serde_json::json!({
                    "url": "https://example.com/a.png", "width": 64, "mode": "MODE_FIT"
                }))),
            }],
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn a_registered_type_takes_checked_json_examples_and_defaults() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let ch = channel(&server.url()).await;
    let mut types = JobTypeServiceClient::new(ch.clone());
    let mut jobs = JobServiceClient::new(ch);

    let v1 = types
        .register_job_type(registration(false))
        .await
        .expect("registered")
        .into_inner()
        .job_type
        .expect("type");
    assert_eq!((v1.version, v1.latest), (1, true));

    let worker = Worker::builder(server.url())
        .queues(["images"])
        .register::<Resize, _, _>(|_ctx, job: Resize| async move {
            Ok(Resized {
                width: job.width * 2,
            })
        })
        .build()
        .expect("worker");
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    let client = jobwire::Client::connect(server.url())
        .await
        .expect("client");

    // JSON with grpcurl, as an operator types it.
    let addr = server.addr().to_string();
    let out = grpcurl::run(&[
        "-plaintext",
        "-d",
        r#"{"job": {"job_type": "demo.resize", "payload_json": {"url": "https://example.com/b.png",
            "width": 128, "tags": ["x"], "inner": {"depth": 2}}}}"#,
        &addr,
        "jobwire.v1.JobService/EnqueueJob",
    ]);
    let out: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let job = &out["job"];
    assert_eq!(job["queue"], "images", "the type's default queue");
    assert_eq!(job["priority"], 80);
    assert_eq!(job["jobTypeVersion"], 1);
    assert_eq!(job["retryPolicy"]["maxAttempts"], 5);
    assert_eq!(job["timeout"], "30s");
    assert_eq!(job["payloadJson"]["width"], 128);
    let id = job["id"].as_str().expect("id").to_owned();
    let output = client.job::<Resize>(id.clone()).wait().await.expect("ran");
    assert_eq!(
        output.width, 256,
        "the worker decoded the JSON-made payload"
    );
    let shown = grpcurl::run(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"id": "{id}"}}"#),
        &addr,
        "jobwire.v1.JobService/GetJob",
    ]);
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("JSON");
    assert_eq!(
        shown["job"]["payloadJson"]["url"],
        "https://example.com/b.png"
    );
    assert_eq!(shown["job"]["payloadJson"]["inner"]["depth"], 2);
    assert_eq!(shown["job"]["resultJson"]["width"], 256);
    // Watch events carry the job with its payload as JSON too.
    let watched = grpcurl::run(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"id": "{id}"}}"#),
        &addr,
        "jobwire.v1.JobService/WatchJob",
    ]);
    assert!(
        watched.contains(r#""payloadJson": {"#) && watched.contains("JOB_STATE_SUCCEEDED"),
        "{watched}"
    );

    // Mistakes are refused with the field's path.
    for (payload, field) in [
        (
            r#"{"urll": "https://example.com/c.png"}"#,
            "job.payload_json.urll",
        ),
        (r#"{"width": "ten"}"#, "job.payload_json.width"),
        (
            r#"{"inner": {"depth": true}}"#,
            "job.payload_json.inner.depth",
        ),
        (r#"{"mode": "MODE_SQUARE"}"#, "job.payload_json.mode"),
        (r#"{"tags": "x"}"#, "job.payload_json.tags"),
        (r#"{"quality": 3}"#, "job.payload_json.quality"),
    ] {
        let body =
            format!(r#"{{"job": {{"job_type": "demo.resize", "payload_json": {payload}}}}}"#);
        let err = grpcurl::try_run(&[
            "-plaintext",
            "-d",
            &body,
            &addr,
            "jobwire.v1.JobService/EnqueueJob",
        ])
        .expect_err("refused");
        assert!(err.contains("InvalidArgument"), "{err}");
        assert!(
            err.contains(&format!("Message: {field}: ")),
            "{field} named in {err}"
        );
    }

    // An example by its slug.
    let by_example = jobs
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(pb::JobSpec {
                job_type: "demo.resize".into(),
                example: "small".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("example enqueued")
        .into_inner()
        .job
        .expect("job");
    let output = client
        .job::<Resize>(by_example.id.clone())
        .wait()
        .await
        .expect("example ran");
    assert_eq!(output.width, 128);
    for (spec, field) in [
        (
            pb::JobSpec {
                job_type: "demo.resize".into(),
                example: "huge".into(),
                ..Default::default()
            },
            "job.example",
        ),
        (
            pb::JobSpec {
                job_type: "demo.resize".into(),
                payload: Some(prost_types::Any {
                    type_url: "type.googleapis.com/demo.v1.Other".into(),
                    value: Vec::new(),
                }),
                ..Default::default()
            },
            "job.payload.type_url",
        ),
        (
            pb::JobSpec {
                job_type: "demo.resize".into(),
                example: "small".into(),
                payload_json: Some(json_struct(serde_json::json!({"width": 1}))),
                ..Default::default()
            },
            "job.payload",
        ),
        (
            pb::JobSpec {
                job_type: "demo.unknown".into(),
                payload_json: Some(json_struct(serde_json::json!({"width": 1}))),
                ..Default::default()
            },
            "job.payload_json",
        ),
        (
            pb::JobSpec {
                job_type: "demo.resize".into(),
                job_type_version: 9,
                example: "small".into(),
                ..Default::default()
            },
            "job.job_type_version",
        ),
    ] {
        let status = jobs
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(spec),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field} named in {:?}",
            status.message()
        );
    }

    // Version 2 moves `latest`; the version 1 job keeps its version.
    let v2 = types
        .register_job_type(registration(true))
        .await
        .expect("registered")
        .into_inner()
        .job_type
        .expect("type");
    assert_eq!((v2.version, v2.latest), (2, true));
    let old = types
        .get_job_type(pb::GetJobTypeRequest {
            name: "demo.resize".into(),
            version: "1".into(),
            ..Default::default()
        })
        .await
        .expect("v1")
        .into_inner()
        .job_type
        .expect("type");
    assert!(!old.latest);
    assert!(
        old.descriptor_set.is_empty(),
        "the basic view leaves it out"
    );
    let full = types
        .get_job_type(pb::GetJobTypeRequest {
            name: "demo.resize".into(),
            version: "1".into(),
            view: pb::JobTypeView::Full as i32,
        })
        .await
        .expect("v1, full")
        .into_inner()
        .job_type
        .expect("type");
    assert_eq!(full.descriptor_set, descriptor_set(false));
    let status = types
        .get_job_type(pb::GetJobTypeRequest {
            name: "demo.resize".into(),
            view: 7,
            ..Default::default()
        })
        .await
        .expect_err("no such view");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("view: "), "{status:?}");
    let latest = types
        .get_job_type(pb::GetJobTypeRequest {
            name: "demo.resize".into(),
            version: "latest".into(),
            ..Default::default()
        })
        .await
        .expect("latest")
        .into_inner()
        .job_type
        .expect("type");
    assert_eq!(latest.version, 2);
    let newer = jobs
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(pb::JobSpec {
                job_type: "demo.resize".into(),
                payload_json: Some(json_struct(serde_json::json!({"width": 3, "quality": 3}))),
                ..Default::default()
            }),
        })
        .await
        .expect("v2 payload")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(newer.job_type_version, 2);
    let first = client.get_job(&id).await.expect("first job");
    assert_eq!(first.as_proto().job_type_version, 1);

    // ListJobTypes shows the type with its schema, as JSON through grpcurl.
    let listed = grpcurl::run(&[
        "-plaintext",
        "-d",
        "{}",
        &addr,
        "jobwire.v1.JobTypeService/ListJobTypes",
    ]);
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    let t = &listed["jobTypes"][0];
    assert_eq!(t["name"], "demo.resize");
    assert_eq!(t["version"], 2);
    let fields: Vec<&str> = t["payloadSchema"]["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(fields, ["url", "width", "mode", "tags", "inner", "quality"]);
    assert_eq!(t["payloadSchema"]["fields"][2]["enumValues"][1], "MODE_FIT");
    assert_eq!(t["outputSchema"]["fullName"], "demo.v1.Resized");
    assert_eq!(t["examples"][0]["slug"], "small");

    stop.cancel();
    running.await.expect("worker task").expect("worker ran");
}

#[tokio::test]
async fn bad_registrations_name_the_field() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut types = JobTypeServiceClient::new(channel(&server.url()).await);
    let base = registration(false).job_type.expect("type");
    let cases: Vec<(pb::JobType, &str)> = vec![
        (
            pb::JobType {
                descriptor_set: b"not a descriptor set".to_vec(),
                ..base.clone()
            },
            "job_type.descriptor_set",
        ),
        (
            pb::JobType {
                payload_type: "demo.v1.Missing".into(),
                ..base.clone()
            },
            "job_type.payload_type",
        ),
        (
            pb::JobType {
                output_type: "demo.v1.Gone".into(),
                ..base.clone()
            },
            "job_type.output_type",
        ),
        (
            pb::JobType {
                name: "bad name".into(),
                ..base.clone()
            },
            "job_type.name",
        ),
        (
            pb::JobType {
                examples: vec![pb::ExamplePayload {
                    slug: "broken".into(),
                    name: String::new(),
                    payload: Some(json_struct(serde_json::json!({"width": "wide"}))),
                }],
                ..base.clone()
            },
            "job_type.examples[0].payload.width",
        ),
        (
            pb::JobType {
                defaults: Some(pb::JobTypeDefaults {
                    priority: Some(101),
                    ..Default::default()
                }),
                ..base.clone()
            },
            "job_type.defaults.priority",
        ),
    ];
    for (job_type, field) in cases {
        let status = types
            .register_job_type(pb::RegisterJobTypeRequest {
                job_type: Some(job_type),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field} named in {:?}",
            status.message()
        );
    }
    let status = types
        .get_job_type(pb::GetJobTypeRequest {
            name: "demo.resize".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing registered");
    assert_eq!(status.code(), Code::NotFound);
}
