//! The seed's two scheduler templates ("Scheduler 任务模板"), as constants and as ready-made
//! [`CreateSchedule`] builders.
//!
//! Both run at a daily-batch priority (50), below anything a user is waiting for, and skip a
//! tick while the previous run is still going: a second scan or check of the same machine on
//! top of the first one would only repeat it.

use jobwire::{Client, CreateSchedule, JobType, OverlapPolicy};

use crate::pb;

/// A cron template of the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CronTemplate {
    /// The schedule's name, unique within a tenant.
    pub name: &'static str,
    /// The job type each tick enqueues.
    pub job_type: &'static str,
    /// The seed's recommended cron line (5 fields, in the schedule's time zone).
    pub cron: &'static str,
    /// The priority of the jobs it enqueues: the daily-batch band.
    pub priority: i32,
}

/// `daily_update_check`: an `update.check.batch` of all known software at 03:00.
pub const DAILY_UPDATE_CHECK: CronTemplate = CronTemplate {
    name: "daily_update_check",
    job_type: <pb::UpdateCheckBatch as JobType>::JOB_TYPE,
    cron: "0 3 * * *",
    priority: 50,
};

/// `daily_registry_scan`: a `discovery.scan.registry` at 02:00, an hour before the update
/// check, so the check sees what the scan found.
pub const DAILY_REGISTRY_SCAN: CronTemplate = CronTemplate {
    name: "daily_registry_scan",
    job_type: <pb::DiscoveryScanRegistry as JobType>::JOB_TYPE,
    cron: "0 2 * * *",
    priority: 50,
};

/// Both templates.
pub const TEMPLATES: [CronTemplate; 2] = [DAILY_UPDATE_CHECK, DAILY_REGISTRY_SCAN];

/// The `daily_update_check` schedule for `provider` (such as "winget"), checking every known
/// piece of software (an empty id list); set a time zone or queue on it, then await it.
pub fn daily_update_check(client: &Client, provider: &str) -> CreateSchedule<pb::UpdateCheckBatch> {
    let payload = pb::UpdateCheckBatch {
        software_ids: Vec::new(),
        provider: provider.to_owned(),
        include_prerelease: false,
    };
    from_template(client, DAILY_UPDATE_CHECK, payload)
}

/// The `daily_registry_scan` schedule: both hives, as a scheduled scan.
pub fn daily_registry_scan(client: &Client) -> CreateSchedule<pb::DiscoveryScanRegistry> {
    let payload = pb::DiscoveryScanRegistry {
        source: pb::ScanSource::Registry.into(),
        include_hklm: true,
        include_hkcu: true,
        scan_reason: pb::ScanReason::Scheduled.into(),
    };
    from_template(client, DAILY_REGISTRY_SCAN, payload)
}

fn from_template<J: JobType>(
    client: &Client,
    template: CronTemplate,
    payload: J,
) -> CreateSchedule<J> {
    client
        .create_schedule(template.name, template.cron, payload)
        .priority(template.priority)
        .overlap(OverlapPolicy::Skip)
        .description(format!("seed template {}", template.name))
}
