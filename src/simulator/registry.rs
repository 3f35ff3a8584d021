//! The simulator's state: tokens, login accounts, open streams indexed by sphere, and dispatch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};

use super::admin::SimulatorStats;
use super::scope::{EventFacts, Scope, ScopeFilter};
use crate::crownstone::{StreamFrame, SystemCode};

/// Length of generated access tokens.
const TOKEN_LENGTH: usize = 64;

/// A short, stable reference to a token for logs: never the token itself.
pub fn token_ref(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    hex::encode(&digest[..4])
}

/// What a token grants, and for how long.
#[derive(Debug)]
pub struct TokenRecord {
    /// The Crownstone user that owns the token.
    pub user_id: String,
    /// The spheres whose events the token receives.
    pub spheres: Vec<String>,
    /// The lifetime the token was issued with.
    pub ttl_seconds: u64,
    /// When it was issued.
    pub created_at: DateTime<Utc>,
    /// `created_at + ttl`.
    pub expires_at: DateTime<Utc>,
    /// Set by revocation: the token then counts as expired.
    revoked: AtomicBool,
    /// The compiled scope filter.
    pub filter: ScopeFilter,
}

impl TokenRecord {
    /// Whether the token has expired (or was revoked) at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.revoked.load(Ordering::Relaxed) || now >= self.expires_at
    }
}

/// What a new token should grant.
#[derive(Clone, Debug)]
pub struct TokenTerms {
    /// The owner's Crownstone user id.
    pub user_id: String,
    /// Sphere ids.
    pub spheres: Vec<String>,
    /// Scopes.
    pub scopes: Vec<Scope>,
    /// Lifetime in seconds.
    pub ttl_seconds: u64,
}

/// A login account: an email and the SHA-1 hex digest of its password, issuing tokens on terms.
#[derive(Clone, Debug)]
struct Account {
    password_sha1: String,
    terms: TokenTerms,
}

/// How a stream is to end, set from outside its own task.
#[derive(Clone, Debug)]
pub enum Ending {
    /// Send this last frame (after the frames already queued), then end the stream.
    Frame(Bytes),
    /// Close the connection at once, without a frame.
    Abort,
}

/// The shared half of an open stream: its queue, and a way to make it end.
pub struct StreamHandle {
    /// Registry-wide id.
    pub id: u64,
    /// The token the stream was opened with.
    pub token: Arc<TokenRecord>,
    /// Token value, kept to find the streams of a revoked token.
    token_value: Arc<str>,
    queue: mpsc::Sender<Bytes>,
    ending: Mutex<Option<Ending>>,
    /// Woken when `ending` is set.
    pub wake: Notify,
}

impl StreamHandle {
    /// Takes the ending requested for this stream, if any.
    pub fn take_ending(&self) -> Option<Ending> {
        self.ending.lock().take()
    }

    fn end(&self, ending: Ending) {
        let mut slot = self.ending.lock();
        // An abort overrides a pending frame; a frame never replaces an abort.
        if !matches!(*slot, Some(Ending::Abort)) {
            *slot = Some(ending);
        }
        drop(slot);
        self.wake.notify_one();
    }
}

/// Counters reported by `GET /admin/stats`.
#[derive(Default)]
struct Counters {
    events_published: AtomicU64,
    events_dispatched: AtomicU64,
    frames_delivered: AtomicU64,
    slow_streams_closed: AtomicU64,
    streams_opened: AtomicU64,
    logins: AtomicU64,
}

/// All of the simulator's state.
pub struct Registry {
    tokens: DashMap<Arc<str>, Arc<TokenRecord>>,
    accounts: DashMap<String, Account>,
    /// sphere id → open streams of tokens that have that sphere.
    by_sphere: RwLock<HashMap<String, HashMap<u64, Arc<StreamHandle>>>>,
    /// Every open stream.
    streams: RwLock<HashMap<u64, Arc<StreamHandle>>>,
    next_stream: AtomicU64,
    outage: AtomicBool,
    stopping: AtomicBool,
    stream_buffer: usize,
    counters: Counters,
}

/// A stream's receiving half, handed to the task that writes the response body.
pub struct StreamSubscription {
    /// The shared half.
    pub handle: Arc<StreamHandle>,
    /// Frames queued for this stream.
    pub queue: mpsc::Receiver<Bytes>,
}

impl Registry {
    /// An empty registry; `stream_buffer` frames may wait per stream before it counts as slow.
    pub fn new(stream_buffer: usize, outage: bool) -> Registry {
        Registry {
            tokens: DashMap::new(),
            accounts: DashMap::new(),
            by_sphere: RwLock::new(HashMap::new()),
            streams: RwLock::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            outage: AtomicBool::new(outage),
            stopping: AtomicBool::new(false),
            stream_buffer: stream_buffer.max(1),
            counters: Counters::default(),
        }
    }

    /// Issues a fresh random token on `terms`.
    pub fn issue_token(&self, terms: &TokenTerms) -> (String, Arc<TokenRecord>) {
        let token = Alphanumeric.sample_string(&mut rand::rng(), TOKEN_LENGTH);
        let created_at = Utc::now();
        // Terms are validated to fit; saturate rather than overflow all the same.
        let ttl =
            chrono::Duration::try_seconds(i64::try_from(terms.ttl_seconds).unwrap_or(i64::MAX))
                .unwrap_or(chrono::Duration::MAX);
        let expires_at = created_at
            .checked_add_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let record = Arc::new(TokenRecord {
            filter: ScopeFilter::new(&terms.scopes, &terms.user_id),
            user_id: terms.user_id.clone(),
            spheres: terms.spheres.clone(),
            ttl_seconds: terms.ttl_seconds,
            created_at,
            expires_at,
            revoked: AtomicBool::new(false),
        });
        self.tokens
            .insert(Arc::from(token.as_str()), Arc::clone(&record));
        tracing::info!(token = %token_ref(&token), user = %terms.user_id, "issued token");
        (token, record)
    }

    /// Registers (or replaces) a login account issuing tokens on `terms`.
    pub fn set_account(&self, email: &str, password_sha1: String, terms: TokenTerms) {
        self.accounts.insert(
            email.to_lowercase(),
            Account {
                password_sha1,
                terms,
            },
        );
    }

    /// Logs in: a fresh token on the account's terms, or `None` when the credentials are wrong.
    pub fn login(&self, email: &str, password_sha1: &str) -> Option<(String, Arc<TokenRecord>)> {
        let terms = {
            let account = self.accounts.get(&email.to_lowercase())?;
            if !account.password_sha1.eq_ignore_ascii_case(password_sha1) {
                return None;
            }
            account.terms.clone()
        };
        self.counters.logins.fetch_add(1, Ordering::Relaxed);
        Some(self.issue_token(&terms))
    }

    /// Looks a token up.
    pub fn token(&self, token: &str) -> Option<Arc<TokenRecord>> {
        self.tokens.get(token).map(|r| Arc::clone(r.value()))
    }

    /// Revokes a token: it counts as expired from now on, and its open streams end with
    /// `TOKEN_EXPIRED`. Returns false for an unknown token.
    pub fn revoke(&self, token: &str) -> bool {
        let Some(record) = self.token(token) else {
            return false;
        };
        record.revoked.store(true, Ordering::Relaxed);
        let frame = StreamFrame::system(SystemCode::TokenExpired).to_sse_bytes();
        let victims: Vec<Arc<StreamHandle>> = self
            .streams
            .read()
            .values()
            .filter(|s| &*s.token_value == token)
            .cloned()
            .collect();
        for stream in victims {
            self.close(&stream, Ending::Frame(frame.clone()));
        }
        tracing::info!(token = %token_ref(token), "revoked token");
        true
    }

    /// Whether new streams get `NO_CONNECTION`.
    pub fn outage(&self) -> bool {
        self.outage.load(Ordering::Relaxed)
    }

    /// Switches the outage on or off.
    pub fn set_outage(&self, enabled: bool) {
        self.outage.store(enabled, Ordering::Relaxed);
    }

    /// Whether the server is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Opens a stream for `token`, indexed under each of its spheres.
    pub fn open_stream(&self, token: &str, record: Arc<TokenRecord>) -> StreamSubscription {
        let (tx, rx) = mpsc::channel(self.stream_buffer);
        let handle = Arc::new(StreamHandle {
            id: self.next_stream.fetch_add(1, Ordering::Relaxed),
            token: record,
            token_value: Arc::from(token),
            queue: tx,
            ending: Mutex::new(None),
            wake: Notify::new(),
        });
        {
            let mut by_sphere = self.by_sphere.write();
            for sphere in &handle.token.spheres {
                by_sphere
                    .entry(sphere.clone())
                    .or_default()
                    .insert(handle.id, Arc::clone(&handle));
            }
        }
        self.streams.write().insert(handle.id, Arc::clone(&handle));
        self.counters.streams_opened.fetch_add(1, Ordering::Relaxed);
        StreamSubscription { handle, queue: rx }
    }

    /// Takes a stream out of the indexes; it receives nothing more.
    pub fn remove_stream(&self, stream: &StreamHandle) {
        if self.streams.write().remove(&stream.id).is_none() {
            return;
        }
        let mut by_sphere = self.by_sphere.write();
        for sphere in &stream.token.spheres {
            if let Some(streams) = by_sphere.get_mut(sphere) {
                streams.remove(&stream.id);
                if streams.is_empty() {
                    by_sphere.remove(sphere);
                }
            }
        }
    }

    fn close(&self, stream: &StreamHandle, ending: Ending) {
        self.remove_stream(stream);
        stream.end(ending);
    }

    /// Closes every open stream with `ending`; returns how many there were.
    pub fn close_all(&self, ending: Ending) -> usize {
        let all: Vec<Arc<StreamHandle>> = self.streams.read().values().cloned().collect();
        for stream in &all {
            self.close(stream, ending.clone());
        }
        all.len()
    }

    /// Marks the server as stopping and closes every stream with `STREAM_CLOSED` (500).
    pub fn stop(&self) -> usize {
        self.stopping.store(true, Ordering::Relaxed);
        self.close_all(Ending::Frame(
            StreamFrame::system(SystemCode::StreamClosed).to_sse_bytes(),
        ))
    }

    /// Dispatches one event (its compact JSON text and its facts) to every open stream of its
    /// sphere whose token is unexpired and whose scopes allow it. Returns how many streams got it.
    ///
    /// The frame is built once and shared by every stream. A stream whose token has expired
    /// ends with `TOKEN_EXPIRED`; one whose queue is full is closed as too slow.
    pub fn dispatch(&self, sphere_id: Option<&str>, facts: &EventFacts<'_>, json: &str) -> usize {
        self.counters
            .events_published
            .fetch_add(1, Ordering::Relaxed);
        let Some(sphere_id) = sphere_id else {
            return 0;
        };
        let now = Utc::now();
        let mut frame: Option<Bytes> = None;
        let mut delivered = 0;
        let mut expired = Vec::new();
        let mut slow = Vec::new();
        {
            let by_sphere = self.by_sphere.read();
            let Some(streams) = by_sphere.get(sphere_id) else {
                return 0;
            };
            for stream in streams.values() {
                if stream.token.is_expired(now) {
                    expired.push(Arc::clone(stream));
                    continue;
                }
                if !stream.token.filter.allows(facts) {
                    continue;
                }
                let bytes = frame.get_or_insert_with(|| crate::crownstone::sse_frame(json));
                match stream.queue.try_send(bytes.clone()) {
                    Ok(()) => delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => slow.push(Arc::clone(stream)),
                    // The stream's task is gone; its guard removes it from the index.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        if !expired.is_empty() {
            let bytes = StreamFrame::system(SystemCode::TokenExpired).to_sse_bytes();
            for stream in expired {
                self.close(&stream, Ending::Frame(bytes.clone()));
            }
        }
        for stream in slow {
            tracing::warn!(stream = stream.id, "closing a stream that cannot keep up");
            self.counters
                .slow_streams_closed
                .fetch_add(1, Ordering::Relaxed);
            self.close(&stream, Ending::Abort);
        }
        if delivered > 0 {
            self.counters
                .events_dispatched
                .fetch_add(1, Ordering::Relaxed);
            self.counters
                .frames_delivered
                .fetch_add(delivered as u64, Ordering::Relaxed);
        }
        delivered
    }

    /// The current counters.
    pub fn snapshot(&self) -> SimulatorStats {
        SimulatorStats {
            open_streams: self.streams.read().len(),
            streams_opened: self.counters.streams_opened.load(Ordering::Relaxed),
            events_published: self.counters.events_published.load(Ordering::Relaxed),
            events_dispatched: self.counters.events_dispatched.load(Ordering::Relaxed),
            frames_delivered: self.counters.frames_delivered.load(Ordering::Relaxed),
            slow_streams_closed: self.counters.slow_streams_closed.load(Ordering::Relaxed),
            tokens: self.tokens.len(),
            logins: self.counters.logins.load(Ordering::Relaxed),
            outage: self.outage(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crownstone::samples;

    fn terms(spheres: &[&str], scopes: &[Scope], ttl: u64) -> TokenTerms {
        TokenTerms {
            user_id: "u1".into(),
            spheres: spheres.iter().map(|s| s.to_string()).collect(),
            scopes: scopes.to_vec(),
            ttl_seconds: ttl,
        }
    }

    fn publish(registry: &Registry, event: &serde_json::Value) -> usize {
        let facts = EventFacts::from_value(event);
        let sphere = event["sphere"]["id"].as_str();
        registry.dispatch(sphere, &facts, &event.to_string())
    }

    #[test]
    fn tokens_are_64_alphanumeric_characters_and_unique() {
        let registry = Registry::new(8, false);
        let (a, _) = registry.issue_token(&terms(&["s1"], &[Scope::All], 60));
        let (b, _) = registry.issue_token(&terms(&["s1"], &[Scope::All], 60));
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
        assert_eq!(token_ref(&a).len(), 8);
    }

    #[test]
    fn dispatch_goes_by_sphere_and_scope_and_shares_one_frame() {
        let registry = Registry::new(8, false);
        let (t1, r1) = registry.issue_token(&terms(&["s1"], &[Scope::All], 60));
        let (t2, r2) = registry.issue_token(&terms(&["s2"], &[Scope::All], 60));
        let (t3, r3) = registry.issue_token(&terms(&["s1"], &[Scope::SwitchStone], 60));
        let mut s1 = registry.open_stream(&t1, r1);
        let mut s2 = registry.open_stream(&t2, r2);
        let mut s3 = registry.open_stream(&t3, r3);

        assert_eq!(publish(&registry, &samples::multi_switch("s1")), 2);
        assert_eq!(
            publish(&registry, &samples::switch_state_update("s1", 5)),
            1
        );
        assert_eq!(
            publish(&registry, &samples::switch_state_update("s3", 5)),
            0
        );
        assert_eq!(
            publish(
                &registry,
                &serde_json::json!({"type": "command", "subType": "multiSwitch"})
            ),
            0
        );

        let a = s1.queue.try_recv().unwrap();
        let c = s3.queue.try_recv().unwrap();
        assert_eq!(
            a.as_ptr(),
            c.as_ptr(),
            "one serialisation shared by all streams"
        );
        assert!(s1.queue.try_recv().is_ok());
        assert!(s3.queue.try_recv().is_err());
        assert!(s2.queue.try_recv().is_err());

        let snapshot = registry.snapshot();
        assert_eq!(snapshot.open_streams, 3);
        assert_eq!(snapshot.events_published, 4);
        assert_eq!(snapshot.events_dispatched, 2);
        assert_eq!(snapshot.frames_delivered, 3);
    }

    #[test]
    fn a_full_queue_closes_the_stream() {
        let registry = Registry::new(2, false);
        let (t, r) = registry.issue_token(&terms(&["s1"], &[Scope::All], 60));
        let sub = registry.open_stream(&t, r);
        let event = samples::switch_state_update("s1", 1);
        assert_eq!(publish(&registry, &event), 1);
        assert_eq!(publish(&registry, &event), 1);
        assert_eq!(publish(&registry, &event), 0);
        assert!(matches!(sub.handle.take_ending(), Some(Ending::Abort)));
        assert_eq!(registry.snapshot().open_streams, 0);
        assert_eq!(registry.snapshot().slow_streams_closed, 1);
    }

    #[test]
    fn expired_tokens_end_their_streams_at_dispatch() {
        let registry = Registry::new(8, false);
        let (t, r) = registry.issue_token(&terms(&["s1"], &[Scope::All], 0));
        let sub = registry.open_stream(&t, r);
        assert_eq!(
            publish(&registry, &samples::switch_state_update("s1", 1)),
            0
        );
        match sub.handle.take_ending() {
            Some(Ending::Frame(bytes)) => assert_eq!(
                bytes,
                StreamFrame::system(SystemCode::TokenExpired).to_sse_bytes()
            ),
            other => panic!("expected TOKEN_EXPIRED, got {other:?}"),
        }
        assert_eq!(registry.snapshot().open_streams, 0);
    }

    #[test]
    fn revoking_expires_the_token_and_ends_its_streams_only() {
        let registry = Registry::new(8, false);
        let (t1, r1) = registry.issue_token(&terms(&["s1"], &[Scope::All], 600));
        let (t2, r2) = registry.issue_token(&terms(&["s1"], &[Scope::All], 600));
        let a = registry.open_stream(&t1, r1);
        let b = registry.open_stream(&t2, r2);
        assert!(registry.revoke(&t1));
        assert!(!registry.revoke("unknown"));
        assert!(registry.token(&t1).unwrap().is_expired(Utc::now()));
        assert!(matches!(a.handle.take_ending(), Some(Ending::Frame(_))));
        assert!(b.handle.take_ending().is_none());
        assert_eq!(registry.snapshot().open_streams, 1);
    }

    #[test]
    fn login_checks_the_password_digest_and_issues_a_token_on_the_same_terms() {
        let registry = Registry::new(8, false);
        let digest = hex::encode(sha1::Sha1::digest(b"secret"));
        registry.set_account(
            "Me@Example.com",
            digest.clone(),
            terms(&["s9"], &[Scope::UserLocation], 120),
        );
        assert!(registry.login("me@example.com", "wrong").is_none());
        assert!(registry.login("nobody@example.com", &digest).is_none());
        let (token, record) = registry.login("me@example.com", &digest).unwrap();
        assert_eq!(record.spheres, ["s9"]);
        assert_eq!(
            record.filter,
            ScopeFilter::new(&[Scope::UserLocation], "u1")
        );
        assert_eq!(record.ttl_seconds, 120);
        assert!(registry.token(&token).is_some());
        assert_eq!(registry.snapshot().logins, 1);
    }
}
