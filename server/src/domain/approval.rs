//! When a job needs an operator's approval, beyond asking for it: a job type's conditions on
//! the payload, such as `risk_level == "high"`.
//!
//! Field equality rather than an expression language: a rule names a field the registry can
//! check against the payload's schema when the type is registered (a misspelt field is refused
//! then, not silently false at every enqueue), it reads the same in the `(jobwire.v1.job)`
//! option as in GetJobType, and it covers the rules the seeds ask for. Conditions on several
//! fields at once, or comparisons, would need an expression language such as CEL.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A condition on a payload: `field` (a path of field names joined by `.`) equals one of
/// `equals`, compared in the proto3 JSON form of the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// The path as the rule names it: proto field names.
    pub field: String,
    /// The same path in the names of the proto3 JSON form (lowerCamelCase), which the payload
    /// is compared in; worked out from the schema at registration.
    #[serde(default)]
    pub json_field: String,
    pub equals: Vec<String>,
    /// The text of the field's default value, which the JSON form leaves out: `""`, `0`,
    /// `false`, or the enum's first value name. Worked out from the schema at registration.
    #[serde(default)]
    pub absent: String,
}

impl Condition {
    /// Whether the condition holds of a payload in its JSON form. A field left at its default
    /// is absent from the JSON form; it compares as [`absent`](Self::absent).
    pub fn holds(&self, payload: &Value) -> bool {
        let default = self.absent.as_str();
        let mut at = payload;
        let path = if self.json_field.is_empty() {
            &self.field
        } else {
            &self.json_field
        };
        for part in path.split('.') {
            match at.get(part) {
                Some(next) => at = next,
                None => return self.equals.iter().any(|v| v == default),
            }
        }
        let text = match at {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::Null => default.to_owned(),
            // Repeated fields and messages are refused at registration.
            Value::Array(_) | Value::Object(_) => return false,
        };
        self.equals.contains(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn condition(field: &str, equals: &[&str]) -> Condition {
        Condition {
            field: field.into(),
            json_field: String::new(),
            equals: equals.iter().map(|s| (*s).to_owned()).collect(),
            absent: String::new(),
        }
    }

    fn with_absent(mut c: Condition, absent: &str) -> Condition {
        c.absent = absent.into();
        c
    }

    #[test]
    fn a_field_equal_to_a_listed_value_holds_and_another_does_not() {
        let high = condition("risk_level", &["high", "critical"]);
        assert!(high.holds(&json!({"risk_level": "high"})));
        assert!(high.holds(&json!({"risk_level": "critical"})));
        assert!(!high.holds(&json!({"risk_level": "low"})));
    }

    #[test]
    fn nested_fields_numbers_and_booleans_compare_as_json_writes_them() {
        assert!(
            with_absent(condition("target.env", &["prod"]), "")
                .holds(&json!({"target": {"env": "prod"}}))
        );
        assert!(with_absent(condition("count", &["3"]), "0").holds(&json!({"count": 3})));
        // int64 travels as a string in proto3 JSON.
        assert!(with_absent(condition("size", &["3"]), "0").holds(&json!({"size": "3"})));
        assert!(with_absent(condition("force", &["true"]), "false").holds(&json!({"force": true})));
        assert!(
            !with_absent(condition("force", &["true"]), "false").holds(&json!({"force": false}))
        );
    }

    #[test]
    fn the_json_path_is_what_is_compared() {
        let mut c = condition("risk_level", &["high"]);
        c.json_field = "riskLevel".into();
        assert!(c.holds(&json!({"riskLevel": "high"})));
        assert!(!c.holds(&json!({"risk_level": "high"})));
    }

    #[test]
    fn an_absent_field_compares_as_its_default() {
        assert!(
            with_absent(
                condition("risk_level", &["RISK_LEVEL_LOW"]),
                "RISK_LEVEL_LOW"
            )
            .holds(&json!({}))
        );
        assert!(!with_absent(condition("risk_level", &["high"]), "").holds(&json!({})));
        assert!(with_absent(condition("target.env", &[""]), "").holds(&json!({})));
    }
}
