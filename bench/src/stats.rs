//! Latency percentiles, computed from every sample (no histogram buckets to blur the tail).

use std::time::Duration;

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for an empty sample.
    pub fn of(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((samples.len() as f64) * q).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1000.0
        };
        Some(Self {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: at(1.0),
        })
    }

    /// Adds `p50_ms` .. `max_ms` to a JSON object, rounded to microseconds.
    pub fn write_to(&self, object: &mut serde_json::Map<String, serde_json::Value>) {
        self.write_as("", object);
    }

    /// Adds `{prefix}p50_ms` .. `{prefix}max_ms`, for a stage of a latency measured whole.
    pub fn write_as(&self, prefix: &str, object: &mut serde_json::Map<String, serde_json::Value>) {
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        for (name, value) in [
            ("p50", self.p50),
            ("p95", self.p95),
            ("p99", self.p99),
            ("max", self.max),
        ] {
            object.insert(format!("{prefix}{name}_ms"), round(value).into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut samples).expect("samples");
        assert_eq!(p.p50, 50.0);
        assert_eq!(p.p95, 95.0);
        assert_eq!(p.p99, 99.0);
        assert_eq!(p.max, 100.0);
        assert!(Percentiles::of(&mut []).is_none());

        let mut object = serde_json::Map::new();
        p.write_as("stage_", &mut object);
        assert_eq!(object.get("stage_p99_ms"), Some(&serde_json::json!(99.0)));
        assert_eq!(object.len(), 4);
    }
}
