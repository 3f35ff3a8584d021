//! One event-stream connection per distinct token, shared by every Listener on that token, and
//! the registry that starts a forwarder with the first Listener and stops it with the last.

mod backoff;
mod events;
mod stream;
mod transport;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

pub use crate::domain::{Token, TokenHash};
pub use backoff::Backoff;
pub use events::{EventStream, EventStreamClient, EventStreamSetupError, OpenError, StreamEnded};

use crate::delivery::DeliveryEngine;
use crate::domain::ListenerId;
use crate::handover::{
    BufferLimits, FillDecision, GapFill, LogShared, ProgressSink, ProgressSource, Role, Seq,
    TokenLog, TokenProgress,
};
use crate::index::{ListenerEntry, RoutingIndex};
use crate::metrics::ForwarderMetrics;

/// Where a token's stream stands; the Listener controller turns it into conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Opening the stream for the first time.
    Connecting,
    /// `STREAM_START` received; events flow.
    Streaming,
    /// The stream ended or could not be opened; retrying after a backoff.
    Reconnecting { reason: String },
    /// The token cannot be used; not retried until the token changes.
    InvalidToken(InvalidTokenCause),
    /// The event server said `TOKEN_EXPIRED`; its listeners are being deleted.
    Expired,
}

/// Why a token is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidTokenCause {
    /// The event server answered `INVALID_ACCESS_TOKEN` (or `NO_ACCESS_TOKEN`).
    RefusedByServer,
    /// The token holds characters that cannot travel in an HTTP header, so it was never sent.
    NotAHeaderValue,
}

/// What a forwarder tells the controllers: the stream state of this token changed, so its
/// listeners are to be reconciled (and deleted, when the token expired).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenNotice(pub TokenHash);

/// How forwarders connect.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// The event server's base url; the stream is `{events_url}/sse`.
    pub events_url: Url,
    /// No byte for this long means the connection is dead.
    pub silence_timeout: Duration,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Named to the event server as `projectName`.
    pub project_name: String,
    /// The proxy to reach the event server through; none unless configured (the environment's
    /// `HTTP(S)_PROXY` is ignored: the token must go only where it is configured to go).
    pub proxy: Option<Url>,
    /// The longest line, and the largest event, a stream may send; more ends the connection,
    /// so a hostile event server cannot make the operator buffer without limit.
    pub max_event_bytes: usize,
    /// How much a standby holds for a takeover.
    pub buffer: BufferLimits,
}

/// What this replica does with one token when tokens are sharded over replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Duty {
    /// Stream it and deliver its events.
    Lead,
    /// Stream it but route nothing more, while its deliveries in flight settle: it moves to
    /// another replica, which starts after the last event routed here.
    Release,
    /// Stream it and buffer its events for a takeover.
    Standby,
    /// Do not stream it.
    Idle,
}

/// Who decides each token's [`Duty`]: the shard coordinator.
pub trait Duties: Send + Sync + 'static {
    fn duty(&self, token: &TokenHash) -> Duty;
}

/// What one [`ForwarderRegistry::refresh_duties`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DutyChanges {
    /// Tokens this replica started delivering.
    pub taken_over: usize,
    /// Buffered events routed by those takeovers.
    pub events_routed: usize,
    /// Tokens it stopped routing, to hand them on.
    pub released: usize,
    /// Tokens it leads or released that it only buffers now.
    pub stood_by: usize,
    /// Streams opened and closed.
    pub started: usize,
    pub stopped: usize,
}

/// The most progress records kept for tokens this replica does not stream (yet).
const MAX_WAITING_RECORDS: usize = 10_000;

/// How long such a record is kept: a stream that starts later than this needs a newer one.
const WAITING_RECORD_TTL: Duration = Duration::from_secs(30);

struct Forwarder {
    cancel: CancellationToken,
    state: Arc<Mutex<StreamState>>,
    log: Arc<Mutex<TokenLog>>,
}

/// Everything a running forwarder needs.
struct Shared {
    index: Arc<RoutingIndex>,
    engine: DeliveryEngine,
    settings: StreamSettings,
    /// The client every stream opens with, made once; `Err` says why streams cannot be opened.
    endpoint: Result<EventStreamClient, String>,
    notices: mpsc::UnboundedSender<TokenNotice>,
    metrics: ForwarderMetrics,
    /// What the tokens' logs share: buffer limits and bytes, the tokens with news.
    logs: Arc<LogShared>,
    /// The registry's role (leading if true); a new forwarder starts in it. Read under the
    /// forwarders' lock, so it is not a lock itself: a change of role takes that lock after
    /// setting it.
    leading: AtomicBool,
    /// Held across a change of role, so changes happen one at a time.
    role_change: Mutex<()>,
    /// Routing stopped for a rollout.
    frozen: AtomicBool,
    /// No stream may be open: a cold standby that lost the Lease. Read under the forwarders'
    /// lock, like `leading`.
    closed: AtomicBool,
    /// The leader's records of tokens without a forwarder here, with when they came.
    waiting_records: Mutex<HashMap<TokenHash, (TokenProgress, Instant)>>,
    /// Sharded: each token's duty; `None` streams every token in the registry's role.
    duties: Mutex<Option<Arc<dyn Duties>>>,
    /// Every token a Listener is routed on, streamed or not, so a token that becomes this
    /// replica's duty can be streamed without a reconcile. Read under the forwarders' lock.
    known: Mutex<HashMap<TokenHash, Token>>,
}

/// The forwarders, by token hash.
#[derive(Clone)]
pub struct ForwarderRegistry {
    forwarders: Arc<Mutex<HashMap<TokenHash, Forwarder>>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl ForwarderRegistry {
    pub fn new(
        index: Arc<RoutingIndex>,
        engine: DeliveryEngine,
        settings: StreamSettings,
        metrics: ForwarderMetrics,
    ) -> (Self, mpsc::UnboundedReceiver<TokenNotice>) {
        let (notices, receiver) = mpsc::unbounded_channel();
        let registry = ForwarderRegistry {
            forwarders: Arc::default(),
            shared: Arc::new(Shared {
                index,
                engine,
                endpoint: EventStreamClient::new(
                    &settings.events_url,
                    &settings.project_name,
                    settings.proxy.as_ref(),
                    settings.max_event_bytes,
                )
                .map_err(|e| e.to_string()),
                logs: Arc::new(LogShared::new(settings.buffer, metrics.clone())),
                settings,
                notices,
                metrics,
                leading: AtomicBool::new(true),
                role_change: Mutex::new(()),
                frozen: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                waiting_records: Mutex::default(),
                duties: Mutex::new(None),
                known: Mutex::default(),
            }),
            shutdown: CancellationToken::new(),
        };
        (registry, receiver)
    }

    /// Puts a listener into the routing index on `token` and makes sure a forwarder streams
    /// that token; a forwarder left without listeners by the move is stopped. Decided under the
    /// registry's lock, so a concurrent detach cannot stop a stream this listener needs.
    pub fn attach(&self, entry: ListenerEntry, token: &Token) {
        let mut forwarders = self.forwarders.lock();
        let moved_from = self.shared.index.upsert_listener(entry);
        if let Some(previous) = moved_from {
            self.stop_if_unused(&mut forwarders, previous);
        }
        self.ensure(&mut forwarders, token);
    }

    /// Takes a listener out of the routing index and stops its token's forwarder if no other
    /// listener is on it. Returns whether the listener was in the index.
    pub fn detach(&self, id: &ListenerId) -> bool {
        let mut forwarders = self.forwarders.lock();
        match self.shared.index.remove_listener(id) {
            Some(token) => {
                self.stop_if_unused(&mut forwarders, token);
                true
            }
            None => false,
        }
    }

    /// Starts a forwarder for `token` unless one runs. A forwarder that gave up on an invalid
    /// or expired token stays, so it is not retried: only a different token (a changed Secret)
    /// starts a new one.
    fn ensure(&self, forwarders: &mut HashMap<TokenHash, Forwarder>, token: &Token) {
        let hash = token.hash();
        self.shared.known.lock().insert(hash, token.clone());
        if forwarders.contains_key(&hash)
            || self.shutdown.is_cancelled()
            || self.shared.closed.load(Ordering::Acquire)
        {
            return;
        }
        let duty = self.duty(&hash);
        if duty == Some(Duty::Idle) {
            return;
        }
        let cancel = self.shutdown.child_token();
        let state = Arc::new(Mutex::new(StreamState::Connecting));
        let log = self.new_log(hash, duty);
        tokio::spawn(stream::run(
            self.shared.clone(),
            token.clone(),
            state.clone(),
            Arc::clone(&log),
            cancel.clone(),
        ));
        forwarders.insert(hash, Forwarder { cancel, state, log });
        self.shared.metrics.streams.set(forwarders.len() as i64);
        tracing::info!(token = %hash, "forwarder started");
    }

    /// A log for a new forwarder, in the registry's current role, with the leader's record of
    /// the token if one came before the stream started.
    fn new_log(&self, hash: TokenHash, duty: Option<Duty>) -> Arc<Mutex<TokenLog>> {
        // A new stream has nothing routed, so a token being released only buffers.
        let leading = match duty {
            Some(duty) => duty == Duty::Lead,
            None => self.shared.leading.load(Ordering::Acquire),
        };
        let mut log = TokenLog::new(hash, leading, Arc::clone(&self.shared.logs));
        if self.shared.frozen.load(Ordering::Acquire) {
            log.freeze();
        }
        let waiting = self.shared.waiting_records.lock().remove(&hash);
        if let Some((record, came)) = waiting {
            let now = Instant::now();
            if now.saturating_duration_since(came) < WAITING_RECORD_TTL {
                log.apply(&record, now);
            }
        }
        Arc::new(Mutex::new(log))
    }

    /// The logs of every running forwarder.
    fn logs(&self) -> Vec<(TokenHash, Arc<Mutex<TokenLog>>)> {
        self.forwarders
            .lock()
            .iter()
            .map(|(hash, forwarder)| (*hash, Arc::clone(&forwarder.log)))
            .collect()
    }

    /// Changes what every forwarder does with the events it reads. Standby -> leading routes
    /// each token's buffered events the leader did not settle, in the leader's numbering where
    /// they aligned, then routes live; it also ends a [`stop_routing`](Self::stop_routing).
    /// Leading -> standby stops routing at once and buffers from then on; deliveries already
    /// submitted are the engine's ([`DeliveryEngine::abandon_all`] drops them).
    pub fn set_role(&self, role: Role) {
        let _change = self.shared.role_change.lock();
        let was_frozen = self.shared.frozen.swap(false, Ordering::AcqRel);
        let was_leading = self
            .shared
            .leading
            .swap(role == Role::Leading, Ordering::AcqRel);
        if was_leading == (role == Role::Leading) && !was_frozen {
            return;
        }
        // A forwarder started from here on starts in the new role; one started before is in
        // the list below, and changing it twice does nothing the second time.
        let mut taken_over = 0;
        for (hash, log) in self.logs() {
            match role {
                Role::Leading => taken_over += stream::take_over(&self.shared, hash, &log),
                Role::Standby => log.lock().stand_by(),
            }
        }
        if role == Role::Leading {
            self.shared
                .metrics
                .takeover_events
                .inc_by(taken_over as u64);
            tracing::info!(events = taken_over, "leading: buffered events routed");
        } else {
            tracing::info!("standing by: events are buffered, not routed");
        }
    }

    /// Stops routing on every token at once, for a rollout: each log stays at the last event
    /// it routed, and events read later are neither routed nor buffered. Deliveries already
    /// submitted go on, and their logs keep counting them as they settle.
    pub fn stop_routing(&self) {
        let _change = self.shared.role_change.lock();
        self.shared.frozen.store(true, Ordering::Release);
        for (_, log) in self.logs() {
            log.lock().freeze();
        }
    }

    /// Closes every stream and opens none until [`open_streams`](Self::open_streams): a cold
    /// standby keeps one stream per token between the replicas, the leader's. The routing
    /// index stays, so opening again needs only the Listeners reconciled.
    pub fn close_streams(&self) {
        let mut forwarders = self.forwarders.lock();
        self.shared.closed.store(true, Ordering::Release);
        for (hash, forwarder) in forwarders.drain() {
            forwarder.cancel.cancel();
            tracing::debug!(token = %hash, "forwarder stopped: streams closed");
        }
        self.shared.metrics.streams.set(0);
    }

    /// Lets forwarders start again after [`close_streams`](Self::close_streams).
    pub fn open_streams(&self) {
        let _forwarders = self.forwarders.lock();
        self.shared.closed.store(false, Ordering::Release);
    }

    /// The registry's role.
    pub fn role(&self) -> Role {
        if self.shared.leading.load(Ordering::Acquire) {
            Role::Leading
        } else {
            Role::Standby
        }
    }

    fn stop_if_unused(&self, forwarders: &mut HashMap<TokenHash, Forwarder>, hash: TokenHash) {
        if self.shared.index.has_token(&hash) {
            return;
        }
        self.shared.known.lock().remove(&hash);
        if let Some(forwarder) = forwarders.remove(&hash) {
            forwarder.cancel.cancel();
            tracing::info!(token = %hash, "forwarder stopped: no listener left");
        }
        self.shared.metrics.streams.set(forwarders.len() as i64);
    }

    /// The stream state of a token, if a forwarder runs for it.
    pub fn state(&self, hash: &TokenHash) -> Option<StreamState> {
        self.forwarders
            .lock()
            .get(hash)
            .map(|f| f.state.lock().clone())
    }

    /// How many forwarders run.
    pub fn len(&self) -> usize {
        self.forwarders.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The log of a token's forwarder.
    fn log(&self, hash: &TokenHash) -> Option<Arc<Mutex<TokenLog>>> {
        self.forwarders.lock().get(hash).map(|f| Arc::clone(&f.log))
    }

    /// Stops every forwarder and refuses new ones.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        self.forwarders.lock().clear();
    }
}

/// Sharding: each token's stream and role follow the [`Duties`] given.
impl ForwarderRegistry {
    /// From now on every token's stream and role follow `duties`; call
    /// [`refresh_duties`](Self::refresh_duties) whenever they change.
    pub fn set_duties(&self, duties: Arc<dyn Duties>) {
        *self.shared.duties.lock() = Some(duties);
    }

    fn duty(&self, hash: &TokenHash) -> Option<Duty> {
        let duties = self.shared.duties.lock().clone();
        duties.map(|duties| duties.duty(hash))
    }

    /// Brings every token's stream and log in line with its duty now: opens and closes
    /// streams, takes over, releases and stands by. A release freezes the log, so its
    /// deliveries in flight still settle into its progress; standing by (or closing) moves the
    /// log to a new epoch, so its deliveries not yet attempted are dropped, never sent.
    pub fn refresh_duties(&self) -> DutyChanges {
        let _change = self.shared.role_change.lock();
        let mut changes = DutyChanges::default();
        let Some(duties) = self.shared.duties.lock().clone() else {
            return changes;
        };
        let known: Vec<(TokenHash, Token)> = self
            .shared
            .known
            .lock()
            .iter()
            .map(|(hash, token)| (*hash, token.clone()))
            .collect();
        for (hash, token) in known {
            let duty = duties.duty(&hash);
            let Some(log) = self.log(&hash) else {
                if duty != Duty::Idle {
                    let mut forwarders = self.forwarders.lock();
                    // Still routed on, as decided under the lock a detach takes.
                    if self.shared.index.has_token(&hash) && !forwarders.contains_key(&hash) {
                        self.ensure(&mut forwarders, &token);
                        changes.started += usize::from(forwarders.contains_key(&hash));
                    }
                }
                continue;
            };
            match duty {
                Duty::Lead => {
                    if !log.lock().is_leading() {
                        changes.events_routed += stream::take_over(&self.shared, hash, &log);
                        changes.taken_over += 1;
                    }
                }
                Duty::Release => {
                    let mut log = log.lock();
                    if log.is_leading() {
                        log.freeze();
                        changes.released += 1;
                    }
                }
                Duty::Standby => {
                    let mut log = log.lock();
                    if !log.is_standby() {
                        log.stand_by();
                        changes.stood_by += 1;
                    }
                }
                Duty::Idle => {
                    if !log.lock().is_standby() {
                        log.lock().stand_by();
                        changes.stood_by += 1;
                    }
                    let mut forwarders = self.forwarders.lock();
                    if let Some(forwarder) = forwarders.remove(&hash) {
                        forwarder.cancel.cancel();
                        changes.stopped += 1;
                    }
                    self.shared.metrics.streams.set(forwarders.len() as i64);
                }
            }
        }
        changes
    }

    /// Whether every event routed on these tokens has settled (tokens not streamed count as
    /// settled): a release waits for this before it publishes the last progress.
    pub fn settled(&self, tokens: &[TokenHash]) -> bool {
        tokens
            .iter()
            .all(|hash| self.log(hash).is_none_or(|log| log.lock().is_settled()))
    }

    /// The tokens streamed here, each with whether this replica delivers it (leading).
    pub fn token_roles(&self) -> Vec<(TokenHash, bool)> {
        self.logs()
            .into_iter()
            .map(|(hash, log)| (hash, log.lock().is_leading()))
            .collect()
    }

    /// The gap fills found since the previous call for the tokens `wanted` picks: sharded,
    /// each goes to the replica that leads its token.
    pub fn take_fills_where(&self, wanted: impl Fn(&TokenHash) -> bool) -> Vec<GapFill> {
        self.shared
            .logs
            .take_fills_where(|fill| wanted(&fill.token))
    }

    /// Whether every token routed on that is this replica's duty has its stream open, or
    /// refused for good: a token without a forwarder yet counts as not open.
    pub fn duty_streams_open(&self) -> bool {
        let Some(duties) = self.shared.duties.lock().clone() else {
            return true;
        };
        let known = self.known_tokens();
        let forwarders = self.forwarders.lock();
        known.iter().all(|hash| {
            if !self.shared.index.has_token(hash) || duties.duty(hash) == Duty::Idle {
                return true;
            }
            forwarders.get(hash).is_some_and(|forwarder| {
                matches!(
                    *forwarder.state.lock(),
                    StreamState::Streaming | StreamState::InvalidToken(_) | StreamState::Expired
                )
            })
        })
    }

    /// Every token a Listener is routed on, streamed here or not.
    pub fn known_tokens(&self) -> Vec<TokenHash> {
        self.shared.known.lock().keys().copied().collect()
    }
}

impl ProgressSource for ForwarderRegistry {
    fn changed_progress(&self) -> Vec<TokenProgress> {
        let changed = self.shared.logs.take_changed();
        if changed.is_empty() {
            return Vec::new();
        }
        let logs: Vec<_> = {
            let forwarders = self.forwarders.lock();
            changed
                .iter()
                .filter_map(|hash| forwarders.get(hash).map(|f| Arc::clone(&f.log)))
                .collect()
        };
        logs.iter()
            .filter_map(|log| log.lock().progress())
            .collect()
    }

    fn fill_gap(&self, fill: GapFill) -> FillDecision {
        match self.log(&fill.token) {
            Some(log) => stream::fill_gap(&self.shared, fill.token, &log, fill.at, fill.events),
            None => FillDecision::Ignored,
        }
    }
}

impl ProgressSink for ForwarderRegistry {
    fn apply_progress(&self, records: &[TokenProgress]) {
        let now = Instant::now();
        for record in records {
            let log = self
                .forwarders
                .lock()
                .get(&record.token)
                .map(|f| Arc::clone(&f.log));
            match log {
                Some(log) => log.lock().apply(record, now),
                None => self.keep_waiting(record, now),
            }
        }
    }

    fn take_fills(&self) -> Vec<GapFill> {
        self.shared.logs.take_fills()
    }

    fn fill_answered(&self, token: &TokenHash, at: Seq, accepted: bool) {
        if let Some(log) = self.log(token) {
            log.lock().fill_answered(at, accepted);
        }
    }
}

impl ForwarderRegistry {
    /// Keeps a record of a token this replica does not stream, in case its stream starts
    /// soon; bounded in number and age.
    fn keep_waiting(&self, record: &TokenProgress, now: Instant) {
        let mut waiting = self.shared.waiting_records.lock();
        if waiting.len() >= MAX_WAITING_RECORDS && !waiting.contains_key(&record.token) {
            waiting
                .retain(|_, (_, came)| now.saturating_duration_since(*came) < WAITING_RECORD_TTL);
            if waiting.len() >= MAX_WAITING_RECORDS {
                return;
            }
        }
        waiting.insert(record.token, (record.clone(), now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::delivery::DeliveryConfig;
    use crate::domain::OwnerKey;
    use prometheus_client::registry::Registry;

    /// Stream settings whose event server never answers: streams keep reconnecting, which is
    /// all these tests need.
    fn settings() -> StreamSettings {
        StreamSettings {
            events_url: Url::parse("http://127.0.0.1:9").unwrap(),
            silence_timeout: Duration::from_secs(35),
            reconnect_initial: Duration::from_secs(60),
            reconnect_max: Duration::from_secs(60),
            project_name: "test".into(),
            proxy: None,
            max_event_bytes: 1024,
            buffer: BufferLimits::default(),
        }
    }

    fn registry() -> ForwarderRegistry {
        let clock: crate::clock::SharedClock = Arc::new(SystemClock);
        let engine =
            DeliveryEngine::new(DeliveryConfig::default(), &mut Registry::default()).unwrap();
        let settings = settings();
        let index = Arc::new(RoutingIndex::new(clock));
        ForwarderRegistry::new(index, engine, settings, ForwarderMetrics::default()).0
    }

    fn entry(name: &str, token: &Token) -> ListenerEntry {
        ListenerEntry {
            id: ListenerId::new("ns", name),
            owner: OwnerKey::new("ns", "acme"),
            token: token.hash(),
            generation: 1,
            event_types: Default::default(),
            url: Arc::new(Url::parse("https://example.com/hook").unwrap()),
            user_id: Arc::from("u"),
            expires_at: None,
            delivery: Arc::default(),
        }
    }

    #[tokio::test]
    async fn a_stream_runs_while_any_listener_is_on_its_token() {
        let forwarders = registry();
        let (t1, t2) = (Token::new("t1"), Token::new("t2"));
        forwarders.attach(entry("a", &t1), &t1);
        forwarders.attach(entry("b", &t1), &t1);
        assert_eq!(forwarders.len(), 1, "one stream per token");
        assert!(forwarders.detach(&ListenerId::new("ns", "a")));
        assert!(forwarders.state(&t1.hash()).is_some(), "b still needs it");
        // b moves to another token: the first stream stops, the second starts.
        forwarders.attach(entry("b", &t2), &t2);
        assert!(forwarders.state(&t1.hash()).is_none());
        assert!(forwarders.state(&t2.hash()).is_some());
        assert!(forwarders.detach(&ListenerId::new("ns", "b")));
        assert!(forwarders.is_empty());
        assert!(!forwarders.detach(&ListenerId::new("ns", "b")));
    }

    /// Duties set by the test, token by token; `Idle` for any other.
    #[derive(Default)]
    struct TestDuties(Mutex<HashMap<TokenHash, Duty>>);

    impl Duties for TestDuties {
        fn duty(&self, token: &TokenHash) -> Duty {
            self.0.lock().get(token).copied().unwrap_or(Duty::Idle)
        }
    }

    fn log_role(forwarders: &ForwarderRegistry, token: &Token) -> Option<&'static str> {
        let log = forwarders.log(&token.hash())?;
        let log = log.lock();
        Some(if log.is_leading() {
            "lead"
        } else if log.is_standby() {
            "standby"
        } else {
            "frozen"
        })
    }

    #[tokio::test]
    async fn duties_decide_which_tokens_stream_and_in_which_role() {
        let forwarders = registry();
        let duties = Arc::new(TestDuties::default());
        forwarders.set_duties(duties.clone());
        let (t1, t2, t3) = (Token::new("t1"), Token::new("t2"), Token::new("t3"));
        duties.0.lock().extend([
            (t1.hash(), Duty::Lead),
            (t2.hash(), Duty::Standby),
            (t3.hash(), Duty::Idle),
        ]);
        for (name, token) in [("a", &t1), ("b", &t2), ("c", &t3)] {
            forwarders.attach(entry(name, token), token);
        }
        assert_eq!(log_role(&forwarders, &t1), Some("lead"));
        assert_eq!(log_role(&forwarders, &t2), Some("standby"));
        assert_eq!(
            log_role(&forwarders, &t3),
            None,
            "an idle token is not streamed"
        );
        assert_eq!(forwarders.known_tokens().len(), 3, "but it is known");

        // t1 is handed on, t2 goes elsewhere entirely, t3 becomes this replica's standby.
        duties.0.lock().extend([
            (t1.hash(), Duty::Release),
            (t2.hash(), Duty::Idle),
            (t3.hash(), Duty::Standby),
        ]);
        let changes = forwarders.refresh_duties();
        assert_eq!(
            (changes.released, changes.stopped, changes.started),
            (1, 1, 1)
        );
        assert_eq!(log_role(&forwarders, &t1), Some("frozen"));
        assert_eq!(log_role(&forwarders, &t2), None);
        assert_eq!(log_role(&forwarders, &t3), Some("standby"));
        assert!(forwarders.settled(&[t1.hash(), t2.hash()]));

        // The release is done: t1 is buffered only; t3 is taken over.
        duties
            .0
            .lock()
            .extend([(t1.hash(), Duty::Standby), (t3.hash(), Duty::Lead)]);
        let changes = forwarders.refresh_duties();
        assert_eq!((changes.stood_by, changes.taken_over), (1, 1));
        assert_eq!(log_role(&forwarders, &t1), Some("standby"));
        assert_eq!(log_role(&forwarders, &t3), Some("lead"));
        let leading: Vec<TokenHash> = forwarders
            .token_roles()
            .into_iter()
            .filter_map(|(token, leads)| leads.then_some(token))
            .collect();
        assert_eq!(leading, vec![t3.hash()]);
        assert_eq!(
            forwarders.refresh_duties(),
            DutyChanges::default(),
            "nothing left to do"
        );

        // A token no Listener is on any more is forgotten, duty or not.
        assert!(forwarders.detach(&ListenerId::new("ns", "c")));
        assert_eq!(forwarders.known_tokens().len(), 2);
        assert_eq!(log_role(&forwarders, &t3), None);
    }

    #[tokio::test]
    async fn streams_count_as_open_only_when_every_token_on_duty_streams() {
        let forwarders = registry();
        let duties = Arc::new(TestDuties::default());
        forwarders.set_duties(duties.clone());
        let (t1, t2) = (Token::new("t1"), Token::new("t2"));
        forwarders.attach(entry("a", &t1), &t1);
        forwarders.attach(entry("b", &t2), &t2);
        assert!(forwarders.duty_streams_open(), "idle tokens need no stream");

        // t2 becomes a duty, but no refresh started its stream yet.
        duties
            .0
            .lock()
            .extend([(t1.hash(), Duty::Lead), (t2.hash(), Duty::Standby)]);
        assert!(
            !forwarders.duty_streams_open(),
            "a token on duty without a forwarder is not open"
        );
        forwarders.refresh_duties();
        assert!(
            !forwarders.duty_streams_open(),
            "streams still connecting are not open"
        );
        let set_state = |token: &Token, state: StreamState| {
            let forwarders = forwarders.forwarders.lock();
            *forwarders[&token.hash()].state.lock() = state;
        };
        set_state(&t1, StreamState::Streaming);
        assert!(!forwarders.duty_streams_open(), "t2 is still connecting");
        set_state(&t2, StreamState::Expired);
        assert!(
            forwarders.duty_streams_open(),
            "a token refused for good holds nothing up"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_attaches_and_detaches_never_leave_a_listener_without_its_stream() {
        let forwarders = registry();
        let token = Token::new("shared");
        let tasks: Vec<_> = (0..8)
            .map(|n| {
                let forwarders = forwarders.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    for round in 0..200 {
                        let name = format!("l{n}");
                        forwarders.attach(entry(&name, &token), &token);
                        if round % 2 == 0 {
                            forwarders.detach(&ListenerId::new("ns", name));
                        }
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Every task ended attached: the token has listeners, so its stream must run.
        assert!(forwarders.shared.index.has_token(&token.hash()));
        assert!(forwarders.state(&token.hash()).is_some());
        for n in 0..8 {
            forwarders.detach(&ListenerId::new("ns", format!("l{n}")));
        }
        assert!(forwarders.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn role_changes_racing_attaches_leave_every_log_in_the_last_role() {
        let forwarders = registry();
        let runtime = tokio::runtime::Handle::current();
        // Plain threads, so a deadlock fails the test at the deadline instead of hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        for part in 0..2 {
            let (forwarders, runtime, done) = (forwarders.clone(), runtime.clone(), done.clone());
            std::thread::spawn(move || {
                let _runtime = runtime.enter();
                if part == 0 {
                    for round in 0..5_000 {
                        let role = if round % 2 == 0 {
                            Role::Standby
                        } else {
                            Role::Leading
                        };
                        forwarders.set_role(role);
                    }
                    forwarders.set_role(Role::Standby);
                } else {
                    for n in 0..1_000 {
                        let token = Token::new(format!("t{n}"));
                        forwarders.attach(entry(&format!("l{n}"), &token), &token);
                    }
                }
                let _ = done.send(());
            });
        }
        for _ in 0..2 {
            // A lock-order deadlock between the two would never finish.
            finished
                .recv_timeout(Duration::from_secs(60))
                .expect("role changes and attaches finished");
        }
        for (_, log) in forwarders.logs() {
            assert!(log.lock().is_standby(), "every log follows the last role");
        }
        assert_eq!(forwarders.role(), Role::Standby);
    }

    mod handover {
        //! Two registries as a leader and a standby: what reaches a real receiver when the
        //! lead passes.

        use super::*;
        use crate::crownstone::EventType;
        use crate::handover::EventDigest;
        use crate::index::OwnerEntry;
        use bytes::Bytes;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        const SECRET: &str = "0123456789abcdef0123456789abcdef";

        /// A receiver on loopback that answers 200 and keeps each request's `webhook-id`.
        async fn receiver() -> (Url, Arc<Mutex<Vec<String>>>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url =
                Url::parse(&format!("http://{}/hook", listener.local_addr().unwrap())).unwrap();
            let ids = Arc::new(Mutex::new(Vec::new()));
            let seen = Arc::clone(&ids);
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let seen = Arc::clone(&seen);
                    tokio::spawn(async move {
                        let mut buffer = Vec::new();
                        let mut chunk = [0u8; 4096];
                        loop {
                            let Some(head) = buffer.windows(4).position(|w| w == b"\r\n\r\n")
                            else {
                                match socket.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                                }
                                continue;
                            };
                            let text = String::from_utf8_lossy(&buffer[..head]).to_lowercase();
                            let header = |name: &str| {
                                text.lines()
                                    .find_map(|line| line.strip_prefix(name))
                                    .unwrap_or_default()
                                    .trim()
                                    .to_owned()
                            };
                            let length: usize = header("content-length:").parse().unwrap_or(0);
                            if buffer.len() < head + 4 + length {
                                match socket.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                                }
                                continue;
                            }
                            seen.lock().push(header("webhook-id:"));
                            buffer.drain(..head + 4 + length);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if socket.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            (url, ids)
        }

        fn replica(url: &Url, token: &Token) -> ForwarderRegistry {
            let clock: crate::clock::SharedClock = Arc::new(SystemClock);
            let engine = DeliveryEngine::new(
                DeliveryConfig {
                    allow_private_destinations: true,
                    ..DeliveryConfig::default()
                },
                &mut Registry::default(),
            )
            .unwrap();
            let settings = settings();
            let index = Arc::new(RoutingIndex::new(clock));
            index.upsert_owner(
                OwnerKey::new("ns", "acme"),
                OwnerEntry {
                    enabled: true,
                    daily_allowance: 1_000_000,
                    client_secret: Some(crate::domain::ClientSecret::new(SECRET)),
                },
            );
            let registry =
                ForwarderRegistry::new(index, engine, settings, ForwarderMetrics::default()).0;
            let mut listener = entry("l", token);
            listener.url = Arc::new(url.clone());
            listener.event_types = [EventType::Presence].into_iter().collect();
            registry.attach(listener, token);
            registry
        }

        fn event(n: u64) -> Bytes {
            Bytes::from(format!(
                r#"{{"type":"presence","subType":"enterSphere","n":{n}}}"#
            ))
        }

        /// What the stream does with one data event.
        fn read(registry: &ForwarderRegistry, token: &Token, n: u64) {
            let log = registry.log(&token.hash()).unwrap();
            let mut scratch = stream::Scratch::default();
            stream::deliver(
                &registry.shared,
                token.hash(),
                &log,
                EventType::Presence,
                event(n),
                &mut scratch,
            );
        }

        fn id_of(token: &Token, seq: u64, n: u64) -> String {
            crate::handover::webhook_id(
                &ListenerId::new("ns", "l"),
                &token.hash(),
                seq,
                EventDigest::of(&event(n)),
            )
        }

        async fn eventually(what: &str, condition: impl Fn() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !condition() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        #[tokio::test]
        async fn a_standby_that_takes_over_delivers_what_the_leader_did_not_with_the_same_ids() {
            let (url, ids) = receiver().await;
            let token = Token::new("t");
            let leader = replica(&url, &token);
            let standby = replica(&url, &token);
            standby.set_role(Role::Standby);
            // The standby's stream started one event later than the leader's.
            read(&leader, &token, 1);
            for n in 2..=6 {
                read(&leader, &token, n);
                read(&standby, &token, n);
            }
            eventually("the leader's deliveries", || ids.lock().len() == 6).await;
            eventually("the leader's records", || {
                let records = leader.changed_progress();
                standby.apply_progress(&records);
                records.last().is_some_and(|r| r.delivered_through == 6)
            })
            .await;
            // The leader reads 7 and dies before delivering it; the standby read 7 and 8.
            leader.stop_routing();
            read(&leader, &token, 7);
            read(&standby, &token, 7);
            read(&standby, &token, 8);
            standby.set_role(Role::Leading);
            read(&standby, &token, 9);
            eventually("the new leader's deliveries", || {
                ids.lock().contains(&id_of(&token, 9, 9))
            })
            .await;
            let mut received = ids.lock().clone();
            // 2 was read before the standby's first alignment: delivered again, same id.
            let mut after: Vec<_> = received[6..].to_vec();
            after.sort();
            let mut expected_new: Vec<_> = [(2, 2), (7, 7), (8, 8), (9, 9)]
                .into_iter()
                .map(|(s, n)| id_of(&token, s, n))
                .collect();
            expected_new.sort();
            assert_eq!(after, expected_new, "after the takeover");
            received.sort();
            received.dedup();
            let mut every: Vec<_> = (1..=9).map(|n| id_of(&token, n, n)).collect();
            every.sort();
            assert_eq!(received, every, "each event once, by id");
        }

        #[tokio::test]
        async fn a_fill_of_a_gap_is_delivered_once_as_if_read_with_its_gap_places() {
            use crate::handover::gap_place;
            let (url, ids) = receiver().await;
            let token = Token::new("t");
            let leader = replica(&url, &token);
            let log = leader.log(&token.hash()).unwrap();
            read(&leader, &token, 1);
            read(&leader, &token, 2);
            log.lock().mark_gap();
            read(&leader, &token, 5);
            let fill = |at: u64, events: Vec<Bytes>| GapFill {
                token: token.hash(),
                at,
                events,
            };
            assert_eq!(
                leader.fill_gap(fill(2, vec![event(3), event(4)])),
                FillDecision::Accepted
            );
            assert_eq!(
                leader.fill_gap(fill(2, vec![event(3), event(4)])),
                FillDecision::Ignored,
                "only the first fill"
            );
            // Bytes that are no event are skipped and keep their number.
            log.lock().mark_gap();
            read(&leader, &token, 8);
            assert_eq!(
                leader.fill_gap(fill(3, vec![Bytes::from_static(b"not json"), event(7)])),
                FillDecision::Accepted
            );
            eventually("the deliveries", || ids.lock().len() == 7).await;
            let mut received = ids.lock().clone();
            received.sort();
            let mut expected: Vec<_> = [
                (1, 1),
                (2, 2),
                (gap_place(2, 1), 3),
                (gap_place(2, 2), 4),
                (3, 5),
                (gap_place(3, 2), 7),
                (4, 8),
            ]
            .into_iter()
            .map(|(seq, n)| id_of(&token, seq, n))
            .collect();
            expected.sort();
            assert_eq!(received, expected);
            eventually("the watermark past both gaps", || {
                leader
                    .changed_progress()
                    .last()
                    .is_some_and(|r| r.delivered_through == 4 && r.gaps.is_empty())
            })
            .await;
        }

        #[tokio::test]
        async fn stopped_routing_delivers_nothing_more_and_still_reports_progress() {
            let (url, ids) = receiver().await;
            let token = Token::new("t");
            let leader = replica(&url, &token);
            read(&leader, &token, 1);
            leader.stop_routing();
            read(&leader, &token, 2);
            eventually("the first delivery settled", || {
                leader
                    .changed_progress()
                    .iter()
                    .any(|r| r.delivered_through == 1)
            })
            .await;
            assert_eq!(ids.lock().clone(), vec![id_of(&token, 1, 1)]);
            // A forwarder started now starts stopped too.
            let other = Token::new("other");
            let mut second = entry("m", &other);
            second.url = Arc::new(url.clone());
            second.event_types = [EventType::Presence].into_iter().collect();
            leader.attach(second, &other);
            read(&leader, &other, 3);
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(ids.lock().len(), 1);
        }

        #[tokio::test]
        async fn a_record_that_comes_before_its_stream_is_applied_when_it_starts() {
            let (url, ids) = receiver().await;
            let token = Token::new("t");
            let standby = replica(&url, &Token::new("unrelated"));
            standby.set_role(Role::Standby);
            let digests = (1..=2).map(|n| EventDigest::of(&event(n))).collect();
            standby.apply_progress(&[TokenProgress {
                token: token.hash(),
                seq: 2,
                tail: digests,
                delivered_through: 2,
                chain: None,
                gaps: Vec::new(),
            }]);
            let mut listener = entry("l", &token);
            listener.url = Arc::new(url.clone());
            listener.event_types = [EventType::Presence].into_iter().collect();
            standby.attach(listener, &token);
            for n in 1..=3 {
                read(&standby, &token, n);
            }
            standby.set_role(Role::Leading);
            eventually("the takeover", || !ids.lock().is_empty()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(ids.lock().clone(), vec![id_of(&token, 3, 3)]);
        }
    }
}
