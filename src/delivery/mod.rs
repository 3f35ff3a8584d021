//! The delivery engine: POSTs events to webhook urls, signed, with timeouts, retries and a queue
//! per destination shared fairly between owners, and counts what happened per listener. It knows
//! nothing of Kubernetes.
//!
//! The caller [`submit`](DeliveryEngine::submit)s an event's raw JSON with a
//! [`DeliveryTarget`], and the [`Charge`] it counted against the owner's allowance, if any;
//! submitting never waits, and a delivery that ends without an attempt gives its charge back. Every few seconds it takes
//! [`ListenerReport`]s, the changes per listener since the previous call, to write them to the
//! listeners' status. A receiver answering 410 Gone, or failing every delivery for
//! `endpoint_failing_after`, suspends its listener until the listener's generation changes.
//! A delivery that ends without success goes once more to the listener's dead-letter sink, if
//! it has one, queued like any delivery in its owner's lane of the sink's destination.

mod body;
mod charge;
mod client;
mod config;
mod dead_letter;
mod destination;
#[cfg(test)]
mod engine_tests;
mod fair;
mod listener;
mod metrics;
mod policy;
mod retry;
mod signature;
mod url_policy;

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use bytes::Bytes;

pub use crate::domain::{ClientSecret, ListenerId};
use crate::domain::{OwnerKey, TokenHash};
use crate::handover::{webhook_id, EventDigest, EventPlace, Seq, Settle};
use crate::telemetry::Tracing;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use http::HeaderValue;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use url::Url;

pub use body::BodyPrefix;
pub use charge::{Charge, Ledger};
pub use client::USER_AGENT;
pub use config::{ConfigError, DeliveryArgs, DeliveryConfig, NetworkList};
pub use dead_letter::{
    display_url, DeadLetterReason, ERROR_CODE, ERROR_DATA, ERROR_DEST, ERROR_REASON, MAX_ERROR_DATA,
};
pub use policy::{
    format_iso_duration, parse_iso_duration, DeliveryOverrides, DurationError, ISO_DURATION_PATTERN,
};
pub use retry::{classify_status, parse_retry_after, AttemptResult, Backoff, RetryPolicy, Verdict};
pub use signature::{
    receiver_secret, verify, SignatureError, SigningKey, SigningKeys, WEBHOOK_ID,
    WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};
pub use url_policy::{AddressClass, DestinationRefused, UrlPolicy, UrlRefused};

use destination::{Delivery, DestinationKey, DestinationQueue, Rejected, Settlement};
use listener::{FailureEffect, ListenerEntry};
use metrics::DeliveryMetrics;

/// Where and as whom to deliver an event. Cheap to clone; keep one per listener and reuse it
/// (the engine then reuses the body prefix, signing key and queue it prepared for it).
#[derive(Clone, Debug)]
pub struct DeliveryTarget {
    /// The listener the delivery is counted on.
    pub listener: ListenerId,
    /// The listener's `metadata.generation`; a suspension applies to one generation.
    pub generation: i64,
    /// The webhook url.
    pub url: Arc<Url>,
    /// The owner's id: `clientId` in the body. With the listener's namespace it names the owner
    /// whose share of the destination the delivery takes.
    pub client_id: Arc<str>,
    /// The owner's secret: `clientSecret` in the body, and with the secrets it replaced that
    /// are still live, the signing keys.
    pub client_secret: ClientSecret,
    /// The Crownstone user id: `userId` in the body.
    pub user_id: Arc<str>,
    /// The listener's delivery policy and dead-letter sink over its owner's; the engine's
    /// defaults fill the rest.
    pub delivery: Arc<DeliveryOverrides>,
}

/// Why a listener gets no more deliveries (until its generation changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspension {
    /// The receiver answered 410 Gone.
    EndpointGone,
    /// Every delivery failed for `endpoint_failing_after`, without a success in between.
    EndpointFailing,
}

impl Suspension {
    /// The reason, for a condition or an event: `EndpointGone` or `EndpointFailing`.
    pub fn as_reason(self) -> &'static str {
        match self {
            Self::EndpointGone => "EndpointGone",
            Self::EndpointFailing => "EndpointFailing",
        }
    }
}

/// Why a delivery was dropped without (another) attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The owner's queue for the destination was full: it holds its bound of bytes.
    QueueFull,
    /// The operator's memory budget for queued deliveries was spent, or the owner held its share
    /// of it while other owners were waiting.
    Budget,
    /// The delivery could not be sent within its max age.
    Expired,
    /// The engine is shutting down.
    ShuttingDown,
    /// The listener is suspended for this generation.
    Suspended,
    /// The listener was forgotten while the delivery waited.
    ListenerRemoved,
    /// The listener's owner was disabled or removed while the delivery waited.
    Paused,
    /// This replica stopped leading: whoever leads now delivers the event.
    LeadershipLost,
}

impl DropReason {
    /// Every reason, for registering metrics up front.
    pub const ALL: [Self; 8] = [
        Self::QueueFull,
        Self::Budget,
        Self::Expired,
        Self::ShuttingDown,
        Self::Suspended,
        Self::ListenerRemoved,
        Self::Paused,
        Self::LeadershipLost,
    ];

    /// The metric label: `queue_full`, `budget`, `expired`, `shutting_down`, `suspended`, `listener_removed`,
    /// `paused`, `leadership_lost`.
    pub fn as_label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Budget => "budget",
            Self::Expired => "expired",
            Self::ShuttingDown => "shutting_down",
            Self::Suspended => "suspended",
            Self::ListenerRemoved => "listener_removed",
            Self::Paused => "paused",
            Self::LeadershipLost => "leadership_lost",
        }
    }

    /// What a drop means, for a Listener's `lastError`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::QueueFull => "dropped: the owner's queue for this receiver was full",
            Self::Budget => "dropped: the operator's memory budget for queued deliveries was spent",
            Self::Expired => "dropped: not sent within the delivery's max age",
            Self::ShuttingDown => "dropped: the operator was shutting down",
            Self::Suspended => "dropped: deliveries to this listener are suspended",
            Self::ListenerRemoved => "dropped: the listener was removed",
            Self::Paused => "dropped: the owner was disabled or removed",
            Self::LeadershipLost => "dropped: this replica stopped leading",
        }
    }

    /// Whether the drop settles the event for good. A drop because this replica stops
    /// (shutting down, leadership lost) leaves the event to whoever leads next.
    pub fn settles(self) -> bool {
        !matches!(self, Self::ShuttingDown | Self::LeadershipLost)
    }
}

/// What became of a submitted delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    /// Queued for its destination: it will be attempted.
    Queued,
    /// Dropped before any attempt.
    Dropped(DropReason),
    /// Refused before any attempt: the url can never be delivered to.
    Refused,
}

impl Submission {
    /// Whether the delivery will be attempted.
    pub fn is_queued(self) -> bool {
        self == Submission::Queued
    }
}

/// What happened to a listener's deliveries since the previous [`DeliveryEngine::take_reports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerReport {
    /// The listener.
    pub listener: ListenerId,
    /// The newest generation the engine has seen for it.
    pub generation: i64,
    /// Deliveries that got a 2xx, since the previous report.
    pub delivered: u64,
    /// Deliveries that failed for good, since the previous report.
    pub failed: u64,
    /// Deliveries dropped without an attempt, since the previous report.
    pub dropped: u64,
    /// Dead letters the sink took, since the previous report.
    pub dead_lettered: u64,
    /// When the latest success came, if one came since the previous report.
    pub last_delivery_time: Option<DateTime<Utc>>,
    /// The reason of the latest failure, if one happened since the previous report: short,
    /// such as `HTTP 400 Bad Request` or `timed out after 10s`; never a url or a secret.
    pub last_error: Option<String>,
    /// The reason of the latest drop, if one happened since the previous report.
    pub last_drop_reason: Option<DropReason>,
    /// The listener's suspension for `generation`, reported whenever it starts or is lifted.
    pub suspension: Option<Suspension>,
    /// When the current run of failed deliveries of `generation` began (no success since), if
    /// one is running; the start of the `EndpointFailing` window.
    pub failing_since: Option<DateTime<Utc>>,
}

/// The engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// A setting cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The engine spawns tasks, so it must be created inside a Tokio runtime.
    #[error("the delivery engine must be created inside a Tokio runtime")]
    NoRuntime,
    /// TLS for deliveries could not be set up.
    #[error("could not set up TLS for deliveries: {0}")]
    Tls(#[source] rustls::Error),
}

/// The source of wall-clock time: `webhook-timestamp`, `lastDeliveryTime` and the
/// `EndpointFailing` window. Tests substitute their own.
pub use crate::clock::{Clock, SystemClock};

/// Delivers events to webhooks. Cheap to clone: clones share one engine.
#[derive(Clone)]
pub struct DeliveryEngine {
    shared: Arc<Shared>,
}

impl fmt::Debug for DeliveryEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryEngine")
            .field("listeners", &self.shared.listeners.len())
            .field("destinations", &self.shared.destinations.len())
            .finish()
    }
}

/// What a target is turned into once: the body prefix, the signing key and the destination.
pub(crate) struct PreparedTarget {
    pub(crate) generation: i64,
    /// The url as given, to recognise the target.
    url: Arc<Url>,
    /// The url requests go to: without user information, which travels as `authorization`.
    pub(crate) request_url: Url,
    /// `Basic` credentials from the url's user information, if it has any.
    pub(crate) authorization: Option<HeaderValue>,
    client_id: Arc<str>,
    client_secret: ClientSecret,
    user_id: Arc<str>,
    delivery: Arc<DeliveryOverrides>,
    /// The effective policy: the target's overrides over the engine's defaults.
    pub(crate) retry: RetryPolicy,
    pub(crate) prefix: BodyPrefix,
    pub(crate) signing_key: SigningKeys,
    destination: DestinationKey,
    /// The WebhookUser whose lane of the destination the deliveries go to.
    pub(crate) owner: OwnerKey,
    /// The dead-letter sink, prepared like a target of its own (same owner, keys and policy);
    /// `None` without a sink, for a sink itself, or when the URL policy refuses the sink.
    pub(crate) sink: Option<Arc<PreparedTarget>>,
}

impl PreparedTarget {
    /// Prepares a target, or says why it can never be delivered to.
    fn new(
        target: &DeliveryTarget,
        policy: &UrlPolicy,
        defaults: &RetryPolicy,
    ) -> Result<Self, String> {
        // The controller refuses a Listener whose sink the policy refuses; should one get here
        // anyway (the policy changed), its deliveries go on and their dead letters are not sent.
        let sink = target
            .delivery
            .dead_letter_sink
            .as_ref()
            .and_then(|sink| Self::for_url(target, sink, policy, defaults, None).ok())
            .map(Arc::new);
        Self::for_url(target, &target.url, policy, defaults, sink)
    }

    /// Prepares deliveries of `target` to `url`: its own url, or its sink.
    fn for_url(
        target: &DeliveryTarget,
        url: &Arc<Url>,
        policy: &UrlPolicy,
        defaults: &RetryPolicy,
        sink: Option<Arc<PreparedTarget>>,
    ) -> Result<Self, String> {
        policy.check_url(url).map_err(|e| e.to_string())?;
        let destination = DestinationKey::of(url).ok_or("url has no host")?;
        let signing_key = SigningKeys::of(&target.client_secret).map_err(|e| e.to_string())?;
        let (request_url, authorization) = split_credentials(url)?;
        Ok(Self {
            generation: target.generation,
            url: Arc::clone(url),
            request_url,
            authorization,
            client_id: Arc::clone(&target.client_id),
            client_secret: target.client_secret.clone(),
            user_id: Arc::clone(&target.user_id),
            delivery: Arc::clone(&target.delivery),
            retry: defaults.with_overrides(&target.delivery),
            prefix: BodyPrefix::new(
                &target.client_id,
                target.client_secret.expose(),
                &target.user_id,
            ),
            signing_key,
            destination,
            owner: OwnerKey::new(target.listener.namespace(), Arc::clone(&target.client_id)),
            sink,
        })
    }

    /// Whether this was prepared from an equal target; pointer equality makes it cheap when the
    /// caller reuses its target.
    fn matches(&self, target: &DeliveryTarget) -> bool {
        fn same<T: ?Sized + PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
            Arc::ptr_eq(a, b) || a == b
        }
        self.generation == target.generation
            && same(&self.url, &target.url)
            && same(&self.client_id, &target.client_id)
            && same(&self.user_id, &target.user_id)
            && same(&self.delivery, &target.delivery)
            && (self.client_secret.ptr_eq(&target.client_secret)
                || self.client_secret == target.client_secret)
    }
}

/// Moves a url's user information into a `Basic` authorization header, as browsers and curl do.
fn split_credentials(url: &Url) -> Result<(Url, Option<HeaderValue>), String> {
    if url.username().is_empty() && url.password().is_none() {
        return Ok((url.clone(), None));
    }
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|_| "url credentials are not valid UTF-8".to_owned())
    };
    let credentials = format!(
        "{}:{}",
        decode(url.username())?,
        decode(url.password().unwrap_or_default())?
    );
    let mut value = HeaderValue::try_from(format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credentials)
    ))
    .map_err(|_| "url credentials cannot be sent".to_owned())?;
    value.set_sensitive(true);
    let mut bare = url.clone();
    // Only fails for urls that cannot have credentials, which this one has.
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    Ok((bare, Some(value)))
}

/// A listener's prepared target and the queue of its destination, reused across submits.
pub(crate) struct PreparedSlot {
    target: Arc<PreparedTarget>,
    queue: Arc<DestinationQueue>,
}

/// Why a submit could not get a queue.
enum Unavailable {
    /// The target can never be delivered to: fail the delivery with this reason.
    Refused(String),
    /// No new queue is made once shutdown has begun.
    ShuttingDown,
}

/// The engine's state, shared by its handles and its dispatchers.
pub(crate) struct Shared {
    pub(crate) config: DeliveryConfig,
    pub(crate) retry: RetryPolicy,
    policy: UrlPolicy,
    pub(crate) connector: client::Connector,
    pub(crate) metrics: Arc<DeliveryMetrics>,
    /// The bytes every queue's deliveries may hold together.
    budget: Arc<fair::MemoryBudget>,
    pub(crate) clock: Arc<dyn Clock>,
    runtime: tokio::runtime::Handle,
    // Looked up for every delivery: foldhash, randomly seeded, costs less than std's SipHash.
    listeners: DashMap<ListenerId, Arc<ListenerEntry>, foldhash::fast::RandomState>,
    destinations: DashMap<DestinationKey, Arc<DestinationQueue>, foldhash::fast::RandomState>,
    /// Serialises making and releasing queues (rare), so a queue is never made after shutdown
    /// began and a released queue's gauge is never handed to its successor.
    lifecycle: Mutex<()>,
    shutting_down: AtomicBool,
    /// How many times [`DeliveryEngine::abandon_all`] was called: a delivery submitted before
    /// the latest call is dropped instead of attempted.
    pub(crate) abandons: AtomicU64,
    /// Whether this replica still holds its Lease; checked before every attempt.
    pub(crate) fence: Arc<crate::leader::LeaseFence>,
    stopping: CancellationToken,
    abort: CancellationToken,
    live_dispatchers: AtomicUsize,
    dispatcher_exit: Notify,
    /// Spans of routing and attempts; unset: traces off.
    tracing: OnceLock<Tracing>,
}

impl Shared {
    /// The spans to make, or none.
    pub(crate) fn tracing(&self) -> &Tracing {
        static OFF: Tracing = Tracing::disabled();
        self.tracing.get().unwrap_or(&OFF)
    }
}

impl DeliveryEngine {
    /// Starts an engine, registering its metrics into `registry`. Must be called inside a Tokio
    /// runtime, whose tasks then carry the deliveries.
    pub fn new(config: DeliveryConfig, registry: &mut Registry) -> Result<Self, DeliveryError> {
        Self::with_clock(config, registry, Arc::new(SystemClock))
    }

    /// Like [`new`](Self::new), with another source of wall-clock time.
    pub fn with_clock(
        config: DeliveryConfig,
        registry: &mut Registry,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DeliveryError> {
        config.validate()?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DeliveryError::NoRuntime)?;
        let policy = config.url_policy();
        let connector =
            client::Connector::new(Arc::new(policy.clone())).map_err(DeliveryError::Tls)?;
        let metrics = Arc::new(DeliveryMetrics::register(registry));
        Ok(Self {
            shared: Arc::new(Shared {
                retry: config.retry_policy(),
                budget: Arc::new(fair::MemoryBudget::new(config.memory_budget)),
                config,
                policy,
                connector,
                metrics,
                clock,
                runtime,
                listeners: DashMap::default(),
                destinations: DashMap::default(),
                lifecycle: Mutex::new(()),
                shutting_down: AtomicBool::new(false),
                abandons: AtomicU64::new(0),
                fence: Arc::new(crate::leader::LeaseFence::open()),
                stopping: CancellationToken::new(),
                abort: CancellationToken::new(),
                live_dispatchers: AtomicUsize::new(0),
                dispatcher_exit: Notify::new(),
                tracing: OnceLock::new(),
            }),
        })
    }

    /// Traces routing and attempts with `tracing` from now on; only the first call counts.
    pub fn set_tracing(&self, tracing: Tracing) {
        let _ = self.shared.tracing.set(tracing);
    }

    /// The spans the engine makes, for the forwarders' receive and route spans.
    pub fn tracing(&self) -> &Tracing {
        self.shared.tracing()
    }

    /// Queues one event for one listener and returns at once. `event` is the event's JSON as it
    /// arrived on the stream; it becomes the body's `data` byte for byte.
    ///
    /// Never blocks: when the owner's queue for the destination is full, the engine is shutting
    /// down, or the listener is suspended for this generation, forgotten or paused, the delivery
    /// is dropped and counted with its reason. A url that can never be delivered to (scheme,
    /// refused IP literal) fails at once.
    pub fn submit(&self, event: Bytes, target: DeliveryTarget) -> Submission {
        self.submit_charged(event, target, None)
    }

    /// [`submit`](Self::submit), with the `charge` the delivery used of its owner's allowance:
    /// given back when the delivery is dropped or fails before any attempt, whether at once or
    /// later while it waits.
    pub fn submit_charged(
        &self,
        event: Bytes,
        target: DeliveryTarget,
        charge: Option<Charge>,
    ) -> Submission {
        self.submit_with(event, target, charge, None)
    }

    /// [`submit_charged`](Self::submit_charged) for an event with a place in its token's
    /// stream: its `webhook-id` is made from the place (the same on every replica, see
    /// [`webhook_id`]), and the place's log is told when the delivery is settled: delivered,
    /// failed for good, or dropped for a reason that stands. Dropped because this replica stops
    /// (shutdown cut short, leadership lost), it is never settled.
    pub fn submit_placed(
        &self,
        event: Bytes,
        target: DeliveryTarget,
        charge: Option<Charge>,
        place: EventPlace,
    ) -> Submission {
        self.submit_with(event, target, charge, Some(place))
    }

    fn submit_with(
        &self,
        event: Bytes,
        target: DeliveryTarget,
        charge: Option<Charge>,
        place: Option<EventPlace>,
    ) -> Submission {
        let shared = &self.shared;
        let listener = shared.listener(&target.listener);
        let generation = target.generation;
        // The id is made only for a delivery that is queued, not for one refused at once.
        let (settle, place) = match place {
            Some(place) => (
                Some(place.settle),
                Some((place.token, place.seq, place.digest)),
            ),
            None => (None, None),
        };
        let refused = |reason: DropReason, charge: Option<Charge>, settle: Option<Settle>| {
            give_back(charge);
            if reason.settles() {
                settled(settle);
            }
            shared.dropped(&listener, generation, reason)
        };
        if shared.shutting_down.load(Ordering::Acquire) {
            return refused(DropReason::ShuttingDown, charge, settle);
        }
        // Routed just before the listener was forgotten: it must not come back.
        if listener.is_removed() {
            return refused(DropReason::ListenerRemoved, charge, settle);
        }
        if listener.is_paused() {
            return refused(DropReason::Paused, charge, settle);
        }
        // Without a sink a suspended listener's event needs nothing prepared: no destination
        // queue is made for a receiver that answered 410.
        let suspended = listener.is_suspended(generation);
        if suspended && target.delivery.dead_letter_sink.is_none() {
            return refused(DropReason::Suspended, charge, settle);
        }
        let (prepared, mut queue) = match shared.prepare(&listener, &target, None) {
            Ok(pair) => pair,
            Err(Unavailable::Refused(reason)) => {
                give_back(charge);
                settled(settle);
                shared.failed(&listener, generation, reason);
                return Submission::Refused;
            }
            Err(Unavailable::ShuttingDown) => {
                return refused(DropReason::ShuttingDown, charge, settle)
            }
        };
        let Some(message_id) = message_id(&target, place) else {
            give_back(charge);
            settled(settle);
            shared.failed(&listener, generation, "could not make a message id".into());
            return Submission::Refused;
        };
        let mut delivery =
            shared.new_delivery(&listener, &prepared, event, message_id, charge, settle);
        // Refused at submit, it never waits in a queue; as a delivery it still reaches the sink.
        if suspended {
            delivery.settle(Settlement::Dropped(DropReason::Suspended), shared);
            return Submission::Dropped(DropReason::Suspended);
        }
        loop {
            match queue.push(delivery) {
                Ok(()) => return Submission::Queued,
                // Settling gives the charge back: no attempt was made.
                Err(Rejected::Full(refused, reason)) => {
                    refused.settle(Settlement::Dropped(reason), shared);
                    return Submission::Dropped(reason);
                }
                // The queue went idle and was released just now: take its successor.
                Err(Rejected::Closed(refused)) => {
                    match shared.prepare(&listener, &target, Some(&queue)) {
                        Ok((_, successor)) => queue = successor,
                        Err(_) => {
                            refused.settle(Settlement::Dropped(DropReason::ShuttingDown), shared);
                            return Submission::Dropped(DropReason::ShuttingDown);
                        }
                    }
                    delivery = refused;
                }
            }
        }
    }

    /// Sends an event that is not delivered for a reason its caller counted (an owner's
    /// allowance used up) to the listener's dead-letter sink, if it has one, and settles the
    /// event's place once that is done. The dead letter costs nothing of the allowance.
    pub fn dead_letter_unsent(
        &self,
        event: Bytes,
        target: DeliveryTarget,
        reason: DeadLetterReason,
        place: EventPlace,
    ) {
        let shared = &self.shared;
        let settle = place.settle;
        if target.delivery.dead_letter_sink.is_none() {
            return settle.settled();
        }
        let listener = shared.listener(&target.listener);
        let sends = !shared.shutting_down.load(Ordering::Acquire)
            && !listener.is_removed()
            && !listener.is_paused();
        if !sends {
            return settle.settled();
        }
        let prepared = match shared.prepare(&listener, &target, None) {
            Ok((prepared, _)) => prepared,
            Err(_) => return settle.settled(),
        };
        let Some(message_id) = message_id(&target, Some((place.token, place.seq, place.digest)))
        else {
            return settle.settled();
        };
        let delivery =
            shared.new_delivery(&listener, &prepared, event, message_id, None, Some(settle));
        delivery.settle(Settlement::Unsent(reason), shared);
    }

    /// Checks a url against the URL policy as far as it can be without DNS (scheme, IP
    /// literals), as every delivery's url is checked: for a dead-letter sink, before it is used.
    pub fn check_url(&self, url: &Url) -> Result<(), UrlRefused> {
        self.shared.policy.check_url(url)
    }

    /// The policy deliveries with these overrides get: the overrides over the engine's
    /// defaults.
    pub fn effective_policy(&self, overrides: &DeliveryOverrides) -> RetryPolicy {
        self.shared.retry.with_overrides(overrides)
    }

    /// The changes since the previous call: one report per listener with activity, or whose
    /// suspension started or was lifted.
    pub fn take_reports(&self) -> Vec<ListenerReport> {
        let now = Instant::now();
        self.shared
            .listeners
            .retain(|_, entry| !entry.forgotten_for(now, FORGOTTEN_KEPT));
        self.shared
            .listeners
            .iter()
            .filter(|entry| !entry.value().is_removed())
            .filter_map(|entry| entry.value().take_report())
            .collect()
    }

    /// Why deliveries to `generation` of a listener are suspended, if they are.
    pub fn suspension(&self, listener: &ListenerId, generation: i64) -> Option<Suspension> {
        let entry = self
            .shared
            .listeners
            .get(listener)
            .filter(|entry| !entry.is_removed())?;
        let state = entry.lock();
        state
            .suspension
            .filter(|(suspended, _)| *suspended >= generation)
            .map(|(_, kind)| kind)
    }

    /// Pauses or resumes a listener: while paused (its owner disabled or gone), new and queued
    /// deliveries, retries included, are dropped instead of attempted.
    ///
    /// Only a live listener is paused or resumed, so this also brings back one that was
    /// forgotten and has been created again.
    pub fn set_paused(&self, listener: &ListenerId, paused: bool) {
        let known = self
            .shared
            .listeners
            .get(listener)
            .map(|entry| Arc::clone(entry.value()));
        let entry = match known {
            Some(entry) if !entry.is_removed() => entry,
            Some(_) => self.shared.revive(listener),
            None if !paused => return,
            None => self.shared.revive(listener),
        };
        entry.set_paused(paused);
    }

    /// Takes over a listener's suspension and failure window as its status recorded them before
    /// a restart, so `EndpointGone` and `EndpointFailing` hold across restarts. Ignored for a
    /// listener the engine has already seen (a forgotten one is new again).
    pub fn restore(
        &self,
        listener: &ListenerId,
        generation: i64,
        suspension: Option<Suspension>,
        failing_since: Option<DateTime<Utc>>,
    ) {
        self.shared
            .revive(listener)
            .restore(generation, suspension, failing_since);
    }

    /// Whether the engine keeps state for a listener it has not forgotten.
    pub fn knows(&self, listener: &ListenerId) -> bool {
        self.shared
            .listeners
            .get(listener)
            .is_some_and(|entry| !entry.is_removed())
    }

    /// Forgets a deleted listener: its tallies and suspension go, its deliveries still waiting
    /// are dropped, and so are deliveries routed to it just before (no attempt, the allowance
    /// given back) instead of bringing it back. Only [`set_paused`](Self::set_paused) or
    /// [`restore`](Self::restore), which the reconciler of a live listener calls, bring it back.
    pub fn forget_listener(&self, listener: &ListenerId) {
        let entry = self.shared.listener(listener);
        entry.mark_removed(Instant::now());
        entry.lock().prepared = None;
    }

    /// The fence every attempt checks: give it to the Lease lock, which moves it on with every
    /// renewal. Without election it always holds.
    pub fn fence(&self) -> Arc<crate::leader::LeaseFence> {
        Arc::clone(&self.shared.fence)
    }

    /// Drops every delivery queued or waiting to retry, now, as `leadership_lost`, without
    /// settling their events: this replica stopped leading and whoever leads now delivers
    /// them. Attempts in flight finish; they are not retried. The engine stays usable: a
    /// replica that leads again delivers again.
    pub fn abandon_all(&self) {
        let shared = &self.shared;
        shared.abandons.fetch_add(1, Ordering::AcqRel);
        for queue in shared.destinations.iter() {
            queue.value().wake_dispatcher();
        }
    }

    /// Stops taking events (later submits are dropped as `shutting_down`), lets queued, waiting
    /// and in-flight deliveries finish within `grace`, then gives up the rest, which count as
    /// failed. When it returns, [`take_reports`](Self::take_reports) has the final tallies.
    pub async fn shutdown(&self, grace: Duration) {
        let shared = &self.shared;
        {
            let _lifecycle = shared.lifecycle.lock();
            shared.shutting_down.store(true, Ordering::Release);
        }
        shared.stopping.cancel();
        let deadline = Instant::now() + grace;
        if !shared.wait_for_dispatchers(Some(deadline)).await {
            shared.abort.cancel();
            shared.wait_for_dispatchers(None).await;
        }
    }
}

/// How long a forgotten listener's entry stays to turn away deliveries routed to it just before
/// it was forgotten: routing and submitting are one step of a stream's task, so a moment would do.
const FORGOTTEN_KEPT: Duration = Duration::from_secs(60);

/// A delivery's `webhook-id`: from the event's place in its token's stream (the same on every
/// replica), or new for an event without one.
fn message_id(
    target: &DeliveryTarget,
    place: Option<(TokenHash, Seq, EventDigest)>,
) -> Option<HeaderValue> {
    let id = match place {
        Some((token, seq, digest)) => webhook_id(&target.listener, &token, seq, digest),
        None => signature::new_message_id(),
    };
    HeaderValue::try_from(id).ok()
}

/// Tells an event's log that its delivery is settled, if the event has a place.
fn settled(settle: Option<Settle>) {
    if let Some(settle) = settle {
        settle.settled();
    }
}

/// Gives an allowance back: the delivery it was taken for is never attempted.
fn give_back(charge: Option<Charge>) {
    if let Some(charge) = charge {
        charge.refund();
    }
}

impl Shared {
    /// The listener's entry; a forgotten listener's entry stays forgotten.
    fn listener(&self, id: &ListenerId) -> Arc<ListenerEntry> {
        if let Some(entry) = self.listeners.get(id) {
            return Arc::clone(entry.value());
        }
        let entry = self
            .listeners
            .entry(id.clone())
            .or_insert_with(|| Arc::new(ListenerEntry::new(id.clone())));
        Arc::clone(entry.value())
    }

    /// The listener's entry, a fresh one in place of a forgotten one: the listener exists again.
    fn revive(&self, id: &ListenerId) -> Arc<ListenerEntry> {
        let entry = self
            .listeners
            .entry(id.clone())
            .and_modify(|entry| {
                if entry.is_removed() {
                    *entry = Arc::new(ListenerEntry::new(id.clone()));
                }
            })
            .or_insert_with(|| Arc::new(ListenerEntry::new(id.clone())));
        Arc::clone(entry.value())
    }

    /// The prepared target and live queue for a submit, reusing the listener's previous ones
    /// when the target is the same. `stale` is a queue found closed, to be replaced.
    fn prepare(
        self: &Arc<Self>,
        listener: &Arc<ListenerEntry>,
        target: &DeliveryTarget,
        stale: Option<&Arc<DestinationQueue>>,
    ) -> Result<(Arc<PreparedTarget>, Arc<DestinationQueue>), Unavailable> {
        let mut state = listener.lock();
        state.observe_generation(target.generation);
        let reusable = state
            .prepared
            .as_ref()
            .filter(|slot| slot.target.matches(target));
        if let Some(slot) = reusable {
            let is_stale = stale.is_some_and(|stale| Arc::ptr_eq(stale, &slot.queue));
            if !is_stale {
                return Ok((Arc::clone(&slot.target), Arc::clone(&slot.queue)));
            }
        }
        let prepared = match reusable {
            Some(slot) => Arc::clone(&slot.target),
            None => Arc::new(
                PreparedTarget::new(target, &self.policy, &self.retry)
                    .map_err(Unavailable::Refused)?,
            ),
        };
        let queue = self.queue_for(&prepared.destination)?;
        state.prepared = Some(PreparedSlot {
            target: Arc::clone(&prepared),
            queue: Arc::clone(&queue),
        });
        Ok((prepared, queue))
    }

    /// The open queue of a destination, made (with its dispatcher) if there is none.
    fn queue_for(
        self: &Arc<Self>,
        key: &DestinationKey,
    ) -> Result<Arc<DestinationQueue>, Unavailable> {
        if let Some(queue) = self.destinations.get(key) {
            if !queue.is_closed() {
                return Ok(Arc::clone(queue.value()));
            }
        }
        let _lifecycle = self.lifecycle.lock();
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(Unavailable::ShuttingDown);
        }
        if let Some(queue) = self.destinations.get(key) {
            if !queue.is_closed() {
                return Ok(Arc::clone(queue.value()));
            }
        }
        let queue = Arc::new(DestinationQueue::new(
            key.clone(),
            self.config.lane_bounds(),
            Arc::clone(&self.budget),
            Arc::clone(&self.metrics),
        ));
        self.destinations.insert(key.clone(), Arc::clone(&queue));
        self.live_dispatchers.fetch_add(1, Ordering::AcqRel);
        self.runtime.spawn(destination::dispatch(
            Arc::clone(&queue),
            Arc::clone(self),
            self.stopping.child_token(),
            self.abort.child_token(),
        ));
        Ok(queue)
    }

    /// Releases an idle queue: closes it if it holds nothing, and forgets it. False if it still
    /// holds deliveries.
    pub(crate) fn retire(&self, queue: &Arc<DestinationQueue>) -> bool {
        let _lifecycle = self.lifecycle.lock();
        if !queue.close_if_empty() {
            return false;
        }
        let removed = self
            .destinations
            .remove_if(queue.key(), |_, current| Arc::ptr_eq(current, queue));
        if removed.is_some() {
            self.metrics.forget_queue_gauge(queue.label());
        }
        true
    }

    /// A dispatcher ended.
    pub(crate) fn dispatcher_exited(&self) {
        self.live_dispatchers.fetch_sub(1, Ordering::AcqRel);
        self.dispatcher_exit.notify_waiters();
    }

    /// Waits until every dispatcher ended, or `deadline`; true if they all ended.
    async fn wait_for_dispatchers(&self, deadline: Option<Instant>) -> bool {
        loop {
            let exit = self.dispatcher_exit.notified();
            tokio::pin!(exit);
            exit.as_mut().enable();
            if self.live_dispatchers.load(Ordering::Acquire) == 0 {
                return true;
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, exit).await.is_err() {
                        return false;
                    }
                }
                None => exit.await,
            }
        }
    }

    /// A delivery of `event` made now, in this lead, with its max age from `prepared`'s policy.
    fn new_delivery(
        &self,
        listener: &Arc<ListenerEntry>,
        prepared: &Arc<PreparedTarget>,
        event: Bytes,
        message_id: HeaderValue,
        charge: Option<Charge>,
        settle: Option<Settle>,
    ) -> Delivery {
        let mut delivery = Delivery::new(
            Arc::clone(listener),
            Arc::clone(prepared),
            event,
            message_id,
            Instant::now() + prepared.retry.max_age,
            charge,
        );
        delivery.settle_handle = settle;
        delivery.lead = self.abandons.load(Ordering::Acquire);
        delivery.trace = self.tracing().delivery();
        delivery
    }

    /// Queues a dead letter in its owner's lane of the sink's destination, under the same
    /// bounds and budget as any delivery: one that does not fit is dropped and counted.
    pub(crate) fn enqueue_dead_letter(self: &Arc<Self>, mut letter: Delivery) {
        loop {
            let queue = match self.queue_for(&letter.target.destination) {
                Ok(queue) => queue,
                Err(_) => {
                    letter.settle(Settlement::Dropped(DropReason::ShuttingDown), self);
                    return;
                }
            };
            match queue.push(letter) {
                Ok(()) => return,
                Err(Rejected::Full(refused, reason)) => {
                    refused.settle(Settlement::Dropped(reason), self);
                    return;
                }
                // Released for idleness just now: the next call makes its successor.
                Err(Rejected::Closed(refused)) => letter = refused,
            }
        }
    }

    fn dropped(&self, listener: &ListenerEntry, generation: i64, reason: DropReason) -> Submission {
        listener.record_dropped(generation, reason);
        self.metrics.dropped(reason);
        Submission::Dropped(reason)
    }

    fn failed(&self, listener: &ListenerEntry, generation: i64, reason: String) {
        listener.record_failed(
            generation,
            reason,
            self.clock.now(),
            self.config.endpoint_failing_after,
            FailureEffect::Counted,
        );
        self.metrics.outcome(metrics::Outcome::Failed);
    }
}
