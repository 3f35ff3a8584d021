//! A leader's server and a standby's client over 127.0.0.1, with plain structs for the
//! forwarders on either side.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::domain::TokenHash;
use crate::handover::{
    EventDigest, FillDecision, GapFill, ProgressSink, ProgressSource, Seq, TokenProgress,
};

const LEADER: &str = "replica-a";
const TERM: i32 = 7;

/// The leader's records to publish, and the fills it took.
#[derive(Default)]
struct Source(Mutex<Vec<TokenProgress>>, Mutex<Vec<GapFill>>);

impl Source {
    fn push(&self, record: TokenProgress) {
        self.0.lock().push(record);
    }
}

impl ProgressSource for Source {
    fn changed_progress(&self) -> Vec<TokenProgress> {
        std::mem::take(&mut *self.0.lock())
    }

    fn fill_gap(&self, fill: GapFill) -> FillDecision {
        let mut fills = self.1.lock();
        if fills
            .iter()
            .any(|f| f.token == fill.token && f.at == fill.at)
        {
            return FillDecision::Ignored;
        }
        fills.push(fill);
        FillDecision::Accepted
    }
}

/// The records a standby applied, the fills it has to send and the answers to them, and
/// whether the standby said it was caught up as each batch of records arrived.
#[derive(Default)]
struct Sink(
    Mutex<Vec<TokenProgress>>,
    Mutex<Vec<GapFill>>,
    Mutex<Vec<(Seq, bool)>>,
    CatchUp,
    Mutex<Vec<bool>>,
);

impl Sink {
    fn got(&self) -> Vec<TokenProgress> {
        self.0.lock().clone()
    }
}

impl ProgressSink for Sink {
    fn apply_progress(&self, records: &[TokenProgress]) {
        self.0.lock().extend_from_slice(records);
        self.4.lock().push(self.3.is_caught_up());
    }

    fn take_fills(&self) -> Vec<GapFill> {
        std::mem::take(&mut *self.1.lock())
    }

    fn fill_answered(&self, _token: &TokenHash, at: Seq, accepted: bool) {
        self.2.lock().push((at, accepted));
    }
}

fn record(token: &str, seq: u64) -> TokenProgress {
    TokenProgress {
        token: TokenHash::of(token),
        seq,
        tail: vec![EventDigest(seq)],
        delivered_through: seq,
        chain: None,
        gaps: Vec::new(),
    }
}

fn key(fill: u8) -> HandoverKey {
    HandoverKey::new(vec![fill; 32]).unwrap()
}

struct Leader {
    server: ProgressServer,
    source: Arc<Source>,
    leading: watch::Sender<Option<i32>>,
    metrics: HandoverMetrics,
    stop: CancellationToken,
}

async fn leader(term: Option<i32>) -> Leader {
    let source = Arc::new(Source::default());
    let (leading, leading_rx) = watch::channel(term);
    let metrics = HandoverMetrics::default();
    let stop = CancellationToken::new();
    let server = ProgressServer::start(
        ServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            key: key(1),
            identity: LEADER.into(),
            interval: Duration::from_millis(20),
        },
        source.clone(),
        leading_rx,
        metrics.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    Leader {
        server,
        source,
        leading,
        metrics,
        stop,
    }
}

struct Standby {
    sink: Arc<Sink>,
    metrics: HandoverMetrics,
    cancel: CancellationToken,
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn standby(key: HandoverKey, holder: Holder) -> Standby {
    let sink = Arc::new(Sink::default());
    let metrics = HandoverMetrics::default();
    let cancel = CancellationToken::new();
    let (_, holder_rx) = watch::channel(Some(holder));
    ProgressClient::spawn(
        key,
        "replica-b".into(),
        holder_rx,
        sink.clone(),
        metrics.clone(),
        sink.3.clone(),
        cancel.clone(),
    )
    .unwrap();
    Standby {
        sink,
        metrics,
        cancel,
    }
}

fn holder_of(leader: &Leader) -> Holder {
    Holder {
        identity: LEADER.into(),
        term: TERM,
        address: Some(leader.server.local_addr().to_string()),
    }
}

/// Waits up to 10 s for `ready`.
async fn until(what: &str, ready: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn auth_failures(metrics: &HandoverMetrics, side: &'static str, reason: &'static str) -> u64 {
    metrics
        .auth_failures
        .get_or_create(&SideLabel { side, reason })
        .get()
}

#[tokio::test]
async fn a_standby_gets_the_leaders_records_and_the_final_batch_before_finish_returns() {
    let leader = leader(Some(TERM)).await;
    let standby = standby(key(1), holder_of(&leader));
    leader.source.push(record("t1", 3));
    leader.source.push(record("t2", 1));
    until("the first records", || standby.sink.got().len() == 2).await;
    leader.source.push(record("t1", 5));
    until("the change", || standby.sink.got().len() == 3).await;
    assert_eq!(standby.sink.got()[2], record("t1", 5));
    assert_eq!(standby.metrics.records_received.get(), 3);
    assert!(leader.metrics.records_sent.get() >= 3);
    assert!(standby.metrics.progress_age.seconds().is_some());

    // The last records reach the standby through `finish`, and `finish` knows it.
    leader.source.push(record("t2", 9));
    let outcome = leader.server.finish(Duration::from_secs(5)).await;
    assert_eq!(outcome, FinishOutcome::AllFetched);
    assert_eq!(standby.sink.got().last(), Some(&record("t2", 9)));

    // Nothing published after the final batch reaches anyone.
    leader.source.push(record("t1", 11));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!standby.sink.got().contains(&record("t1", 11)));
    leader.stop.cancel();
}

#[tokio::test]
async fn a_standby_is_caught_up_only_once_it_has_every_page_of_the_leaders_records() {
    let leader = leader(Some(TERM)).await;
    let count = 2 * MAX_RECORDS_PER_ANSWER + 500;
    for n in 0..count {
        leader.source.push(record(&format!("t{n}"), 1));
    }
    // Published at the leader's next tick, before the standby first polls.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let standby = standby(key(1), holder_of(&leader));
    assert!(
        !standby.sink.3.is_caught_up(),
        "not before its first answer"
    );
    until("caught up", || standby.sink.3.is_caught_up()).await;
    assert_eq!(standby.sink.got().len(), count);
    let seen = standby.sink.4.lock().clone();
    assert_eq!(
        seen,
        vec![false; 3],
        "no page but the last says it is caught up"
    );

    // A standby the leader refuses never is; one with nobody to follow always is.
    let refused = self::standby(key(2), holder_of(&leader));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!refused.sink.3.is_caught_up());
    let (_, nobody) = watch::channel(None);
    let alone = Arc::new(Sink::default());
    ProgressClient::spawn(
        key(1),
        "replica-c".into(),
        nobody,
        alone.clone(),
        HandoverMetrics::default(),
        alone.3.clone(),
        leader.stop.clone(),
    )
    .unwrap();
    until("nobody to follow", || alone.3.is_caught_up()).await;
    leader.stop.cancel();
}

#[tokio::test]
async fn finish_waits_for_a_standby_that_polled_and_not_for_ever() {
    let leader = leader(Some(TERM)).await;
    let gone = standby(key(1), holder_of(&leader));
    leader.source.push(record("t1", 1));
    until("the first record", || gone.sink.got().len() == 1).await;
    // It polled a moment ago, then stopped: finish waits for it until its timeout.
    drop(gone);
    let started = std::time::Instant::now();
    let outcome = leader.server.finish(Duration::from_millis(300)).await;
    assert_eq!(
        outcome,
        FinishOutcome::TimedOut {
            waiting: vec!["replica-b".into()]
        }
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    // With no standby at all there is nobody to wait for.
    let alone = self::leader(Some(TERM)).await;
    assert_eq!(
        alone.server.finish(Duration::from_secs(5)).await,
        FinishOutcome::AllFetched
    );
}

#[tokio::test]
async fn a_standby_with_another_key_gets_nothing_and_is_counted() {
    let leader = leader(Some(TERM)).await;
    let intruder = standby(key(2), holder_of(&leader));
    leader.source.push(record("t1", 1));
    until("a refusal", || {
        auth_failures(&leader.metrics, "leader", "bad_mac") > 0
    })
    .await;
    until("the standby sees it", || {
        intruder
            .metrics
            .poll_errors
            .get_or_create(&crate::metrics::ReasonLabel { reason: "refused" })
            .get()
            > 0
    })
    .await;
    assert!(intruder.sink.got().is_empty());
    assert_eq!(leader.metrics.records_sent.get(), 0);
}

#[tokio::test]
async fn answers_of_a_replica_that_does_not_hold_the_lease_are_refused() {
    let leader = leader(Some(TERM)).await;
    leader.source.push(record("t1", 1));
    // The Lease names another holder at the same address, or this one in another term.
    for holder in [
        Holder {
            identity: "replica-c".into(),
            ..holder_of(&leader)
        },
        Holder {
            term: TERM + 1,
            ..holder_of(&leader)
        },
    ] {
        let standby = standby(key(1), holder);
        until("a refused answer", || {
            auth_failures(&standby.metrics, "standby", "wrong_leader") > 0
        })
        .await;
        assert!(standby.sink.got().is_empty());
    }
}

#[tokio::test]
async fn a_replica_that_does_not_lead_serves_nothing_until_it_does() {
    let leader = leader(None).await;
    let standby = standby(key(1), holder_of(&leader));
    leader.source.push(record("t1", 1));
    until("a 503", || {
        standby
            .metrics
            .poll_errors
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: "not_leading",
            })
            .get()
            > 0
    })
    .await;
    assert!(standby.sink.got().is_empty());
    leader.leading.send_replace(Some(TERM));
    until("the record once it leads", || {
        standby.sink.got() == vec![record("t1", 1)]
    })
    .await;
}

fn gap_fill(at: Seq, events: &[&str]) -> GapFill {
    GapFill {
        token: TokenHash::of("t1"),
        at,
        events: events
            .iter()
            .map(|e| bytes::Bytes::from(e.to_string()))
            .collect(),
    }
}

#[tokio::test]
async fn a_standby_sends_the_leader_a_gaps_events_and_learns_whether_it_took_them() {
    let leader = leader(Some(TERM)).await;
    let standby = standby(key(1), holder_of(&leader));
    let event = r#"{"type":"presence","n":1}"#;
    standby.sink.1.lock().push(gap_fill(4, &[event]));
    leader.source.push(record("t1", 5));
    until("the answer", || !standby.sink.2.lock().is_empty()).await;
    assert_eq!(*standby.sink.2.lock(), vec![(4, true)]);
    assert_eq!(*leader.source.1.lock(), vec![gap_fill(4, &[event])]);
    // A second fill of the same gap is answered, and not taken.
    standby.sink.1.lock().push(gap_fill(4, &[event]));
    leader.source.push(record("t1", 6));
    until("the second answer", || standby.sink.2.lock().len() == 2).await;
    assert_eq!(standby.sink.2.lock()[1], (4, false));
    assert_eq!(leader.source.1.lock().len(), 1);
}

/// Posts a fill to `leader` signed under `key` with `body_signed`, sending `body`.
async fn post_fill(
    leader: &Leader,
    key: &HandoverKey,
    body_signed: &[u8],
    body: Vec<u8>,
) -> reqwest::StatusCode {
    let now = auth::unix_now();
    let signature =
        auth::sign_request_with_body(key, "POST", GAP_PATH, "replica-b", now, body_signed);
    reqwest::Client::new()
        .post(format!("http://{}{GAP_PATH}", leader.server.local_addr()))
        .header(auth::PEER_HEADER, "replica-b")
        .header(auth::TIME_HEADER, now.to_string())
        .header(auth::AUTH_HEADER, signature)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_fill_with_a_bad_mac_a_wrong_term_or_leader_or_too_large_is_refused_and_changes_nothing()
{
    let leader = leader(Some(TERM)).await;
    let holder = holder_of(&leader);
    let fill = gap_fill(4, &[r#"{"type":"presence","n":1}"#]);
    let body = client::fill_body(&holder, &fill).unwrap();
    let altered =
        client::fill_body(&holder, &gap_fill(5, &[r#"{"type":"presence","n":1}"#])).unwrap();
    let stale = client::fill_body(
        &Holder {
            term: TERM - 1,
            ..holder.clone()
        },
        &fill,
    )
    .unwrap();
    let elsewhere = client::fill_body(
        &Holder {
            identity: "replica-c".into(),
            ..holder.clone()
        },
        &fill,
    )
    .unwrap();
    let huge = vec![b' '; MAX_FILL_BYTES + 1];
    // What it is, the key, the bytes signed, the bytes sent, the status.
    type Case<'a> = (&'a str, HandoverKey, &'a [u8], Vec<u8>, u16);
    let cases: Vec<Case<'_>> = vec![
        ("another key", key(2), &body, body.clone(), 401),
        (
            "a body changed after signing",
            key(1),
            &body,
            altered.clone(),
            401,
        ),
        ("an earlier term", key(1), &stale, stale.clone(), 409),
        ("another leader", key(1), &elsewhere, elsewhere.clone(), 409),
        ("a body over the bound", key(1), &huge, huge.clone(), 413),
    ];
    for (what, key, signed, sent, status) in cases {
        let got = post_fill(&leader, &key, signed, sent).await;
        assert_eq!(got.as_u16(), status, "{what}");
    }
    assert!(
        leader.source.1.lock().is_empty(),
        "no fill reached the forwarders"
    );
    // Too many events, even in a small body.
    let many: Vec<&str> = vec!["{}"; MAX_FILL_EVENTS + 1];
    assert!(
        client::fill_body(&holder, &gap_fill(4, &many)).is_none(),
        "not sent"
    );
    let request = FillRequest {
        leader: LEADER.into(),
        term: TERM,
        token: TokenHash::of("t1"),
        gap: 4,
        events: many.iter().map(|e| e.to_string()).collect(),
    };
    let body = serde_json::to_vec(&request).unwrap();
    assert_eq!(
        post_fill(&leader, &key(1), &body, body.clone())
            .await
            .as_u16(),
        413
    );
    assert!(leader.source.1.lock().is_empty());
    // The same fill, signed right, is taken.
    assert_eq!(
        post_fill(
            &leader,
            &key(1),
            &body_of(&holder, &fill),
            body_of(&holder, &fill)
        )
        .await
        .as_u16(),
        200
    );
    assert_eq!(*leader.source.1.lock(), vec![fill]);
}

fn body_of(holder: &Holder, fill: &GapFill) -> Vec<u8> {
    client::fill_body(holder, fill).unwrap()
}
