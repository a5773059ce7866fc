//! Cron schedules through ScheduleService: one tick, one job, whichever of several replicas
//! runs the schedules, through a SIGKILL of the one that does; overlap and catch-up policies;
//! the calls an operator makes; and refusals of bad input.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jobwire::{CatchUpPolicy, Client, JobState, OverlapPolicy, tonic::Code};
use jobwire_tests::{ServerProcess, eventually, jobs::Sleep, test_db};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn payload() -> Sleep {
    Sleep {
        millis: 0,
        ..Default::default()
    }
}

/// The ticks of a schedule's jobs, oldest first.
async fn ticks(pool: &PgPool, schedule: &str) -> Vec<DateTime<Utc>> {
    let id = Uuid::parse_str(schedule).expect("schedule id");
    let rows: Vec<(DateTime<Utc>,)> = sqlx::query_as(
        "SELECT schedule_tick FROM jobs WHERE schedule_id = $1 AND schedule_tick IS NOT NULL \
         ORDER BY schedule_tick",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .expect("ticks");
    rows.into_iter().map(|(t,)| t).collect()
}

/// The pid of the server process holding leadership of this database (an unexpired lease).
async fn leader_pid(pool: &PgPool) -> Option<u32> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT holder_app FROM leader WHERE expires_at > now()")
            .fetch_optional(pool)
            .await
            .expect("leader");
    row.and_then(|(name,)| name.strip_prefix("jobwire-server/")?.parse().ok())
}

/// Every tick one second after the one before: none doubled, none lost.
fn assert_contiguous(ticks: &[DateTime<Utc>]) {
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::TimeDelta::seconds(1),
            "ticks {} then {}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test]
async fn every_second_on_three_replicas_makes_one_job_per_tick_through_a_leader_kill() {
    let db = test_db().await;
    let pool = db.pool().await;
    let mut servers = [
        ServerProcess::start(&db, &[]).await,
        ServerProcess::start(&db, &[]).await,
        ServerProcess::start(&db, &[]).await,
    ];
    let client = Client::connect(servers[0].url()).await.expect("client");
    let schedule = client
        .create_schedule("every-second", "* * * * * *", payload())
        .queue("cron")
        .catch_up(CatchUpPolicy::All)
        .await
        .expect("created");
    assert!(schedule.next_run_at().is_some());

    tokio::time::sleep(Duration::from_secs(10)).await;
    client
        .schedule("every-second")
        .pause()
        .await
        .expect("paused");
    let first = ticks(&pool, schedule.id()).await;
    println!("10 s on 3 replicas: {} jobs", first.len());
    assert!(
        (9..=11).contains(&first.len()),
        "{} jobs in 10 s",
        first.len()
    );
    assert_contiguous(&first);

    // Kill the replica that runs the schedules while they tick.
    let resumed = client
        .schedule("every-second")
        .resume()
        .await
        .expect("resumed");
    assert!(!resumed.is_paused());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = eventually("a leader", WAIT, || leader_pid(&pool)).await;
    let victim = servers
        .iter()
        .position(|s| s.pid() == pid)
        .expect("the leader is one of our servers");
    let killed_at = Utc::now();
    let started = Instant::now();
    servers[victim].kill();
    let new_pid = eventually("a new leader", WAIT, || async {
        leader_pid(&pool).await.filter(|p| *p != pid)
    })
    .await;
    let handover = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let survivor = servers.iter().find(|s| s.pid() != pid).expect("a survivor");
    let client = Client::connect(survivor.url()).await.expect("client");
    client
        .schedule("every-second")
        .pause()
        .await
        .expect("paused");

    let all = ticks(&pool, schedule.id()).await;
    let second: Vec<_> = all
        .iter()
        .copied()
        .filter(|t| *t > *first.last().expect("ticks"))
        .collect();
    let after_kill = second.iter().filter(|t| **t > killed_at).count();
    println!(
        "leader {pid} killed; {new_pid} took over after {handover:?}; {} ticks after the \
         resume, {after_kill} after the kill",
        second.len()
    );
    assert!(after_kill >= 4, "the schedule went on after the kill");
    assert_contiguous(&second);
    let (jobs, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT schedule_tick) FROM jobs WHERE schedule_id = $1",
    )
    .bind(Uuid::parse_str(schedule.id()).expect("id"))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(jobs, distinct, "no tick made two jobs");
}

#[tokio::test]
async fn overlap_policies_skip_or_cancel_an_unfinished_run() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    // No worker serves the queue, so every job stays unfinished.
    let skip = client
        .create_schedule("skip", "* * * * * *", payload())
        .queue("nobody")
        .overlap(OverlapPolicy::Skip)
        .await
        .expect("created");
    let cancel = client
        .create_schedule("cancel", "* * * * * *", payload())
        .queue("nobody")
        .overlap(OverlapPolicy::CancelPrevious)
        .await
        .expect("created");
    eventually("four runs of the cancelling schedule", WAIT, || async {
        (ticks(&pool, cancel.id()).await.len() >= 4).then_some(())
    })
    .await;
    client.schedule("skip").pause().await.expect("paused");
    client.schedule("cancel").pause().await.expect("paused");

    assert_eq!(
        ticks(&pool, skip.id()).await.len(),
        1,
        "later ticks were skipped while the first job waited"
    );
    let states: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT state::text, cancel_reason FROM jobs WHERE schedule_id = $1 \
         ORDER BY schedule_tick",
    )
    .bind(Uuid::parse_str(cancel.id()).expect("id"))
    .fetch_all(&pool)
    .await
    .expect("states");
    let (last, earlier) = states.split_last().expect("jobs");
    assert_eq!(last.0, "available");
    for (state, reason) in earlier {
        assert_eq!(state, "cancelled");
        assert!(
            reason.as_deref().is_some_and(|r| r.contains("next tick")),
            "{reason:?}"
        );
    }
}

#[tokio::test]
async fn missed_ticks_follow_the_catch_up_policy_after_downtime() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let mut ids = Vec::new();
    for (name, policy) in [
        ("once", CatchUpPolicy::Once),
        ("skip", CatchUpPolicy::Skip),
        ("all", CatchUpPolicy::All),
    ] {
        let s = client
            .create_schedule(name, "* * * * *", payload())
            .queue("nobody")
            .catch_up(policy)
            .max_catch_up(3)
            .paused()
            .await
            .expect("created");
        ids.push(Uuid::parse_str(s.id()).expect("id"));
    }
    // As if no replica had run for ten minutes: the last tick seen was ten minutes ago.
    sqlx::query(
        "UPDATE schedules SET paused = false, \
             next_run_at = date_trunc('minute', now()) - interval '10 minutes' \
         WHERE id = ANY($1)",
    )
    .bind(&ids)
    .execute(&pool)
    .await
    .expect("rewound");
    eventually("the schedules fired", WAIT, || async {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM schedules WHERE id = ANY($1) AND next_run_at <= now()",
        )
        .bind(&ids)
        .fetch_one(&pool)
        .await
        .expect("due");
        (waiting == 0).then_some(())
    })
    .await;
    let mut counts = Vec::new();
    for id in &ids {
        counts.push(ticks(&pool, &id.to_string()).await.len());
    }
    // The current minute's tick is on time (within the 60 s grace); ten were missed.
    assert_eq!(counts, vec![2, 1, 4], "once, skip, all (at most 3 missed)");
}

#[tokio::test]
async fn schedules_are_managed_through_the_sdk() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let created = client
        .create_schedule("daily_update_check", "0 3 * * *", payload())
        .time_zone("Europe/Berlin")
        .description("the seeds' nightly update check")
        .queue("updates")
        .priority(50)
        .await
        .expect("created");
    assert_eq!(created.time_zone(), "Europe/Berlin");
    assert_eq!(created.queue(), "updates");
    assert_eq!(created.payload::<Sleep>().expect("payload"), payload());
    // 03:00 in Berlin is 02:00 UTC in winter, 01:00 in summer.
    let next: DateTime<Utc> = created.next_run_at().expect("next").into();
    assert!(
        ["01:00:00", "02:00:00"].contains(&next.format("%H:%M:%S").to_string().as_str()),
        "{next}"
    );

    let again = client
        .create_schedule("daily_update_check", "0 3 * * *", payload())
        .await
        .expect_err("duplicate");
    assert_eq!(again.code(), Some(Code::AlreadyExists));

    let updated = client
        .schedule("daily_update_check")
        .update()
        .cron("0 2 * * *")
        .await
        .expect("updated");
    assert_eq!(updated.cron(), "0 2 * * *");
    assert_ne!(updated.next_run_at(), created.next_run_at());

    let job = client
        .schedule("daily_update_check")
        .trigger()
        .await
        .expect("triggered");
    assert_eq!(job.schedule_id(), Some(created.id()));
    assert_eq!(job.schedule_tick(), None);
    assert_eq!(job.state(), JobState::Available);
    let after = client
        .schedule("daily_update_check")
        .get()
        .await
        .expect("get");
    assert_eq!(
        after.last_job_id().map(|id| id.to_string()),
        Some(job.id().to_string())
    );

    let listed = client.list_schedules().await.expect("list");
    assert_eq!(listed.len(), 1);
    client
        .schedule("daily_update_check")
        .delete()
        .await
        .expect("deleted");
    let gone = client
        .schedule("daily_update_check")
        .get()
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), Some(Code::NotFound));
    assert!(gone.to_string().contains("daily_update_check"), "{gone}");
}

#[tokio::test]
async fn bad_schedule_requests_name_the_field() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let cases: [(&str, &str, &str); 5] = [
        ("61 * * * *", "UTC", "schedule.cron"),
        ("* * *", "UTC", "schedule.cron"),
        ("* * * * * * 2030", "UTC", "schedule.cron"),
        ("not cron at all", "UTC", "schedule.cron"),
        ("0 3 * * *", "Mars/Olympus", "schedule.time_zone"),
    ];
    for (cron, zone, field) in cases {
        let err = client
            .create_schedule("bad", cron, payload())
            .time_zone(zone)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{cron} {zone}");
        assert!(
            err.to_string().contains(&format!("{field}: ")),
            "{field} named in {err}"
        );
    }

    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut raw = jobwire::proto::v1::schedule_service_client::ScheduleServiceClient::new(channel);
    let status = raw
        .create_schedule(jobwire::proto::v1::CreateScheduleRequest {
            schedule: Some(jobwire::proto::v1::Schedule {
                name: "neg".into(),
                cron: "* * * * *".into(),
                max_catch_up: -5,
                job: Some(jobwire::proto::v1::JobTemplate {
                    job_type: "test.sleep".into(),
                    payload: Some(prost_types::Any {
                        type_url: "type.googleapis.com/jobwire.tests.Sleep".into(),
                        value: Vec::new(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            paused: false,
        })
        .await
        .expect_err("negative");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("schedule.max_catch_up"),
        "{status:?}"
    );
    let status = raw
        .create_schedule(jobwire::proto::v1::CreateScheduleRequest {
            schedule: Some(jobwire::proto::v1::Schedule {
                name: "nojob".into(),
                cron: "* * * * *".into(),
                ..Default::default()
            }),
            paused: false,
        })
        .await
        .expect_err("no template");
    assert!(status.message().starts_with("schedule.job"), "{status:?}");
    let status = raw
        .update_schedule(jobwire::proto::v1::UpdateScheduleRequest {
            schedule: Some(jobwire::proto::v1::Schedule {
                name: "ghost".into(),
                cron: "* * * * *".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["cron".into()],
            }),
        })
        .await
        .expect_err("unknown schedule");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("ghost"), "{status:?}");
    let status = raw
        .update_schedule(jobwire::proto::v1::UpdateScheduleRequest {
            schedule: Some(jobwire::proto::v1::Schedule {
                name: "ghost".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["next_run_at".into()],
            }),
        })
        .await
        .expect_err("not updatable");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("update_mask.paths[0]"),
        "{status:?}"
    );
    for name in ["ghost", ""] {
        let status = raw
            .trigger_schedule(jobwire::proto::v1::TriggerScheduleRequest { name: name.into() })
            .await
            .expect_err("refused");
        let want = if name.is_empty() {
            Code::InvalidArgument
        } else {
            Code::NotFound
        };
        assert_eq!(status.code(), want, "{name:?}: {status:?}");
    }
    assert!(client.list_schedules().await.expect("list").is_empty());
}
