//! The CRDs on a real API server: established, accepting good objects, refusing bad ones with
//! messages that name the field, and printing the documented columns.

use std::time::Duration;

use crownstone_webhooks::resources::{Listener, WebhookUser};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Resource;
use serde_json::{json, Value};

use crate::support::cluster::{client, eventually, TestNamespace};

fn listener_json(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
        "kind": "Listener",
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn good_spec() -> Value {
    json!({
        "owner": "acme",
        "userId": "58bcd2aadf42e8c330b5fd62",
        "eventTypes": ["command", "presence"],
        "url": "https://hooks.example.com/crownstone",
        "tokenSecretRef": {"name": "acme-token", "key": "token"},
        "expiresAt": "2030-01-01T00:00:00Z"
    })
}

fn dynamic_listeners(ns: &TestNamespace) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(
        &Listener::group(&()),
        &Listener::version(&()),
        &Listener::kind(&()),
    );
    Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::from_gvk_with_plural(&gvk, "listeners"),
    )
}

async fn create_listener(ns: &TestNamespace, name: &str, spec: Value) -> Result<(), String> {
    let object: DynamicObject = serde_json::from_value(listener_json(name, spec)).unwrap();
    dynamic_listeners(ns)
        .create(&PostParams::default(), &object)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn crds_become_established() {
    let crds: Api<CustomResourceDefinition> = Api::all(client().await);
    for name in [
        "listeners.webhooks.crownstone.rocks",
        "webhookusers.webhooks.crownstone.rocks",
    ] {
        eventually(name, Duration::from_secs(30), || async {
            let crd = crds.get(name).await.ok()?;
            let conditions = crd.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn valid_listener_and_webhook_user_are_accepted() {
    let ns = TestNamespace::new("crd-valid").await;
    create_listener(&ns, "good", good_spec()).await.unwrap();
    let listener = ns.api::<Listener>().get("good").await.unwrap();
    assert_eq!(listener.spec.owner, "acme");
    assert_eq!(listener.spec.event_types.len(), 2);

    let user: WebhookUser = serde_json::from_value(json!({
        "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
        "kind": "WebhookUser",
        "metadata": {"name": "acme"},
        "spec": {"displayName": "Acme Inc."}
    }))
    .unwrap();
    let created = ns
        .api::<WebhookUser>()
        .create(&PostParams::default(), &user)
        .await
        .unwrap();
    assert!(
        created.spec.enabled,
        "enabled defaults to true on the server"
    );
}

#[tokio::test]
async fn bad_listeners_are_rejected_naming_the_field() {
    let ns = TestNamespace::new("crd-invalid").await;
    let long_url = format!("https://example.com/{}", "a".repeat(2048));
    // (name, field of the spec, its bad value or None to leave it out, field the error names)
    let cases: Vec<(&str, &str, Option<Value>, &str)> = vec![
        (
            "empty-event-types",
            "eventTypes",
            Some(json!([])),
            "spec.eventTypes",
        ),
        (
            "unknown-event-type",
            "eventTypes",
            Some(json!(["ping"])),
            "spec.eventTypes",
        ),
        (
            "duplicate-event-type",
            "eventTypes",
            Some(json!(["command", "command"])),
            "spec.eventTypes",
        ),
        (
            "ftp-url",
            "url",
            Some(json!("ftp://example.com/x")),
            "spec.url",
        ),
        ("relative-url", "url", Some(json!("/hooks")), "spec.url"),
        ("long-url", "url", Some(json!(long_url)), "spec.url"),
        ("empty-user-id", "userId", Some(json!("")), "spec.userId"),
        ("empty-owner", "owner", Some(json!("")), "spec.owner"),
        (
            "no-token-secret-ref",
            "tokenSecretRef",
            None,
            "spec.tokenSecretRef",
        ),
        (
            "bad-expires-at",
            "expiresAt",
            Some(json!("next tuesday")),
            "spec.expiresAt",
        ),
    ];
    for (name, key, value, field) in cases {
        let mut spec = good_spec();
        match value {
            Some(value) => spec[key] = value,
            None => {
                spec.as_object_mut().unwrap().remove(key);
            }
        }
        let error = create_listener(&ns, name, spec)
            .await
            .expect_err(&format!("{name} must be rejected"));
        assert!(
            error.contains(field),
            "{name}: the error should name {field}: {error}"
        );
    }
    let left = ns
        .api::<Listener>()
        .list(&Default::default())
        .await
        .unwrap();
    assert!(left.items.is_empty(), "nothing bad was stored");
}

#[tokio::test]
async fn kubectl_apply_refuses_empty_event_types() {
    let ns = TestNamespace::new("crd-kubectl").await;
    let mut spec = good_spec();
    spec["eventTypes"] = json!([]);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        serde_json::to_string(&listener_json("empty", spec)).unwrap(),
    )
    .unwrap();
    let output = ns.kubectl(&["apply", "-f", file.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("spec.eventTypes"), "{stderr}");
}

#[tokio::test]
async fn kubectl_get_listeners_prints_the_columns() {
    let ns = TestNamespace::new("crd-columns").await;
    create_listener(&ns, "shown", good_spec()).await.unwrap();
    let output = ns.kubectl(&["get", "listeners", "-o", "wide"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let header: Vec<&str> = stdout.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "OWNER", "USER", "EVENTS", "HOST", "READY", "REASON", "EXPIRES", "DELIVERY",
            "AGE"
        ]
    );
    let row = stdout.lines().nth(1).unwrap();
    assert!(row.starts_with("shown"));
    assert!(row.contains("acme") && row.contains("58bcd2aadf42e8c330b5fd62"));
    assert!(row.contains("command") && row.contains("presence"));

    // The short name works too.
    let output = ns.kubectl(&["get", "lst", "shown"]);
    assert!(output.status.success());
}
