//! The operator as a hostile tenant and a restart would try it: Secrets it must not touch,
//! expiry that stays within one registration, owner changes, suspensions that survive a
//! restart, and an allowance that only real attempts use.

use std::collections::BTreeMap;
use std::sync::Arc;

use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::delivery::{verify, SigningKey};
use crownstone_webhooks::resources::{Listener, WebhookUser};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::cluster::{eventually, PrivatePlane, TestNamespace};
use crate::support::operator::{Harness, ALLOW_LOOPBACK, WAIT};
use crate::support::receiver::{Receiver, RecordedRequest, Reply};

const SPHERE: &str = "sphere-1";
const DROPPED_SUSPENDED: &str =
    r#"crownstone_webhooks_webhook_delivery_drops_total{reason="suspended"}"#;

/// A Secret as a user (not the operator) would make it.
async fn users_secret(h: &Harness, name: &str, type_: &str, data: &[(&str, &str)]) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some(type_.to_owned()),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Secret::default()
    };
    h.ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
}

async fn delete_listener(h: &Harness, name: &str) {
    h.ns.api::<Listener>()
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete Listener");
    h.wait_gone(name).await;
}

async fn secret_exists(h: &Harness, name: &str) -> bool {
    h.ns.api::<Secret>()
        .get_opt(name)
        .await
        .expect("read Secret")
        .is_some()
}

/// Publishes a command and returns the request it made at `receiver`.
async fn deliver_one(h: &Harness, receiver: &Receiver) -> RecordedRequest {
    let before = receiver.request_count();
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    let requests = receiver.wait_for_requests(before + 1, WAIT).await;
    requests[before].clone()
}

/// Whether a delivery is signed with this client secret.
fn signed_with(request: &RecordedRequest, client_secret: &str) -> bool {
    let (Some(id), Some(timestamp), Some(signature)) = (
        request.header("webhook-id"),
        request.header("webhook-timestamp"),
        request.header("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(timestamp) = timestamp.parse::<i64>() else {
        return false;
    };
    let key = SigningKey::from_client_secret(client_secret).unwrap();
    // Any entry: while a replaced secret is in its overlap, each live secret signs.
    verify(&key, id, timestamp, &request.body, signature)
}

#[tokio::test]
async fn secrets_the_operator_did_not_create_survive_their_listeners() {
    let h = Harness::start("trust-secrets").await;
    let receiver = Receiver::start().await;
    h.create_user("acme", true, None).await;
    let token = h.token("user-1", SPHERE).await;
    // Another client's credentials, and a TLS Secret: a tenant names them in tokenSecretRef.
    users_secret(&h, "other-client", "Opaque", &[("token", &token)]).await;
    users_secret(
        &h,
        "tls",
        "kubernetes.io/tls",
        &[("tls.crt", "certificate"), ("tls.key", "key")],
    )
    .await;
    let url = receiver.url();
    h.create_listener(
        "steals",
        "acme",
        "other-client",
        &["command"],
        url.as_str(),
        None,
    )
    .await;
    h.create_listener("tls-ref", "acme", "tls", &["command"], url.as_str(), None)
        .await;
    h.wait_ready("steals").await;
    h.wait_condition("tls-ref", "Ready", "False", "TokenSecretMissing")
        .await;
    delete_listener(&h, "steals").await;
    delete_listener(&h, "tls-ref").await;
    assert!(
        secret_exists(&h, "other-client").await,
        "another client's Secret was deleted"
    );
    assert!(secret_exists(&h, "tls").await, "the TLS Secret was deleted");

    // A managed token Secret goes with the last Listener that reads it, not before.
    h.create_managed_token_secret("managed", &token).await;
    h.create_listener("m1", "acme", "managed", &["command"], url.as_str(), None)
        .await;
    h.create_listener("m2", "acme", "managed", &["command"], url.as_str(), None)
        .await;
    h.wait_ready("m1").await;
    h.wait_ready("m2").await;
    delete_listener(&h, "m1").await;
    assert!(secret_exists(&h, "managed").await, "still read by m2");
    delete_listener(&h, "m2").await;
    h.wait_secret_gone("managed").await;
}

#[tokio::test]
async fn a_credentials_secret_the_operator_did_not_create_is_reported_never_adopted() {
    let h = Harness::start("trust-credentials").await;
    let receiver = Receiver::start().await;
    let planted = [
        ("apiKey", "planted-key"),
        ("clientSecret", "planted-secret"),
    ];
    users_secret(&h, "acme-credentials", "Opaque", &planted).await;
    h.create_user("acme", true, None).await;
    h.wait_user_reason("acme", "False", "CredentialsSecretConflict")
        .await;

    // Its Listeners are not Ready: nothing could be signed with a secret the operator trusts.
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("t", &token).await;
    h.create_listener(
        "hook",
        "acme",
        "t",
        &["command"],
        receiver.url().as_str(),
        None,
    )
    .await;
    h.wait_condition("hook", "Ready", "False", "OwnerCredentialsMissing")
        .await;
    let skipped =
        r#"crownstone_webhooks_forwarder_skipped_total{reason="owner_without_credentials"}"#;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    h.wait_metric(skipped, 1.0).await;
    assert_eq!(receiver.request_count(), 0);

    // Deleting the user leaves the Secret as it was.
    h.ns.api::<WebhookUser>()
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("hook").await;
    let users = h.ns.api::<WebhookUser>();
    eventually("the user deleted", WAIT, || async {
        users.get_opt("acme").await.ok()?.is_none().then_some(())
    })
    .await;
    let secret = h.ns.api::<Secret>().get("acme-credentials").await.unwrap();
    let data = secret.data.unwrap();
    assert_eq!(data["clientSecret"].0, b"planted-secret");
    assert_eq!(data["apiKey"].0, b"planted-key");
}

#[tokio::test]
async fn the_credentials_secret_is_watched_edits_are_followed_and_a_deleted_one_remade() {
    let h = Harness::start("trust-credentials-watch").await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    let first = h.client_secret("acme").await;
    assert!(signed_with(&deliver_one(&h, &receiver).await, &first));

    // An edited client secret signs the next deliveries.
    let rotated = "0123456789abcdef0123456789abcdef";
    let patch = json!({"stringData": {"clientSecret": rotated}});
    h.ns.api::<Secret>()
        .patch(
            "acme-credentials",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    eventually("deliveries signed with the edited secret", WAIT, || async {
        signed_with(&deliver_one(&h, &receiver).await, rotated).then_some(())
    })
    .await;

    // A deleted one is made again, with new credentials, and deliveries go on.
    h.ns.api::<Secret>()
        .delete("acme-credentials", &DeleteParams::default())
        .await
        .unwrap();
    let remade = eventually("new credentials", WAIT, || async {
        let secret =
            h.ns.api::<Secret>()
                .get_opt("acme-credentials")
                .await
                .ok()??;
        let value = secret.data?.get("clientSecret")?.0.clone();
        let value = String::from_utf8(value).ok()?;
        (value != rotated && value != first).then_some(value)
    })
    .await;
    eventually("deliveries signed with the new secret", WAIT, || async {
        signed_with(&deliver_one(&h, &receiver).await, &remade).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_owner_change_moves_the_owner_reference_and_re_signs() {
    let h = Harness::start("trust-owner").await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    h.create_user("beta", true, None).await;
    let beta_secret = h.client_secret("beta").await;
    let first = deliver_one(&h, &receiver).await;
    assert_eq!(first.json()["clientId"], "acme");

    let patch = json!({"spec": {"owner": "beta"}});
    h.ns.api::<Listener>()
        .patch("hook", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let listeners = h.ns.api::<Listener>();
    eventually("the ownerReference names beta alone", WAIT, || async {
        let refs = listeners
            .get("hook")
            .await
            .ok()?
            .metadata
            .owner_references?;
        (refs.len() == 1 && refs[0].name == "beta" && refs[0].controller == Some(true))
            .then_some(())
    })
    .await;
    h.wait_ready("hook").await;
    let request = eventually("a delivery on behalf of beta", WAIT, || async {
        let request = deliver_one(&h, &receiver).await;
        (request.json()["clientId"] == "beta").then_some(request)
    })
    .await;
    assert_eq!(request.json()["clientSecret"], beta_secret.as_str());
    assert!(signed_with(&request, &beta_secret));
    // The old owner no longer counts the Listener.
    let users = h.ns.api::<WebhookUser>();
    eventually("acme counts no listener", WAIT, || async {
        (users.get("acme").await.ok()?.status?.listeners == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_gone_receiver_stays_suspended_across_an_operator_restart() {
    let mut h = Harness::start("trust-gone-restart").await;
    let receiver = Receiver::counting(Reply::status(410)).await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    h.wait_condition("hook", "Ready", "False", "EndpointGone")
        .await;
    // From now on the receiver would accept: anything it gets proves the suspension was lost.
    receiver.set_default(Reply::status(200));

    h.restart_operator().await;
    h.wait_streams(1).await;
    h.wait_condition("hook", "Streaming", "True", "Streaming")
        .await;
    // The stream count and the condition may still be the old process's: publish until the
    // new process reads an event, which it must drop.
    eventually(
        "an event dropped as suspended after the restart",
        WAIT,
        || async {
            h.admin
                .publish(&[samples::multi_switch(SPHERE)])
                .await
                .ok()?;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            (h.metric(DROPPED_SUSPENDED).await >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        receiver.request_count(),
        1,
        "deliveries resumed after the restart"
    );
    let listener = h.ns.api::<Listener>().get("hook").await.unwrap();
    let ready = listener.condition("Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "EndpointGone")
    );
    assert_eq!(ready.observed_generation, listener.metadata.generation);
}

#[tokio::test]
async fn a_suspended_listener_does_not_use_its_owners_allowance() {
    let h = Harness::start("trust-allowance").await;
    let (gone, ok) = (
        Receiver::counting(Reply::status(410)).await,
        Receiver::start().await,
    );
    h.create_user("acme", true, Some(3)).await;
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("t-gone", &token).await;
    h.create_token_secret("t-ok", &token).await;
    // Routed in name order: the suspended Listener comes first and would take the allowance.
    h.create_listener(
        "a-gone",
        "acme",
        "t-gone",
        &["command"],
        gone.url().as_str(),
        None,
    )
    .await;
    h.create_listener(
        "b-ok",
        "acme",
        "t-ok",
        &["command"],
        ok.url().as_str(),
        None,
    )
    .await;
    h.wait_ready("a-gone").await;
    h.wait_ready("b-ok").await;
    deliver_one(&h, &ok).await;
    h.wait_condition("a-gone", "Ready", "False", "EndpointGone")
        .await;
    deliver_one(&h, &ok).await;
    h.wait_metric(DROPPED_SUSPENDED, 1.0).await;
    assert_eq!(gone.request_count(), 1);
    // The drop is on the Listener's status, counted and explained.
    h.wait_status("a-gone", "the drop recorded", |s| {
        s.failed == 2
            && s.last_error.as_deref() == Some("dropped: deliveries to this listener are suspended")
    })
    .await;
    let users = h.ns.api::<WebhookUser>();
    eventually(
        "usage 3: two to b-ok, one attempt at a-gone",
        WAIT,
        || async { (users.get("acme").await.ok()?.status?.usage?.deliveries == 3).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_all_namespaces_expiry_stays_in_its_registration_and_token_expiry_reaches_all() {
    let plane = Arc::new(
        tokio::task::spawn_blocking(PrivatePlane::start)
            .await
            .unwrap(),
    );
    let first = TestNamespace::on(&plane.kubeconfig(), "trust-all-a").await;
    let second = TestNamespace::on(&plane.kubeconfig(), "trust-all-b").await;
    let a = Harness::start_all_namespaces(first, ALLOW_LOOPBACK).await;
    let b = a.beside(second);
    let (ra, rb) = (Receiver::start().await, Receiver::start().await);
    // One token, shared by a Listener in each namespace: one stream.
    let token = a.token("user-1", SPHERE).await;
    for (h, receiver) in [(&a, &ra), (&b, &rb)] {
        h.create_user("acme", true, None).await;
        h.create_token_secret("t", &token).await;
        h.create_listener(
            "hook",
            "acme",
            "t",
            &["command"],
            receiver.url().as_str(),
            None,
        )
        .await;
        h.wait_ready("hook").await;
    }
    a.wait_streams(1).await;

    // A registration on the same token whose expiresAt has passed, in the first namespace.
    a.create_listener(
        "expired",
        "acme",
        "t",
        &["command"],
        ra.url().as_str(),
        Some("2020-01-01T00:00:00Z"),
    )
    .await;
    a.wait_gone("expired").await;
    a.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    ra.wait_for_requests(1, WAIT).await;
    rb.wait_for_requests(1, WAIT).await;
    b.wait_ready("hook").await;

    // The event server's TOKEN_EXPIRED speaks for the token: every Listener on it goes.
    a.admin.revoke_token(&token).await.unwrap();
    a.wait_gone("hook").await;
    b.wait_gone("hook").await;
    a.wait_streams(0).await;
    // Both token Secrets were the users' own.
    assert!(secret_exists(&a, "t").await && secret_exists(&b, "t").await);
}

#[tokio::test]
async fn a_listener_deleted_without_its_finalizer_is_no_longer_routed() {
    let h = Harness::start("trust-no-finalizer").await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    h.wait_streams(1).await;
    // Take the finalizer off and delete in one compare-and-swap chain, so the operator never
    // sees the deletion with its finalizer on; retried when the operator put it back first.
    let listeners = h.ns.api::<Listener>();
    eventually("deleted without the finalizer", WAIT, || async {
        let listener = listeners.get("hook").await.ok()?;
        let patch = json!({"metadata": {
            "finalizers": null,
            "resourceVersion": listener.metadata.resource_version,
        }});
        let patched = listeners
            .patch("hook", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .ok()?;
        let precondition = kube::api::Preconditions {
            resource_version: patched.metadata.resource_version,
            uid: None,
        };
        let delete = DeleteParams {
            preconditions: Some(precondition),
            ..DeleteParams::default()
        };
        listeners.delete("hook", &delete).await.ok().map(|_| ())
    })
    .await;
    h.wait_gone("hook").await;
    // The watch saw it go: the routing entry and with it the token's stream are gone.
    h.wait_streams(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_down_the_operator_is_not_ready_still_alive_and_stops_in_time() {
    let plane = Arc::new(
        tokio::task::spawn_blocking(PrivatePlane::start)
            .await
            .unwrap(),
    );
    let ns = TestNamespace::on(&plane.kubeconfig(), "trust-apiserver-down").await;
    let mut h = Harness::start_in(
        ns,
        Arc::new(crownstone_webhooks::clock::SystemClock),
        ALLOW_LOOPBACK,
    )
    .await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    let health = h.operator.as_ref().unwrap().health_addr();
    let status = |path: &'static str| async move {
        reqwest::get(format!("http://{health}{path}"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    eventually("ready", WAIT, || async {
        (status("/readyz").await == 200).then_some(())
    })
    .await;

    let stopping = plane.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap();
    eventually("not ready once the watches fail", WAIT * 2, || async {
        (status("/readyz").await == 503).then_some(())
    })
    .await;
    assert_eq!(
        status("/healthz").await,
        200,
        "a short outage is no reason to restart"
    );
    // Deliveries need no API server.
    deliver_one(&h, &receiver).await;
    tokio::time::timeout(std::time::Duration::from_secs(60), h.stop_operator())
        .await
        .expect("shutdown finished although the API server is down");
}
