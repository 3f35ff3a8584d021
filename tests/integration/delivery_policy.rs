//! `spec.delivery` on the real control plane: the API server refuses nonsense policies, and the
//! operator delivers with the Listener's fields over its owner's over its own defaults, with
//! linear and exponential timings measured at a receiver that answers 500.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crownstone_webhooks::clock::SystemClock;
use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::resources::{Listener, WebhookUser};
use serde_json::{json, Value};

use crate::support::api::{registration, Facade};
use crate::support::cluster::{eventually, TestNamespace};
use crate::support::objects::{create, dynamic, listener, user};
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::{Receiver, RecordedRequest, Reply};

const SPHERE: &str = "sphere-1";

#[tokio::test]
async fn the_api_server_refuses_nonsense_policies_with_a_clear_message() {
    let ns = TestNamespace::new("policy-cel").await;
    let listeners = dynamic::<Listener>(&ns, "listeners");
    let users = dynamic::<WebhookUser>(&ns, "webhookusers");
    let url = "https://hooks.example.com/x";
    let refused = [
        ("zero-retry", json!({"retry": 0}), "retry"),
        (
            "timeout-above-max-age",
            json!({"timeout": "PT10S", "maxAge": "PT5S"}),
            "timeout must not be longer than maxAge",
        ),
        (
            "zero-delay",
            json!({"backoffDelay": "PT0S"}),
            "must be a positive ISO-8601 duration",
        ),
        (
            "days",
            json!({"maxAge": "P1D"}),
            "must be a positive ISO-8601 duration",
        ),
        (
            "go-style",
            json!({"timeout": "10s"}),
            "must be a positive ISO-8601 duration",
        ),
        (
            "negative",
            json!({"retryAfterMax": "PT-5S"}),
            "must be a positive ISO-8601 duration",
        ),
        (
            "fibonacci",
            json!({"backoffPolicy": "fibonacci"}),
            "backoffPolicy",
        ),
    ];
    for (name, delivery, message) in refused {
        let error = create(
            &listeners,
            listener(name, "acme", "t", url, Some(delivery.clone())),
        )
        .await
        .expect_err(name);
        assert!(error.contains("spec.delivery"), "{name}: {error}");
        assert!(error.contains(message), "{name}: {error}");
        let error = create(&users, user(name, Some(delivery), None))
            .await
            .expect_err(name);
        assert!(error.contains(message), "{name} (WebhookUser): {error}");
    }
    // Nothing of the refused ones was stored.
    assert!(listeners
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());

    let sound = json!({
        "retry": 3, "backoffPolicy": "linear", "backoffDelay": "PT0.5S",
        "timeout": "PT2S", "retryAfterMax": "PT1M", "maxAge": "PT2S"
    });
    create(
        &listeners,
        listener("sound", "acme", "t", url, Some(sound.clone())),
    )
    .await
    .unwrap();
    create(&users, user("sound", Some(sound), None))
        .await
        .unwrap();
    create(&listeners, listener("none", "acme", "t", url, None))
        .await
        .unwrap();
}

/// Gaps between a delivery's attempts, by (path, webhook-id), in arrival order.
fn attempts_by_delivery(requests: &[RecordedRequest]) -> BTreeMap<(String, String), Vec<Instant>> {
    let mut by_delivery: BTreeMap<(String, String), Vec<Instant>> = BTreeMap::new();
    for request in requests {
        let id = request.header("webhook-id").unwrap_or_default().to_owned();
        by_delivery
            .entry((request.path.clone(), id))
            .or_default()
            .push(request.received_at);
    }
    by_delivery
}

/// The mean gap, in seconds, after attempt `attempt` (1-based) over the deliveries to `path`.
fn mean_gap(
    deliveries: &BTreeMap<(String, String), Vec<Instant>>,
    path: &str,
    attempt: usize,
) -> f64 {
    let gaps: Vec<f64> = deliveries
        .iter()
        .filter(|((p, _), _)| p == path)
        .map(|(_, times)| (times[attempt] - times[attempt - 1]).as_secs_f64())
        .collect();
    assert!(!gaps.is_empty(), "no deliveries to {path}");
    gaps.iter().sum::<f64>() / gaps.len() as f64
}

#[tokio::test]
async fn the_listeners_policy_wins_over_its_owners_over_the_defaults() {
    // The operator's default: two attempts, exponential from 10 ms.
    let h = Harness::start_with(
        "policy-order",
        Arc::new(SystemClock),
        &[
            "--allow-private-destinations",
            "--delivery-max-attempts",
            "2",
        ],
    )
    .await;
    let receiver = Receiver::scripted([], Reply::status(500)).await;
    let users = dynamic::<WebhookUser>(&h.ns, "webhookusers");
    let listeners = dynamic::<Listener>(&h.ns, "listeners");
    // The owner's policy: three attempts, linear from 100 ms, waits of up to 10 s.
    let owner_policy = json!({
        "retry": 3, "backoffPolicy": "linear", "backoffDelay": "PT0.1S", "retryAfterMax": "PT10S"
    });
    create(&users, user("acme", Some(owner_policy), None))
        .await
        .unwrap();
    create(&users, user("plain", None, None)).await.unwrap();
    let token = h.token("user-1", SPHERE).await;
    let url = |path: &str| receiver.url_with_path(path).to_string();
    let cases = [
        // (listener, owner, its own policy)
        ("dflt", "plain", None),
        ("owner", "acme", None),
        ("lin", "acme", Some(json!({"retry": 6}))),
        (
            "exp",
            "acme",
            Some(json!({"retry": 6, "backoffPolicy": "exponential"})),
        ),
    ];
    for (name, owner, delivery) in &cases {
        let secret = format!("{name}-token");
        h.create_token_secret(&secret, &token).await;
        create(
            &listeners,
            listener(
                name,
                owner,
                &secret,
                &url(&format!("/{name}")),
                delivery.clone(),
            ),
        )
        .await
        .unwrap();
    }
    for (name, _, _) in &cases {
        h.wait_ready(name).await;
    }
    h.wait_streams(1).await;

    // Each Listener says which policy it got, in full.
    let typed = h.ns.api::<Listener>();
    let expected_summaries = [
        ("dflt", "2x exponential PT0.01S timeout PT10S maxAge PT5M"),
        ("owner", "3x linear PT0.1S timeout PT10S maxAge PT5M"),
        ("lin", "6x linear PT0.1S timeout PT10S maxAge PT5M"),
        ("exp", "6x exponential PT0.1S timeout PT10S maxAge PT5M"),
    ];
    for (name, summary) in expected_summaries {
        eventually(
            &format!("{name}: effectiveDelivery {summary}"),
            WAIT,
            || async {
                let status = typed.get(name).await.ok()?.status?;
                (status.effective_delivery?.summary == summary).then_some(())
            },
        )
        .await;
    }
    let wide = h.ns.kubectl(&["get", "listeners", "-o", "wide"]);
    let wide = String::from_utf8_lossy(&wide.stdout);
    assert!(wide.contains("DELIVERY"), "{wide}");
    assert!(wide.contains("6x exponential PT0.1S"), "{wide}");

    const EVENTS: usize = 60;
    let events: Vec<Value> = (0..EVENTS).map(|_| samples::multi_switch(SPHERE)).collect();
    h.admin.publish(&events).await.unwrap();
    let expected_attempts = [("dflt", 2), ("owner", 3), ("lin", 6), ("exp", 6)];
    let total: usize = expected_attempts.iter().map(|(_, n)| n * EVENTS).sum();
    // The exponential schedule's ceilings add up to 3.1 s per delivery.
    receiver
        .wait_for_requests(total, Duration::from_secs(60))
        .await;
    // Any attempt past the policy's would come within the largest ceiling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = receiver.requests();
    assert_eq!(
        requests.len(),
        total,
        "more attempts than the policies allow"
    );
    let deliveries = attempts_by_delivery(&requests);
    for (name, attempts) in expected_attempts {
        let path = format!("/{name}");
        let counts: Vec<usize> = deliveries
            .iter()
            .filter(|((p, _), _)| *p == path)
            .map(|(_, times)| times.len())
            .collect();
        assert_eq!(counts.len(), EVENTS, "{name}: deliveries");
        assert!(
            counts.iter().all(|n| *n == attempts),
            "{name}: attempts {counts:?}"
        );
    }

    // Waits are drawn at random under a ceiling of 100 ms × n (linear) or 100 ms × 2^(n−1)
    // (exponential) after attempt n: means over 60 deliveries are half the ceilings, give or
    // take a few per cent. Compared by differences, loosely: a loaded machine adds to every gap
    // alike.
    let lin = |n| mean_gap(&deliveries, "/lin", n);
    let exp = |n| mean_gap(&deliveries, "/exp", n);
    let summary = format!(
        "linear {:?}, exponential {:?}",
        (1..6).map(lin).collect::<Vec<_>>(),
        (1..6).map(exp).collect::<Vec<_>>()
    );
    // Expected after the fifth attempt: 0.25 s linear, 0.8 s exponential.
    assert!(lin(5) > 0.12, "{summary}");
    assert!(exp(5) > 0.4, "{summary}");
    // Expected 0.2 s: linear waits grow by 50 ms per attempt.
    assert!(lin(5) - lin(1) > 0.1, "linear waits grow: {summary}");
    assert!(
        lin(5) - lin(1) < 0.45,
        "linear waits grow slowly: {summary}"
    );
    // Expected 0.7 s and 0.55 s: exponential waits double.
    assert!(
        exp(5) - exp(2) > 0.35,
        "exponential waits double: {summary}"
    );
    assert!(
        exp(5) - lin(5) > 0.25,
        "exponential outgrows linear: {summary}"
    );
}

#[tokio::test]
async fn the_rest_api_sets_no_policy_and_its_listeners_get_the_defaults() {
    let f = Facade::start("policy-rest").await;
    let acme = f.new_user("Acme").await;
    let receiver = Receiver::start().await;
    let token = f.token().await;
    let answer = f
        .register(
            &acme,
            registration(&token, "user-1", &["command"], receiver.url().as_str()),
        )
        .await;
    let id = answer.expect(200).json["id"].as_str().unwrap().to_owned();
    f.h.wait_ready(&id).await;

    let owner = f.h.ns.api::<WebhookUser>().get(&acme.id).await.unwrap();
    assert_eq!(owner.spec.delivery, None);
    let listeners = f.h.ns.api::<Listener>();
    assert_eq!(listeners.get(&id).await.unwrap().spec.delivery, None);
    // The harness's defaults: five attempts, exponential from 10 ms.
    eventually(
        "the defaults on the REST Listener's status",
        WAIT,
        || async {
            let status = listeners.get(&id).await.ok()?.status?;
            (status.effective_delivery?.summary
                == "5x exponential PT0.01S timeout PT10S maxAge PT5M")
                .then_some(())
        },
    )
    .await;
}
