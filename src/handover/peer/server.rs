//! The leader's side: collects the forwarders' progress every interval, keeps the latest record
//! per token with the version it changed at, and answers standbys' long polls with the records
//! newer than what they have. Serves only while this replica leads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::auth::{self, AuthError, HandoverKey};
use super::{
    FillAnswer, FillRequest, HandoverError, HandoverMetrics, ProgressAnswer, GAP_PATH,
    MAX_FILL_BYTES, MAX_FILL_EVENTS, MAX_RECORDS_PER_ANSWER, PROGRESS_PATH,
};
use crate::domain::TokenHash;
use crate::handover::{FillDecision, GapFill, ProgressSource, TokenProgress};

/// How long a poll with nothing new waits for something before it is answered empty.
const POLL_WAIT: Duration = Duration::from_secs(1);

/// A standby that polled this recently is waited for by [`ProgressServer::finish`].
const RECENT_PEER: Duration = Duration::from_secs(5);

/// A standby not heard from for this long is forgotten.
const FORGET_PEER: Duration = Duration::from_secs(60);

/// A token's record unchanged for this long is dropped: a standby buffers nothing of a token
/// without events, so it needs no record of it; this bounds memory to the tokens recently busy.
const FORGET_RECORD: Duration = Duration::from_secs(600);

/// How [`ProgressServer::finish`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishOutcome {
    /// Every standby that polled in the last seconds has fetched the final batch.
    AllFetched,
    /// The timeout passed first; these standbys (their identities, sorted) had not fetched it.
    TimedOut { waiting: Vec<String> },
}

struct Entry {
    version: u64,
    record: TokenProgress,
    at: Instant,
}

struct Peer {
    polled: Instant,
    /// The highest `after` it polled with: everything up to it reached it.
    acked: u64,
}

#[derive(Default)]
struct Book {
    version: u64,
    records: HashMap<TokenHash, Entry>,
    final_version: Option<u64>,
    peers: HashMap<String, Peer>,
    /// The Lease term the records were published in.
    term: Option<i32>,
}

impl Book {
    /// Starts over in a new term: records of an earlier term count places from a time this
    /// replica led before, and must not reach the standbys of this one. Versions go on rising.
    fn enter(&mut self, term: i32) {
        if self.term != Some(term) {
            self.records.clear();
            self.final_version = None;
            self.term = Some(term);
        }
    }

    /// Keeps each record with a version of its own, so answers page exactly.
    fn publish(&mut self, records: Vec<TokenProgress>) -> usize {
        let now = Instant::now();
        let count = records.len();
        for record in records {
            self.version += 1;
            self.records.insert(
                record.token,
                Entry {
                    version: self.version,
                    record,
                    at: now,
                },
            );
        }
        self.records.retain(|_, e| e.at.elapsed() < FORGET_RECORD);
        count
    }

    /// The answer to `after`: records newer than it, oldest change first, at most a page.
    fn answer(&self, after: u64) -> (u64, Vec<TokenProgress>) {
        let mut newer: Vec<&Entry> = self
            .records
            .values()
            .filter(|e| e.version > after)
            .collect();
        newer.sort_unstable_by_key(|e| e.version);
        let version = match newer.get(MAX_RECORDS_PER_ANSWER) {
            // Cut: the standby asks again from the last version it got.
            Some(_) => newer[MAX_RECORDS_PER_ANSWER - 1].version,
            None => self.version,
        };
        newer.truncate(MAX_RECORDS_PER_ANSWER);
        (
            version,
            newer.into_iter().map(|e| e.record.clone()).collect(),
        )
    }

    fn saw(&mut self, identity: &str, after: u64) {
        let now = Instant::now();
        self.peers.retain(|_, p| p.polled.elapsed() < FORGET_PEER);
        let peer = self.peers.entry(identity.to_owned()).or_insert(Peer {
            polled: now,
            acked: 0,
        });
        peer.polled = now;
        peer.acked = peer.acked.max(after.min(self.version));
    }

    /// Standbys that polled recently and have not yet polled past `version`.
    fn waiting_for(&self, version: u64) -> Vec<String> {
        let mut waiting: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.polled.elapsed() < RECENT_PEER && p.acked < version)
            .map(|(identity, _)| identity.clone())
            .collect();
        waiting.sort_unstable();
        waiting
    }
}

struct Shared {
    key: HandoverKey,
    identity: String,
    /// The Lease term while this replica leads; `None` while it does not.
    leading: watch::Receiver<Option<i32>>,
    source: Arc<dyn ProgressSource>,
    book: Mutex<Book>,
    /// Bumped on every publish: long polls wake on it.
    published: watch::Sender<u64>,
    /// Woken on every poll: `finish` rechecks who has fetched its batch.
    polled: Notify,
    metrics: HandoverMetrics,
}

impl Shared {
    fn collect(&self, term: i32) {
        {
            let mut book = self.book.lock();
            book.enter(term);
            // After the final batch the forwarders' records stay with them: nothing more is sent.
            if book.final_version.is_some() {
                return;
            }
        }
        let records = self.source.changed_progress();
        if records.is_empty() {
            return;
        }
        let version = {
            let mut book = self.book.lock();
            book.publish(records);
            book.version
        };
        self.published.send_replace(version);
    }
}

/// What the progress server needs besides its inputs.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Where to listen (port 0: any).
    pub listen: SocketAddr,
    pub key: HandoverKey,
    /// This replica's name in the Lease, sent with every answer.
    pub identity: String,
    /// How often the changed records are taken from the forwarders.
    pub interval: Duration,
}

/// The leader's progress server. Every replica runs one; it answers only while it leads.
pub struct ProgressServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl ProgressServer {
    /// Binds `settings.listen` and serves `GET /handover/progress` until `stop`. Every
    /// `settings.interval` while `leading` holds a term, takes the changed records from `source`.
    pub async fn start(
        settings: ServerSettings,
        source: Arc<dyn ProgressSource>,
        leading: watch::Receiver<Option<i32>>,
        metrics: HandoverMetrics,
        stop: CancellationToken,
    ) -> Result<Self, HandoverError> {
        let ServerSettings {
            listen,
            key,
            identity,
            interval,
        } = settings;
        let (listener, addr) =
            crate::net::bind(listen)
                .await
                .map_err(|source| HandoverError::Listen {
                    addr: listen,
                    source,
                })?;
        let shared = Arc::new(Shared {
            key,
            identity,
            leading,
            source,
            book: Mutex::new(Book::default()),
            published: watch::Sender::new(0),
            polled: Notify::new(),
            metrics,
        });
        let app = Router::new()
            .route(PROGRESS_PATH, get(progress))
            .route(GAP_PATH, post(fill))
            .with_state(shared.clone());
        let server_stop = stop.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(server_stop.cancelled_owned())
                .await;
        });
        let ticker_shared = shared.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let term = *ticker_shared.leading.borrow();
                if let Some(term) = term {
                    ticker_shared.collect(term);
                }
            }
        });
        Ok(ProgressServer {
            shared,
            addr,
            tasks: vec![server, ticker],
        })
    }

    /// The address bound (the port chosen when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes the last records with `final: true` and waits until every standby that
    /// polled in the last 5 s has fetched them (its next poll asks past them), or `timeout`.
    /// Call once this replica routes no more; records after it are not published.
    pub async fn finish(&self, timeout: Duration) -> FinishOutcome {
        self.publish_and_wait(true, timeout).await
    }

    /// Publishes the records changed since the last interval now, not final, and waits as
    /// [`finish`](Self::finish) does until the peers polling fetched them: a sharded replica
    /// does this for the tokens it hands on, before it says they are released.
    pub async fn publish_now(&self, timeout: Duration) -> FinishOutcome {
        self.publish_and_wait(false, timeout).await
    }

    async fn publish_and_wait(&self, is_final: bool, timeout: Duration) -> FinishOutcome {
        let records = self.shared.source.changed_progress();
        let final_version = {
            let mut book = self.shared.book.lock();
            book.publish(records);
            // A version of its own, so a standby that had everything still gets the final word.
            book.version += 1;
            if is_final {
                book.final_version = Some(book.version);
            }
            book.version
        };
        self.shared.published.send_replace(final_version);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let polled = self.shared.polled.notified();
            tokio::pin!(polled);
            polled.as_mut().enable();
            if self
                .shared
                .book
                .lock()
                .waiting_for(final_version)
                .is_empty()
            {
                return FinishOutcome::AllFetched;
            }
            tokio::select! {
                _ = polled => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let waiting = self.shared.book.lock().waiting_for(final_version);
                    return if waiting.is_empty() {
                        FinishOutcome::AllFetched
                    } else {
                        FinishOutcome::TimedOut { waiting }
                    };
                }
            }
        }
    }

    /// Waits for the server to stop (after the `stop` given to [`start`](Self::start)).
    pub async fn stopped(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, AuthError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::MissingHeader)
}

/// `after` from the query; absent means 0.
fn after_of(query: Option<&str>) -> Option<u64> {
    let Some(query) = query else { return Some(0) };
    let mut after = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("after", value)) => after = value.parse().ok()?,
            _ => return None,
        }
    }
    Some(after)
}

/// The identity of a request signed under `key` within the allowed skew.
fn authenticate(
    key: &HandoverKey,
    headers: &HeaderMap,
    path_and_query: &str,
) -> Result<String, AuthError> {
    let identity = header(headers, auth::PEER_HEADER)?;
    auth::verify_request(
        key,
        Method::GET.as_str(),
        path_and_query,
        identity,
        header(headers, auth::TIME_HEADER)?,
        header(headers, auth::AUTH_HEADER)?,
        auth::unix_now(),
    )?;
    Ok(identity.to_owned())
}

/// A standby's fill of a gap: authenticated with the body under the MAC, for this replica in
/// its current term, within the bounds; handed to the forwarders, which take only the first
/// fill of an open gap.
async fn fill(State(shared): State<Arc<Shared>>, request: Request<Body>) -> Response {
    let (parts, body) = request.into_parts();
    // One byte over the bound tells a body too large from one exactly at it.
    let body = match axum::body::to_bytes(body, MAX_FILL_BYTES + 1).await {
        Ok(body) if body.len() <= MAX_FILL_BYTES => body,
        _ => return (StatusCode::PAYLOAD_TOO_LARGE, "fill too large").into_response(),
    };
    let path_and_query = parts.uri.path_and_query().map_or(GAP_PATH, |p| p.as_str());
    let verified = header(&parts.headers, auth::PEER_HEADER).and_then(|identity| {
        auth::verify_request_with_body(
            &shared.key,
            Method::POST.as_str(),
            path_and_query,
            identity,
            header(&parts.headers, auth::TIME_HEADER)?,
            header(&parts.headers, auth::AUTH_HEADER)?,
            auth::unix_now(),
            &body,
        )
    });
    if let Err(error) = verified {
        shared.metrics.auth_failure("leader", error.as_label());
        tracing::debug!(%error, "Refused a handover request.");
        return (StatusCode::UNAUTHORIZED, "not authenticated").into_response();
    }
    let Some(term) = *shared.leading.borrow() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica does not lead",
        )
            .into_response();
    };
    let Ok(request) = serde_json::from_slice::<FillRequest>(&body) else {
        return (StatusCode::BAD_REQUEST, "not a fill").into_response();
    };
    if request.leader != shared.identity || request.term != term {
        shared.metrics.auth_failure("leader", "wrong_leader");
        return (StatusCode::CONFLICT, "a fill for another leader or term").into_response();
    }
    if request.events.len() > MAX_FILL_EVENTS {
        return (StatusCode::PAYLOAD_TOO_LARGE, "too many events").into_response();
    }
    let decision = shared.source.fill_gap(GapFill {
        token: request.token,
        at: request.gap,
        events: request.events.into_iter().map(bytes::Bytes::from).collect(),
    });
    let answer = FillAnswer {
        leader: shared.identity.clone(),
        term,
        accepted: decision == FillDecision::Accepted,
    };
    signed(&shared, &answer)
}

/// A JSON answer with the MAC of its exact bytes.
fn signed(shared: &Shared, answer: &impl serde::Serialize) -> Response {
    let body = match serde_json::to_vec(answer) {
        Ok(body) => body,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let mac = auth::sign_answer(&shared.key, &body);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::HeaderName::from_static(auth::MAC_HEADER), mac),
        ],
        body,
    )
        .into_response()
}

async fn progress(State(shared): State<Arc<Shared>>, request: Request<Body>) -> Response {
    let (parts, _) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or(PROGRESS_PATH, |p| p.as_str());
    let verified = authenticate(&shared.key, &parts.headers, path_and_query);
    let identity = match verified {
        Ok(identity) => identity,
        Err(error) => {
            shared.metrics.auth_failure("leader", error.as_label());
            tracing::debug!(%error, "Refused a handover request.");
            return (StatusCode::UNAUTHORIZED, "not authenticated").into_response();
        }
    };
    let Some(term) = *shared.leading.borrow() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica does not lead",
        )
            .into_response();
    };
    let Some(asked) = after_of(parts.uri.query()) else {
        return (StatusCode::BAD_REQUEST, "after must be a version number").into_response();
    };
    let mut published = shared.published.subscribe();
    let after = {
        let mut book = shared.book.lock();
        book.enter(term);
        // Past what this replica ever published: the standby followed another leader.
        let after = if asked > book.version { 0 } else { asked };
        book.saw(&identity, after);
        after
    };
    shared.polled.notify_waiters();
    if *published.borrow_and_update() <= after {
        let _ = tokio::time::timeout(POLL_WAIT, published.changed()).await;
    }
    let answer = {
        let book = shared.book.lock();
        let (version, records) = book.answer(after);
        ProgressAnswer {
            leader: shared.identity.clone(),
            term,
            version,
            is_final: book.final_version.is_some_and(|f| version >= f),
            records,
        }
    };
    let body = match serde_json::to_vec(&answer) {
        Ok(body) => body,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    shared
        .metrics
        .records_sent
        .inc_by(answer.records.len() as u64);
    let mac = auth::sign_answer(&shared.key, &body);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::HeaderName::from_static(auth::MAC_HEADER), mac),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::EventDigest;

    fn record(token: u8, seq: u64) -> TokenProgress {
        TokenProgress {
            token: TokenHash::of(&token.to_string()),
            seq,
            tail: vec![EventDigest(seq)],
            delivered_through: seq.saturating_sub(1),
            chain: None,
            gaps: Vec::new(),
        }
    }

    #[test]
    fn an_answer_holds_the_latest_record_per_token_newer_than_asked() {
        let mut book = Book::default();
        book.publish(vec![record(1, 1), record(2, 1)]);
        book.publish(vec![record(1, 5)]);
        let (version, records) = book.answer(0);
        assert_eq!(version, 3);
        assert_eq!(records, vec![record(2, 1), record(1, 5)]);
        let (version, records) = book.answer(2);
        assert_eq!((version, records), (3, vec![record(1, 5)]));
        assert_eq!(book.answer(3), (3, vec![]));
    }

    #[test]
    fn a_long_answer_is_paged_by_version_and_loses_nothing() {
        let mut book = Book::default();
        let all: Vec<TokenProgress> = (0..=255u8)
            .cycle()
            .take(MAX_RECORDS_PER_ANSWER + 10)
            .enumerate()
            .map(|(i, t)| record(t, i as u64))
            .collect();
        book.publish(all);
        // 256 tokens, each with its latest record once.
        let mut seen = HashMap::new();
        let mut after = 0;
        loop {
            let (version, records) = book.answer(after);
            assert!(records.len() <= MAX_RECORDS_PER_ANSWER);
            for r in records {
                seen.insert(r.token, r.seq);
            }
            if version == after {
                break;
            }
            after = version;
        }
        assert_eq!(seen.len(), 256);
        let latest = (0..MAX_RECORDS_PER_ANSWER as u64 + 10)
            .filter(|i| i % 256 == 3)
            .max();
        assert_eq!(Some(seen[&TokenHash::of("3")]), latest);

        let mut book = Book::default();
        let many: Vec<TokenProgress> = (0..MAX_RECORDS_PER_ANSWER as u64 + 5)
            .map(|i| TokenProgress {
                token: TokenHash::of(&i.to_string()),
                ..record(0, i)
            })
            .collect();
        book.publish(many);
        let (first, page) = book.answer(0);
        assert_eq!(page.len(), MAX_RECORDS_PER_ANSWER);
        assert_eq!(first, MAX_RECORDS_PER_ANSWER as u64);
        let (second, rest) = book.answer(first);
        assert_eq!(rest.len(), 5);
        assert_eq!(second, book.version);
    }

    #[test]
    fn a_new_term_serves_none_of_an_earlier_terms_records() {
        let mut book = Book::default();
        book.enter(1);
        book.publish(vec![record(1, 7)]);
        book.enter(1);
        assert_eq!(book.answer(0).1, vec![record(1, 7)]);
        book.enter(2);
        assert_eq!(book.answer(0), (1, vec![]));
        book.publish(vec![record(2, 1)]);
        assert_eq!(book.answer(0), (2, vec![record(2, 1)]));
    }

    #[test]
    fn the_query_holds_only_a_version() {
        assert_eq!(after_of(None), Some(0));
        assert_eq!(after_of(Some("after=12")), Some(12));
        assert_eq!(after_of(Some("after=-1")), None);
        assert_eq!(after_of(Some("after=1&x=2")), None);
    }
}
