//! Writes delivery outcomes and daily usage to status in batches: every few seconds, one patch
//! per Listener or WebhookUser that changed, never one API call per delivery, and no more
//! patches a second than the pacing allows, failures first. Failures are also raised as
//! Kubernetes Events, at most one per Listener per minute and within the same pacing, so an
//! overload that fails every Listener at once does not flood the API server with Events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::Resource;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{apply_status, is_not_found, Context};
use crate::clock::format_day;
use crate::conventions::{cap_message, describe_kube_error};
use crate::delivery::ListenerReport;
use crate::domain::{ListenerId, OwnerKey};
use crate::index::DayUsage;
use crate::resources::{FailureWindow, Listener, Usage, WebhookUser};

/// Field manager of the delivery counters: the reconcilers own the rest of the status.
const DELIVERY_MANAGER: &str = "crownstone-webhooks-delivery";
/// Field manager of `status.usage`.
const USAGE_MANAGER: &str = "crownstone-webhooks-usage";
/// At most one failure Event per Listener this often.
const EVENT_EVERY: Duration = Duration::from_secs(60);
/// Patches in flight in the last flush of a term: the old leader holds the Lease until its
/// counters are written, and its successor delivers only after that, so thousands of Listeners
/// are written side by side rather than one after the other.
const LAST_FLUSH_IN_FLIGHT: usize = 32;

/// A Listener's counters since it was created: the part of its status this writer owns.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryStatus {
    delivered: u64,
    failed: u64,
    dead_lettered: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_delivery_time: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_window: Option<FailureWindow>,
}

/// The part of a WebhookUser's status this writer owns.
#[derive(Serialize, Debug)]
struct UsageStatus {
    usage: Usage,
}

/// A Listener's counters, and what of them is not on its status yet.
struct ListenerTotals {
    status: DeliveryStatus,
    /// Changed since the last write.
    dirty: bool,
    /// Something an operator acts on changed (a failure, a drop, the failure window): written
    /// at the next flush. Successes alone wait for the counters interval.
    urgent: bool,
    written_at: Option<Instant>,
}

/// Which due write goes first when a flush cannot make them all: failures, then counters never
/// written by this process, then those written longest ago.
fn write_order(urgent: bool, written_at: Option<Instant>) -> (bool, Option<Instant>) {
    (!urgent, written_at)
}

/// An owner's usage as counted, and what was last written of it.
struct PendingUsage {
    usage: DayUsage,
    written: Option<(DayUsage, Instant)>,
}

impl PendingUsage {
    /// Unwritten usage is due at once on a new day (a rollover, or a first write); otherwise as
    /// counters are.
    fn is_due(&self, counters_due: &impl Fn(Option<Instant>) -> bool) -> bool {
        match self.written {
            None => true,
            Some((written, _)) if written == self.usage => false,
            Some((written, _)) if written.day != self.usage.day => true,
            Some((_, at)) => counters_due(Some(at)),
        }
    }
}

/// Failures not yet reported as an Event.
#[derive(Default)]
struct PendingFailures {
    count: u64,
    last_error: String,
    last_event: Option<Instant>,
}

impl PendingFailures {
    /// There is something to report and the Listener's last Event is out of its window.
    fn is_due(&self) -> bool {
        self.count > 0 && self.last_event.is_none_or(|at| at.elapsed() >= EVENT_EVERY)
    }
}

/// Write these Listeners' counters now, and say so on `done`.
pub struct FlushRequest {
    pub listeners: Vec<ListenerId>,
    pub done: oneshot::Sender<()>,
}

/// How often the writer writes, and how much.
#[derive(Clone, Copy, Debug)]
pub struct StatusPacing {
    /// Time between flushes.
    pub interval: Duration,
    /// How often a Listener's success counters alone are written.
    pub counters_every: Duration,
    /// Listener status writes a second, at most, on average over a flush.
    pub writes_per_second: u32,
}

/// How one flush shares its writes, in the order they are made.
#[derive(Debug, PartialEq, Eq)]
struct FlushPlan {
    /// Listener statuses with a new failure, drop or failure window.
    failures: usize,
    /// `DeliveryFailed` Events.
    events: usize,
    /// WebhookUser usage.
    usage: usize,
    /// Listener statuses with only success counters to write: whatever the rest left.
    counters: usize,
}

impl FlushPlan {
    fn within(budget: usize, failures: usize, events: usize, usage: usize) -> Self {
        let failures = failures.min(budget);
        let budget = budget - failures;
        let events = events.min(budget);
        let budget = budget - events;
        let usage = usage.min(budget);
        FlushPlan {
            failures,
            events,
            usage,
            counters: budget - usage,
        }
    }
}

impl StatusPacing {
    /// Listener status writes one flush may make.
    fn writes_per_flush(&self) -> usize {
        let writes = (f64::from(self.writes_per_second) * self.interval.as_secs_f64()).ceil();
        (writes as usize).max(1)
    }
}

/// Batches delivery outcomes and usage into status patches.
pub struct StatusWriter {
    ctx: Arc<Context>,
    totals: HashMap<ListenerId, ListenerTotals>,
    failures: HashMap<ListenerId, PendingFailures>,
    usage: HashMap<OwnerKey, PendingUsage>,
    pacing: StatusPacing,
}

impl StatusWriter {
    /// A writer that writes failures at every flush and success counters alone at most every
    /// `pacing.counters_every`, within its writes a second.
    pub fn new(ctx: Arc<Context>, pacing: StatusPacing) -> Self {
        StatusWriter {
            ctx,
            totals: HashMap::new(),
            failures: HashMap::new(),
            usage: HashMap::new(),
            pacing,
        }
    }

    /// Flushes every interval until `stop` is cancelled; the caller flushes once more after
    /// the delivery engine has drained.
    pub async fn run(&mut self, stop: CancellationToken) {
        let (_keep, requests) = mpsc::unbounded_channel();
        self.run_with_requests(stop, requests).await;
    }

    /// [`run`](Self::run), and writes the counters of the Listeners a request names at once:
    /// a sharded replica does before it hands their token on, so its successor counts on from
    /// everything it delivered.
    pub async fn run_with_requests(
        &mut self,
        stop: CancellationToken,
        mut requests: mpsc::UnboundedReceiver<FlushRequest>,
    ) {
        let mut ticker = tokio::time::interval(self.pacing.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => self.flush().await,
                Some(request) = requests.recv() => {
                    self.flush_listeners(request.listeners).await;
                    let _ = request.done.send(());
                }
            }
        }
    }

    /// Writes the counters of these Listeners that are not on their status yet, side by side.
    async fn flush_listeners(&mut self, ids: Vec<ListenerId>) {
        for report in self.ctx.engine.take_reports() {
            self.absorb(report);
        }
        let dirty = ids
            .into_iter()
            .filter(|id| self.totals.get(id).is_some_and(|t| t.dirty))
            .collect();
        self.write_listeners(dirty, LAST_FLUSH_IN_FLIGHT).await;
    }

    /// Writes what is due, within the writes a flush may make: failures and drops first, then
    /// the failure Events whose rate-limit window has ended, then usage, then success counters
    /// once they are `counters_every` old.
    pub async fn flush(&mut self) {
        self.flush_due(false).await;
    }

    /// Writes everything not yet written, as the operator stops.
    pub async fn flush_all(&mut self) {
        self.flush_due(true).await;
    }

    async fn flush_due(&mut self, everything: bool) {
        for report in self.ctx.engine.take_reports() {
            self.absorb(report);
        }
        for (owner, usage) in self.ctx.index.take_usage_changes() {
            self.usage
                .entry(owner)
                .or_insert(PendingUsage {
                    usage,
                    written: None,
                })
                .usage = usage;
        }
        self.prune();
        let counters_every = self.pacing.counters_every;
        let is_due = |written_at: Option<Instant>| {
            everything || written_at.is_none_or(|at| at.elapsed() >= counters_every)
        };
        let mut listeners: Vec<(bool, Option<Instant>, ListenerId)> = self
            .totals
            .iter()
            .filter(|(_, t)| t.dirty && (t.urgent || is_due(t.written_at)))
            .map(|(id, t)| (t.urgent, t.written_at, id.clone()))
            .collect();
        listeners.sort_unstable_by_key(|&(urgent, written_at, _)| write_order(urgent, written_at));
        let mut owners: Vec<(Option<Instant>, OwnerKey)> = self
            .usage
            .iter()
            .filter(|(_, pending)| pending.is_due(&is_due))
            .map(|(owner, pending)| (pending.written.map(|(_, at)| at), owner.clone()))
            .collect();
        owners.sort_unstable_by_key(|(written_at, _)| *written_at);

        let budget = if everything {
            usize::MAX
        } else {
            self.pacing.writes_per_flush()
        };
        let urgent = listeners
            .iter()
            .take_while(|(urgent, _, _)| *urgent)
            .count();
        let mut events: Vec<(Option<Instant>, ListenerId)> = self
            .failures
            .iter()
            .filter(|(_, pending)| pending.is_due())
            .map(|(id, pending)| (pending.last_event, id.clone()))
            .collect();
        events.sort_unstable_by_key(|(last_event, _)| *last_event);
        let plan = FlushPlan::within(budget, urgent, events.len(), owners.len());
        let mut listeners = listeners.into_iter().map(|(_, _, id)| id);
        let failures = listeners.by_ref().take(plan.failures).collect();
        self.write_listeners(failures, 1).await;
        for (_, id) in events.into_iter().take(plan.events) {
            self.publish_failures(id).await;
        }
        for (_, owner) in owners.into_iter().take(plan.usage) {
            self.write_usage(owner).await;
        }
        // The last flush of a term writes side by side; a paced one, one after the other.
        let in_flight = if everything { LAST_FLUSH_IN_FLIGHT } else { 1 };
        let counters = listeners.take(plan.counters).collect();
        self.write_listeners(counters, in_flight).await;
    }

    /// Writes the Listeners' counters, in order, with up to `in_flight` patches at a time.
    async fn write_listeners(&mut self, ids: Vec<ListenerId>, in_flight: usize) {
        use futures::StreamExt;
        let writes: Vec<(ListenerId, DeliveryStatus)> = ids
            .into_iter()
            .filter_map(|id| {
                let status = self.totals.get(&id)?.status.clone();
                Some((id, status))
            })
            .collect();
        let ctx = &self.ctx;
        let results: Vec<(ListenerId, Option<Result<(), kube::Error>>)> =
            futures::stream::iter(writes)
                .map(|(id, status)| async move {
                    // Checked before each write: one the Lease (or the token's shard) ended
                    // before is not made.
                    if !ctx.may_write_listener(&id) {
                        return (id, None);
                    }
                    let api: Api<Listener> = Api::namespaced(ctx.client.clone(), id.namespace());
                    ctx.metrics.status_writes.inc();
                    let result = apply_status(&api, id.name(), DELIVERY_MANAGER, &status).await;
                    (id, Some(result))
                })
                .buffered(in_flight)
                .collect()
                .await;
        for (id, result) in results {
            match result {
                Some(result) => self.written_listener(id, result),
                // Sharded: another replica delivers this Listener's token now and writes its
                // counters, from its status; counting on here would later write over them.
                None if self.ctx.shards.is_some() => {
                    self.totals.remove(&id);
                }
                None => {}
            }
        }
    }

    async fn write_usage(&mut self, owner: OwnerKey) {
        // Checked before each write: a flush that outlives this replica's lease writes no more.
        if !self.ctx.may_write() {
            return;
        }
        let Some(pending) = self.usage.get_mut(&owner) else {
            return;
        };
        let api: Api<WebhookUser> = Api::namespaced(self.ctx.client.clone(), owner.namespace());
        let status = UsageStatus {
            usage: Usage {
                day: format_day(pending.usage.day),
                deliveries: pending.usage.deliveries,
            },
        };
        self.ctx.metrics.status_writes.inc();
        match apply_status(&api, owner.name(), USAGE_MANAGER, &status).await {
            Ok(()) => pending.written = Some((pending.usage, Instant::now())),
            Err(error) if is_not_found(&error) => {
                self.usage.remove(&owner);
            }
            Err(error) => {
                tracing::warn!(user = %owner, error = %describe_kube_error(&error), "Could not write the user's usage.");
            }
        }
    }

    /// Forgets Listeners that are gone, so the maps do not grow with every Listener ever seen.
    fn prune(&mut self) {
        let listeners = &self.ctx.listeners;
        let exists = |id: &ListenerId| {
            listeners
                .get(&ObjectRef::new(id.name()).within(id.namespace()))
                .is_some()
        };
        // Sharded: counters of a Listener whose token another replica delivers now are that
        // replica's to write; kept here they would later be written over its.
        let ctx = &self.ctx;
        let ours = |id: &ListenerId| ctx.shards.is_none() || ctx.may_write_listener(id);
        self.totals.retain(|id, _| exists(id) && ours(id));
        self.failures.retain(|id, _| exists(id));
        let users = &self.ctx.users;
        self.usage.retain(|owner, _| {
            users
                .get(&ObjectRef::new(owner.name()).within(owner.namespace()))
                .is_some()
        });
    }

    /// Adds a report to a Listener's totals.
    fn absorb(&mut self, report: ListenerReport) {
        let id = report.listener.clone();
        // The Listener controller reads the suspension from the engine and reports it.
        if report.suspension.is_some() {
            self.ctx.wake_listener(&id);
        }
        let listeners = &self.ctx.listeners;
        let totals = self.totals.entry(id.clone()).or_insert_with(|| {
            // After a restart the counters go on from what the status says.
            let reference = ObjectRef::<Listener>::new(id.name()).within(id.namespace());
            let status = listeners
                .get(&reference)
                .and_then(|l| l.status.clone())
                .unwrap_or_default();
            ListenerTotals {
                status: DeliveryStatus {
                    delivered: status.delivered,
                    failed: status.failed,
                    dead_lettered: status.dead_lettered,
                    last_delivery_time: status.last_delivery_time,
                    last_error: status.last_error,
                    failure_window: status.failure_window,
                },
                dirty: false,
                urgent: false,
                written_at: None,
            }
        });
        let failed_now = report.failed + report.dropped;
        let status = &mut totals.status;
        status.delivered += report.delivered;
        status.dead_lettered += report.dead_lettered;
        status.failed += failed_now;
        if report.last_delivery_time.is_some() {
            status.last_delivery_time = report.last_delivery_time;
        }
        let last_error = report
            .last_error
            .as_deref()
            .map(cap_message)
            .or_else(|| report.last_drop_reason.map(|r| r.describe().to_owned()));
        if last_error.is_some() {
            status.last_error.clone_from(&last_error);
        }
        let window = report.failing_since.map(|since| FailureWindow {
            since,
            generation: report.generation,
        });
        totals.urgent |= failed_now > 0 || window != status.failure_window;
        status.failure_window = window;
        totals.dirty = true;

        if failed_now > 0 {
            let pending = self.failures.entry(id).or_default();
            pending.count += failed_now;
            if let Some(error) = last_error {
                pending.last_error = error;
            }
        }
    }

    /// Takes note of how a write of a Listener's counters went.
    fn written_listener(&mut self, id: ListenerId, result: Result<(), kube::Error>) {
        match result {
            Ok(()) => {
                if let Some(totals) = self.totals.get_mut(&id) {
                    totals.dirty = false;
                    totals.urgent = false;
                    totals.written_at = Some(Instant::now());
                }
            }
            Err(error) if is_not_found(&error) => {
                self.totals.remove(&id);
                self.failures.remove(&id);
            }
            Err(error) => {
                tracing::warn!(listener = %id, error = %describe_kube_error(&error), "Could not write the Listener's delivery status.")
            }
        }
    }

    /// Raises one `DeliveryFailed` Event for the Listener's failures not yet reported. The
    /// flush picks which Listeners, at most one Event each per [`EVENT_EVERY`]: failures that
    /// wait are counted into the next Event, not lost.
    async fn publish_failures(&mut self, id: ListenerId) {
        if !self.ctx.may_write_listener(&id) {
            return;
        }
        let reference = ObjectRef::<Listener>::new(id.name()).within(id.namespace());
        let Some(listener) = self.ctx.listeners.get(&reference) else {
            return;
        };
        let Some(pending) = self.failures.get_mut(&id) else {
            return;
        };
        let note = format!(
            "{} deliveries failed; last error: {}",
            pending.count, pending.last_error
        );
        let event = Event {
            type_: EventType::Warning,
            reason: "DeliveryFailed".into(),
            note: Some(note),
            action: "Deliver".into(),
            secondary: None,
        };
        if let Err(error) = self
            .ctx
            .recorder
            .publish(&event, &listener.object_ref(&()))
            .await
        {
            tracing::warn!(listener = %id, error = %describe_kube_error(&error), "Could not record a DeliveryFailed event.");
            return;
        }
        pending.count = 0;
        pending.last_event = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_writes_within_the_budget() {
        let pacing = |interval_ms, writes_per_second| StatusPacing {
            interval: Duration::from_millis(interval_ms),
            counters_every: Duration::from_secs(30),
            writes_per_second,
        };
        assert_eq!(pacing(3000, 20).writes_per_flush(), 60);
        assert_eq!(pacing(100, 1).writes_per_flush(), 1, "never zero");
        assert_eq!(pacing(1500, 3).writes_per_flush(), 5, "rounded up");
    }

    #[test]
    fn failures_then_events_then_usage_then_counters_share_a_flush() {
        let plan = |budget, failures, events, usage| {
            let FlushPlan {
                failures,
                events,
                usage,
                counters,
            } = FlushPlan::within(budget, failures, events, usage);
            (failures, events, usage, counters)
        };
        assert_eq!(plan(60, 5, 10, 3), (5, 10, 3, 42), "room for all");
        assert_eq!(
            plan(60, 0, 1000, 3),
            (0, 60, 0, 0),
            "an overload that fails every Listener raises Events within the budget"
        );
        assert_eq!(plan(60, 70, 1000, 3), (60, 0, 0, 0), "status before Events");
        assert_eq!(plan(60, 50, 8, 3), (50, 8, 2, 0));
        assert_eq!(
            plan(usize::MAX, 7, 8, 9).3,
            usize::MAX - 24,
            "the last flush is unbounded"
        );
    }

    #[test]
    fn usage_is_written_at_once_when_new_or_on_a_new_day_and_otherwise_like_counters() {
        let day = |d| chrono::NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        let usage = |d, deliveries| DayUsage {
            day: day(d),
            deliveries,
        };
        let never = |_: Option<Instant>| false;
        let always = |_: Option<Instant>| true;
        let now = Instant::now();
        let pending = |counted, written| PendingUsage {
            usage: counted,
            written,
        };
        assert!(pending(usage(1, 5), None).is_due(&never), "never written");
        assert!(
            !pending(usage(1, 5), Some((usage(1, 5), now))).is_due(&always),
            "unchanged since written"
        );
        assert!(
            pending(usage(2, 0), Some((usage(1, 5), now))).is_due(&never),
            "a new day"
        );
        assert!(!pending(usage(1, 6), Some((usage(1, 5), now))).is_due(&never));
        assert!(pending(usage(1, 6), Some((usage(1, 5), now))).is_due(&always));
    }

    #[test]
    fn failures_go_first_then_the_counters_written_longest_ago() {
        let now = Instant::now();
        let old = now - Duration::from_secs(60);
        let mut due = [
            ("recent counters", false, Some(now)),
            ("failure", true, Some(now)),
            ("old counters", false, Some(old)),
            ("never written", false, None),
        ];
        due.sort_by_key(|&(_, urgent, at)| write_order(urgent, at));
        let order: Vec<&str> = due.iter().map(|(name, _, _)| *name).collect();
        assert_eq!(
            order,
            [
                "failure",
                "never written",
                "old counters",
                "recent counters"
            ]
        );
    }
}
