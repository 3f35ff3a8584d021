//! The engine against receivers on loopback: allowance given back for every delivery that is
//! never attempted, and a forgotten listener that stays forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use chrono::NaiveDate;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// Counts what is given back.
#[derive(Default)]
struct Refunds(AtomicU64);

impl Ledger for Refunds {
    fn give_back(&self, _day: NaiveDate) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Refunds {
    fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn charge(refunds: &Arc<Refunds>) -> Option<Charge> {
    let ledger: Arc<dyn Ledger> = refunds.clone();
    Some(Charge::new(ledger, NaiveDate::MIN))
}

/// How the receiver answers every request.
#[derive(Clone, Copy)]
enum Answer {
    /// Never: the attempt runs into its timeout.
    Never,
    /// With this status, after this long.
    After(u16, Duration),
}

/// An HTTP/1.1 receiver on loopback that counts the requests it read and keeps their
/// `clientId`s and `webhook-id`s in order.
struct Receiver {
    url: Url,
    requests: Arc<AtomicUsize>,
    clients: Arc<parking_lot::Mutex<Vec<String>>>,
    ids: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let clients = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let ids = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (counted, seen, seen_ids) = (
            Arc::clone(&requests),
            Arc::clone(&clients),
            Arc::clone(&ids),
        );
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (counted, seen, seen_ids) = (
                    Arc::clone(&counted),
                    Arc::clone(&seen),
                    Arc::clone(&seen_ids),
                );
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some((head, end)) = request_end(&buffer) else {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let body: serde_json::Value =
                            serde_json::from_slice(&buffer[head..end]).unwrap_or_default();
                        seen.lock()
                            .push(body["clientId"].as_str().unwrap_or_default().to_owned());
                        let head_text = String::from_utf8_lossy(&buffer[..head]).to_lowercase();
                        seen_ids.lock().push(
                            head_text
                                .lines()
                                .find_map(|line| line.strip_prefix("webhook-id:"))
                                .unwrap_or_default()
                                .trim()
                                .to_owned(),
                        );
                        buffer.drain(..end);
                        counted.fetch_add(1, Ordering::SeqCst);
                        let Answer::After(status, delay) = answer else {
                            std::future::pending::<()>().await;
                            return;
                        };
                        tokio::time::sleep(delay).await;
                        let head = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                        if socket.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            url: Url::parse(&format!("http://{address}/hook")).unwrap(),
            requests,
            clients,
            ids,
        }
    }

    fn ids(&self) -> Vec<String> {
        self.ids.lock().clone()
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn clients(&self) -> Vec<String> {
        self.clients.lock().clone()
    }
}

/// Where a whole request's head and `content-length` body end in `buffer`, if it is all there.
fn request_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let head = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buffer[..head]).to_ascii_lowercase();
    let length = text
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buffer.len() >= head + length).then_some((head, head + length))
}

/// One attempt in flight at a time, no retries: a second delivery waits behind the first.
fn one_at_a_time() -> DeliveryConfig {
    DeliveryConfig {
        timeout: Duration::from_millis(500),
        max_attempts: 1,
        concurrency_per_destination: 1,
        allow_private_destinations: true,
        ..DeliveryConfig::default()
    }
}

fn start(config: DeliveryConfig) -> DeliveryEngine {
    DeliveryEngine::new(config, &mut Registry::default()).unwrap()
}

fn target(listener: &str, owner: &str, url: &Url) -> DeliveryTarget {
    DeliveryTarget {
        listener: ListenerId::new("ns", listener),
        generation: 1,
        url: Arc::new(url.clone()),
        client_id: Arc::from(owner),
        client_secret: ClientSecret::new(SECRET),
        user_id: Arc::from("user-1"),
        delivery: Arc::default(),
    }
}

fn event() -> Bytes {
    Bytes::from_static(br#"{"type":"presence"}"#)
}

/// Waits for `condition`, failing the test after 20 s.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The engine's tallies of a listener, summed over reports.
async fn dropped_and_failed(engine: &DeliveryEngine, listener: &str) -> (u64, u64) {
    let id = ListenerId::new("ns", listener);
    engine
        .take_reports()
        .iter()
        .filter(|r| r.listener == id)
        .fold((0, 0), |(d, f), r| (d + r.dropped, f + r.failed))
}

#[tokio::test]
async fn deliveries_refused_at_submit_give_their_allowance_back() {
    let receiver = Receiver::start(Answer::After(200, Duration::ZERO)).await;
    let engine = start(one_at_a_time());
    let refunds = Arc::new(Refunds::default());
    let submit = |listener: &str, url: &Url| {
        engine.submit_charged(event(), target(listener, "acme", url), charge(&refunds))
    };

    engine.restore(
        &ListenerId::new("ns", "gone"),
        1,
        Some(Suspension::EndpointGone),
        None,
    );
    engine.set_paused(&ListenerId::new("ns", "paused"), true);
    let refused_url = Url::parse("http://10.0.0.1/hook").unwrap();
    let strict = start(DeliveryConfig::default());
    // (case, listener, engine, url, expected result); each refused one gives its charge back.
    let table = [
        (
            "suspended",
            "gone",
            &engine,
            &receiver.url,
            Submission::Dropped(DropReason::Suspended),
        ),
        (
            "owner disabled",
            "paused",
            &engine,
            &receiver.url,
            Submission::Dropped(DropReason::Paused),
        ),
        (
            "url refused",
            "private",
            &strict,
            &refused_url,
            Submission::Refused,
        ),
        ("queued", "fine", &engine, &receiver.url, Submission::Queued),
    ];
    for (case, listener, engine, url, expected) in table {
        let before = refunds.count();
        let submission =
            engine.submit_charged(event(), target(listener, "acme", url), charge(&refunds));
        assert_eq!(submission, expected, "{case}");
        let refunded = u64::from(!submission.is_queued());
        assert_eq!(refunds.count(), before + refunded, "{case}");
    }
    eventually("the delivery", || receiver.requests() == 1).await;

    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        submit("late", &receiver.url),
        Submission::Dropped(DropReason::ShuttingDown)
    );
    assert_eq!(refunds.count(), 4, "shutting down");
    assert_eq!(receiver.requests(), 1, "nothing refused was sent");
}

#[tokio::test]
async fn a_full_queue_gives_the_allowance_back() {
    let receiver = Receiver::start(Answer::Never).await;
    let engine = start(DeliveryConfig {
        queue_capacity: 1,
        ..one_at_a_time()
    });
    let refunds = Arc::new(Refunds::default());
    let submit = || {
        engine.submit_charged(
            event(),
            target("a", "acme", &receiver.url),
            charge(&refunds),
        )
    };
    assert_eq!(submit(), Submission::Queued);
    assert_eq!(submit(), Submission::Dropped(DropReason::QueueFull));
    assert_eq!(refunds.count(), 1);
    // The first is attempted: it fails on its timeout and keeps its charge.
    eventually("the first attempt to fail", || {
        engine.take_reports().iter().any(|r| r.failed == 1)
    })
    .await;
    assert_eq!(refunds.count(), 1);
}

/// A delivery waits behind one that hangs; `meanwhile` happens; the waiting one is then dropped
/// or failed without an attempt and must give its allowance back, the attempted one must not.
async fn waiting_delivery_refunded_when(
    answer: Answer,
    config: DeliveryConfig,
    meanwhile: impl FnOnce(&DeliveryEngine),
) -> (DeliveryEngine, Arc<Refunds>, Receiver) {
    let receiver = Receiver::start(answer).await;
    let engine = start(config);
    let refunds = Arc::new(Refunds::default());
    for _ in 0..2 {
        let submission = engine.submit_charged(
            event(),
            target("a", "acme", &receiver.url),
            charge(&refunds),
        );
        assert_eq!(submission, Submission::Queued);
    }
    eventually("the first attempt", || receiver.requests() == 1).await;
    meanwhile(&engine);
    (engine, refunds, receiver)
}

#[tokio::test]
async fn a_waiting_delivery_of_a_paused_listener_gives_its_allowance_back() {
    let (engine, refunds, receiver) =
        waiting_delivery_refunded_when(Answer::Never, one_at_a_time(), |engine| {
            engine.set_paused(&ListenerId::new("ns", "a"), true)
        })
        .await;
    eventually("the waiting delivery to be dropped", || {
        refunds.count() == 1
    })
    .await;
    let (dropped, failed) = dropped_and_failed(&engine, "a").await;
    assert_eq!((dropped, failed), (1, 1));
    assert_eq!(
        refunds.count(),
        1,
        "the attempted delivery keeps its charge"
    );
    assert_eq!(receiver.requests(), 1);
}

#[tokio::test]
async fn a_waiting_delivery_of_a_forgotten_listener_gives_its_allowance_back() {
    let (_engine, refunds, receiver) =
        waiting_delivery_refunded_when(Answer::Never, one_at_a_time(), |engine| {
            engine.forget_listener(&ListenerId::new("ns", "a"))
        })
        .await;
    // Dropped when its turn came, after the first attempt's timeout: it is never sent.
    eventually("the waiting delivery to be dropped", || {
        refunds.count() == 1
    })
    .await;
    assert_eq!(receiver.requests(), 1);
}

#[tokio::test]
async fn a_waiting_delivery_of_a_suspended_listener_gives_its_allowance_back() {
    // The first attempt is answered 410 Gone, which suspends the listener.
    let (engine, refunds, receiver) = waiting_delivery_refunded_when(
        Answer::After(410, Duration::from_millis(200)),
        one_at_a_time(),
        |_| {},
    )
    .await;
    eventually("the waiting delivery to be dropped", || {
        refunds.count() == 1
    })
    .await;
    assert_eq!(
        engine.suspension(&ListenerId::new("ns", "a"), 1),
        Some(Suspension::EndpointGone)
    );
    assert_eq!(receiver.requests(), 1);
}

#[tokio::test]
async fn a_delivery_not_sent_within_its_max_age_is_dropped_as_expired_and_refunded() {
    let config = DeliveryConfig {
        max_delivery_age: Duration::from_millis(100),
        ..one_at_a_time()
    };
    let (engine, refunds, receiver) =
        waiting_delivery_refunded_when(Answer::Never, config, |_| {}).await;
    eventually("the waiting delivery to expire", || refunds.count() == 1).await;
    let reports = engine.take_reports();
    let (dropped, failed) = reports
        .iter()
        .fold((0, 0), |(d, f), r| (d + r.dropped, f + r.failed));
    assert_eq!(
        (dropped, failed),
        (1, 1),
        "the attempted one fails, the waiting one expires unsent"
    );
    assert!(reports
        .iter()
        .any(|r| r.last_drop_reason == Some(DropReason::Expired)));
    assert_eq!(receiver.requests(), 1);
    eventually("the bytes given back", || engine.shared.budget.used() == 0).await;
}

#[tokio::test]
async fn a_queued_delivery_holds_little_more_than_its_body() {
    let receiver = Receiver::start(Answer::Never).await;
    let engine = start(one_at_a_time());
    assert_eq!(
        engine.submit(event(), target("a", "acme", &receiver.url)),
        Submission::Queued
    );
    let body = BodyPrefix::new("acme", SECRET, "user-1").len() + event().len() + 1;
    let held = engine.shared.budget.used();
    println!("a queued delivery holds {held} bytes, {body} of them its body");
    assert!(held > body, "the body is counted");
    assert!(held - body < 512, "{} bytes besides the body", held - body);
}

#[tokio::test]
async fn a_spent_budget_drops_new_deliveries_until_bytes_are_given_back() {
    let receiver = Receiver::start(Answer::Never).await;
    // Room for a few deliveries; past half of it a lone owner holds no more.
    let engine = start(DeliveryConfig {
        memory_budget: 4096,
        ..one_at_a_time()
    });
    let refunds = Arc::new(Refunds::default());
    let submit = |owner: &str| {
        engine.submit_charged(
            event(),
            target(owner, owner, &receiver.url),
            charge(&refunds),
        )
    };
    let mut queued = 0;
    while submit("flood") == Submission::Queued {
        queued += 1;
        assert!(queued < 100, "the budget bounds the queue");
    }
    assert!(queued >= 2, "{queued}");
    assert_eq!(submit("flood"), Submission::Dropped(DropReason::Budget));
    assert!(engine.shared.budget.used() <= 2048);
    assert_eq!(refunds.count(), 2, "both refusals gave the allowance back");
    // Another owner still finds room in the half the flooder could not take.
    assert_eq!(submit("quiet"), Submission::Queued);
    // The attempts time out and fail one by one, giving their bytes back.
    eventually("every delivery to end", || engine.shared.budget.used() == 0).await;
    assert_eq!(submit("flood"), Submission::Queued);
}

#[tokio::test]
async fn deliveries_given_up_at_shutdown_give_their_allowance_back_unless_attempted() {
    let config = DeliveryConfig {
        timeout: Duration::from_secs(30),
        ..one_at_a_time()
    };
    let (engine, refunds, receiver) =
        waiting_delivery_refunded_when(Answer::Never, config, |_| {}).await;
    engine.shutdown(Duration::from_millis(100)).await;
    assert_eq!(refunds.count(), 1, "only the one never attempted");
    assert_eq!(receiver.requests(), 1);
}

#[tokio::test]
async fn a_delivery_routed_before_its_listener_was_forgotten_is_dropped_not_revived() {
    let receiver = Receiver::start(Answer::After(200, Duration::ZERO)).await;
    let engine = start(one_at_a_time());
    let refunds = Arc::new(Refunds::default());
    let id = ListenerId::new("ns", "a");
    let submit = || {
        engine.submit_charged(
            event(),
            target("a", "acme", &receiver.url),
            charge(&refunds),
        )
    };
    assert_eq!(submit(), Submission::Queued);
    eventually("the first delivery", || receiver.requests() == 1).await;

    // The race, in order: routing hands out a target (the stream's task), the reconciler
    // forgets the listener, then the stream's task submits what it routed.
    let routed = target("a", "acme", &receiver.url);
    engine.forget_listener(&id);
    let late = engine.submit_charged(event(), routed, charge(&refunds));
    assert_eq!(late, Submission::Dropped(DropReason::ListenerRemoved));
    assert_eq!(refunds.count(), 1);
    assert!(!engine.knows(&id), "the listener was not brought back");
    assert!(
        engine.take_reports().iter().all(|r| r.listener != id),
        "a forgotten listener gets no report"
    );

    // Never seen before it was forgotten: the same.
    let never = ListenerId::new("ns", "never");
    engine.forget_listener(&never);
    let late = engine.submit_charged(
        event(),
        target("never", "acme", &receiver.url),
        charge(&refunds),
    );
    assert_eq!(late, Submission::Dropped(DropReason::ListenerRemoved));
    assert_eq!(refunds.count(), 2);

    // Created again: its reconciler resumes it, and it takes deliveries again.
    engine.set_paused(&id, false);
    assert_eq!(submit(), Submission::Queued);
    eventually("the delivery to the listener made again", || {
        receiver.requests() == 2
    })
    .await;
    assert_eq!(refunds.count(), 2);
}

#[tokio::test]
async fn a_flooding_owner_fills_only_its_own_lane() {
    let receiver = Receiver::start(Answer::Never).await;
    let engine = start(DeliveryConfig {
        queue_capacity: 3,
        timeout: Duration::from_millis(300),
        ..one_at_a_time()
    });
    let flood: Vec<Submission> = (0..10)
        .map(|_| engine.submit(event(), target("flood", "flooder", &receiver.url)))
        .collect();
    let queued = flood.iter().filter(|s| s.is_queued()).count();
    assert_eq!(queued, 3, "{flood:?}");
    // Another owner on the same destination still gets its whole lane.
    for _ in 0..3 {
        assert_eq!(
            engine.submit(event(), target("quiet", "quiet", &receiver.url)),
            Submission::Queued
        );
    }
    assert_eq!(
        engine.submit(event(), target("quiet", "quiet", &receiver.url)),
        Submission::Dropped(DropReason::QueueFull)
    );
    // The same owner name in another namespace is another owner.
    let mut elsewhere = target("x", "flooder", &receiver.url);
    elsewhere.listener = ListenerId::new("other", "x");
    assert_eq!(engine.submit(event(), elsewhere), Submission::Queued);
    // Served in turn, one attempt at a time: the quiet owner's first goes second, not after
    // the flood.
    eventually("every queued delivery attempted", || {
        receiver.requests() == 7
    })
    .await;
    assert_eq!(
        receiver.clients(),
        ["flooder", "quiet", "flooder", "flooder", "quiet", "flooder", "quiet"]
    );
}

/// The value of one series in `registry`'s text form; 0 when absent.
fn series(registry: &Registry, name: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn with_sink(mut target: DeliveryTarget, sink: &Url) -> DeliveryTarget {
    target.delivery = Arc::new(DeliveryOverrides {
        dead_letter_sink: Some(Arc::new(sink.clone())),
        ..DeliveryOverrides::default()
    });
    target
}

#[tokio::test]
async fn dead_letters_of_a_flood_stay_in_the_flooders_lane_at_the_sink() {
    let receiver = Receiver::start(Answer::Never).await;
    let sink = Receiver::start(Answer::Never).await;
    let mut registry = Registry::default();
    let engine = DeliveryEngine::new(
        DeliveryConfig {
            queue_capacity: 3,
            timeout: Duration::from_secs(5),
            ..one_at_a_time()
        },
        &mut registry,
    )
    .unwrap();
    let flood: Vec<Submission> = (0..10)
        .map(|_| {
            engine.submit(
                event(),
                with_sink(target("flood", "flooder", &receiver.url), &sink.url),
            )
        })
        .collect();
    assert_eq!(flood.iter().filter(|s| s.is_queued()).count(), 3);
    // Seven drops, seven dead letters: three fit the flooder's lane at the sink, four are
    // dropped there and counted, none is dead-lettered again.
    assert_eq!(
        series(&registry, r#"dead_letters_total{outcome="dropped"}"#),
        4.0
    );
    eventually("the first dead letter at the sink", || sink.requests() == 1).await;
    // Another owner's lane at the sink is untouched by the flooder's dead letters.
    for _ in 0..3 {
        assert_eq!(
            engine.submit(event(), target("quiet", "quiet", &sink.url)),
            Submission::Queued
        );
    }
    assert_eq!(
        series(&registry, r#"dead_letters_total{outcome="delivered"}"#),
        0.0
    );
    // Each dead letter carries the id of the delivery it stands for.
    assert!(!sink.ids()[0].is_empty());
}

#[tokio::test]
async fn a_delivery_with_a_sink_counts_the_answer_it_keeps_for_its_dead_letter() {
    let receiver = Receiver::start(Answer::Never).await;
    let engine = start(one_at_a_time());
    let plain = target("a", "acme", &receiver.url);
    assert!(engine.submit(event(), plain).is_queued());
    let without = engine.shared.budget.used();
    let sunk = with_sink(target("b", "acme", &receiver.url), &receiver.url);
    assert!(engine.submit(event(), sunk).is_queued());
    let with = engine.shared.budget.used() - without;
    assert!(with >= without + MAX_ERROR_DATA, "{with} vs {without}");
}

#[tokio::test]
async fn a_failed_delivery_becomes_one_dead_letter_that_is_not_dead_lettered_again() {
    let receiver = Receiver::start(Answer::After(500, Duration::ZERO)).await;
    let sink = Receiver::start(Answer::After(500, Duration::ZERO)).await;
    let mut registry = Registry::default();
    let engine = DeliveryEngine::new(one_at_a_time(), &mut registry).unwrap();
    assert!(engine
        .submit(
            event(),
            with_sink(target("a", "acme", &receiver.url), &sink.url)
        )
        .is_queued());
    eventually("the dead letter to fail at the sink", || {
        series(&registry, r#"dead_letters_total{outcome="failed"}"#) == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.requests(), 1);
    assert_eq!(sink.requests(), 1);
    assert_eq!(receiver.ids(), sink.ids(), "the same webhook-id");
    // The sink's failure is not the listener's: one failure counted, no dead letter taken.
    let reports = engine.take_reports();
    assert_eq!(reports.iter().map(|r| r.failed).sum::<u64>(), 1);
    assert_eq!(reports.iter().map(|r| r.dead_lettered).sum::<u64>(), 0);
}

mod placed {
    //! Deliveries of events with a place: their ids and what they tell the event's log.

    use super::*;
    use crate::domain::TokenHash;
    use crate::handover::{EventDigest, LogShared, TokenLog};
    use crate::metrics::ForwarderMetrics;

    fn leading_log() -> Arc<parking_lot::Mutex<TokenLog>> {
        let shared = Arc::new(LogShared::new(
            Default::default(),
            ForwarderMetrics::default(),
        ));
        Arc::new(parking_lot::Mutex::new(TokenLog::new(
            TokenHash::of("t"),
            true,
            shared,
        )))
    }

    /// Numbers one event routed to one delivery, and the place its delivery carries.
    fn place(log: &Arc<parking_lot::Mutex<TokenLog>>) -> EventPlace {
        let digest = EventDigest::of(&event());
        let (seq, epoch) = {
            let mut log = log.lock();
            (log.record(digest, 1).unwrap(), log.epoch())
        };
        EventPlace {
            token: TokenHash::of("t"),
            seq,
            digest,
            settle: Settle::new(Arc::clone(log), seq, epoch),
        }
    }

    #[tokio::test]
    async fn an_event_with_a_dead_letter_is_settled_when_its_dead_letter_is() {
        let receiver = Receiver::start(Answer::After(400, Duration::ZERO)).await;
        // The sink holds the dead letter until its timeout.
        let sink = Receiver::start(Answer::Never).await;
        let engine = start(DeliveryConfig {
            timeout: Duration::from_millis(800),
            ..one_at_a_time()
        });
        let log = leading_log();
        let place = place(&log);
        let target = with_sink(target("a", "acme", &receiver.url), &sink.url);
        assert!(engine
            .submit_placed(event(), target, None, place)
            .is_queued());
        eventually("the dead letter at the sink", || sink.requests() == 1).await;
        assert_eq!(receiver.ids(), sink.ids());
        assert_eq!(log.lock().delivered_through(), 0, "not settled yet");
        // The dead letter fails on its timeout: now the event is settled.
        eventually("the event settled", || log.lock().delivered_through() == 1).await;
    }

    #[tokio::test]
    async fn a_placed_delivery_carries_the_id_of_its_place_on_every_attempt() {
        let receiver = Receiver::start(Answer::After(503, Duration::ZERO)).await;
        let engine = start(DeliveryConfig {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            ..one_at_a_time()
        });
        let log = leading_log();
        let place = place(&log);
        let expected = webhook_id(
            &ListenerId::new("ns", "a"),
            &place.token,
            place.seq,
            place.digest,
        );
        let submitted =
            engine.submit_placed(event(), target("a", "acme", &receiver.url), None, place);
        assert_eq!(submitted, Submission::Queued);
        eventually("three attempts", || receiver.requests() == 3).await;
        assert_eq!(receiver.ids(), vec![expected.clone(); 3]);
        // Failed for good after the last attempt: settled.
        eventually("the event settled", || log.lock().delivered_through() == 1).await;
    }

    #[tokio::test]
    async fn settled_deliveries_move_the_watermark_and_abandoned_ones_hold_it() {
        let fine = Receiver::start(Answer::After(200, Duration::ZERO)).await;
        let hanging = Receiver::start(Answer::Never).await;
        let engine = start(DeliveryConfig {
            timeout: Duration::from_secs(3),
            ..one_at_a_time()
        });
        let log = leading_log();
        let submit = |listener: &str, url: &Url| {
            engine.submit_placed(event(), target(listener, "acme", url), None, place(&log))
        };
        assert_eq!(submit("a", &fine.url), Submission::Queued);
        eventually("the first event settled", || {
            log.lock().delivered_through() == 1
        })
        .await;

        // The second hangs in flight, the third waits behind it; then the lead is lost.
        assert_eq!(submit("b", &hanging.url), Submission::Queued);
        assert_eq!(submit("b", &hanging.url), Submission::Queued);
        eventually("the attempt in flight", || hanging.requests() == 1).await;
        engine.abandon_all();
        let dropped = AtomicU64::new(0);
        let count_drops = || {
            let reports = engine.take_reports();
            let more: u64 = reports.iter().map(|r| r.dropped).sum();
            dropped.fetch_add(more, Ordering::SeqCst) + more
        };
        eventually("the waiting one dropped", || count_drops() > 0).await;
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "dropped at once, while the attempt in flight still hangs"
        );
        // The attempt in flight runs into its timeout and is dropped, not retried.
        eventually("the attempt in flight dropped", || count_drops() == 2).await;
        assert_eq!(hanging.requests(), 1, "nothing more is sent");
        assert_eq!(log.lock().delivered_through(), 1, "2 and 3 stay unsettled");

        // The engine still delivers: a replica that leads again sends again.
        assert_eq!(
            engine.submit(event(), target("a", "acme", &fine.url)),
            Submission::Queued
        );
        eventually("a delivery after the abandon", || fine.requests() == 2).await;
    }

    #[tokio::test]
    async fn a_delivery_of_a_token_handed_on_is_dropped_before_its_next_attempt() {
        let hanging = Receiver::start(Answer::Never).await;
        let fine = Receiver::start(Answer::After(200, Duration::ZERO)).await;
        let engine = start(DeliveryConfig {
            timeout: Duration::from_secs(3),
            ..one_at_a_time()
        });
        let moved = leading_log();
        let kept = leading_log();
        // One delivery of the moving token hangs in flight, a second waits behind it.
        let submit = |log: &Arc<Mutex<TokenLog>>, url: &Url| {
            engine.submit_placed(event(), target("b", "acme", url), None, place(log))
        };
        assert_eq!(submit(&moved, &hanging.url), Submission::Queued);
        assert_eq!(submit(&moved, &hanging.url), Submission::Queued);
        eventually("the attempt in flight", || hanging.requests() == 1).await;
        // Sharding moved the token to another replica: this one only buffers it now.
        moved.lock().stand_by();
        let dropped = AtomicU64::new(0);
        let count_drops = || {
            let reports = engine.take_reports();
            let more: u64 = reports.iter().map(|r| r.dropped).sum();
            dropped.fetch_add(more, Ordering::SeqCst) + more
        };
        eventually("both deliveries dropped", || count_drops() == 2).await;
        assert_eq!(hanging.requests(), 1, "the waiting one was never sent");
        // Other tokens' deliveries go on: the fence is the token's, not the replica's.
        engine.submit_placed(event(), target("a", "acme", &fine.url), None, place(&kept));
        eventually("the kept token delivered", || fine.requests() == 1).await;
    }
}

#[tokio::test]
async fn each_delivery_follows_its_targets_policy_over_the_defaults() {
    let failing = Receiver::start(Answer::After(500, Duration::ZERO)).await;
    let other = Receiver::start(Answer::After(500, Duration::ZERO)).await;
    let hanging = Receiver::start(Answer::Never).await;
    let engine = start(DeliveryConfig {
        timeout: Duration::from_secs(30),
        max_attempts: 1,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        allow_private_destinations: true,
        ..DeliveryConfig::default()
    });
    let three = DeliveryTarget {
        delivery: Arc::new(DeliveryOverrides {
            attempts: Some(3),
            ..DeliveryOverrides::default()
        }),
        ..target("three", "acme", &failing.url)
    };
    let short = DeliveryTarget {
        delivery: Arc::new(DeliveryOverrides {
            timeout: Some(Duration::from_millis(100)),
            ..DeliveryOverrides::default()
        }),
        ..target("short", "acme", &hanging.url)
    };
    assert!(engine.submit(event(), three).is_queued());
    assert!(engine
        .submit(event(), target("default", "acme", &other.url))
        .is_queued());
    assert!(engine.submit(event(), short).is_queued());

    eventually("three attempts and one", || {
        failing.requests() == 3 && other.requests() == 1
    })
    .await;
    // Failures and the last error per listener, summed over reports.
    let mut tallies: HashMap<String, (u64, Option<String>)> = HashMap::new();
    let done = |tallies: &HashMap<String, (u64, Option<String>)>| {
        ["three", "default", "short"]
            .iter()
            .all(|name| tallies.get(*name).is_some_and(|t| t.0 == 1))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&tallies) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        for report in engine.take_reports() {
            let tally = tallies
                .entry(report.listener.name().to_owned())
                .or_default();
            tally.0 += report.failed;
            if report.last_error.is_some() {
                tally.1 = report.last_error;
            }
        }
    }
    let tally = |name: &str| tallies.get(name).cloned().unwrap_or_default();
    let (three, default, short) = (tally("three"), tally("default"), tally("short"));
    assert_eq!((three.0, default.0, short.0), (1, 1, 1));
    // Well before the engine's 30 s: the target's own timeout.
    assert_eq!(short.1.as_deref(), Some("timed out after 100ms"));
    assert_eq!((failing.requests(), other.requests()), (3, 1));
    assert_eq!(
        engine
            .effective_policy(&DeliveryOverrides::default())
            .max_attempts,
        1
    );
}
