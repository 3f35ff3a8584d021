//! The delivery engine against real receivers on loopback.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use crownstone_webhooks::delivery::{
    receiver_secret, ClientSecret, Clock, DeliveryConfig, DeliveryEngine, DeliveryTarget,
    DropReason, ListenerId, ListenerReport, SigningKey, Submission, Suspension,
};
use prometheus_client::registry::Registry;
use url::Url;

use crate::support::receiver::{Receiver, RecordedRequest, Reply};

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(20);

/// Fast retries, loopback allowed: what most tests need.
fn test_config() -> DeliveryConfig {
    DeliveryConfig {
        timeout: Duration::from_secs(10),
        max_attempts: 4,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        allow_private_destinations: true,
        ..DeliveryConfig::default()
    }
}

fn start(config: DeliveryConfig) -> (DeliveryEngine, Registry) {
    let mut registry = Registry::default();
    match DeliveryEngine::new(config, &mut registry) {
        Ok(engine) => (engine, registry),
        Err(error) => panic!("engine did not start: {error}"),
    }
}

fn target(listener: &str, generation: i64, url: Url) -> DeliveryTarget {
    DeliveryTarget {
        listener: ListenerId::new("ns", listener),
        generation,
        url: Arc::new(url),
        client_id: Arc::from("owner-1"),
        client_secret: ClientSecret::new(SECRET),
        user_id: Arc::from("user-1"),
        delivery: Arc::default(),
    }
}

fn parse_url(text: &str) -> Url {
    match Url::parse(text) {
        Ok(url) => url,
        Err(error) => panic!("{text}: {error}"),
    }
}

fn event(n: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"presence","subType":"enterSphere","user":{{"id":"u","name":"N"}},"sphere":{{"id":"s","name":"Home","uid":{n}}}}}"#
    ))
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        panic!("metrics do not encode: {error}");
    }
    text
}

/// A listener's reports added up.
#[derive(Debug, Default, Clone)]
struct Totals {
    generation: i64,
    delivered: u64,
    failed: u64,
    dropped: u64,
    last_delivery_time: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_drop_reason: Option<DropReason>,
    suspension: Option<Suspension>,
    reports: usize,
}

/// Adds up the engine's report deltas per listener, as the status writer does.
#[derive(Default)]
struct Tally {
    totals: HashMap<ListenerId, Totals>,
}

impl Tally {
    fn absorb(&mut self, reports: Vec<ListenerReport>) {
        for report in reports {
            let totals = self.totals.entry(report.listener.clone()).or_default();
            totals.generation = report.generation;
            totals.delivered += report.delivered;
            totals.failed += report.failed;
            totals.dropped += report.dropped;
            totals.last_delivery_time = report.last_delivery_time.or(totals.last_delivery_time);
            totals.last_error = report.last_error.or(totals.last_error.take());
            totals.last_drop_reason = report.last_drop_reason.or(totals.last_drop_reason);
            totals.suspension = report.suspension;
            totals.reports += 1;
        }
    }

    fn get(&mut self, engine: &DeliveryEngine, listener: &str) -> Totals {
        self.absorb(engine.take_reports());
        self.totals
            .get(&ListenerId::new("ns", listener))
            .cloned()
            .unwrap_or_default()
    }

    /// Takes reports until `done` holds for the listener's totals; panics after `WAIT`.
    async fn wait(
        &mut self,
        engine: &DeliveryEngine,
        listener: &str,
        done: impl Fn(&Totals) -> bool,
    ) -> Totals {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let totals = self.get(engine, listener);
            if done(&totals) {
                return totals;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("{listener}: condition not reached within {WAIT:?}; totals: {totals:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn header<'a>(request: &'a RecordedRequest, name: &str) -> &'a str {
    match request.header(name) {
        Some(value) => value,
        None => panic!("request has no {name} header: {:?}", request.headers),
    }
}

#[tokio::test]
async fn delivers_the_exact_body_and_headers() {
    let receiver = Receiver::start().await;
    let (engine, _registry) = start(test_config());
    // Odd field order, unknown fields, whitespace and escapes: all must arrive untouched.
    let raw = r#"{"zeta":true, "type":"command","subType":"multiSwitch","unknownField":{"nested":[1,2.50,"\u00e9"]},"sphere":{"id":"s1","name":"Home","uid":1}}"#;
    let url = receiver.url_with_path("/hooks/a?tag=x");
    engine.submit(Bytes::from(raw), target("exact", 1, url));

    let requests = receiver.wait_for_requests(1, WAIT).await;
    let request = &requests[0];
    let expected = format!(
        r#"{{"clientId":"owner-1","clientSecret":"{SECRET}","userId":"user-1","data":{raw}}}"#
    );
    assert_eq!(request.method, axum::http::Method::POST);
    assert_eq!(request.path, "/hooks/a?tag=x");
    assert_eq!(
        std::str::from_utf8(&request.body).ok(),
        Some(expected.as_str())
    );
    assert_eq!(header(request, "content-type"), "application/json");
    assert_eq!(header(request, "accept"), "application/json");
    assert_eq!(
        header(request, "user-agent"),
        format!("crownstone-webhooks/{}", env!("CARGO_PKG_VERSION"))
    );

    let id = header(request, "webhook-id");
    assert!(id.starts_with("msg_") && id.len() == 36, "{id}");
    let timestamp: i64 = match header(request, "webhook-timestamp").parse() {
        Ok(timestamp) => timestamp,
        Err(error) => panic!("webhook-timestamp is not an integer: {error}"),
    };
    assert!((Utc::now().timestamp() - timestamp).abs() < 300);
    let key = match SigningKey::from_client_secret(SECRET) {
        Ok(key) => key,
        Err(error) => panic!("{error}"),
    };
    assert_eq!(
        header(request, "webhook-signature"),
        key.sign(id, timestamp, &request.body)
    );

    let mut tally = Tally::default();
    let totals = tally.wait(&engine, "exact", |t| t.delivered == 1).await;
    assert_eq!((totals.failed, totals.dropped), (0, 0));
    assert!(totals.last_delivery_time.is_some());
    assert_eq!(totals.last_error, None);
}

#[tokio::test]
async fn transient_failures_are_retried_under_one_message_id() {
    let receiver = Receiver::scripted(
        [Reply::status(503), Reply::retry_after(503, 0)],
        Reply::status(200),
    )
    .await;
    let (engine, registry) = start(test_config());
    engine.submit(event(1), target("retry", 1, receiver.url()));

    let mut tally = Tally::default();
    let totals = tally.wait(&engine, "retry", |t| t.delivered == 1).await;
    assert_eq!((totals.failed, totals.dropped), (0, 0));

    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    let ids: Vec<&str> = requests.iter().map(|r| header(r, "webhook-id")).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert!(requests.iter().all(|r| r.body == requests[0].body));

    let text = metrics_text(&registry);
    assert!(text.contains("webhook_delivery_retries_total 2"), "{text}");
    assert!(
        text.contains(r#"webhook_delivery_attempts_total{result="server_error"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"webhook_deliveries_total{outcome="delivered"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn too_many_requests_and_timeouts_are_retried() {
    let receiver = Receiver::scripted(
        [Reply::retry_after(429, 0), Reply::status(408), Reply::Hang],
        Reply::status(204),
    )
    .await;
    let config = DeliveryConfig {
        timeout: Duration::from_millis(300),
        ..test_config()
    };
    let (engine, registry) = start(config);
    engine.submit(event(1), target("transient", 1, receiver.url()));

    let mut tally = Tally::default();
    let totals = tally.wait(&engine, "transient", |t| t.delivered == 1).await;
    assert_eq!(totals.failed, 0);
    assert_eq!(receiver.request_count(), 4);
    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"webhook_delivery_attempts_total{result="timeout"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_error_fails_at_once_with_its_reason() {
    let receiver = Receiver::scripted([], Reply::status(400)).await;
    let (engine, _registry) = start(test_config());
    engine.submit(event(1), target("bad-request", 1, receiver.url()));

    let mut tally = Tally::default();
    let totals = tally.wait(&engine, "bad-request", |t| t.failed == 1).await;
    assert_eq!(totals.last_error.as_deref(), Some("HTTP 400 Bad Request"));
    assert_eq!(totals.delivered, 0);
    assert_eq!(totals.suspension, None);
    // The failure is final once reported, so no retry can still be on its way.
    assert_eq!(receiver.request_count(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_fails_with_its_reason() {
    // A port that was just free: nothing listens there.
    let closed = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(listener) => listener.local_addr(),
        Err(error) => panic!("cannot bind: {error}"),
    };
    let address = match closed {
        Ok(address) => address,
        Err(error) => panic!("no local address: {error}"),
    };
    let (engine, registry) = start(test_config());
    let url = parse_url(&format!("http://{address}/webhook?token=abc"));
    engine.submit(event(1), target("refused", 1, url));

    let mut tally = Tally::default();
    let totals = tally.wait(&engine, "refused", |t| t.failed == 1).await;
    assert_eq!(totals.last_error.as_deref(), Some("connection refused"));
    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"webhook_delivery_attempts_total{result="connection_error"} 4"#),
        "{text}"
    );
    assert!(text.contains("webhook_delivery_retries_total 3"), "{text}");
}

#[tokio::test]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let target_receiver = Receiver::start().await;
    let location = match axum::http::HeaderValue::from_str(target_receiver.url().as_str()) {
        Ok(value) => value,
        Err(error) => panic!("{error}"),
    };
    let redirect = Receiver::scripted(
        [],
        Reply::WithHeaders(
            axum::http::StatusCode::FOUND,
            vec![(axum::http::header::LOCATION, location)],
        ),
    )
    .await;
    let (engine, _registry) = start(test_config());
    engine.submit(event(1), target("redirect", 1, redirect.url()));

    let mut tally = Tally::default();
    let totals = tally.wait(&engine, "redirect", |t| t.failed == 1).await;
    assert_eq!(
        totals.last_error.as_deref(),
        Some("HTTP 302 Found (redirects are not followed)")
    );
    assert_eq!(redirect.request_count(), 1);
    assert_eq!(target_receiver.request_count(), 0);
}

#[tokio::test]
async fn gone_suspends_the_generation_until_it_changes() {
    let receiver = Receiver::start().await;
    receiver.push_replies([Reply::status(410)]);
    let (engine, registry) = start(test_config());
    let mut tally = Tally::default();

    engine.submit(event(1), target("gone", 1, receiver.url()));
    let totals = tally.wait(&engine, "gone", |t| t.failed == 1).await;
    assert_eq!(totals.suspension, Some(Suspension::EndpointGone));
    assert_eq!(totals.last_error.as_deref(), Some("HTTP 410 Gone"));

    // Same generation: dropped without a request.
    engine.submit(event(2), target("gone", 1, receiver.url()));
    let totals = tally.get(&engine, "gone");
    assert_eq!(totals.dropped, 1);
    assert_eq!(totals.last_drop_reason, Some(DropReason::Suspended));
    assert_eq!(totals.suspension, Some(Suspension::EndpointGone));

    // A new generation is delivered again, and the suspension is reported lifted.
    engine.submit(event(3), target("gone", 2, receiver.url()));
    let totals = tally.wait(&engine, "gone", |t| t.delivered == 1).await;
    assert_eq!(totals.generation, 2);
    assert_eq!(totals.suspension, None);
    assert_eq!(receiver.request_count(), 2);
    let requests = receiver.requests();
    assert!(requests[1].json()["data"]["sphere"]["uid"] == 3);

    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"webhook_delivery_drops_total{reason="suspended"} 1"#),
        "{text}"
    );
}

/// A clock the test moves by hand.
struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    fn new(now: DateTime<Utc>) -> Arc<Self> {
        Arc::new(Self(Mutex::new(now)))
    }

    fn advance(&self, by: TimeDelta) {
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tokio::test]
async fn an_endpoint_failing_for_the_window_is_suspended() {
    let receiver = Receiver::scripted([], Reply::status(500)).await;
    let clock = ManualClock::new(Utc::now());
    let config = DeliveryConfig {
        max_attempts: 1,
        endpoint_failing_after: Duration::from_secs(24 * 60 * 60),
        ..test_config()
    };
    let mut registry = Registry::default();
    let engine = match DeliveryEngine::with_clock(config, &mut registry, clock.clone()) {
        Ok(engine) => engine,
        Err(error) => panic!("{error}"),
    };
    let mut tally = Tally::default();

    engine.submit(event(1), target("failing", 7, receiver.url()));
    let totals = tally.wait(&engine, "failing", |t| t.failed == 1).await;
    assert_eq!(totals.suspension, None);

    clock.advance(TimeDelta::hours(23));
    engine.submit(event(2), target("failing", 7, receiver.url()));
    let totals = tally.wait(&engine, "failing", |t| t.failed == 2).await;
    assert_eq!(totals.suspension, None);

    clock.advance(TimeDelta::hours(1));
    engine.submit(event(3), target("failing", 7, receiver.url()));
    let totals = tally.wait(&engine, "failing", |t| t.failed == 3).await;
    assert_eq!(totals.suspension, Some(Suspension::EndpointFailing));
    assert_eq!(
        totals.last_error.as_deref(),
        Some("HTTP 500 Internal Server Error")
    );

    engine.submit(event(4), target("failing", 7, receiver.url()));
    assert_eq!(tally.get(&engine, "failing").dropped, 1);
    assert_eq!(receiver.request_count(), 3);

    // The next generation starts afresh.
    receiver.set_default(Reply::status(200));
    engine.submit(event(5), target("failing", 8, receiver.url()));
    let totals = tally.wait(&engine, "failing", |t| t.delivered == 1).await;
    assert_eq!(totals.suspension, None);
}

#[tokio::test]
async fn a_hanging_receiver_does_not_delay_another() {
    let slow = Receiver::scripted([], Reply::Hang).await;
    let fast = Receiver::start().await;
    let config = DeliveryConfig {
        timeout: Duration::from_secs(120),
        concurrency_per_destination: 2,
        ..test_config()
    };
    let (engine, _registry) = start(config);

    for n in 0..5 {
        engine.submit(event(n), target("slow", 1, slow.url()));
    }
    slow.wait_for_requests(1, WAIT).await;
    for n in 0..200 {
        engine.submit(event(n), target("fast", 1, fast.url()));
    }
    fast.wait_for_requests(200, WAIT).await;

    let mut tally = Tally::default();
    let totals = tally.wait(&engine, "fast", |t| t.delivered == 200).await;
    assert_eq!(totals.failed + totals.dropped, 0);
    // Meanwhile the slow receiver still holds its first requests, unanswered.
    let slow_totals = tally.get(&engine, "slow");
    assert_eq!(slow_totals.delivered + slow_totals.failed, 0);
    assert!(slow.request_count() <= 2);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    let receiver = Receiver::scripted([], Reply::Hang).await;
    let config = DeliveryConfig {
        timeout: Duration::from_secs(120),
        queue_capacity: 2,
        concurrency_per_destination: 1,
        ..test_config()
    };
    let (engine, registry) = start(config);
    for n in 0..5 {
        engine.submit(event(n), target("full", 1, receiver.url()));
    }
    // Drops are counted by `submit` itself, before it returns.
    let mut tally = Tally::default();
    let totals = tally.get(&engine, "full");
    assert_eq!(totals.dropped, 3);
    assert_eq!(totals.last_drop_reason, Some(DropReason::QueueFull));
    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"webhook_delivery_drops_total{reason="queue_full"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"webhook_deliveries_total{outcome="dropped"} 3"#),
        "{text}"
    );
    let destination = format!("http://{}", receiver.address());
    assert!(
        text.contains(&format!(
            r#"webhook_delivery_queue_depth{{destination="{destination}"}} 2"#
        )),
        "{text}"
    );
}

#[tokio::test]
async fn private_destinations_are_refused_unless_allowed() {
    let receiver = Receiver::start().await;
    let config = DeliveryConfig {
        allow_private_destinations: false,
        ..test_config()
    };
    let (engine, registry) = start(config);
    let port = receiver.address().port();
    let cases = [
        // An IP literal: checked before any connection.
        (
            "literal",
            format!("http://127.0.0.1:{port}/webhook"),
            "destination 127.0.0.1 is not allowed (loopback)",
        ),
        (
            "mapped",
            format!("http://[::ffff:127.0.0.1]:{port}/webhook"),
            "destination ::ffff:127.0.0.1 is not allowed (loopback)",
        ),
        // A name: refused by the resolver, on the address it resolves to.
        (
            "name",
            format!("http://localhost:{port}/webhook"),
            "is not allowed (loopback)",
        ),
        (
            "scheme",
            format!("ftp://127.0.0.1:{port}/webhook"),
            "url scheme ftp is not allowed",
        ),
    ];
    for (listener, url, _) in &cases {
        engine.submit(event(1), target(listener, 1, parse_url(url)));
    }
    let mut tally = Tally::default();
    for (listener, _, reason) in &cases {
        let totals = tally.wait(&engine, listener, |t| t.failed == 1).await;
        let error = totals.last_error.unwrap_or_default();
        assert!(error.ends_with(reason), "{listener}: {error}");
        assert!(
            !error.contains("webhook"),
            "{listener}: the reason holds the url: {error}"
        );
        assert_eq!(totals.delivered, 0);
    }
    // Refusals are final: nothing is retried, and nothing reached the receiver.
    let text = metrics_text(&registry);
    assert!(text.contains("webhook_delivery_retries_total 0"), "{text}");
    assert_eq!(receiver.request_count(), 0);
}

#[tokio::test]
async fn deliveries_end_at_the_age_limit_failed_if_attempted_else_dropped() {
    let receiver = Receiver::scripted([], Reply::Hang).await;
    let config = DeliveryConfig {
        timeout: Duration::from_secs(2),
        max_delivery_age: Duration::from_secs(1),
        concurrency_per_destination: 1,
        ..test_config()
    };
    let (engine, _registry) = start(config);
    engine.submit(event(1), target("aged", 1, receiver.url()));
    engine.submit(event(2), target("aged", 1, receiver.url()));

    let mut tally = Tally::default();
    let totals = tally
        .wait(&engine, "aged", |t| t.failed + t.dropped == 2)
        .await;
    // The first was attempted and timed out (its timeout cut to the age limit): a failure. The
    // second never got a slot: it expired in the queue, a drop the receiver is not blamed for.
    assert_eq!((totals.failed, totals.dropped), (1, 1));
    assert_eq!(totals.last_error.as_deref(), Some("timed out after 1s"));
    assert_eq!(totals.last_drop_reason, Some(DropReason::Expired));
    assert_eq!(receiver.request_count(), 1);
}

/// Waits until the metrics contain `line`; panics after `WAIT`.
async fn wait_for_metric(registry: &Registry, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics_text(registry);
        if text.contains(line) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("metrics never contained {line:?}: {text}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn forgetting_a_listener_drops_what_it_has_waiting() {
    let receiver = Receiver::scripted([Reply::Hang], Reply::status(200)).await;
    let config = DeliveryConfig {
        timeout: Duration::from_secs(2),
        max_attempts: 1,
        concurrency_per_destination: 1,
        ..test_config()
    };
    let (engine, registry) = start(config);
    for n in 0..3 {
        engine.submit(event(n), target("deleted", 1, receiver.url()));
    }
    // The first request is held; the other two wait for the slot.
    receiver.wait_for_requests(1, WAIT).await;
    engine.forget_listener(&ListenerId::new("ns", "deleted"));

    wait_for_metric(
        &registry,
        r#"webhook_delivery_drops_total{reason="listener_removed"} 2"#,
    )
    .await;
    assert_eq!(receiver.request_count(), 1);
    let mut tally = Tally::default();
    assert_eq!(tally.get(&engine, "deleted").reports, 0);

    // An event routed before the listener was forgotten does not bring it back.
    assert_eq!(
        engine.submit(event(3), target("deleted", 1, receiver.url())),
        Submission::Dropped(DropReason::ListenerRemoved)
    );
    assert!(!engine.knows(&ListenerId::new("ns", "deleted")));

    // A listener made again under the same name is resumed by its reconciler, and starts afresh.
    engine.set_paused(&ListenerId::new("ns", "deleted"), false);
    engine.submit(event(4), target("deleted", 1, receiver.url()));
    let totals = tally.wait(&engine, "deleted", |t| t.delivered == 1).await;
    assert_eq!((totals.failed, totals.dropped), (0, 0));
}

#[tokio::test]
async fn idle_destinations_are_released_and_made_again() {
    let receiver = Receiver::start().await;
    let config = DeliveryConfig {
        destination_idle_timeout: Duration::from_millis(20),
        ..test_config()
    };
    let (engine, registry) = start(config);
    let gauge = format!(
        r#"webhook_delivery_queue_depth{{destination="http://{}"}}"#,
        receiver.address()
    );
    let mut tally = Tally::default();
    for round in 1..=3 {
        engine.submit(event(round), target("idle", 1, receiver.url()));
        tally
            .wait(&engine, "idle", |t| t.delivered == round as u64)
            .await;
        // Released: its gauge is gone with it.
        let deadline = tokio::time::Instant::now() + WAIT;
        while metrics_text(&registry).contains(&gauge) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the idle destination was never released"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(receiver.request_count(), 3);
}

#[tokio::test]
async fn shutdown_finishes_queued_deliveries() {
    let receiver = Receiver::start().await;
    let config = DeliveryConfig {
        concurrency_per_destination: 1,
        ..test_config()
    };
    let (engine, _registry) = start(config);
    for n in 0..30 {
        engine.submit(event(n), target("drain", 1, receiver.url()));
    }
    engine.shutdown(WAIT).await;
    assert_eq!(receiver.request_count(), 30);
    let mut tally = Tally::default();
    let totals = tally.get(&engine, "drain");
    assert_eq!((totals.delivered, totals.failed), (30, 0));

    engine.submit(event(31), target("drain", 1, receiver.url()));
    let totals = tally.get(&engine, "drain");
    assert_eq!(totals.dropped, 1);
    assert_eq!(totals.last_drop_reason, Some(DropReason::ShuttingDown));
    assert_eq!(receiver.request_count(), 30);
}

#[tokio::test]
async fn shutdown_gives_up_what_the_grace_period_cannot_finish() {
    let receiver = Receiver::scripted([], Reply::Hang).await;
    let config = DeliveryConfig {
        timeout: Duration::from_secs(120),
        concurrency_per_destination: 1,
        ..test_config()
    };
    let (engine, _registry) = start(config);
    for n in 0..3 {
        engine.submit(event(n), target("abandoned", 1, receiver.url()));
    }
    receiver.wait_for_requests(1, WAIT).await;
    engine.shutdown(Duration::from_millis(100)).await;
    let mut tally = Tally::default();
    let totals = tally.get(&engine, "abandoned");
    assert_eq!((totals.delivered, totals.failed), (0, 3));
    assert_eq!(
        totals.last_error.as_deref(),
        Some("not delivered before shutdown")
    );
    assert_eq!(totals.suspension, None);
}

#[tokio::test]
async fn metrics_name_destinations_without_paths_or_secrets() {
    let receiver = Receiver::start().await;
    let (engine, registry) = start(test_config());
    let url = parse_url(&format!(
        "http://user:hunter2@{}/private/path?token=query-token",
        receiver.address()
    ));
    engine.submit(event(1), target("metrics", 1, url));
    let mut tally = Tally::default();
    tally.wait(&engine, "metrics", |t| t.delivered == 1).await;

    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"webhook_delivery_attempts_total{result="success"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("webhook_delivery_attempt_duration_seconds_count 1"),
        "{text}"
    );
    for secret in ["hunter2", "user:", "query-token", "/private", SECRET] {
        assert!(!text.contains(secret), "metrics contain {secret:?}: {text}");
    }
    // The request went out with the url's credentials and query, of course.
    let requests = receiver.requests();
    assert_eq!(requests[0].path, "/private/path?token=query-token");
    assert_eq!(
        requests[0].header("authorization"),
        Some("Basic dXNlcjpodW50ZXIy")
    );
}

/// Runs `tests/integration/python/verify_signature.py` on recorded requests.
pub(crate) async fn verify_with_python(
    secret: &str,
    deliveries: &[(HashMap<String, String>, Vec<u8>)],
) -> Vec<serde_json::Value> {
    let root = env!("CARGO_MANIFEST_DIR");
    let env = tokio::process::Command::new("bash")
        .arg("hack/python-env.sh")
        .current_dir(root)
        .output()
        .await;
    let python = match env {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
        Ok(output) => panic!(
            "hack/python-env.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => panic!("cannot run hack/python-env.sh: {error}"),
    };
    let input = serde_json::json!({
        "secret": secret,
        "deliveries": deliveries.iter().map(|(headers, body)| serde_json::json!({
            "headers": headers,
            "body_base64": STANDARD.encode(body),
        })).collect::<Vec<_>>(),
    });
    let mut child = match tokio::process::Command::new(python)
        .arg(format!(
            "{root}/tests/integration/python/verify_signature.py"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(error) => panic!("cannot start python: {error}"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        if let Err(error) = stdin.write_all(input.to_string().as_bytes()).await {
            panic!("cannot write to python: {error}");
        }
    }
    let output = match child.wait_with_output().await {
        Ok(output) => output,
        Err(error) => panic!("python did not finish: {error}"),
    };
    assert!(
        output.status.success(),
        "verify_signature.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    match serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout) {
        Ok(results) => results,
        Err(error) => panic!(
            "unexpected python output ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        ),
    }
}

pub(crate) fn signed_parts(request: &RecordedRequest) -> (HashMap<String, String>, Vec<u8>) {
    let headers = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .map(|name| (name.to_string(), header(request, name).to_owned()))
        .collect();
    (headers, request.body.to_vec())
}

#[tokio::test]
async fn the_standard_webhooks_library_verifies_what_we_send() {
    let receiver = Receiver::start().await;
    let (engine, _registry) = start(test_config());
    let unicode = Bytes::from(
        r#"{"type":"dataChange","subType":"users","operation":"update","changedItem":{"id":"1","name":"Zoë ☃"},"sphere":{"id":"s","name":"Thuis","uid":1}}"#,
    );
    engine.submit(event(1), target("verified", 1, receiver.url()));
    engine.submit(unicode, target("verified", 1, receiver.url()));
    let requests = receiver.wait_for_requests(2, WAIT).await;

    let mut cases: Vec<(HashMap<String, String>, Vec<u8>)> =
        requests.iter().map(signed_parts).collect();
    // Tampered body: one byte changed.
    let (headers, mut body) = signed_parts(&requests[0]);
    if let Some(byte) = body.iter_mut().find(|b| **b == b'1') {
        *byte = b'2';
    }
    cases.push((headers, body));
    // Another delivery's signature on this body.
    let (_, body) = signed_parts(&requests[0]);
    let (other_headers, _) = signed_parts(&requests[1]);
    cases.push((other_headers, body));

    let results = verify_with_python(&receiver_secret(SECRET), &cases).await;
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["ok"], true, "{results:?}");
    assert_eq!(results[1]["ok"], true, "{results:?}");
    assert_eq!(
        results[2]["error"], "No matching signature found",
        "{results:?}"
    );
    assert_eq!(
        results[3]["error"], "No matching signature found",
        "{results:?}"
    );

    // A wrong secret fails everything.
    let wrong = verify_with_python(
        &receiver_secret("fedcba9876543210fedcba9876543210"),
        &cases[..1],
    )
    .await;
    assert_eq!(wrong[0]["ok"], false, "{wrong:?}");
}

#[tokio::test]
async fn the_standard_webhooks_library_refuses_an_old_timestamp() {
    let receiver = Receiver::start().await;
    // A sender whose clock is ten minutes behind signs correctly, with an old timestamp.
    let clock = ManualClock::new(Utc::now() - TimeDelta::minutes(10));
    let mut registry = Registry::default();
    let engine = match DeliveryEngine::with_clock(test_config(), &mut registry, clock) {
        Ok(engine) => engine,
        Err(error) => panic!("{error}"),
    };
    engine.submit(event(1), target("old", 1, receiver.url()));
    let requests = receiver.wait_for_requests(1, WAIT).await;

    let (headers, body) = signed_parts(&requests[0]);
    let key = match SigningKey::from_client_secret(SECRET) {
        Ok(key) => key,
        Err(error) => panic!("{error}"),
    };
    let timestamp: i64 = headers["webhook-timestamp"].parse().unwrap_or_default();
    assert_eq!(
        headers["webhook-signature"],
        key.sign(&headers["webhook-id"], timestamp, &body),
        "the signature itself is valid"
    );
    let results = verify_with_python(&receiver_secret(SECRET), &[(headers, body)]).await;
    assert_eq!(
        results[0]["error"], "Message timestamp too old",
        "{results:?}"
    );
}

/// Prints how many deliveries per second the engine makes to local receivers, and the latency
/// from submit to arrival at a steady 2,000 events per second. A benchmark, not a test:
/// `cargo test --release --test integration throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly"]
async fn throughput_against_local_receivers() {
    const EVENTS: usize = 100_000;
    const RECEIVERS: usize = 4;
    let receivers =
        futures::future::join_all((0..RECEIVERS).map(|_| Receiver::counting(Reply::status(200))))
            .await;
    let config = DeliveryConfig {
        queue_capacity: EVENTS,
        ..test_config()
    };
    let (engine, _registry) = start(config);
    let targets: Vec<DeliveryTarget> = receivers
        .iter()
        .enumerate()
        .map(|(i, receiver)| target(&format!("bench/{i}"), 1, receiver.url()))
        .collect();
    let payload = event(1);

    // Warm the connection pools.
    for target in &targets {
        for _ in 0..64 {
            engine.submit(payload.clone(), target.clone());
        }
    }
    for receiver in &receivers {
        receiver.wait_for_requests(64, WAIT).await;
    }

    let started = std::time::Instant::now();
    for n in 0..EVENTS {
        engine.submit(payload.clone(), targets[n % RECEIVERS].clone());
    }
    let submitted = started.elapsed();
    for receiver in &receivers {
        receiver
            .wait_for_requests(64 + EVENTS / RECEIVERS, Duration::from_secs(120))
            .await;
    }
    let elapsed = started.elapsed();
    println!(
        "throughput: {EVENTS} deliveries in {elapsed:?} = {:.0} deliveries/s (submitting took {submitted:?})",
        EVENTS as f64 / elapsed.as_secs_f64()
    );

    // Latency at a steady rate: each event carries its submit time, the receiver records when
    // it arrived.
    let latency_receiver = Receiver::start().await;
    let latency_target = target("bench/latency", 1, latency_receiver.url());
    const RATE: usize = 2_000;
    const SECONDS: usize = 5;
    let origin = std::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0;
    while sent < RATE * SECONDS {
        ticker.tick().await;
        let due = ((origin.elapsed().as_secs_f64() * RATE as f64) as usize).min(RATE * SECONDS);
        while sent < due {
            let at = origin.elapsed().as_nanos();
            let body = format!(r#"{{"type":"ping","at":{at}}}"#);
            engine.submit(Bytes::from(body), latency_target.clone());
            sent += 1;
        }
    }
    let requests = latency_receiver
        .wait_for_requests(RATE * SECONDS, Duration::from_secs(60))
        .await;
    let mut latencies: Vec<Duration> = requests
        .iter()
        .map(|request| {
            let at = request.json()["data"]["at"].as_u64().unwrap_or_default();
            let arrived = request.received_at.duration_since(origin);
            arrived.saturating_sub(Duration::from_nanos(at))
        })
        .collect();
    latencies.sort();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "latency at {RATE}/s: p50 {:?}, p99 {:?}, max {:?}",
        percentile(0.50),
        percentile(0.99),
        percentile(1.0)
    );
}

#[tokio::test]
async fn a_paused_listener_stops_retrying_and_takes_nothing_new() {
    let receiver = Receiver::counting(Reply::status(503)).await;
    let config = DeliveryConfig {
        max_attempts: 100,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(100),
        ..test_config()
    };
    let (engine, _registry) = start(config);
    let submitted = engine.submit(event(1), target("paused", 1, receiver.url()));
    assert!(submitted.is_queued());
    receiver.wait_for_requests(2, WAIT).await;

    // The owner is disabled: the waiting retry is dropped instead of attempted.
    engine.set_paused(&ListenerId::new("ns", "paused"), true);
    let mut tally = Tally::default();
    let totals = tally.wait(&engine, "paused", |t| t.dropped == 1).await;
    assert_eq!(totals.last_drop_reason, Some(DropReason::Paused));
    let attempts = receiver.request_count();
    assert_eq!(
        engine.submit(event(2), target("paused", 1, receiver.url())),
        crownstone_webhooks::delivery::Submission::Dropped(DropReason::Paused)
    );
    assert_eq!(receiver.request_count(), attempts);

    // Enabled again: deliveries flow.
    receiver.set_default(Reply::status(200));
    engine.set_paused(&ListenerId::new("ns", "paused"), false);
    assert!(engine
        .submit(event(3), target("paused", 1, receiver.url()))
        .is_queued());
    tally.wait(&engine, "paused", |t| t.delivered == 1).await;
}

#[tokio::test]
async fn the_receive_subcommand_verifies_deliveries_and_refuses_the_rest() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
        .args(["receive", "--listen", "127.0.0.1:0"])
        .env("WEBHOOK_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("receive starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = parse_url(first.strip_prefix("listening on ").unwrap())
        .join("/hook")
        .unwrap();

    // A real delivery from the engine is verified and printed, without the client secret.
    let (engine, _registry) = start(test_config());
    let submitted = engine.submit(event(7), target("received", 1, url.clone()));
    assert!(submitted.is_queued());
    let mut tally = Tally::default();
    tally.wait(&engine, "received", |t| t.delivered == 1).await;
    let verified = lines.next().unwrap().unwrap();
    assert!(verified.starts_with("verified msg_"), "{verified}");
    assert!(
        verified.contains(r#""uid":7"#) && !verified.contains(SECRET),
        "{verified}"
    );

    // A forged one is refused.
    let forged = reqwest::Client::new()
        .post(url)
        .header("webhook-id", "msg_1")
        .header("webhook-timestamp", Utc::now().timestamp().to_string())
        .header("webhook-signature", "v1,AAAA")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let refused = lines.next().unwrap().unwrap();
    assert!(refused.contains("does not match"), "{refused}");
    let _ = child.kill();
    let _ = child.wait();
}

/// The operator end to end, two WebhookUsers on one receiver: `flood` publishes far more than
/// the receiver takes while its first request hangs, `quiet` a few events. Each owner has a lane
/// of 5 at the destination, served in turn over one connection.
#[tokio::test]
async fn a_flooding_owner_drops_only_its_own_deliveries_on_a_shared_receiver() {
    use crate::support::cluster::eventually;
    use crate::support::operator::Harness;
    use crownstone_webhooks::clock::SystemClock;
    use crownstone_webhooks::crownstone::samples;
    use crownstone_webhooks::resources::WebhookUser;

    const FLOOD: usize = 20;
    const QUIET: usize = 3;
    const LANE: usize = 5;
    const QUEUE_FULL: &str =
        r#"crownstone_webhooks_webhook_delivery_drops_total{reason="queue_full"}"#;

    let h = Harness::start_with(
        "fair",
        Arc::new(SystemClock),
        &[
            "--allow-private-destinations",
            "--delivery-queue-capacity=5",
            "--delivery-concurrency=1",
            "--delivery-timeout=5s",
        ],
    )
    .await;
    // The first request hangs until its timeout: meanwhile everything else queues.
    let receiver = Receiver::scripted([Reply::Hang], Reply::status(200)).await;
    for (owner, user, sphere) in [
        ("flood", "user-flood", "sphere-flood"),
        ("quiet", "user-quiet", "sphere-quiet"),
    ] {
        h.create_user(owner, true, None).await;
        let token = h.token(user, sphere).await;
        let secret = format!("{owner}-token");
        h.create_token_secret(&secret, &token).await;
        h.create_listener(
            owner,
            owner,
            &secret,
            &["command"],
            receiver.url().as_str(),
            None,
        )
        .await;
        h.wait_ready(owner).await;
    }
    h.wait_streams(2).await;

    let flood = vec![samples::multi_switch("sphere-flood"); FLOOD];
    h.admin.publish(&flood).await.unwrap();
    let quiet = vec![samples::multi_switch("sphere-quiet"); QUIET];
    h.admin.publish(&quiet).await.unwrap();

    // The flooder's excess is dropped as queue_full; the quiet owner loses nothing.
    h.wait_metric(QUEUE_FULL, (FLOOD - LANE) as f64).await;
    let requests = receiver.wait_for_requests(LANE + QUIET + 1, WAIT).await;
    let owners: Vec<String> = requests
        .iter()
        .map(|r| r.json()["clientId"].as_str().unwrap_or_default().to_owned())
        .collect();
    let count = |owner: &str| owners.iter().filter(|o| *o == owner).count();
    // The hung request is retried under its message id: one more request than deliveries.
    let first = owners[0].clone();
    assert_eq!(
        (count("flood"), count("quiet")),
        if first == "flood" {
            (LANE + 1, QUIET)
        } else {
            (LANE, QUIET + 1)
        },
        "{owners:?}"
    );
    assert_eq!(h.metric(QUEUE_FULL).await, (FLOOD - LANE) as f64);
    // Served in turn: the quiet owner's last delivery goes before the flooder's backlog ends.
    let last = |owner: &str| owners.iter().rposition(|o| o == owner);
    assert!(last("quiet") < last("flood"), "{owners:?}");

    h.wait_status("quiet", "delivered=3", |s| s.delivered == QUIET as u64)
        .await;
    h.wait_status("flood", "delivered=5", |s| s.delivered == LANE as u64)
        .await;
    // Dropped deliveries give the allowance back: each owner is charged what was delivered.
    let users = h.ns.api::<WebhookUser>();
    for (owner, delivered) in [("flood", LANE), ("quiet", QUIET)] {
        eventually(&format!("usage of {owner}"), WAIT, || async {
            let usage = users.get(owner).await.ok()?.status?.usage?;
            (usage.deliveries == delivered as u64).then_some(())
        })
        .await;
    }
}
