//! Custom resources as the API server takes them, built as JSON: for tests of what the API
//! server refuses (CEL rules), where typed structs could not carry the nonsense.

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Resource;
use serde_json::{json, Value};

use super::cluster::TestNamespace;

/// An untyped api for `K` in the namespace.
pub fn dynamic<K: Resource<DynamicType = ()>>(
    ns: &TestNamespace,
    plural: &str,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(&K::group(&()), &K::version(&()), &K::kind(&()));
    Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Creates `object`; the API server's refusal as text.
pub async fn create(api: &Api<DynamicObject>, object: Value) -> Result<(), String> {
    let object: DynamicObject = serde_json::from_value(object).expect("a resource's JSON");
    api.create(&PostParams::default(), &object)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A Listener of `owner` on the token in Secret `secret`, posting `command` events to `url`.
pub fn listener(
    name: &str,
    owner: &str,
    secret: &str,
    url: &str,
    delivery: Option<Value>,
) -> Value {
    let mut spec = json!({
        "owner": owner,
        "userId": "user-1",
        "eventTypes": ["command"],
        "url": url,
        "tokenSecretRef": {"name": secret, "key": "token"},
    });
    if let Some(delivery) = delivery {
        spec["delivery"] = delivery;
    }
    json!({
        "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
        "kind": "Listener",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// A WebhookUser, with a delivery policy and a daily allowance where given.
pub fn user(name: &str, delivery: Option<Value>, allowance: Option<u64>) -> Value {
    let mut spec = json!({"displayName": name});
    if let Some(delivery) = delivery {
        spec["delivery"] = delivery;
    }
    if let Some(allowance) = allowance {
        spec["dailyAllowance"] = json!(allowance);
    }
    json!({
        "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
        "kind": "WebhookUser",
        "metadata": {"name": name},
        "spec": spec,
    })
}
