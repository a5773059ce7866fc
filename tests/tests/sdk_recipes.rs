//! Recipes (the Rust SDK's `jobwire::Recipe`) against the real server: one recipe applied to
//! two job types gives both its queue, priority, retry policy, labels, timeout and approval,
//! as GetJob shows; a setting of the call's own wins, and labels merge.

use std::time::Duration;

use jobwire::{Client, JobState, Recipe, RetryPolicy};
use jobwire_tests::jobs::{Sleep, Steps};
use jobwire_tests::{ServerProcess, test_db};

#[tokio::test]
async fn a_recipe_gives_many_job_types_its_settings_and_a_call_overrides_it() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let recipe = Recipe::new()
        .queue("backups")
        .priority(30)
        .retry(RetryPolicy::new().max_attempts(7))
        .timeout(Duration::from_secs(600))
        .label("team", "storage")
        .label("tier", "gold")
        .needs_approval();

    let sleep = client
        .enqueue_with(&recipe, Sleep::succeeding(1, 1))
        .await
        .expect("enqueue");
    let steps = client
        .enqueue(Steps {
            steps: 3,
            step_millis: 1,
        })
        .recipe(&recipe)
        .await
        .expect("enqueue");
    for handle in [sleep.get().await, steps.get().await] {
        let job = handle.expect("get");
        assert_eq!(job.queue(), "backups", "{}", job.job_type());
        assert_eq!(job.priority(), 30);
        assert_eq!(job.max_attempts(), Some(7));
        assert_eq!(job.timeout(), Some(Duration::from_secs(600)));
        assert_eq!(job.state(), JobState::AwaitingApproval);
        assert_eq!(
            job.labels().get("team").map(String::as_str),
            Some("storage")
        );
        assert_eq!(job.labels().get("tier").map(String::as_str), Some("gold"));
    }

    // The call's own settings win, whether set before or after the recipe.
    let overridden = client
        .enqueue(Sleep::succeeding(1, 2))
        .priority(90)
        .recipe(&recipe)
        .queue("urgent")
        .label("tier", "silver")
        .label("ticket", "42")
        .retry(RetryPolicy::no_retries())
        .await
        .expect("enqueue");
    let job = overridden.get().await.expect("get");
    assert_eq!(job.queue(), "urgent");
    assert_eq!(job.priority(), 90);
    assert_eq!(job.max_attempts(), Some(1));
    assert_eq!(
        job.timeout(),
        Some(Duration::from_secs(600)),
        "kept from the recipe"
    );
    let mut labels: Vec<(&str, &str)> = job
        .labels()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    labels.sort_unstable();
    assert_eq!(
        labels,
        [("team", "storage"), ("ticket", "42"), ("tier", "silver")]
    );

    // Without a recipe, nothing of it applies.
    let plain = client
        .enqueue(Sleep::succeeding(1, 3))
        .await
        .expect("enqueue")
        .get()
        .await
        .expect("get");
    assert_eq!(plain.queue(), "default");
    assert!(plain.labels().is_empty());
    assert_eq!(plain.state(), JobState::Available);
}
