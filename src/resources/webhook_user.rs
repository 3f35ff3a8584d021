//! `WebhookUser`: a client of the service, with credentials kept in a Secret.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::delivery::DeliverySpec;

/// A client of the webhook service (upstream "User"). Its name is the `clientId` / `ownerId`
/// of the REST API; its API key and client secret live in the Secret named in its status.
// Each printcolumn(...) repeats the same keys, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "webhooks.crownstone.rocks",
    version = "v1alpha1",
    kind = "WebhookUser",
    namespaced,
    status = "WebhookUserStatus",
    shortname = "whu",
    category = "crownstone",
    doc = "A client of the webhook service, whose listeners receive Crownstone events.",
    printcolumn(
        name = "Display Name",
        type_ = "string",
        json_path = ".spec.displayName"
    ),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled"),
    printcolumn(name = "Listeners", type_ = "integer", json_path = ".status.listeners"),
    printcolumn(
        name = "Today",
        type_ = "integer",
        json_path = ".status.usage.deliveries"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookUserSpec {
    /// A human-readable name of the client.
    #[schemars(length(max = 256))]
    pub display_name: String,

    /// A disabled user's listeners receive nothing.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,

    /// Deliveries allowed per UTC day; the operator's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0), extend("format" = "int64"))]
    pub daily_allowance: Option<u64>,

    /// How many Listeners this user may have; the operator's default when unset. The newest
    /// past it are not streamed (`Ready=False`, `ListenerLimitExceeded`) until others go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0), extend("format" = "int32"))]
    pub max_listeners: Option<u32>,

    /// The delivery policy of this user's Listeners, field by field under what each Listener's
    /// own `spec.delivery` sets, and over the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
}

fn enabled_by_default() -> bool {
    true
}

/// What the operator observed of a WebhookUser.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookUserStatus {
    /// `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The Secret holding `apiKey` and `clientSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// How many Listeners this user owns.
    #[serde(default)]
    #[schemars(extend("format" = "int32"))]
    pub listeners: u32,
    /// Deliveries made today (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Deliveries counted against the daily allowance.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Deliveries on that day.
    #[schemars(extend("format" = "int64"))]
    pub deliveries: u64,
}

impl WebhookUser {
    /// The condition of the given type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        super::find_condition(&self.status.as_ref()?.conditions, type_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_defaults_to_true() {
        let spec: WebhookUserSpec =
            serde_json::from_value(serde_json::json!({"displayName": "Acme"})).unwrap();
        assert!(spec.enabled);
        assert_eq!(spec.daily_allowance, None);
        assert_eq!(spec.max_listeners, None);
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let json = serde_json::json!({
            "credentialsSecret": "acme-credentials",
            "listeners": 2,
            "usage": {"day": "2026-11-23", "deliveries": 17},
            "observedGeneration": 3
        });
        let status: WebhookUserStatus = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(status.usage.as_ref().unwrap().deliveries, 17);
        assert_eq!(serde_json::to_value(&status).unwrap(), json);
    }
}
