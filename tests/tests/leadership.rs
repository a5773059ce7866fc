//! Leadership survives a stalled leader (invariant 10): with three replicas and the leader
//! stopped (SIGSTOP) for 20 s, another takes the singleton loops over within the lease's time to
//! live, so cron ticks are neither lost nor doubled, delayed jobs start within TTL + 1 s of due,
//! and expired leases are reaped; when the stalled leader wakes, it does not act as leader.

mod support;

use std::time::Duration;

use chrono::{DateTime, Utc};
use jobwire_proto::v1::{self as pb, schedule_service_client::ScheduleServiceClient};
use jobwire_tests::{ServerProcess, eventually, test_db};
use nix::sys::signal::Signal;
use support::{RawWorker, channel, enqueue, jobs, spec};

const TTL: Duration = Duration::from_secs(2);
const STALL: Duration = Duration::from_secs(20);
const WAIT: Duration = Duration::from_secs(60);

fn args() -> Vec<&'static str> {
    vec![
        "--leader-ttl",
        "2s",
        "--lease-duration",
        "2s",
        "--heartbeat-interval",
        "500ms",
        "--reap-interval",
        "100ms",
        "--poll-interval",
        "500ms",
    ]
}

/// The replica that says it took leadership last.
fn leader_of(replicas: &[ServerProcess]) -> Option<usize> {
    replicas
        .iter()
        .position(|r| r.stderr_tail(10_000).contains("leadership taken"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_leader_loses_the_role_and_does_not_act_when_it_wakes() {
    let db = test_db().await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(ServerProcess::start(&db, &args()).await);
    }
    let leader = eventually("a leader", WAIT, || {
        let found = leader_of(&replicas);
        async move { found }
    })
    .await;
    let follower = (leader + 1) % 3;
    let url = replicas[follower].url();

    // A schedule every second, every missed tick made up: ticks must come out once each.
    let mut schedules = ScheduleServiceClient::new(channel(&url).await);
    schedules
        .create_schedule(pb::CreateScheduleRequest {
            schedule: Some(pb::Schedule {
                name: "every-second".into(),
                cron: "* * * * * *".into(),
                catch_up_policy: pb::CatchUpPolicy::All.into(),
                max_catch_up: 1000,
                job: Some(pb::JobTemplate {
                    job_type: "leader.tick".into(),
                    payload: Some(support::any_bytes("test.Payload", vec![])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("schedule");

    // A lease that will lapse during the stall: taken, then abandoned.
    let mut client = jobs(&url).await;
    let abandoned = enqueue(&mut client, spec("leader.lapse", "default")).await;
    let mut worker = RawWorker::connect(&url, "gone", &["leader.lapse"], 1).await;
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, abandoned.id);
    drop(worker);

    // Due just after the stall begins.
    let mut delayed = spec("leader.delayed", "default");
    delayed.schedule = Some(pb::job_spec::Schedule::Delay(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    }));
    let delayed = enqueue(&mut client, delayed).await;
    let mut starter = RawWorker::connect(&url, "starter", &["leader.delayed"], 1).await;

    let stalled_at = Utc::now();
    replicas[leader].signal(Signal::SIGSTOP);

    let lease = starter
        .lease_within(WAIT)
        .await
        .expect("the delayed job starts while the leader is stalled");
    assert_eq!(lease.job_id, delayed.id);
    let started = support::get(&mut client, &delayed.id).await;
    let due = ts(started.run_at.as_ref());
    let began = ts(started.started_at.as_ref());
    assert!(
        began <= due + chrono::Duration::from_std(TTL + Duration::from_secs(1)).expect("small"),
        "due {due}, started {began}: more than TTL + 1 s late"
    );

    let reaped = eventually("the lapsed lease is reaped", WAIT, || {
        let (mut client, id) = (client.clone(), abandoned.id.clone());
        async move {
            let job = support::get(&mut client, &id).await;
            (job.state != pb::JobState::Running as i32).then_some(job)
        }
    })
    .await;
    assert!(
        ts(reaped.updated_at.as_ref())
            < stalled_at + chrono::Duration::from_std(STALL).expect("small"),
        "reaped during the stall: {:?}",
        reaped.updated_at
    );

    tokio::time::sleep(
        STALL.saturating_sub((Utc::now() - stalled_at).to_std().unwrap_or_default()),
    )
    .await;
    replicas[leader].signal(Signal::SIGCONT);
    eventually("the old leader finds it lost the role", WAIT, || {
        let log = replicas[leader].stderr_tail(10_000);
        async move { log.contains("leadership lost").then_some(()) }
    })
    .await;
    // Let every replica's loops run a few passes after the wake-up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = replicas[leader].stderr_tail(10_000);
    let woke = log.rfind("leadership lost").expect("the loss is logged");
    assert!(
        !log[woke..].contains("leadership taken"),
        "the old leader took the role back at once:\n{}",
        &log[woke..]
    );

    // Every tick from the schedule's first to its last came out once: none lost to the stall,
    // none doubled by two leaders.
    let ticks: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT schedule_tick FROM jobs WHERE schedule_tick IS NOT NULL ORDER BY schedule_tick",
    )
    .fetch_all(&db.pool().await)
    .await
    .expect("ticks");
    assert!(ticks.len() > 20, "only {} ticks", ticks.len());
    for pair in ticks.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            1,
            "ticks {} and {} are not one second apart",
            pair[0],
            pair[1]
        );
    }
}

fn ts(t: Option<&prost_types::Timestamp>) -> DateTime<Utc> {
    let t = t.expect("a timestamp");
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).expect("nanos")).expect("valid")
}
