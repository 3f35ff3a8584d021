//! Client secret rotation with overlap: while deliveries flow, a changed secret keeps the
//! replaced one signing until the overlap ends, through an operator restart, so a receiver
//! verifying with either (the reference `standardwebhooks` library here) rejects nothing; after
//! the overlap only the new one signs. Changed by hand in the Secret, and through the REST
//! facade's `PATCH` and `rotate`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use crownstone_webhooks::clock::SystemClock;
use crownstone_webhooks::conventions::{CLIENT_SECRET, PREVIOUS_SECRETS, RECORDED_CLIENT_SECRET};
use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::delivery::{receiver_secret, verify, SigningKey};
use crownstone_webhooks::operator;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use reqwest::Method;
use serde_json::json;

use crate::delivery::{signed_parts, verify_with_python};
use crate::support::api::{registration, Facade};
use crate::support::cluster::eventually;
use crate::support::operator::{test_args, Harness, WAIT};
use crate::support::receiver::{Receiver, RecordedRequest};

const SPHERE: &str = "sphere-1";
/// Short, so the test sees it end; long enough to span a restart of the operator.
const OVERLAP: &str = "30s";

/// Publishes an event every 100 ms until dropped: steady delivery.
struct Publisher {
    running: Arc<AtomicBool>,
}

impl Publisher {
    fn start(h: &Harness) -> Publisher {
        let running = Arc::new(AtomicBool::new(true));
        let admin = h.admin.clone();
        let flag = running.clone();
        tokio::spawn(async move {
            while flag.load(Ordering::Relaxed) {
                let _ = admin.publish(&[samples::multi_switch(SPHERE)]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Publisher { running }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
    }
}

fn operator_flags() -> Vec<&'static str> {
    vec![
        "--allow-private-destinations",
        "--secret-rotation-overlap",
        OVERLAP,
    ]
}

/// The credentials Secret's value under `key`, as text.
async fn stored(h: &Harness, user: &str, key: &str) -> Option<String> {
    let secret =
        h.ns.api::<Secret>()
            .get(&format!("{user}-credentials"))
            .await
            .expect("read the credentials Secret");
    let value = secret.data?.get(key)?.0.clone();
    String::from_utf8(value).ok()
}

/// Waits until the Secret records `previous` among its previous secrets, and returns its expiry.
async fn wait_recorded(h: &Harness, user: &str, previous: &str) -> DateTime<Utc> {
    eventually("the previous secret recorded", WAIT, || async {
        let list: serde_json::Value =
            serde_json::from_str(&stored(h, user, PREVIOUS_SECRETS).await?).ok()?;
        let entry = list
            .as_array()?
            .iter()
            .find(|entry| entry["secret"] == previous)?;
        DateTime::parse_from_rfc3339(entry["expiresAt"].as_str()?)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    })
    .await
}

/// Waits for `count` more requests than `seen`, and returns those.
async fn next_requests(receiver: &Receiver, seen: usize, count: usize) -> Vec<RecordedRequest> {
    receiver
        .wait_for_requests(seen + count, WAIT)
        .await
        .split_off(seen)
}

fn body_secret(request: &RecordedRequest) -> String {
    request.json()["clientSecret"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn timestamp(request: &RecordedRequest) -> i64 {
    request
        .header("webhook-timestamp")
        .and_then(|t| t.parse().ok())
        .expect("a webhook-timestamp")
}

/// Which of `requests` the reference library accepts with `secret`.
async fn accepted(secret: &str, requests: &[RecordedRequest]) -> Vec<bool> {
    let parts: Vec<_> = requests.iter().map(signed_parts).collect();
    verify_with_python(&receiver_secret(secret), &parts)
        .await
        .iter()
        .map(|result| result["ok"] == true)
        .collect()
}

/// Whether our own verifier finds a signature by `secret` on the request.
fn signed_with(request: &RecordedRequest, secret: &str) -> bool {
    let key = SigningKey::from_client_secret(secret).expect("a key");
    let (Some(id), Some(signature)) = (
        request.header("webhook-id"),
        request.header("webhook-signature"),
    ) else {
        return false;
    };
    verify(&key, id, timestamp(request), &request.body, signature)
}

#[tokio::test]
async fn a_hand_edited_secret_overlaps_the_old_one_across_a_restart_until_it_expires() {
    let mut h =
        Harness::start_with("rotation-hand", Arc::new(SystemClock), &operator_flags()).await;
    let receiver = Receiver::start().await;
    h.ready_listener("steady", "acme", &["command"], &receiver.url())
        .await;
    let old = h.client_secret("acme").await;
    let publisher = Publisher::start(&h);
    let before = next_requests(&receiver, 0, 3).await;

    // The secret is changed by hand, as `kubectl edit` would.
    let new = "changed-by-hand-0123456789abcdef";
    h.ns.api::<Secret>()
        .patch(
            "acme-credentials",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {CLIENT_SECRET: new}})),
        )
        .await
        .expect("edit the credentials Secret");
    let expires_at = wait_recorded(&h, "acme", &old).await;
    assert_eq!(
        stored(&h, "acme", RECORDED_CLIENT_SECRET).await.as_deref(),
        Some(new)
    );
    let seen = receiver.request_count();
    let during = next_requests(&receiver, seen, 5).await;

    // A new operator: the overlap is the one stored, not a new one.
    h.stop_operator().await;
    let restarted = operator::start(
        h.ns.client.clone(),
        test_args(&h.sim.base_url(), &h.ns.name, &operator_flags()),
        Arc::new(SystemClock),
    )
    .await
    .expect("the operator restarts");
    h.operator = Some(restarted);
    let seen = receiver.request_count();
    let after_restart = next_requests(&receiver, seen, 5).await;
    assert_eq!(wait_recorded(&h, "acme", &old).await, expires_at);

    // Every delivery up to the end of the overlap verifies with the old secret; every one that
    // carries the new secret verifies with it too.
    let all = receiver.requests();
    let overlapping: Vec<RecordedRequest> = all
        .iter()
        .filter(|r| timestamp(r) < expires_at.timestamp())
        .cloned()
        .collect();
    assert!(overlapping.len() >= before.len() + during.len() + after_restart.len());
    assert!(accepted(&old, &overlapping).await.iter().all(|ok| *ok));
    let carrying_new: Vec<RecordedRequest> = overlapping
        .iter()
        .filter(|r| body_secret(r) == new)
        .cloned()
        .collect();
    assert!(carrying_new.len() >= during.len() + after_restart.len());
    assert!(accepted(new, &carrying_new).await.iter().all(|ok| *ok));
    for request in &carrying_new {
        let signature = request.header("webhook-signature").unwrap_or_default();
        assert_eq!(signature.split(' ').count(), 2, "{signature}");
        // Newest first.
        let first = SigningKey::from_client_secret(new).expect("a key");
        assert!(verify(
            &first,
            request.header("webhook-id").unwrap_or_default(),
            timestamp(request),
            &request.body,
            signature.split(' ').next().unwrap_or_default()
        ));
    }

    // After the overlap, the old secret is refused and the leader prunes it.
    let wait = (expires_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(1)).await;
    let seen = receiver.request_count();
    let late = next_requests(&receiver, seen, 3).await;
    drop(publisher);
    assert!(late.iter().all(|r| timestamp(r) >= expires_at.timestamp()));
    assert!(accepted(new, &late).await.iter().all(|ok| *ok));
    assert!(accepted(&old, &late).await.iter().all(|ok| !*ok));
    assert!(late.iter().all(|r| body_secret(r) == new));
    eventually("the expired secret pruned", WAIT, || async {
        (stored(&h, "acme", PREVIOUS_SECRETS).await.as_deref() == Some("[]")).then_some(())
    })
    .await;
    assert!(late.iter().all(|r| !signed_with(r, &old)));
}

/// Publishes one event and returns the request it made.
async fn deliver(f: &Facade, receiver: &Receiver) -> RecordedRequest {
    let seen = receiver.request_count();
    f.h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .expect("publish");
    next_requests(receiver, seen, 1).await.remove(0)
}

#[tokio::test]
async fn the_facade_rotates_and_patches_with_the_overlap() {
    let f = Facade::start("rotation-api").await;
    let receiver = Receiver::start().await;
    let user = f.new_user("acme").await;
    let token = f.token().await;
    let answer = f
        .register(
            &user,
            registration(&token, "user-1", &["command"], receiver.url().as_str()),
        )
        .await;
    let listener = answer.expect(200).json["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    f.h.wait_ready(&listener).await;
    let first = deliver(&f, &receiver).await;
    assert_eq!(body_secret(&first), user.secret);

    // `rotate` answers a fresh secret; the users list shows it; deliveries carry it and are
    // signed with it and with the one it replaced.
    let answer = f
        .call(
            Method::POST,
            &format!("/api/users/{}/rotate", user.id),
            f.admin(),
            None,
        )
        .await;
    answer.expect(200);
    assert_eq!(answer.json["id"], user.id.as_str());
    let rotated = answer.json["secret"].as_str().expect("a secret").to_owned();
    assert_eq!(rotated.len(), 32);
    assert_ne!(rotated, user.secret);
    let users = f.call(Method::GET, "/api/users", f.admin(), None).await;
    assert_eq!(users.json[0]["secret"], rotated.as_str());
    wait_recorded(&f.h, &user.id, &user.secret).await;
    let signed = eventually("a delivery with the rotated secret", WAIT, || async {
        let request = deliver(&f, &receiver).await;
        (body_secret(&request) == rotated).then_some(request)
    })
    .await;
    assert!(signed_with(&signed, &rotated));
    assert!(signed_with(&signed, &user.secret));

    // `PATCH` with a secret: three secrets sign, newest first.
    f.call(
        Method::PATCH,
        &format!("/api/users/{}", user.id),
        f.admin(),
        Some(json!({"secret": "patched-secret"})),
    )
    .await
    .expect(204);
    wait_recorded(&f.h, &user.id, &rotated).await;
    let signed = eventually("a delivery with the patched secret", WAIT, || async {
        let request = deliver(&f, &receiver).await;
        (body_secret(&request) == "patched-secret").then_some(request)
    })
    .await;
    let signature = signed.header("webhook-signature").unwrap_or_default();
    assert_eq!(signature.split(' ').count(), 3, "{signature}");
    for secret in ["patched-secret", rotated.as_str(), user.secret.as_str()] {
        assert!(signed_with(&signed, secret), "{secret}");
    }
    assert!(accepted(&rotated, std::slice::from_ref(&signed)).await[0]);

    // Unknown users and missing keys change nothing.
    f.call(Method::POST, "/api/users/nobody/rotate", f.admin(), None)
        .await
        .expect(404);
    f.call(
        Method::POST,
        &format!("/api/users/{}/rotate", user.id),
        crate::support::api::Key::None,
        None,
    )
    .await
    .expect(401);
    assert_eq!(
        stored(&f.h, &user.id, CLIENT_SECRET).await.as_deref(),
        Some("patched-secret")
    );
}
