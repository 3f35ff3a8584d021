//! Dead letters on the real control plane: a delivery that fails for good, or is dropped, is
//! POSTed once to its Listener's (or its owner's) `deadLetterSink`, with the original body,
//! `webhook-id` and signature scheme, and the `crownstone-error-*` headers; a sink that fails
//! too gets nothing more; the API server refuses malformed sinks, and the operator a sink the
//! URL policy refuses.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::delivery::{verify, SigningKey};
use crownstone_webhooks::resources::{Listener, WebhookUser};
use serde_json::{json, Value};

use crate::support::cluster::{eventually, TestNamespace};
use crate::support::objects::{create, dynamic, listener, user};
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::{Receiver, RecordedRequest, Reply};

const SPHERE: &str = "sphere-1";
const DEAD: &str = "crownstone_webhooks_dead_letters_total";

/// Makes the token Secret of Listener `name` and the Listener.
async fn make_listener(h: &Harness, name: &str, owner: &str, url: &str, delivery: Option<Value>) {
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret(&format!("{name}-token"), &token)
        .await;
    create(
        &dynamic::<Listener>(&h.ns, "listeners"),
        listener(name, owner, &format!("{name}-token"), url, delivery),
    )
    .await
    .unwrap();
}

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
    verify(&key, id, timestamp, &request.body, signature)
}

fn requests_to<'a>(requests: &'a [RecordedRequest], path: &str) -> Vec<&'a RecordedRequest> {
    requests.iter().filter(|r| r.path == path).collect()
}

fn webhook_id(request: &RecordedRequest) -> String {
    request.header("webhook-id").unwrap_or_default().to_owned()
}

async fn dead_lettered(h: &Harness, name: &str) -> u64 {
    let api = h.ns.api::<Listener>();
    api.get(name)
        .await
        .ok()
        .and_then(|l| l.status)
        .map_or(0, |s| s.dead_lettered)
}

const FAILURE_BODY: &[u8] = b"{\"error\":\"receiver is down\"}";

#[tokio::test]
async fn a_delivery_that_fails_for_good_reaches_the_sink_once_with_its_error() {
    let h = Harness::start("dead-letter").await;
    let failing = Receiver::scripted(
        [],
        Reply::WithBody(500_u16.try_into().unwrap(), FAILURE_BODY),
    )
    .await;
    let sink = Receiver::start().await;
    let users = dynamic::<WebhookUser>(&h.ns, "webhookusers");
    let owner_sink = sink.url_with_path("/owner").to_string();
    create(
        &users,
        user(
            "acme",
            Some(json!({"deadLetterSink": {"url": owner_sink}})),
            None,
        ),
    )
    .await
    .unwrap();
    let policy = |sink: Option<String>| {
        let mut delivery = json!({"retry": 2, "backoffDelay": "PT0.05S"});
        if let Some(sink) = sink {
            delivery["deadLetterSink"] = json!({"url": sink});
        }
        Some(delivery)
    };
    // Its own sink, over its owner's.
    make_listener(
        &h,
        "own",
        "acme",
        failing.url_with_path("/own").as_str(),
        policy(Some(sink.url_with_path("/listener").to_string())),
    )
    .await;
    // No sink of its own: its owner's.
    make_listener(
        &h,
        "inherit",
        "acme",
        failing.url_with_path("/inherit").as_str(),
        policy(None),
    )
    .await;
    // Its sink fails too: counted, and nothing more is sent.
    make_listener(
        &h,
        "doomed",
        "acme",
        failing.url_with_path("/doomed").as_str(),
        policy(Some(failing.url_with_path("/doomed-sink").to_string())),
    )
    .await;
    for name in ["own", "inherit", "doomed"] {
        h.wait_ready(name).await;
    }
    h.wait_streams(3).await;
    let effective = h
        .wait_status("own", "effectiveDelivery names the sink", |s| {
            s.effective_delivery
                .as_ref()
                .is_some_and(|e| e.dead_letter_sink.is_some())
        })
        .await;
    assert_eq!(
        effective
            .effective_delivery
            .unwrap()
            .dead_letter_sink
            .as_deref(),
        Some(sink.url_with_path("/listener").as_str())
    );

    const EVENTS: usize = 3;
    let events: Vec<Value> = (0..EVENTS).map(|_| samples::multi_switch(SPHERE)).collect();
    h.admin.publish(&events).await.unwrap();
    // Two attempts each for own, inherit, doomed and doomed's dead letters.
    failing
        .wait_for_requests(EVENTS * 2 * 4, Duration::from_secs(60))
        .await;
    sink.wait_for_requests(EVENTS * 2, Duration::from_secs(60))
        .await;
    // A second dead letter, or a third attempt, would come within this.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failed = failing.requests();
    let letters = sink.requests();
    assert_eq!(
        failed.len(),
        EVENTS * 2 * 4,
        "attempts at the failing receiver"
    );
    assert_eq!(letters.len(), EVENTS * 2, "dead letters");

    let secret = h.client_secret("acme").await;
    for (listener, sink_path) in [("own", "/listener"), ("inherit", "/owner")] {
        let attempts = requests_to(&failed, &format!("/{listener}"));
        let mut by_id: BTreeMap<String, Vec<&RecordedRequest>> = BTreeMap::new();
        for attempt in attempts {
            by_id.entry(webhook_id(attempt)).or_default().push(attempt);
        }
        assert_eq!(by_id.len(), EVENTS, "{listener}: deliveries");
        let mine = requests_to(&letters, sink_path);
        assert_eq!(mine.len(), EVENTS, "{listener}: one dead letter per event");
        for letter in mine {
            let id = webhook_id(letter);
            let originals = by_id
                .get(&id)
                .unwrap_or_else(|| panic!("{listener}: dead letter {id} matches no delivery"));
            assert_eq!(originals.len(), 2);
            assert_eq!(
                letter.body, originals[0].body,
                "{listener}: the original body"
            );
            assert!(
                signed_with(letter, &secret),
                "{listener}: signed by the owner"
            );
            assert_eq!(
                letter.header("crownstone-error-dest"),
                Some(failing.url_with_path(&format!("/{listener}")).as_str())
            );
            assert_eq!(letter.header("crownstone-error-code"), Some("500"));
            let data = base64::engine::general_purpose::STANDARD
                .decode(letter.header("crownstone-error-data").unwrap_or_default())
                .unwrap();
            assert_eq!(data, FAILURE_BODY);
            assert_eq!(
                letter.header("crownstone-error-reason"),
                Some("attempts-exhausted")
            );
            assert!(letter.header("traceparent").is_some());
        }
        // Every id dead-lettered once.
        let ids: std::collections::BTreeSet<_> = requests_to(&letters, sink_path)
            .into_iter()
            .map(webhook_id)
            .collect();
        assert_eq!(ids.len(), EVENTS);
    }
    // The doomed sink got its dead letters, each tried as a delivery (twice), then no more.
    let doomed = requests_to(&failed, "/doomed-sink");
    assert_eq!(doomed.len(), EVENTS * 2);
    assert!(doomed
        .iter()
        .all(|r| r.header("crownstone-error-reason") == Some("attempts-exhausted")));

    h.wait_metric(
        &format!("{DEAD}{{outcome=\"delivered\"}}"),
        (EVENTS * 2) as f64,
    )
    .await;
    assert_eq!(
        h.metric(&format!("{DEAD}{{outcome=\"failed\"}}")).await,
        EVENTS as f64
    );
    assert_eq!(
        h.metric(&format!("{DEAD}{{outcome=\"dropped\"}}")).await,
        0.0
    );
    for (name, expected) in [("own", EVENTS), ("inherit", EVENTS), ("doomed", 0)] {
        eventually(&format!("{name}: status.deadLettered"), WAIT, || async {
            (dead_lettered(&h, name).await == expected as u64).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn drops_reach_the_sink_with_their_reason() {
    let h = Harness::start("dead-letter-drops").await;
    let gone = Receiver::scripted([], Reply::WithBody(410_u16.try_into().unwrap(), b"bye")).await;
    let fine = Receiver::start().await;
    let sink = Receiver::start().await;
    let users = dynamic::<WebhookUser>(&h.ns, "webhookusers");
    create(&users, user("acme", None, None)).await.unwrap();
    // One delivery a day.
    create(&users, user("thrifty", None, Some(1)))
        .await
        .unwrap();
    let with_sink =
        |path: &str| Some(json!({"deadLetterSink": {"url": sink.url_with_path(path).to_string()}}));
    make_listener(&h, "gone", "acme", gone.url().as_str(), with_sink("/gone")).await;
    make_listener(
        &h,
        "thrifty",
        "thrifty",
        fine.url().as_str(),
        with_sink("/thrifty"),
    )
    .await;
    // A sink the URL policy refuses whatever is allowed: link-local (cloud metadata).
    make_listener(
        &h,
        "metadata",
        "acme",
        fine.url_with_path("/metadata").as_str(),
        Some(json!({"deadLetterSink": {"url": "http://169.254.169.254/latest"}})),
    )
    .await;
    h.wait_ready("gone").await;
    h.wait_ready("thrifty").await;
    h.wait_condition("metadata", "Ready", "False", "InvalidSpec")
        .await;
    let refused = h.ns.api::<Listener>().get("metadata").await.unwrap();
    let message = &refused.condition("Ready").unwrap().message;
    assert!(
        message.contains("spec.delivery.deadLetterSink") && message.contains("link-local"),
        "{message}"
    );
    h.wait_streams(2).await;

    // The first event: 410 from "gone" (the Listener is suspended), "thrifty" delivered.
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    let letters = sink.wait_for_requests(1, Duration::from_secs(30)).await;
    assert_eq!(letters[0].path, "/gone");
    assert_eq!(letters[0].header("crownstone-error-reason"), Some("gone"));
    assert_eq!(letters[0].header("crownstone-error-code"), Some("410"));
    assert_eq!(letters[0].header("crownstone-error-data"), Some("Ynll"));
    fine.wait_for_requests(1, Duration::from_secs(30)).await;
    h.wait_condition("gone", "Ready", "False", "EndpointGone")
        .await;

    // The second: dropped at submit for "gone" (suspended), and past the allowance for
    // "thrifty". Neither was answered by anyone: no code, no data.
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    let letters = sink.wait_for_requests(3, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let letters = {
        assert_eq!(sink.requests().len(), 3, "{letters:?}");
        sink.requests()
    };
    let reason = |path: &str| {
        let found = requests_to(&letters, path);
        found
            .last()
            .map(|r| {
                (
                    r.header("crownstone-error-reason")
                        .unwrap_or_default()
                        .to_owned(),
                    r.header("crownstone-error-code")
                        .unwrap_or_default()
                        .to_owned(),
                    r.header("crownstone-error-data")
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .unwrap_or_default()
    };
    assert_eq!(
        reason("/gone"),
        ("suspended".into(), String::new(), String::new())
    );
    assert_eq!(
        reason("/thrifty"),
        ("allowance-exhausted".into(), String::new(), String::new())
    );
    let secret = h.client_secret("thrifty").await;
    assert!(signed_with(requests_to(&letters, "/thrifty")[0], &secret));
    // Nothing more went to the receivers themselves, nor anywhere for the refused sink.
    assert_eq!(gone.request_count(), 1);
    assert_eq!(fine.request_count(), 1);
    assert!(requests_to(&fine.requests(), "/metadata").is_empty());
    h.wait_metric(&format!("{DEAD}{{outcome=\"delivered\"}}"), 3.0)
        .await;
}

#[tokio::test]
async fn the_api_server_refuses_malformed_sinks_with_a_clear_message() {
    let ns = TestNamespace::new("dead-letter-cel").await;
    let listeners = dynamic::<Listener>(&ns, "listeners");
    let users = dynamic::<WebhookUser>(&ns, "webhookusers");
    let url = "https://hooks.example.com/x";
    let refused = [
        (
            "both",
            json!({"url": "https://a.example.com/", "ref": {"kind": "Service", "name": "dead"}}),
            "deadLetterSink takes exactly one of url and ref",
        ),
        (
            "neither",
            json!({}),
            "deadLetterSink takes exactly one of url and ref",
        ),
        (
            "pod",
            json!({"ref": {"kind": "Pod", "name": "dead"}}),
            "deadLetterSink.ref.kind must be Service",
        ),
        (
            "ftp",
            json!({"url": "ftp://a.example.com/"}),
            "deadLetterSink.url must be an absolute http or https URL",
        ),
        (
            "dotted",
            json!({"ref": {"kind": "Service", "name": "dead.other"}}),
            "deadLetterSink.ref.name must be a Service name",
        ),
    ];
    for (name, sink, message) in refused {
        let delivery = json!({"deadLetterSink": sink});
        let error = create(
            &listeners,
            listener(
                name,
                "acme",
                &format!("{name}-token"),
                url,
                Some(delivery.clone()),
            ),
        )
        .await
        .expect_err(name);
        assert!(
            error.contains("spec.delivery.deadLetterSink"),
            "{name}: {error}"
        );
        assert!(error.contains(message), "{name}: {error}");
        let error = create(&users, user(name, Some(delivery), None))
            .await
            .expect_err(name);
        assert!(error.contains(message), "{name} (WebhookUser): {error}");
    }
    assert!(listeners
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());
    for (name, sink) in [
        ("by-url", json!({"url": "https://sink.example.com/dead"})),
        (
            "by-ref",
            json!({"ref": {"kind": "Service", "name": "dead", "port": 8080, "path": "/in"}}),
        ),
    ] {
        let delivery = json!({"deadLetterSink": sink});
        create(
            &listeners,
            listener(
                name,
                "acme",
                &format!("{name}-token"),
                url,
                Some(delivery.clone()),
            ),
        )
        .await
        .unwrap();
        create(&users, user(name, Some(delivery), None))
            .await
            .unwrap();
    }
}
