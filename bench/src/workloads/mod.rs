//! One module per workload. Each returns the JSON object it prints.

pub mod cross_replica;

pub type Report = serde_json::Map<String, serde_json::Value>;
