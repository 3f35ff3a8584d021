//! `spec.delivery`, shared by Listener and WebhookUser: how deliveries are retried and for how
//! long they are kept. Field names follow Knative Eventing's `delivery` block.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::delivery::{
    format_iso_duration, parse_iso_duration, Backoff, DeliveryOverrides, DurationError, RetryPolicy,
};

/// A CEL expression turning an ISO-8601 `PT…` duration into a CEL duration: `PT1M30S` becomes
/// `1m30s`, which CEL's `duration()` reads. Only valid once the pattern rule has matched.
macro_rules! cel_duration {
    ($field:literal) => {
        concat!("duration(", $field, ".substring(2).lowerAscii())")
    };
}

/// The rule every duration field carries: the ISO-8601 form the operator parses, and positive.
macro_rules! duration_rule {
    () => {
        kube::core::Rule::new(concat!(
            "self.matches('^PT([0-9]+H)?([0-9]+M)?([0-9]+([.][0-9]+)?S)?$') && self != 'PT' && ",
            cel_duration!("self"),
            " > duration('0s')"
        ))
        .message("must be a positive ISO-8601 duration of hours, minutes and seconds, such as PT2S, PT0.5S or PT1M30S")
    };
}

/// How deliveries are made for a Listener, or for every Listener of a WebhookUser. Each field
/// left out comes from the next layer: the Listener's over its owner's over the operator's
/// defaults. Durations are ISO-8601 in hours, minutes and seconds (`PT2S`, `PT1M30S`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(concat!(
    "!has(self.timeout) || !has(self.maxAge) || ",
    "!self.timeout.matches('^PT([0-9]+H)?([0-9]+M)?([0-9]+([.][0-9]+)?S)?$') || self.timeout == 'PT' || ",
    "!self.maxAge.matches('^PT([0-9]+H)?([0-9]+M)?([0-9]+([.][0-9]+)?S)?$') || self.maxAge == 'PT' || ",
    cel_duration!("self.timeout"), " <= ", cel_duration!("self.maxAge")
)).message("timeout must not be longer than maxAge"))]
pub struct DeliverySpec {
    /// Attempts per delivery, the first one included (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    #[x_kube(validation = kube::core::Rule::new("self >= 1").message("retry must be at least 1: it counts every attempt, the first one included"))]
    pub retry: Option<u32>,

    /// How the wait between attempts grows: `exponential` (`backoffDelay × 2^(n−1)` after
    /// attempt n) or `linear` (`backoffDelay × n`). Each wait is drawn at random between zero
    /// and that ceiling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_policy: Option<BackoffPolicy>,

    /// The base of the wait between attempts, e.g. `PT1S`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_rule!())]
    pub backoff_delay: Option<String>,

    /// Time for one attempt, from connecting to the end of the response, e.g. `PT10S`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_rule!())]
    pub timeout: Option<String>,

    /// The longest wait between two attempts, whether computed or asked for by a receiver's
    /// `Retry-After`, e.g. `PT1M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_rule!())]
    pub retry_after_max: Option<String>,

    /// How long a delivery is kept: once it is this old no new attempt starts and it fails,
    /// e.g. `PT5M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_rule!())]
    pub max_age: Option<String>,
}

/// How the wait between attempts grows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BackoffPolicy {
    /// `backoffDelay × 2^(n−1)` after attempt n.
    Exponential,
    /// `backoffDelay × n` after attempt n.
    Linear,
}

/// A `spec.delivery` field that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.delivery.{field}: {error}")]
pub struct DeliverySpecError {
    /// The field, as named in the spec.
    pub field: &'static str,
    /// What is wrong with it.
    pub error: DurationError,
}

impl DeliverySpec {
    /// The overrides this spec sets, its durations parsed.
    pub fn overrides(&self) -> Result<DeliveryOverrides, DeliverySpecError> {
        let parse = |field: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(parse_iso_duration)
                .transpose()
                .map_err(|error| DeliverySpecError { field, error })
        };
        Ok(DeliveryOverrides {
            attempts: self.retry,
            backoff: self.backoff_policy.map(|policy| match policy {
                BackoffPolicy::Exponential => Backoff::Exponential,
                BackoffPolicy::Linear => Backoff::Linear,
            }),
            backoff_delay: parse("backoffDelay", &self.backoff_delay)?,
            timeout: parse("timeout", &self.timeout)?,
            retry_after_max: parse("retryAfterMax", &self.retry_after_max)?,
            max_age: parse("maxAge", &self.max_age)?,
        })
    }
}

/// A Listener's `spec.delivery` over its owner's: the resource layers of its policy.
pub fn resource_overrides(
    listener: Option<&DeliverySpec>,
    owner: Option<&DeliverySpec>,
) -> Result<DeliveryOverrides, DeliverySpecError> {
    let listener = listener.map(DeliverySpec::overrides).transpose()?;
    let owner = owner.map(DeliverySpec::overrides).transpose()?;
    Ok(listener
        .unwrap_or_default()
        .over(&owner.unwrap_or_default()))
}

/// The policy a Listener's deliveries get, every field filled in, as its status shows it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveDelivery {
    /// Attempts per delivery.
    #[schemars(extend("format" = "int32"))]
    pub retry: u32,
    /// `exponential` or `linear`.
    pub backoff_policy: String,
    /// The base of the wait between attempts.
    pub backoff_delay: String,
    /// Time for one attempt.
    pub timeout: String,
    /// The longest wait between two attempts.
    pub retry_after_max: String,
    /// How long a delivery is kept.
    pub max_age: String,
    /// One line for `kubectl get -o wide`: `5x exponential PT1S timeout PT10S maxAge PT5M`.
    pub summary: String,
}

impl From<&RetryPolicy> for EffectiveDelivery {
    fn from(policy: &RetryPolicy) -> Self {
        let backoff_delay = format_iso_duration(policy.initial_backoff);
        let timeout = format_iso_duration(policy.timeout);
        let max_age = format_iso_duration(policy.max_age);
        Self {
            retry: policy.max_attempts,
            backoff_policy: policy.backoff.as_str().to_owned(),
            summary: format!(
                "{}x {} {backoff_delay} timeout {timeout} maxAge {max_age}",
                policy.max_attempts,
                policy.backoff.as_str()
            ),
            backoff_delay,
            timeout,
            retry_after_max: format_iso_duration(policy.max_backoff),
            max_age,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(json: serde_json::Value) -> DeliverySpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_spec_round_trips_in_camel_case() {
        let json = serde_json::json!({
            "retry": 3,
            "backoffPolicy": "linear",
            "backoffDelay": "PT0.5S",
            "timeout": "PT2S",
            "retryAfterMax": "PT30S",
            "maxAge": "PT1M"
        });
        let parsed = spec(json.clone());
        assert_eq!(serde_json::to_value(&parsed).unwrap(), json);
        assert_eq!(
            parsed.overrides(),
            Ok(DeliveryOverrides {
                attempts: Some(3),
                backoff: Some(Backoff::Linear),
                backoff_delay: Some(Duration::from_millis(500)),
                timeout: Some(Duration::from_secs(2)),
                retry_after_max: Some(Duration::from_secs(30)),
                max_age: Some(Duration::from_secs(60)),
            })
        );
        assert_eq!(
            serde_json::to_value(DeliverySpec::default()).unwrap(),
            serde_json::json!({})
        );
    }

    #[test]
    fn a_bad_duration_names_its_field() {
        let error = spec(serde_json::json!({"maxAge": "P1D"})).overrides();
        assert_eq!(
            error.map_err(|e| e.to_string()),
            Err("spec.delivery.maxAge: \"P1D\" uses a calendar unit; give the duration in hours, minutes and seconds, e.g. PT24H".to_owned())
        );
        assert!(serde_json::from_value::<DeliverySpec>(
            serde_json::json!({"backoffPolicy": "fibonacci"})
        )
        .is_err());
    }

    #[test]
    fn the_listener_layer_wins_field_by_field() {
        let listener = spec(serde_json::json!({"retry": 2}));
        let owner = spec(serde_json::json!({"retry": 9, "backoffPolicy": "linear"}));
        let merged = resource_overrides(Some(&listener), Some(&owner)).unwrap();
        assert_eq!(merged.attempts, Some(2));
        assert_eq!(merged.backoff, Some(Backoff::Linear));
        let merged = resource_overrides(None, Some(&owner)).unwrap();
        assert_eq!(merged.attempts, Some(9));
        assert!(resource_overrides(None, None).unwrap().is_empty());
    }

    #[test]
    fn the_effective_policy_reads_as_a_summary() {
        let policy = RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(300),
        };
        let effective = EffectiveDelivery::from(&policy);
        assert_eq!(
            effective.summary,
            "5x exponential PT1S timeout PT10S maxAge PT5M"
        );
        assert_eq!(effective.retry_after_max, "PT1M");
    }

    #[test]
    fn the_schema_carries_the_rules() {
        let schema = serde_json::to_value(schemars::schema_for!(DeliverySpec)).unwrap();
        let text = schema.to_string();
        assert!(
            text.contains("timeout must not be longer than maxAge"),
            "{text}"
        );
        assert!(text.contains("retry must be at least 1"));
        assert_eq!(schema["properties"]["retry"]["minimum"], 1);
        for field in ["backoffDelay", "timeout", "retryAfterMax", "maxAge"] {
            let rules = &schema["properties"][field]["x-kubernetes-validations"];
            assert!(
                rules[0]["rule"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("duration('0s')"),
                "{field}: {rules}"
            );
        }
    }
}
