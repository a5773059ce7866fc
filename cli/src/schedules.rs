//! `jobwire schedules`: recurring jobs on cron schedules, through `ScheduleService`.
//!
//! Reads, pauses, triggers and deletes go through the SDK's
//! [`ScheduleRef`](jobwire::ScheduleRef); create and update call the generated client on the
//! SDK's channel, because their payload is JSON for a registered type (`payload_json`), which
//! the SDK's typed schedules do not take. An update sends only the settings given, named in
//! its field mask; a change to the job template reads the schedule first and sends the whole
//! template back with the change, since the mask replaces the template as a whole.

use jobwire::Client;
use jobwire_proto::v1 as pb;
use jobwire_proto::v1::schedule_service_client::ScheduleServiceClient;

use crate::args::{
    CreateScheduleArgs, PolicyArgs, SchedulesCommand, TemplateArgs, UpdateScheduleArgs,
};
use crate::error::Failure;
use crate::jobs::{self, proto_duration};
use crate::render::{self, Pool, line};

/// Runs one `schedules` subcommand.
pub async fn run(client: &Client, json: bool, command: SchedulesCommand) -> Result<(), Failure> {
    let pool = Pool::new()?;
    let schedule = match command {
        SchedulesCommand::List => {
            let schedules: Vec<pb::Schedule> = client
                .list_schedules()
                .await?
                .into_iter()
                .map(|schedule| schedule.into_proto())
                .collect();
            let types = schedules
                .iter()
                .filter_map(|schedule| schedule.job.as_ref())
                .map(|job| (job.job_type.clone(), 0))
                .collect::<Vec<_>>();
            let pool = pool.with_job_types(client, types).await;
            return list(&pool, json, schedules);
        }
        SchedulesCommand::Get { name } => client.schedule(name).get().await?.into_proto(),
        SchedulesCommand::Create(args) => create(client, &pool, args).await?,
        SchedulesCommand::Update(args) => update(client, &pool, args).await?,
        SchedulesCommand::Pause { name } => client.schedule(name).pause().await?.into_proto(),
        SchedulesCommand::Resume { name } => client.schedule(name).resume().await?.into_proto(),
        SchedulesCommand::Trigger { name } => {
            let job = client.schedule(name).trigger().await?.into_proto();
            if json {
                let pool = jobs::with_types(pool, client, [&job]).await;
                return pool.print(&pb::TriggerScheduleResponse { job: Some(job) });
            }
            return line(&format!(
                "triggered: job {} ({})\nwatch it with: jobwire jobs watch {}",
                job.id,
                render::state(job.state),
                job.id
            ));
        }
        SchedulesCommand::Delete { name } => {
            client.schedule(&name).delete().await?;
            if json {
                return pool.print(&pb::DeleteScheduleResponse {});
            }
            return line(&format!("deleted schedule {name}"));
        }
    };
    let template_type = schedule
        .job
        .as_ref()
        .map(|job| job.job_type.clone())
        .unwrap_or_default();
    let pool = pool.with_job_types(client, [(template_type, 0)]).await;
    if json {
        return pool.print(&schedule);
    }
    line(&describe(&pool, &schedule))
}

async fn create(
    client: &Client,
    pool: &Pool,
    args: CreateScheduleArgs,
) -> Result<pb::Schedule, Failure> {
    let mut job = pb::JobTemplate {
        job_type: args.job_type,
        payload_json: Some(pool.parse_struct(&args.json_payload, "--json-payload")?),
        ..Default::default()
    };
    apply_template(&mut job, args.template);
    let mut schedule = pb::Schedule {
        name: args.name,
        cron: args.cron,
        time_zone: args.time_zone.unwrap_or_default(),
        description: args.description.unwrap_or_default(),
        job: Some(job),
        ..Default::default()
    };
    apply_policies(&mut schedule, &args.policies, &mut Vec::new());
    let request = pb::CreateScheduleRequest {
        schedule: Some(schedule),
        paused: args.paused,
    };
    let response = ScheduleServiceClient::new(client.channel())
        .create_schedule(client.request(request))
        .await?
        .into_inner();
    response
        .schedule
        .ok_or_else(|| Failure::Internal("the response has no schedule".into()))
}

async fn update(
    client: &Client,
    pool: &Pool,
    args: UpdateScheduleArgs,
) -> Result<pb::Schedule, Failure> {
    let mut paths = Vec::new();
    let mut schedule = pb::Schedule {
        name: args.name.clone(),
        ..Default::default()
    };
    if let Some(cron) = args.cron {
        schedule.cron = cron;
        paths.push("cron");
    }
    if let Some(zone) = args.time_zone {
        schedule.time_zone = zone;
        paths.push("time_zone");
    }
    if let Some(description) = args.description {
        schedule.description = description;
        paths.push("description");
    }
    apply_policies(&mut schedule, &args.policies, &mut paths);
    if args.job_type.is_some() || args.json_payload.is_some() || !args.template.is_empty() {
        let current = client.schedule(&args.name).get().await?.into_proto();
        let mut job = current.job.unwrap_or_default();
        if let Some(job_type) = args.job_type {
            job.job_type = job_type;
        }
        if let Some(text) = &args.json_payload {
            job.payload_json = Some(pool.parse_struct(text, "--json-payload")?);
            job.payload = None;
        }
        if !args.template.labels.is_empty() {
            job.labels.clear();
        }
        apply_template(&mut job, args.template);
        schedule.job = Some(job);
        paths.push("job");
    }
    if paths.is_empty() {
        return Err(Failure::Input(
            "nothing to change: give at least one setting (see `jobwire schedules update --help`)"
                .into(),
        ));
    }
    let request = pb::UpdateScheduleRequest {
        schedule: Some(schedule),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.into_iter().map(str::to_owned).collect(),
        }),
    };
    let response = ScheduleServiceClient::new(client.channel())
        .update_schedule(client.request(request))
        .await?
        .into_inner();
    response
        .schedule
        .ok_or_else(|| Failure::Internal("the response has no schedule".into()))
}

/// The template options given, onto `job`; labels are added to those it has.
fn apply_template(job: &mut pb::JobTemplate, template: TemplateArgs) {
    if let Some(queue) = template.queue {
        job.queue = queue;
    }
    if let Some(priority) = template.priority {
        job.priority = Some(priority);
    }
    job.labels.extend(template.labels);
    if let Some(timeout) = template.timeout {
        job.timeout = Some(proto_duration(timeout));
    }
}

/// The policies given, onto `schedule`, each named in `paths` for an update's mask.
fn apply_policies(schedule: &mut pb::Schedule, policies: &PolicyArgs, paths: &mut Vec<&str>) {
    if let Some(overlap) = policies.overlap {
        schedule.overlap_policy = overlap.to_proto() as i32;
        paths.push("overlap_policy");
    }
    if let Some(catch_up) = policies.catch_up {
        schedule.catch_up_policy = catch_up.to_proto() as i32;
        paths.push("catch_up_policy");
    }
    if let Some(max) = policies.max_catch_up {
        schedule.max_catch_up = max;
        paths.push("max_catch_up");
    }
    if let Some(grace) = policies.misfire_grace {
        schedule.misfire_grace = Some(proto_duration(grace));
        paths.push("misfire_grace");
    }
}

fn list(pool: &Pool, json: bool, schedules: Vec<pb::Schedule>) -> Result<(), Failure> {
    if json {
        return pool.print(&pb::ListSchedulesResponse {
            schedules,
            next_page_token: String::new(),
        });
    }
    let rows = schedules
        .iter()
        .map(|schedule| {
            let job = schedule.job.clone().unwrap_or_default();
            [
                schedule.name.clone(),
                schedule.cron.clone(),
                schedule.time_zone.clone(),
                job.job_type,
                job.queue,
                if schedule.paused { "paused" } else { "" }.to_owned(),
                render::time(schedule.next_run_at.as_ref()),
                render::time(schedule.last_run_at.as_ref()),
            ]
        })
        .collect();
    line(&render::table(
        [
            "NAME", "CRON", "ZONE", "TYPE", "QUEUE", "PAUSED", "NEXT RUN", "LAST RUN",
        ],
        rows,
    ))
}

/// One schedule for people: its timing, policies and job template.
fn describe(pool: &Pool, schedule: &pb::Schedule) -> String {
    let job = schedule.job.clone().unwrap_or_default();
    let overlap = pb::OverlapPolicy::try_from(schedule.overlap_policy)
        .map(|p| render::enum_name(p.as_str_name(), "OVERLAP_POLICY_"))
        .unwrap_or_default();
    let catch_up = pb::CatchUpPolicy::try_from(schedule.catch_up_policy)
        .map(|p| render::enum_name(p.as_str_name(), "CATCH_UP_POLICY_"))
        .unwrap_or_default();
    render::fields(&[
        ("name", schedule.name.clone()),
        ("id", schedule.id.clone()),
        ("description", schedule.description.clone()),
        ("cron", schedule.cron.clone()),
        ("time zone", schedule.time_zone.clone()),
        ("paused", if schedule.paused { "yes" } else { "no" }.into()),
        ("next run", render::time(schedule.next_run_at.as_ref())),
        ("last run", render::time(schedule.last_run_at.as_ref())),
        ("last job", schedule.last_job_id.clone()),
        ("overlap", overlap),
        ("catch up", catch_up),
        ("max catch up", schedule.max_catch_up.to_string()),
        (
            "misfire grace",
            render::proto_duration(schedule.misfire_grace.as_ref()),
        ),
        ("job type", job.job_type.clone()),
        ("queue", job.queue.clone()),
        (
            "priority",
            job.priority.map(|p| p.to_string()).unwrap_or_default(),
        ),
        ("labels", render::labels(&job.labels)),
        ("timeout", render::proto_duration(job.timeout.as_ref())),
        (
            "payload",
            job.payload
                .as_ref()
                .map(|p| pool.any_text(p))
                .unwrap_or_default(),
        ),
        ("created", render::time(schedule.created_at.as_ref())),
    ])
}
