//! One queue and one dispatcher task per destination (scheme, host, port), so a receiver that
//! hangs or fails only ever delays its own deliveries; within a destination, a lane per owner
//! bounded by bytes and served round robin ([`Lanes`]), so an owner that floods a receiver only
//! ever drops and delays its own deliveries there. Every queue draws the bytes its deliveries
//! hold from the operator's one [`MemoryBudget`]; a delivery not sent within its max age is
//! dropped as expired.
//!
//! The dispatcher keeps up to `concurrency_per_destination` attempts in flight, polled by itself
//! (no task per delivery), each on a keep-alive connection of its own that comes back to the
//! dispatcher when the attempt ends, and keeps deliveries waiting to retry in a timer heap, where
//! they hold no concurrency slot; a retry that is due goes back to the front of its owner's lane.
//! A destination with nothing to do for a while closes its queue and ends its task; the next
//! delivery to it makes a new one.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::Bytes;
use futures::{stream::FuturesUnordered, StreamExt};
use http::{HeaderValue, StatusCode};
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::domain::OwnerKey;

use super::{
    charge::Charge,
    client::{self, AttemptRequest, Connection},
    dead_letter::{DeadLetterOutcome, DeadLetterReason, ErrorHeaders, MAX_ERROR_DATA},
    fair::{LaneBounds, LaneId, Lanes, MemoryBudget, Refusal},
    listener::{FailureEffect, ListenerEntry},
    metrics::{DeliveryMetrics, Outcome},
    retry::{AttemptResult, Verdict},
    DropReason, PreparedTarget, Shared,
};
use crate::handover::Settle;
use crate::telemetry::DeliveryTrace;

/// Where connections go: deliveries to the same destination share a queue and a limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DestinationKey {
    https: bool,
    host: Arc<str>,
    port: u16,
}

impl DestinationKey {
    /// The destination of an http(s) url; `None` for other schemes or a url without host.
    pub(crate) fn of(url: &Url) -> Option<Self> {
        let https = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => return None,
        };
        let host = match url.host()? {
            url::Host::Domain(domain) => domain.to_owned(),
            url::Host::Ipv4(address) => address.to_string(),
            url::Host::Ipv6(address) => format!("[{address}]"),
        };
        Some(Self {
            https,
            host: host.into(),
            port: url.port_or_known_default()?,
        })
    }

    /// `scheme://host:port`: the metric label, which holds no path, query or credentials.
    pub(crate) fn label(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

/// One event on its way to one listener.
///
/// A delivery is settled exactly once (delivered, failed or dropped). One dropped unsettled,
/// which happens only when shutdown gives up on it, counts as failed (a dead letter: as a
/// dropped dead letter), and leaves its event unsettled in its token's log.
///
/// A dead letter is a delivery too, to the sink, with error headers; settling it only counts
/// it.
pub(crate) struct Delivery {
    pub(crate) listener: Arc<ListenerEntry>,
    pub(crate) target: Arc<PreparedTarget>,
    /// The raw event until the first attempt builds the body from it.
    event: Bytes,
    body: Option<Bytes>,
    message_id: HeaderValue,
    attempts: u32,
    deadline: Instant,
    last_failure: Option<String>,
    /// The owner's allowance this delivery used, given back if it is never attempted.
    charge: Option<Charge>,
    /// The queue that admitted the delivery, and its engine's metrics; `None` until admitted.
    admitted: Option<Arc<DestinationQueue>>,
    /// The owner's lane in the admitting queue.
    lane: LaneId,
    /// The bytes the admitting queue counted for it, given back when it is settled.
    queued_bytes: usize,
    settled: bool,
    /// Tells the event's log when the delivery is settled; `None` for an event without place.
    pub(crate) settle_handle: Option<Settle>,
    /// The engine's count of abandons when the delivery was submitted.
    pub(crate) lead: u64,
    /// The trace the delivery's attempts belong to.
    pub(crate) trace: DeliveryTrace,
    /// The latest answer's status and the start of its body, for a dead letter.
    last_answer: Option<(StatusCode, Bytes)>,
    /// Why the delivery failed for good, set just before it is settled as failed.
    ending: Option<DeadLetterReason>,
    /// A dead letter's error headers; `None` for a delivery. A dead letter that fails is not
    /// dead-lettered again.
    error_headers: Option<Box<ErrorHeaders>>,
}

/// How a delivery ended.
#[derive(Clone)]
pub(crate) enum Settlement {
    Delivered,
    Failed(String, FailureEffect),
    Dropped(DropReason),
    /// Never sent, for a reason the caller has counted already (an exhausted allowance): only
    /// dead-lettered.
    Unsent(DeadLetterReason),
}

impl Delivery {
    pub(crate) fn new(
        listener: Arc<ListenerEntry>,
        target: Arc<PreparedTarget>,
        event: Bytes,
        message_id: HeaderValue,
        deadline: Instant,
        charge: Option<Charge>,
    ) -> Self {
        Self {
            listener,
            target,
            event,
            body: None,
            message_id,
            attempts: 0,
            deadline,
            last_failure: None,
            charge,
            admitted: None,
            lane: 0,
            queued_bytes: 0,
            settled: false,
            settle_handle: None,
            lead: 0,
            trace: DeliveryTrace::UNTRACED,
            last_answer: None,
            ending: None,
            error_headers: None,
        }
    }

    /// Whether this is a dead letter, on its way to a sink.
    pub(crate) fn is_dead_letter(&self) -> bool {
        self.error_headers.is_some()
    }

    /// The bytes the delivery holds while queued: itself, its body (the event until the first
    /// attempt, then the body that replaces it), its `webhook-id`, and with a dead-letter sink
    /// the room for the last answer's body (a dead letter: its error headers). The parts shared
    /// with other deliveries (target, listener) are not counted.
    fn footprint(&self) -> usize {
        let body = match &self.body {
            Some(body) => body.len(),
            None => self.target.prefix.len() + self.event.len() + 1,
        };
        let dead_letter = match &self.error_headers {
            Some(headers) => headers.footprint(),
            None if self.target.sink.is_some() => MAX_ERROR_DATA,
            None => 0,
        };
        std::mem::size_of::<Self>() + body + self.message_id.len() + dead_letter
    }

    /// Gives the owner's allowance back if no attempt was ever made.
    fn refund_if_unattempted(&mut self) {
        if self.attempts == 0 {
            if let Some(charge) = self.charge.take() {
                charge.refund();
            }
        }
    }

    /// Records the outcome on the listener and the metrics, frees the queue slot, and sends a
    /// delivery that ended without success to its sink, if it has one.
    pub(crate) fn settle(mut self, settlement: Settlement, shared: &Arc<Shared>) {
        self.settled = true;
        self.refund_if_unattempted();
        if self.is_dead_letter() {
            self.settle_dead_letter(settlement, shared);
            return;
        }
        let dead_letter = match &settlement {
            Settlement::Delivered => None,
            Settlement::Failed(..) => self.ending,
            Settlement::Dropped(reason) => DeadLetterReason::for_drop(*reason),
            Settlement::Unsent(reason) => Some(*reason),
        }
        .and_then(|reason| Some((reason, Arc::clone(self.target.sink.as_ref()?))));
        let stands = match &settlement {
            Settlement::Dropped(reason) => reason.settles(),
            Settlement::Delivered | Settlement::Failed(..) | Settlement::Unsent(_) => true,
        };
        // The event is settled once its dead letter is: a dead letter this replica cannot send
        // because it stops leading leaves the event to the next leader.
        let handle = self.settle_handle.take();
        match handle {
            Some(handle) if dead_letter.is_none() => {
                if stands {
                    handle.settled();
                }
            }
            handle => self.settle_handle = handle,
        }
        let generation = self.target.generation;
        match settlement {
            Settlement::Delivered => {
                self.listener
                    .record_delivered(generation, shared.clock.now());
                shared.metrics.outcome(Outcome::Delivered);
            }
            Settlement::Failed(reason, effect) => {
                let suspension = self.listener.record_failed(
                    generation,
                    reason,
                    shared.clock.now(),
                    shared.config.endpoint_failing_after,
                    effect,
                );
                if let Some(suspension) = suspension {
                    tracing::info!(
                        listener = %self.listener.id,
                        generation,
                        reason = suspension.as_reason(),
                        "listener suspended"
                    );
                }
                shared.metrics.outcome(Outcome::Failed);
            }
            Settlement::Dropped(reason) => {
                self.listener.record_dropped(generation, reason);
                shared.metrics.dropped(reason);
            }
            Settlement::Unsent(_) => {}
        }
        // Freed before the dead letter is queued, which may be in the same lane.
        if let Some(queue) = self.admitted.take() {
            queue.release(self.lane, self.queued_bytes);
        }
        if let Some((reason, sink)) = dead_letter {
            let letter = self.dead_letter(reason, sink);
            shared.enqueue_dead_letter(letter);
        }
    }

    /// The dead letter of this delivery: the same body, `webhook-id`, owner and trace, to the
    /// sink, with the error headers. It takes nothing of the allowance.
    fn dead_letter(&mut self, reason: DeadLetterReason, sink: Arc<PreparedTarget>) -> Delivery {
        let (status, excerpt) = match self.last_answer.take() {
            Some((status, excerpt)) => (Some(status), excerpt),
            None => (None, Bytes::new()),
        };
        let headers = ErrorHeaders::new(&self.target.url, status, &excerpt, reason);
        let deadline = Instant::now() + sink.retry.max_age;
        let mut letter = Delivery::new(
            Arc::clone(&self.listener),
            sink,
            std::mem::take(&mut self.event),
            self.message_id.clone(),
            deadline,
            None,
        );
        letter.body = self.body.take();
        letter.error_headers = Some(Box::new(headers));
        letter.settle_handle = self.settle_handle.take();
        letter.lead = self.lead;
        letter.trace = self.trace;
        letter
    }

    /// Counts how a dead letter ended; it is never dead-lettered again.
    fn settle_dead_letter(mut self, settlement: Settlement, shared: &Shared) {
        let (outcome, stands) = match settlement {
            Settlement::Delivered => {
                self.listener.record_dead_lettered(self.target.generation);
                (DeadLetterOutcome::Delivered, true)
            }
            Settlement::Failed(..) | Settlement::Unsent(_) => (DeadLetterOutcome::Failed, true),
            Settlement::Dropped(reason) => (DeadLetterOutcome::Dropped, reason.settles()),
        };
        shared.metrics.dead_letter(outcome);
        if let Some(handle) = self.settle_handle.take() {
            if stands {
                handle.settled();
            }
        }
        if let Some(queue) = self.admitted.take() {
            queue.release(self.lane, self.queued_bytes);
        }
    }

    /// The reason a delivery that ran out of time fails with.
    fn expiry_reason(&mut self, max_age: Duration) -> String {
        self.last_failure.take().unwrap_or_else(|| {
            format!(
                "not delivered within {}",
                humantime::format_duration(max_age)
            )
        })
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.refund_if_unattempted();
        if let Some(queue) = self.admitted.take() {
            if self.is_dead_letter() {
                queue.metrics.dead_letter(DeadLetterOutcome::Dropped);
                queue.release(self.lane, self.queued_bytes);
                return;
            }
            self.listener.record_failed(
                self.target.generation,
                "not delivered before shutdown".to_owned(),
                chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
                Duration::MAX,
                FailureEffect::NotCounted,
            );
            queue.metrics.outcome(Outcome::Failed);
            queue.release(self.lane, self.queued_bytes);
        }
    }
}

/// A delivery refused by a queue, handed back to the caller.
pub(crate) enum Rejected {
    /// The owner's lane is full (`QueueFull`), or the memory budget is spent (`Budget`).
    Full(Delivery, DropReason),
    /// The queue was released for idleness or shutdown; ask for a new one.
    Closed(Delivery),
}

/// The queue of one destination, a lane per owner bounded by bytes, shared by submitters and its
/// dispatcher.
pub(crate) struct DestinationQueue {
    key: DestinationKey,
    label: String,
    state: Mutex<QueueState>,
    wake: Notify,
    depth: Gauge,
    /// The bytes held by every queue of the engine, as the budget counts them.
    bytes: Gauge,
    metrics: Arc<DeliveryMetrics>,
}

struct QueueState {
    /// Admitted and not yet settled, per owner: waiting here, in flight, or waiting to retry.
    lanes: Lanes<OwnerKey, Delivery>,
    closed: bool,
}

impl DestinationQueue {
    pub(crate) fn new(
        key: DestinationKey,
        bounds: LaneBounds,
        budget: Arc<MemoryBudget>,
        metrics: Arc<DeliveryMetrics>,
    ) -> Self {
        let label = key.label();
        let depth = metrics.queue_gauge(&label);
        let bytes = metrics.queue_bytes();
        Self {
            key,
            label,
            state: Mutex::new(QueueState {
                lanes: Lanes::new(bounds, budget),
                closed: false,
            }),
            wake: Notify::new(),
            depth,
            bytes,
            metrics,
        }
    }

    pub(crate) fn key(&self) -> &DestinationKey {
        &self.key
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Admits a delivery into its owner's lane without waiting, or hands it back.
    #[expect(
        clippy::result_large_err,
        reason = "the rejected delivery is handed back by move, boxing it would cost every push an allocation"
    )]
    pub(crate) fn push(self: &Arc<Self>, delivery: Delivery) -> Result<(), Rejected> {
        let bytes = delivery.footprint();
        {
            let mut state = self.state.lock();
            if state.closed {
                return Err(Rejected::Closed(delivery));
            }
            // The lane is looked up by the owner the delivery itself carries.
            let target = Arc::clone(&delivery.target);
            state
                .lanes
                .admit(&target.owner, delivery, bytes, |delivery, lane| {
                    delivery.admitted = Some(Arc::clone(self));
                    delivery.lane = lane;
                    delivery.queued_bytes = bytes;
                })
                .map_err(|(delivery, refusal)| {
                    let reason = match refusal {
                        Refusal::LaneFull => DropReason::QueueFull,
                        Refusal::Budget => DropReason::Budget,
                    };
                    Rejected::Full(delivery, reason)
                })?;
        }
        self.depth.inc();
        self.bytes.inc_by(bytes as i64);
        self.wake.notify_one();
        Ok(())
    }

    /// Moves up to `max` waiting deliveries into `out`, the owners with work in turn; returns
    /// how many.
    fn pop_into(&self, max: usize, out: &mut Vec<Delivery>) -> usize {
        self.state.lock().lanes.pop_into(max, out)
    }

    /// Puts retries that are due back at the front of their owners' lanes.
    fn requeue(&self, due: &mut Vec<Delivery>) {
        let mut state = self.state.lock();
        for delivery in due.drain(..) {
            let lane = delivery.lane;
            state.lanes.requeue(lane, delivery);
        }
    }

    /// Makes the dispatcher look at the queue now.
    pub(crate) fn wake_dispatcher(&self) {
        self.wake.notify_one();
    }

    /// Hands back what waits in the lanes, leaving the queue open.
    fn take_waiting(&self) -> Vec<Delivery> {
        self.state.lock().lanes.take_waiting()
    }

    fn release(&self, lane: LaneId, bytes: usize) {
        self.state.lock().lanes.release(lane, bytes);
        self.depth.dec();
        self.bytes.dec_by(bytes as i64);
    }

    /// Closes the queue if it holds nothing; a closed queue admits nothing more.
    pub(crate) fn close_if_empty(&self) -> bool {
        let mut state = self.state.lock();
        if state.lanes.held() == 0 {
            state.closed = true;
        }
        state.closed
    }

    /// Closes the queue whatever it holds, and hands back what was waiting.
    fn close_and_take(&self) -> Vec<Delivery> {
        let mut state = self.state.lock();
        state.closed = true;
        state.lanes.take_waiting()
    }
}

/// A delivery waiting in the timer heap for its next attempt.
struct ScheduledRetry {
    due: Instant,
    /// Keeps the heap's order total and first-in-first-out among equal times.
    sequence: u64,
    delivery: Delivery,
}

impl PartialEq for ScheduledRetry {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.sequence) == (other.due, other.sequence)
    }
}

impl Eq for ScheduledRetry {}

impl PartialOrd for ScheduledRetry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ScheduledRetry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.sequence).cmp(&(other.due, other.sequence))
    }
}

/// How one attempt ended, with the delivery it belongs to.
struct Attempted {
    delivery: Delivery,
    result: AttemptResult,
    elapsed: Duration,
    /// The connection, if it can carry another request.
    connection: Option<Connection>,
    /// The start of a failure's response body.
    excerpt: Bytes,
}

/// The most recently used of a destination's idle connections that can still carry a request;
/// the ones that cannot are closed on the way.
fn take_reusable(idle: &mut Vec<Connection>, now: Instant) -> Option<Connection> {
    while let Some(connection) = idle.pop() {
        if connection.is_reusable(now) {
            return Some(connection);
        }
    }
    None
}

/// The dispatcher of one destination: runs until the queue is idle for
/// `destination_idle_timeout`, or empty during shutdown, or shutdown's grace period ends.
pub(crate) async fn dispatch(
    queue: Arc<DestinationQueue>,
    shared: Arc<Shared>,
    stopping: CancellationToken,
    abort: CancellationToken,
) {
    let concurrency = shared.config.concurrency_per_destination;
    let idle_timeout = shared.config.destination_idle_timeout;
    let mut in_flight = FuturesUnordered::new();
    // Connections not carrying a request, the most recently used last. A connection is made
    // only when none is idle, so they never outnumber the attempts in flight at once.
    let mut idle_connections: Vec<Connection> = Vec::with_capacity(concurrency);
    let mut retries: BinaryHeap<Reverse<ScheduledRetry>> = BinaryHeap::new();
    let mut batch: Vec<Delivery> = Vec::with_capacity(concurrency);
    let mut sequence = 0u64;
    let mut idle_since: Option<Instant> = None;
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut timer_at: Option<Instant> = None;
    let aborted = abort.clone().cancelled_owned();
    tokio::pin!(aborted);
    let mut stopping_seen = stopping.is_cancelled();
    let stopped = stopping.cancelled_owned();
    tokio::pin!(stopped);
    let mut abandons = shared.abandons.load(Ordering::Acquire);

    loop {
        // This replica stopped leading: what waits here or for a retry goes, unsettled.
        let now_abandons = shared.abandons.load(Ordering::Acquire);
        if now_abandons != abandons {
            abandons = now_abandons;
            let lost = Settlement::Dropped(DropReason::LeadershipLost);
            for delivery in queue.take_waiting() {
                delivery.settle(lost.clone(), &shared);
            }
            for Reverse(retry) in retries.drain() {
                retry.delivery.settle(lost.clone(), &shared);
            }
        }
        // Due retries go back to their owners' lanes, then the free slots are filled from the
        // lanes in turn.
        let now = Instant::now();
        while retries.peek().is_some_and(|Reverse(next)| next.due <= now) {
            if let Some(Reverse(next)) = retries.pop() {
                batch.push(next.delivery);
            }
        }
        if !batch.is_empty() {
            queue.requeue(&mut batch);
        }
        loop {
            let free = concurrency.saturating_sub(in_flight.len());
            if free == 0 || queue.pop_into(free, &mut batch) == 0 {
                break;
            }
            for delivery in batch.drain(..) {
                if let Some(delivery) = ready_for_attempt(delivery, &shared) {
                    in_flight.push(send(
                        Arc::clone(&shared),
                        delivery,
                        take_reusable(&mut idle_connections, now),
                    ));
                }
            }
        }

        let idle = in_flight.is_empty() && retries.is_empty();
        if idle {
            let since = *idle_since.get_or_insert(now);
            if (stopping_seen || now.saturating_duration_since(since) >= idle_timeout)
                && shared.retire(&queue)
            {
                break;
            }
        } else {
            idle_since = None;
        }

        // Sleep until the next retry is due, to put it back in its lane, or until the idle
        // timeout.
        let wake_at = retries
            .peek()
            .map(|Reverse(next)| next.due)
            .or_else(|| idle_since.map(|since| since + idle_timeout));
        if wake_at != timer_at {
            if let Some(at) = wake_at {
                timer.as_mut().reset(at);
            }
            timer_at = wake_at;
        }

        tokio::select! {
            biased;
            _ = &mut aborted => break,
            Some(mut attempted) = in_flight.next(), if !in_flight.is_empty() => {
                idle_connections.extend(attempted.connection.take());
                if let Some(retry) = conclude(attempted, &shared) {
                    sequence += 1;
                    retries.push(Reverse(ScheduledRetry { due: retry.0, sequence, delivery: retry.1 }));
                }
            }
            _ = &mut timer, if timer_at.is_some() => timer_at = None,
            _ = queue.wake.notified() => {}
            _ = &mut stopped, if !stopping_seen => stopping_seen = true,
        }
    }

    // Past shutdown's grace period, whatever is left is given up; a delivery dropped unsettled
    // counts itself as failed (see `Delivery`'s `Drop`).
    if abort.is_cancelled() {
        let waiting = queue.close_and_take();
        drop(in_flight);
        drop(retries);
        drop(waiting);
        shared.retire(&queue);
    }
    shared.dispatcher_exited();
}

/// Another replica leads now: for every token (this one stopped leading since the delivery was
/// made), or, sharded, for this delivery's token (its log stood by).
fn led_elsewhere(delivery: &Delivery, shared: &Shared) -> bool {
    delivery.lead != shared.abandons.load(Ordering::Acquire)
        || delivery
            .settle_handle
            .as_ref()
            .is_some_and(|settle| !settle.is_current())
}

/// Checks a delivery before an attempt: drops or fails the ones that must not be sent.
fn ready_for_attempt(mut delivery: Delivery, shared: &Arc<Shared>) -> Option<Delivery> {
    if led_elsewhere(&delivery, shared) || !shared.fence.holds() {
        delivery.settle(Settlement::Dropped(DropReason::LeadershipLost), shared);
        return None;
    }
    if delivery.listener.is_removed() {
        delivery.settle(Settlement::Dropped(DropReason::ListenerRemoved), shared);
        return None;
    }
    // A dead letter goes out whatever the listener's own receiver did: suspension is about that
    // receiver.
    if !delivery.is_dead_letter() && delivery.listener.is_suspended(delivery.target.generation) {
        delivery.settle(Settlement::Dropped(DropReason::Suspended), shared);
        return None;
    }
    if delivery.listener.is_paused() {
        delivery.settle(Settlement::Dropped(DropReason::Paused), shared);
        return None;
    }
    if Instant::now() >= delivery.deadline {
        // Never sent: the receiver did not fail, the queue was too long for the max age.
        if delivery.attempts == 0 {
            delivery.settle(Settlement::Dropped(DropReason::Expired), shared);
            return None;
        }
        let reason = delivery.expiry_reason(delivery.target.retry.max_age);
        delivery.ending = Some(DeadLetterReason::MaxAge);
        delivery.settle(Settlement::Failed(reason, FailureEffect::Counted), shared);
        return None;
    }
    Some(delivery)
}

/// Makes one attempt, on `connection` if there is one. The body is built on the first attempt
/// and kept for the retries.
async fn send(
    shared: Arc<Shared>,
    mut delivery: Delivery,
    connection: Option<Connection>,
) -> Attempted {
    // Counted before the request leaves: an attempt cut short may still have reached the
    // receiver, so it is never refunded.
    delivery.attempts += 1;
    let body = match &delivery.body {
        Some(body) => body.clone(),
        None => {
            let event = std::mem::take(&mut delivery.event);
            let body = delivery.target.prefix.assemble(&event);
            delivery.body = Some(body.clone());
            body
        }
    };
    let trace = shared.tracing().attempt(
        &delivery.trace,
        &delivery.target.request_url,
        delivery.attempts,
    );
    let started = Instant::now();
    let attempt = client::attempt(
        &shared.connector,
        connection,
        AttemptRequest {
            url: &delivery.target.request_url,
            authorization: delivery.target.authorization.as_ref(),
            body: &body,
            message_id: &delivery.message_id,
            signing_key: &delivery.target.signing_key,
            timestamp: shared.clock.now(),
            timeout: delivery.target.retry.timeout,
            traceparent: trace.traceparent(),
            error_headers: delivery.error_headers.as_deref(),
        },
    )
    .await;
    let elapsed = started.elapsed();
    trace.finish(&attempt.result, elapsed);
    Attempted {
        delivery,
        result: attempt.result,
        elapsed,
        connection: attempt.connection,
        excerpt: attempt.excerpt,
    }
}

/// Settles a delivery after an attempt, or returns when and what to retry.
fn conclude(attempted: Attempted, shared: &Arc<Shared>) -> Option<(Instant, Delivery)> {
    let Attempted {
        mut delivery,
        result,
        elapsed,
        connection: _,
        excerpt,
    } = attempted;
    shared
        .metrics
        .attempt(result.label(), elapsed.as_secs_f64());
    // Kept only for a dead letter, and counted in the footprint only then.
    if let (AttemptResult::Response { status, .. }, Some(_)) = (&result, &delivery.target.sink) {
        delivery.last_answer = Some((*status, excerpt));
    }
    let settlement = match result.verdict() {
        Verdict::Delivered => Settlement::Delivered,
        Verdict::Gone => {
            delivery.ending = Some(DeadLetterReason::Gone);
            Settlement::Failed(result.reason(), FailureEffect::Gone)
        }
        Verdict::Fail => {
            delivery.ending = Some(DeadLetterReason::NotRetryable);
            Settlement::Failed(result.reason(), FailureEffect::Counted)
        }
        Verdict::Retry { retry_after } => {
            let delay =
                delivery
                    .target
                    .retry
                    .delay_after(delivery.attempts, retry_after, &mut rand::rng());
            match delay.map(|delay| Instant::now() + delay) {
                // Abandoned while in flight: whoever leads now delivers it.
                _ if led_elsewhere(&delivery, shared) => {
                    Settlement::Dropped(DropReason::LeadershipLost)
                }
                Some(due) if due < delivery.deadline => {
                    shared.metrics.retry();
                    delivery.last_failure = Some(result.reason());
                    return Some((due, delivery));
                }
                Some(_) => {
                    delivery.ending = Some(DeadLetterReason::MaxAge);
                    Settlement::Failed(result.reason(), FailureEffect::Counted)
                }
                None => {
                    delivery.ending = Some(DeadLetterReason::AttemptsExhausted);
                    Settlement::Failed(result.reason(), FailureEffect::Counted)
                }
            }
        }
    };
    delivery.settle(settlement, shared);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_keys() {
        let table = [
            (
                "https://example.com/a?token=secret",
                Some("https://example.com:443"),
            ),
            ("http://example.com/", Some("http://example.com:80")),
            ("http://EXAMPLE.com:8080/b", Some("http://example.com:8080")),
            (
                "https://user:pass@example.com/",
                Some("https://example.com:443"),
            ),
            ("http://[::1]:9000/", Some("http://[::1]:9000")),
            ("http://10.0.0.1/", Some("http://10.0.0.1:80")),
            ("ftp://example.com/", None),
        ];
        for (text, expected) in table {
            let url = match Url::parse(text) {
                Ok(url) => url,
                Err(error) => panic!("{text}: {error}"),
            };
            let key = DestinationKey::of(&url);
            assert_eq!(
                key.as_ref().map(DestinationKey::label).as_deref(),
                expected,
                "{text}"
            );
        }
        let same = |a: &str, b: &str| {
            let a = Url::parse(a).ok().and_then(|u| DestinationKey::of(&u));
            let b = Url::parse(b).ok().and_then(|u| DestinationKey::of(&u));
            a.is_some() && a == b
        };
        assert!(same("https://example.com/a", "https://example.com:443/b"));
        assert!(!same("https://example.com/", "http://example.com/"));
        assert!(!same("https://example.com/", "https://example.com:8443/"));
    }
}
