//! One event-stream connection per distinct token, shared by every Listener on that token, and
//! the registry that starts a forwarder with the first Listener and stops it with the last.

mod backoff;
mod events;
mod stream;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use url::Url;

pub use crate::domain::{Token, TokenHash};
pub use backoff::Backoff;
pub use events::{EventStream, EventStreamClient, EventStreamSetupError, OpenError, StreamEnded};

use crate::delivery::DeliveryEngine;
use crate::domain::ListenerId;
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
}

struct Forwarder {
    cancel: CancellationToken,
    state: Arc<Mutex<StreamState>>,
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
                settings,
                notices,
                metrics,
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
        if forwarders.contains_key(&hash) || self.shutdown.is_cancelled() {
            return;
        }
        let cancel = self.shutdown.child_token();
        let state = Arc::new(Mutex::new(StreamState::Connecting));
        tokio::spawn(stream::run(
            self.shared.clone(),
            token.clone(),
            state.clone(),
            cancel.clone(),
        ));
        forwarders.insert(hash, Forwarder { cancel, state });
        self.shared.metrics.streams.set(forwarders.len() as i64);
        tracing::info!(token = %hash, "forwarder started");
    }

    fn stop_if_unused(&self, forwarders: &mut HashMap<TokenHash, Forwarder>, hash: TokenHash) {
        if self.shared.index.has_token(&hash) {
            return;
        }
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

    /// Shim: a standby reads its streams but routes nothing.
    pub fn set_role(&self, role: crate::handover::Role) {
        self.shared
            .engine
            .set_routing(role == crate::handover::Role::Leading);
    }

    /// Shim: nothing read from now on is routed.
    pub fn stop_routing(&self) {
        self.shared.engine.set_routing(false);
    }

    /// Stops every forwarder and refuses new ones.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        self.forwarders.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::delivery::DeliveryConfig;
    use crate::domain::OwnerKey;
    use prometheus_client::registry::Registry;

    fn registry() -> ForwarderRegistry {
        let clock: crate::clock::SharedClock = Arc::new(SystemClock);
        let engine =
            DeliveryEngine::new(DeliveryConfig::default(), &mut Registry::default()).unwrap();
        let settings = StreamSettings {
            // Nothing listens there: streams keep reconnecting, which is all these tests need.
            events_url: Url::parse("http://127.0.0.1:9").unwrap(),
            silence_timeout: Duration::from_secs(35),
            reconnect_initial: Duration::from_secs(60),
            reconnect_max: Duration::from_secs(60),
            project_name: "test".into(),
            proxy: None,
            max_event_bytes: 1024,
        };
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
}
