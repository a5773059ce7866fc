//! Each payload message tied to its job type: the dotted name workers subscribe to, the output
//! its handler returns, the seed's priority band and the default priority inside it.
//!
//! The table lives here and nowhere else: [`CATALOG`] is built from the same trait constants
//! that producers use, so the list, the names and the priorities cannot drift apart.

use std::ops::RangeInclusive;

use jobwire::JobType;
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

/// A job type of the catalog: a [`JobType`] with the seed's band and default priority.
///
/// Enqueue with `.priority(J::DEFAULT_PRIORITY)`: the server's own default knows nothing of
/// the seed's bands.
pub trait CatalogJob: JobType {
    /// The band the job type's use puts it in.
    const BAND: PriorityBand;
    /// The priority to enqueue it at unless there is a reason to differ; inside [`Self::BAND`].
    const DEFAULT_PRIORITY: i32;
}

/// One row of [`CATALOG`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The job type's name, such as `download.fetch`.
    pub job_type: &'static str,
    /// The payload's full protobuf name, such as `jobwire.catalog.v1.DownloadFetch`.
    pub payload: &'static str,
    /// The seed's band.
    pub band: PriorityBand,
    /// The default priority.
    pub default_priority: i32,
}

const fn entry<J: CatalogJob>(payload: &'static str) -> CatalogEntry {
    CatalogEntry {
        job_type: J::JOB_TYPE,
        payload,
        band: J::BAND,
        default_priority: J::DEFAULT_PRIORITY,
    }
}

/// Ties a payload to its name, output, band and default priority, and lists its full protobuf
/// name for [`CATALOG`].
macro_rules! catalog {
    ($($payload:ident => $output:ident, $name:literal, $band:ident, $priority:literal;)*) => {
        $(
            impl JobType for pb::$payload {
                const JOB_TYPE: &'static str = $name;
                type Output = pb::$output;
            }

            impl CatalogJob for pb::$payload {
                const BAND: PriorityBand = PriorityBand::$band;
                const DEFAULT_PRIORITY: i32 = $priority;
            }
        )*

        /// Every job type of the catalog, in the seed's order.
        pub const CATALOG: &[CatalogEntry] = &[
            $(entry::<pb::$payload>(concat!("jobwire.catalog.v1.", stringify!($payload))),)*
        ];
    };
}

catalog! {
    DiscoveryScanRegistry => DiscoveryScanRegistryOutput, "discovery.scan.registry", UserTriggered, 80;
    SourceSuggestEnrich => SourceSuggestEnrichOutput, "source.suggest.enrich", DailyBatch, 60;
    UpdateCheckBatch => UpdateCheckBatchOutput, "update.check.batch", DailyBatch, 50;
    UpdateApplyPackage => UpdateApplyPackageOutput, "update.apply.package", UserTriggered, 75;
    CleanupQuarantine => CleanupQuarantineOutput, "cleanup.quarantine", SafetyAndRepair, 90;
    AiAnalyze => AiAnalyzeOutput, "ai.analyze", DailyBatch, 45;
    AiRecommend => AiRecommendOutput, "ai.recommend", UserTriggered, 80;
    AiRepairPlan => AiRepairPlanOutput, "ai.repair.plan", SafetyAndRepair, 90;
    DownloadFetch => DownloadFetchOutput, "download.fetch", UserTriggered, 70;
    DownloadVerify => DownloadVerifyOutput, "download.verify", UserTriggered, 72;
    DownloadCleanup => DownloadCleanupOutput, "download.cleanup", Background, 20;
}

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

    use prost::Name;

    use super::*;

    #[test]
    fn the_catalog_has_the_seeds_eleven_types_each_inside_its_band() {
        assert_eq!(CATALOG.len(), 11);
        let names: HashSet<_> = CATALOG.iter().map(|e| e.job_type).collect();
        assert_eq!(names.len(), 11, "names are unique");
        for e in CATALOG {
            assert!(
                e.band.range().contains(&e.default_priority),
                "{} at {} is outside {:?}",
                e.job_type,
                e.default_priority,
                e.band
            );
            assert_eq!(PriorityBand::of(e.default_priority), Some(e.band));
        }
        assert_eq!(
            CATALOG[0].payload,
            pb::DiscoveryScanRegistry::full_name(),
            "the table names the generated message"
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
