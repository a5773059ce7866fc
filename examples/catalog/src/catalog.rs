//! The catalog's table, the seed's priority bands and its idempotency key.
//!
//! Each payload's job type (its name, output, default queue and default priority) is declared
//! once, by the `(jobwire.v1.job)` option in `catalog.proto`; `jobwire-build` generates the
//! `jobwire::JobType` impls from it. A worker serving a type registers its defaults with the
//! server, which applies them to every enqueue that leaves them unset: a producer need not
//! repeat a priority or queue.

use std::ops::RangeInclusive;

use jobwire::{JobSchema, JobType};
use sha2::{Digest, Sha256};

use crate::pb;

/// The seed's four priority bands ("优先级建议"); jobwire runs higher priorities first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PriorityBand {
    /// 90-100: safety and fault repair.
    SafetyAndRepair,
    /// 70-89: triggered by a user, who is waiting.
    UserTriggered,
    /// 40-69: daily batches.
    DailyBatch,
    /// 1-39: background housekeeping.
    Background,
}

impl PriorityBand {
    /// The priorities the band spans.
    pub const fn range(self) -> RangeInclusive<i32> {
        match self {
            Self::SafetyAndRepair => 90..=100,
            Self::UserTriggered => 70..=89,
            Self::DailyBatch => 40..=69,
            Self::Background => 1..=39,
        }
    }

    /// The band a priority falls in; `None` for 0, which the seed leaves unused.
    pub fn of(priority: i32) -> Option<Self> {
        [
            Self::SafetyAndRepair,
            Self::UserTriggered,
            Self::DailyBatch,
            Self::Background,
        ]
        .into_iter()
        .find(|band| band.range().contains(&priority))
    }
}

/// One row of [`CATALOG`]: a job type and the schema and defaults generated from its option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The job type's name, such as `download.fetch`.
    pub job_type: &'static str,
    /// The payload and output messages and the type's defaults, as its workers register them.
    pub schema: JobSchema,
}

impl CatalogEntry {
    /// The payload's full protobuf name, such as `jobwire.catalog.v1.DownloadFetch`.
    pub fn payload(&self) -> &'static str {
        self.schema.payload_type()
    }
}

const fn entry<J: JobType>() -> CatalogEntry {
    CatalogEntry {
        job_type: J::JOB_TYPE,
        schema: J::SCHEMA.expect("every catalog payload carries the (jobwire.v1.job) option"),
    }
}

/// Every job type of the catalog, in the seed's order.
pub const CATALOG: &[CatalogEntry] = &[
    entry::<pb::DiscoveryScanRegistry>(),
    entry::<pb::SourceSuggestEnrich>(),
    entry::<pb::UpdateCheckBatch>(),
    entry::<pb::UpdateApplyPackage>(),
    entry::<pb::CleanupQuarantine>(),
    entry::<pb::AiAnalyze>(),
    entry::<pb::AiRecommend>(),
    entry::<pb::AiRepairPlan>(),
    entry::<pb::DownloadFetch>(),
    entry::<pb::DownloadVerify>(),
    entry::<pb::DownloadCleanup>(),
];

/// The queues the catalog's types default to: `downloads` for the three download jobs,
/// `default` for the rest. [`register_all`](crate::register_all) serves both.
pub const QUEUES: [&str; 2] = ["default", "downloads"];

/// The seed's default idempotency key: `job_type + payload_fingerprint`, here
/// `<job type>:<SHA-256 of the encoded payload, hex>` (at most 128 + 65 characters, within the
/// server's 256).
///
/// prost encodes a message's fields in tag order, so equal payloads give equal keys; the
/// catalog's messages have no maps, whose order would not be stable.
pub fn idempotency_key<J: JobType>(payload: &J) -> String {
    let digest = Sha256::digest(payload.encode_to_vec());
    format!("{}:{digest:x}", J::JOB_TYPE)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use jobwire::prost::Name;

    use super::*;

    const SAFETY: PriorityBand = PriorityBand::SafetyAndRepair;
    const USER: PriorityBand = PriorityBand::UserTriggered;
    const DAILY: PriorityBand = PriorityBand::DailyBatch;
    const BACKGROUND: PriorityBand = PriorityBand::Background;

    /// What the option of each type must say: name, queue, default priority, and the seed's
    /// band its use puts it in.
    const EXPECTED: [(&str, &str, i32, PriorityBand); 11] = [
        ("discovery.scan.registry", "default", 80, USER),
        ("source.suggest.enrich", "default", 60, DAILY),
        ("update.check.batch", "default", 50, DAILY),
        ("update.apply.package", "default", 75, USER),
        ("cleanup.quarantine", "default", 90, SAFETY),
        ("ai.analyze", "default", 45, DAILY),
        ("ai.recommend", "default", 80, USER),
        ("ai.repair.plan", "default", 90, SAFETY),
        ("download.fetch", "downloads", 70, USER),
        ("download.verify", "downloads", 72, USER),
        ("download.cleanup", "downloads", 20, BACKGROUND),
    ];

    #[test]
    fn the_catalog_has_the_seeds_eleven_types_each_inside_its_band() {
        assert_eq!(CATALOG.len(), 11);
        let names: HashSet<_> = CATALOG.iter().map(|e| e.job_type).collect();
        assert_eq!(names.len(), 11, "names are unique");
        for (e, (name, queue, priority, band)) in CATALOG.iter().zip(EXPECTED) {
            assert_eq!(e.job_type, name);
            assert!(QUEUES.contains(&queue), "{name} defaults to {queue}");
            assert_eq!(PriorityBand::of(priority), Some(band), "{name}");
            let payload = e.payload();
            let output = e.schema.output_type();
            assert_eq!(output, format!("{payload}Output"), "{name}");
            let mut expected = JobSchema::new(payload, output, pb::JOBWIRE_DESCRIPTOR_SET)
                .queue(queue)
                .priority(priority);
            if name == "update.apply.package" {
                // A HIGH risk update waits for approval, a day at most.
                expected = expected
                    .approval_when(&[("risk_level", &["RISK_LEVEL_HIGH"])])
                    .approval_timeout_ms(86_400_000);
            }
            assert_eq!(
                e.schema, expected,
                "{name}: the generated schema carries the option's defaults"
            );
        }
        assert_eq!(
            CATALOG[0].payload(),
            pb::DiscoveryScanRegistry::full_name(),
            "the table names the generated message"
        );
        assert_eq!(
            <pb::DownloadFetch as JobType>::JOB_TYPE,
            "download.fetch",
            "the generated impl"
        );
        assert_eq!(CATALOG[8].job_type, "download.fetch");
        assert_eq!(PriorityBand::of(0), None);
    }

    #[test]
    fn equal_payloads_share_a_key_and_different_ones_do_not() {
        let a = pb::UpdateCheckBatch {
            software_ids: vec![1, 2, 3],
            provider: "winget".into(),
            include_prerelease: false,
        };
        let mut b = a.clone();
        assert_eq!(idempotency_key(&a), idempotency_key(&b));
        b.include_prerelease = true;
        assert_ne!(idempotency_key(&a), idempotency_key(&b));
        let key = idempotency_key(&a);
        assert!(key.starts_with("update.check.batch:"));
        assert_eq!(key.len(), "update.check.batch:".len() + 64);
    }
}
