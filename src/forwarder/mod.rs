//! One event-stream connection per distinct token, shared by every Listener on that token, and
//! the registry that starts a forwarder with the first Listener and stops it with the last.

mod backoff;
mod stream;
mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use url::Url;

pub use backoff::Backoff;
pub use token::{Token, TokenHash};

use crate::delivery::DeliveryEngine;
use crate::index::RoutingIndex;
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
    /// The event server refused the token; not retried until the token changes.
    InvalidToken,
    /// The token's lifetime is over; its listeners are being deleted.
    Expired,
}

/// What a forwarder tells the controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenNotice {
    /// The token's stream state changed: its listeners' status should be refreshed.
    StateChanged(TokenHash),
    /// The event server said `TOKEN_EXPIRED`: every listener on the token is to be deleted.
    Expired(TokenHash),
}

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
                settings,
                notices,
                metrics,
            }),
            shutdown: CancellationToken::new(),
        };
        (registry, receiver)
    }

    /// Makes sure a forwarder runs for `token`. A forwarder that gave up on an invalid token is
    /// left alone: only a different token (a changed Secret) starts a new one.
    pub fn ensure(&self, token: &Token) {
        let hash = token.hash();
        let mut forwarders = self.forwarders.lock();
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

    /// Stops the forwarder of `hash` when no listener in the index is on it any more.
    pub fn release_if_unused(&self, hash: TokenHash) {
        if !self.shared.index.listeners_of_token(&hash).is_empty() {
            return;
        }
        let mut forwarders = self.forwarders.lock();
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

    /// Stops every forwarder and refuses new ones.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        self.forwarders.lock().clear();
    }
}
