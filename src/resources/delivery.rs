//! `spec.delivery`, shared by Listener and WebhookUser: how deliveries are retried, for how
//! long they are kept, and where those that end without success go. Field names follow Knative
//! Eventing's `delivery` block.

use std::sync::Arc;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::delivery::{
    display_url, format_iso_duration, parse_iso_duration, Backoff, DeliveryOverrides,
    DurationError, RetryPolicy,
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

    /// Where a delivery that ends without success (attempts used up, a status that is not
    /// retried, 410 Gone, its max age reached, or dropped: queue full, memory budget, expired,
    /// Listener suspended, allowance used up) is POSTed once more, retried like a delivery: the
    /// original body and `webhook-id`, signed with the owner's secrets, with
    /// `crownstone-error-dest`, `-code`, `-data` and `-reason` headers. The Listener's sink
    /// wins over its owner's; there is no operator-wide one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink: Option<DeadLetterSink>,
}

/// A dead-letter sink: exactly one of `url` and `ref`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.url) != has(self.ref)")
    .message("deadLetterSink takes exactly one of url and ref"))]
pub struct DeadLetterSink {
    /// An http or https url of at most 2048 characters, under the same URL policy as a
    /// Listener's url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = kube::core::Rule::new(
        "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''"
    ).message("deadLetterSink.url must be an absolute http or https URL"))]
    pub url: Option<String>,

    /// A Service in the resource's own namespace, sent to as
    /// `http://NAME.NAMESPACE.svc:PORT/PATH`: the operator must resolve cluster DNS, and the URL
    /// policy applies to the addresses the name resolves to, as for any url.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceReference>,
}

/// A Service in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    /// `Service`, the only kind a sink may name.
    #[schemars(length(max = 63))]
    #[x_kube(validation = kube::core::Rule::new("self == 'Service'")
        .message("deadLetterSink.ref.kind must be Service"))]
    pub kind: String,

    /// The Service's name, a DNS label.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("deadLetterSink.ref.name must be a Service name (a DNS label)"))]
    pub name: String,

    /// The Service's port; 80 when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,

    /// The path the dead letters are POSTed to, starting with `/`; `/` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/') && !self.contains('?') && !self.contains('#')")
        .message("deadLetterSink.ref.path must start with / and hold no query or fragment"))]
    pub path: Option<String>,
}

/// A `deadLetterSink` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// `url` and `ref` both, or neither.
    #[error("deadLetterSink takes exactly one of url and ref")]
    NotOneOf,
    /// `ref` names something other than a Service.
    #[error("deadLetterSink.ref.kind must be Service, not {0:?}")]
    Kind(String),
    /// The url, or the url a Service reference resolves to, does not parse or is not http(s).
    #[error("deadLetterSink is not an absolute http or https URL: {0}")]
    Url(String),
}

impl DeadLetterSink {
    /// The url dead letters go to: `url`, or the Service's cluster DNS name in `namespace`.
    pub fn resolve(&self, namespace: &str) -> Result<Url, SinkError> {
        let url = match (&self.url, &self.service) {
            (Some(url), None) => Url::parse(url).map_err(|e| SinkError::Url(e.to_string()))?,
            (None, Some(service)) => service.resolve(namespace)?,
            _ => return Err(SinkError::NotOneOf),
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(SinkError::Url(display_url(&url)));
        }
        Ok(url)
    }
}

impl ServiceReference {
    /// `http://NAME.NAMESPACE.svc:PORT/PATH`.
    pub fn resolve(&self, namespace: &str) -> Result<Url, SinkError> {
        if self.kind != "Service" {
            return Err(SinkError::Kind(self.kind.clone()));
        }
        let label = |text: &str| {
            !text.is_empty()
                && text.len() <= 63
                && text
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !text.starts_with('-')
                && !text.ends_with('-')
        };
        if !label(&self.name) || !label(namespace) {
            return Err(SinkError::Url(format!(
                "{:?} in {namespace:?} is not a Service name",
                self.name
            )));
        }
        let mut url = Url::parse(&format!(
            "http://{}.{namespace}.svc:{}/",
            self.name,
            self.port.unwrap_or(80)
        ))
        .map_err(|e| SinkError::Url(e.to_string()))?;
        let path = self.path.as_deref().unwrap_or("/");
        if !path.starts_with('/') || path.contains(['?', '#']) {
            return Err(SinkError::Url(format!(
                "path {path:?} must start with / and hold no query or fragment"
            )));
        }
        url.set_path(path);
        Ok(url)
    }
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
pub enum DeliverySpecError {
    /// A duration field.
    #[error("spec.delivery.{field}: {error}")]
    Duration {
        /// The field, as named in the spec.
        field: &'static str,
        /// What is wrong with it.
        error: DurationError,
    },
    /// The dead-letter sink.
    #[error("spec.delivery.{0}")]
    Sink(#[from] SinkError),
}

impl DeliverySpec {
    /// The overrides this spec of a resource in `namespace` sets, its durations parsed and its
    /// sink resolved.
    pub fn overrides(&self, namespace: &str) -> Result<DeliveryOverrides, DeliverySpecError> {
        let parse = |field: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(parse_iso_duration)
                .transpose()
                .map_err(|error| DeliverySpecError::Duration { field, error })
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
            dead_letter_sink: self
                .dead_letter_sink
                .as_ref()
                .map(|sink| sink.resolve(namespace).map(Arc::new))
                .transpose()?,
        })
    }
}

/// A Listener's `spec.delivery` over its owner's (both in `namespace`): the resource layers of
/// its policy.
pub fn resource_overrides(
    listener: Option<&DeliverySpec>,
    owner: Option<&DeliverySpec>,
    namespace: &str,
) -> Result<DeliveryOverrides, DeliverySpecError> {
    let listener = listener.map(|s| s.overrides(namespace)).transpose()?;
    let owner = owner.map(|s| s.overrides(namespace)).transpose()?;
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
    /// Where deliveries that end without success go: scheme, host, port and path, never the
    /// url's user information or query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink: Option<String>,
    /// One line for `kubectl get -o wide`: `5x exponential PT1S timeout PT10S maxAge PT5M`,
    /// and `deadLetter HOST` after it with a sink.
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
            dead_letter_sink: None,
        }
    }
}

impl EffectiveDelivery {
    /// The policy and sink a Listener's deliveries get.
    pub fn new(policy: &RetryPolicy, overrides: &DeliveryOverrides) -> Self {
        let mut effective = Self::from(policy);
        if let Some(sink) = overrides.dead_letter_sink.as_deref() {
            effective.dead_letter_sink = Some(display_url(sink));
            if let Some(host) = sink.host_str() {
                effective.summary.push_str(" deadLetter ");
                effective.summary.push_str(host);
            }
        }
        effective
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
            parsed.overrides("tenant"),
            Ok(DeliveryOverrides {
                attempts: Some(3),
                backoff: Some(Backoff::Linear),
                backoff_delay: Some(Duration::from_millis(500)),
                timeout: Some(Duration::from_secs(2)),
                retry_after_max: Some(Duration::from_secs(30)),
                max_age: Some(Duration::from_secs(60)),
                dead_letter_sink: None,
            })
        );
        assert_eq!(
            serde_json::to_value(DeliverySpec::default()).unwrap(),
            serde_json::json!({})
        );
    }

    #[test]
    fn a_bad_duration_names_its_field() {
        let error = spec(serde_json::json!({"maxAge": "P1D"})).overrides("tenant");
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
        let merged = resource_overrides(Some(&listener), Some(&owner), "tenant").unwrap();
        assert_eq!(merged.attempts, Some(2));
        assert_eq!(merged.backoff, Some(Backoff::Linear));
        let merged = resource_overrides(None, Some(&owner), "tenant").unwrap();
        assert_eq!(merged.attempts, Some(9));
        assert!(resource_overrides(None, None, "tenant").unwrap().is_empty());
    }

    #[test]
    fn a_service_reference_resolves_to_its_cluster_name() {
        let sink = |json| serde_json::from_value::<DeadLetterSink>(json).unwrap();
        let table = [
            (
                serde_json::json!({"ref": {"kind": "Service", "name": "dead"}}),
                Ok("http://dead.tenant.svc/"),
            ),
            (
                serde_json::json!({"ref": {"kind": "Service", "name": "dead", "port": 8080, "path": "/letters/in"}}),
                Ok("http://dead.tenant.svc:8080/letters/in"),
            ),
            (
                serde_json::json!({"url": "https://u:p@sink.example.com/x?k=v"}),
                Ok("https://u:p@sink.example.com/x?k=v"),
            ),
            (
                serde_json::json!({"ref": {"kind": "Secret", "name": "dead"}}),
                Err(SinkError::Kind("Secret".into())),
            ),
            (serde_json::json!({}), Err(SinkError::NotOneOf)),
            (
                serde_json::json!({"url": "https://a.example.com/", "ref": {"kind": "Service", "name": "dead"}}),
                Err(SinkError::NotOneOf),
            ),
        ];
        for (json, expected) in table {
            let got = sink(json.clone()).resolve("tenant");
            assert_eq!(
                got.as_ref().map(Url::as_str).map_err(Clone::clone),
                expected,
                "{json}"
            );
        }
        // Nothing a tenant writes leaves the name under its own namespace.
        for (name, path) in [
            ("evil.other", "/"),
            ("Dead", "/"),
            ("dead", "x"),
            ("dead", "/?q=1"),
            ("dead@kubernetes.default", "/"),
        ] {
            let json = serde_json::json!({"ref": {"kind": "Service", "name": name, "path": path}});
            assert!(
                matches!(sink(json).resolve("tenant"), Err(SinkError::Url(_))),
                "{name} {path}"
            );
        }
        assert!(matches!(
            sink(serde_json::json!({"url": "ftp://sink.example.com/"})).resolve("tenant"),
            Err(SinkError::Url(_))
        ));
    }

    #[test]
    fn the_listener_sink_wins_over_the_owner_sink() {
        let listener =
            spec(serde_json::json!({"deadLetterSink": {"url": "https://mine.example.com/"}}));
        let owner = spec(
            serde_json::json!({"retry": 2, "deadLetterSink": {"ref": {"kind": "Service", "name": "shared"}}}),
        );
        let sink = |merged: DeliveryOverrides| merged.dead_letter_sink.map(|u| u.to_string());
        assert_eq!(
            sink(resource_overrides(Some(&listener), Some(&owner), "tenant").unwrap()),
            Some("https://mine.example.com/".to_owned())
        );
        assert_eq!(
            sink(resource_overrides(None, Some(&owner), "tenant").unwrap()),
            Some("http://shared.tenant.svc/".to_owned())
        );
        assert_eq!(
            sink(resource_overrides(Some(&listener), None, "tenant").unwrap()),
            Some("https://mine.example.com/".to_owned())
        );
        assert_eq!(
            sink(resource_overrides(None, None, "tenant").unwrap()),
            None
        );
        let bad =
            spec(serde_json::json!({"deadLetterSink": {"ref": {"kind": "Pod", "name": "x"}}}));
        assert_eq!(
            resource_overrides(Some(&bad), Some(&owner), "tenant").map_err(|e| e.to_string()),
            Err("spec.delivery.deadLetterSink.ref.kind must be Service, not \"Pod\"".to_owned())
        );
    }

    /// Five attempts, exponential from 1 s to 60 s, 10 s timeout, 5 min max age.
    fn five_exponential_attempts() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(300),
        }
    }

    #[test]
    fn the_effective_sink_shows_no_credentials() {
        let policy = five_exponential_attempts();
        let overrides = DeliveryOverrides {
            dead_letter_sink: Some(Arc::new(
                Url::parse("https://user:secret@sink.example.com/in?token=t").unwrap(),
            )),
            ..DeliveryOverrides::default()
        };
        let effective = EffectiveDelivery::new(&policy, &overrides);
        assert_eq!(
            effective.dead_letter_sink.as_deref(),
            Some("https://sink.example.com/in")
        );
        assert_eq!(
            effective.summary,
            "5x exponential PT1S timeout PT10S maxAge PT5M deadLetter sink.example.com"
        );
        let json = serde_json::to_string(&effective).unwrap();
        assert!(
            !json.contains("secret") && !json.contains("token"),
            "{json}"
        );
        let none = EffectiveDelivery::new(&policy, &DeliveryOverrides::default());
        assert!(!serde_json::to_string(&none)
            .unwrap()
            .contains("deadLetterSink"));
    }

    #[test]
    fn the_effective_policy_reads_as_a_summary() {
        let policy = five_exponential_attempts();
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
        assert!(text.contains("deadLetterSink takes exactly one of url and ref"));
        assert!(text.contains("deadLetterSink.ref.kind must be Service"));
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
