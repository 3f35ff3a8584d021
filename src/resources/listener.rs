//! `Listener`: one webhook registration, forwarding one token's events of some types to a url.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::delivery::{DeliverySpec, EffectiveDelivery};
use crate::crownstone::EventType;

/// A webhook registration: the events of `eventTypes` seen on the stream of the token in
/// `tokenSecretRef` are POSTed to `url` on behalf of the WebhookUser `owner`.
// Each printcolumn(...) repeats the same keys, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "webhooks.crownstone.rocks",
    version = "v1alpha1",
    kind = "Listener",
    namespaced,
    status = "ListenerStatus",
    shortname = "lst",
    category = "crownstone",
    doc = "A webhook registration: events of the chosen types on a Crownstone user's event stream are POSTed to a url.",
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner"),
    printcolumn(name = "User", type_ = "string", json_path = ".spec.userId"),
    printcolumn(name = "Events", type_ = "string", json_path = ".spec.eventTypes"),
    printcolumn(name = "Host", type_ = "string", json_path = ".status.urlHost"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Delivery",
        type_ = "string",
        json_path = ".status.effectiveDelivery.summary",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSpec {
    /// Name of the WebhookUser (in the same namespace) on whose behalf events are delivered.
    #[schemars(length(min = 1, max = 253))]
    pub owner: String,

    /// The Crownstone user id that the token belongs to; sent as `userId` in every delivery.
    #[schemars(length(min = 1, max = 256))]
    pub user_id: String,

    /// The event types to forward, a non-empty set of the six Crownstone types.
    #[schemars(length(min = 1, max = 6), extend("x-kubernetes-list-type" = "set"))]
    pub event_types: Vec<EventType>,

    /// Where events are POSTed: an http or https url of at most 2048 characters.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = kube::core::Rule::new(
        "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''"
    ).message("url must be an absolute http or https URL"))]
    pub url: String,

    /// The Secret key that holds the Crownstone OAuth token. The token never appears in the spec.
    pub token_secret_ref: SecretKeyRef,

    /// When this registration ends, if the client knows (usually its token's expiry): the
    /// Listener is deleted at that moment. Other Listeners on the same token are not affected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,

    /// How this Listener's deliveries are retried and how long they are kept; each field left
    /// out comes from the owner's `spec.delivery`, then from the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
}

/// A key of a Secret in the Listener's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What the operator observed of a Listener.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    /// `TokenValid`, `Streaming` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the token expires, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Host (and port, when not the scheme's default) of the url, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_host: Option<String>,
    /// Events delivered since the Listener was created.
    #[serde(default)]
    #[schemars(extend("format" = "int64"))]
    pub delivered: u64,
    /// Deliveries that failed after their last attempt, or were dropped.
    #[serde(default)]
    #[schemars(extend("format" = "int64"))]
    pub failed: u64,
    /// Failed or dropped deliveries the dead-letter sink took.
    #[serde(default)]
    #[schemars(extend("format" = "int64"))]
    pub dead_lettered: u64,
    /// When the last event was delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_time: Option<DateTime<Utc>>,
    /// Why the last failed or dropped delivery did not arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Since when every delivery has failed (no success since), if they do: the start of the
    /// window after which the Listener is suspended as `EndpointFailing`. Kept here so the
    /// window survives a restart of the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_window: Option<FailureWindow>,
    /// The delivery policy in force: the Listener's `spec.delivery` over its owner's over the
    /// operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_delivery: Option<EffectiveDelivery>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// With sharding, the replica (pod) that streams this Listener's token and delivers its
    /// events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streamed_by: Option<String>,
}

/// A run of failed deliveries to one generation of a Listener's spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureWindow {
    /// When the first failure after the last success happened.
    pub since: DateTime<Utc>,
    /// The spec generation the failures were deliveries of.
    #[schemars(extend("format" = "int64"))]
    pub generation: i64,
}

impl Listener {
    /// The condition of the given type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        super::find_condition(&self.status.as_ref()?.conditions, type_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn schema() -> serde_json::Value {
        let crd = Listener::crd();
        let version = &crd.spec.versions[0];
        serde_json::to_value(&version.schema.as_ref().unwrap().open_api_v3_schema).unwrap()
    }

    #[test]
    fn event_types_are_a_nonempty_set_of_the_six_types() {
        let s = schema();
        let types = &s["properties"]["spec"]["properties"]["eventTypes"];
        assert_eq!(types["minItems"], 1);
        assert_eq!(types["x-kubernetes-list-type"], "set");
        let allowed: Vec<&str> = types["items"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let expected: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(allowed, expected);
    }

    #[test]
    fn url_is_bounded_and_checked_by_a_cel_rule() {
        let s = schema();
        let url = &s["properties"]["spec"]["properties"]["url"];
        assert_eq!(url["maxLength"], 2048);
        let rule = url["x-kubernetes-validations"][0]["rule"].as_str().unwrap();
        assert!(rule.contains("getScheme() in ['http', 'https']"));
    }

    #[test]
    fn required_fields_and_formats() {
        let s = schema();
        let spec = &s["properties"]["spec"];
        let required: Vec<&str> = spec["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for field in ["owner", "userId", "eventTypes", "url", "tokenSecretRef"] {
            assert!(required.contains(&field), "{field} must be required");
        }
        assert!(!required.contains(&"expiresAt"));
        assert_eq!(spec["properties"]["expiresAt"]["format"], "date-time");
        assert_eq!(spec["properties"]["owner"]["minLength"], 1);
        assert_eq!(spec["properties"]["userId"]["minLength"], 1);
    }

    #[test]
    fn spec_round_trips_in_camel_case() {
        let json = serde_json::json!({
            "owner": "acme",
            "userId": "58bcd2aadf42e8c330b5fd62",
            "eventTypes": ["command", "switchStateUpdate"],
            "url": "https://hooks.example.com/crownstone",
            "tokenSecretRef": {"name": "acme-token", "key": "token"},
            "expiresAt": "2026-12-01T00:00:00Z"
        });
        let spec: ListenerSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(
            spec.event_types,
            [EventType::Command, EventType::SwitchStateUpdate]
        );
        assert_eq!(serde_json::to_value(&spec).unwrap(), json);
    }

    #[test]
    fn unknown_event_types_do_not_parse() {
        let json = serde_json::json!({
            "owner": "acme", "userId": "u", "eventTypes": ["ping"],
            "url": "https://x.example", "tokenSecretRef": {"name": "a", "key": "b"}
        });
        assert!(serde_json::from_value::<ListenerSpec>(json).is_err());
    }
}
