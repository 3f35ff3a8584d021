//! Per-listener bookkeeping: tallies handed out as deltas, and suspensions scoped to one
//! generation of the listener's spec.

use std::{
    sync::atomic::{AtomicBool, AtomicI64, Ordering},
    time::Duration,
};

use chrono::{DateTime, TimeDelta, Utc};
use parking_lot::{Mutex, MutexGuard};
use tokio::time::Instant;

use super::{DropReason, ListenerId, ListenerReport, PreparedSlot, Suspension};

/// What a final failure does besides being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureEffect {
    /// Counts towards `EndpointFailing`.
    Counted,
    /// The receiver answered 410 Gone: suspend at once.
    Gone,
    /// Our side gave up (shutdown): not the receiver's fault.
    NotCounted,
}

/// Tracks how long a listener has failed without a single success.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FailureWindow {
    first_failure: Option<DateTime<Utc>>,
}

impl FailureWindow {
    /// A delivery succeeded: the window closes.
    pub(crate) fn success(&mut self) {
        self.first_failure = None;
    }

    /// A delivery failed at `at`. True once every delivery has failed for at least `window`
    /// since the first failure after the last success.
    /// When the current run of failures started, if one is running.
    pub(crate) fn since(&self) -> Option<DateTime<Utc>> {
        self.first_failure
    }

    /// Continues a run of failures that started at `since` (before a restart).
    pub(crate) fn restore(&mut self, since: DateTime<Utc>) {
        self.first_failure = Some(since);
    }

    pub(crate) fn failure(&mut self, at: DateTime<Utc>, window: Duration) -> bool {
        let first = *self.first_failure.get_or_insert(at);
        let window = TimeDelta::from_std(window).unwrap_or(TimeDelta::MAX);
        at.signed_duration_since(first) >= window
    }
}

/// The state the engine keeps for one listener.
pub(crate) struct ListenerEntry {
    pub(crate) id: ListenerId,
    /// Generations up to this one are suspended (`i64::MIN`: none). An atomic, so the check on
    /// every submit and attempt takes no lock.
    suspended_through: AtomicI64,
    /// The listener was forgotten: its queued deliveries are dropped.
    removed: AtomicBool,
    /// The listener's owner cannot take deliveries now (disabled, gone, no credentials): its
    /// queued deliveries and retries are dropped instead of attempted.
    paused: AtomicBool,
    state: Mutex<ListenerState>,
}

/// Everything behind the listener's lock.
pub(crate) struct ListenerState {
    /// The newest generation seen.
    generation: i64,
    delivered: u64,
    failed: u64,
    dropped: u64,
    dead_lettered: u64,
    last_delivery_time: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_drop_reason: Option<DropReason>,
    /// Something changed since the last report.
    dirty: bool,
    pub(crate) suspension: Option<(i64, Suspension)>,
    failures: FailureWindow,
    /// The precomputed form of the listener's current target, and its destination queue.
    pub(crate) prepared: Option<PreparedSlot>,
    /// When the listener was forgotten, if it was.
    forgotten_at: Option<Instant>,
}

impl ListenerState {
    /// Takes note of a target's generation; a newer one lifts a suspension and restarts the
    /// failure window.
    pub(crate) fn observe_generation(&mut self, generation: i64) {
        if generation <= self.generation {
            return;
        }
        if self
            .suspension
            .is_some_and(|(suspended, _)| suspended < generation)
        {
            self.dirty = true;
        }
        self.generation = generation;
        if self.failures.since().is_some() {
            self.dirty = true;
        }
        self.failures = FailureWindow::default();
    }

    fn current_suspension(&self) -> Option<Suspension> {
        self.suspension
            .filter(|(generation, _)| *generation >= self.generation)
            .map(|(_, kind)| kind)
    }
}

impl ListenerEntry {
    pub(crate) fn new(id: ListenerId) -> Self {
        Self {
            id,
            suspended_through: AtomicI64::new(i64::MIN),
            removed: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            state: Mutex::new(ListenerState {
                generation: i64::MIN,
                delivered: 0,
                failed: 0,
                dropped: 0,
                dead_lettered: 0,
                last_delivery_time: None,
                last_error: None,
                last_drop_reason: None,
                dirty: false,
                suspension: None,
                failures: FailureWindow::default(),
                prepared: None,
                forgotten_at: None,
            }),
        }
    }

    /// Whether deliveries of `generation` are suspended. Generations only grow, so a suspension
    /// also covers older ones still in flight.
    pub(crate) fn is_suspended(&self, generation: i64) -> bool {
        generation <= self.suspended_through.load(Ordering::Acquire)
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The listener was forgotten at `at`: whatever it still has waiting, or gets routed to it
    /// after, is dropped.
    pub(crate) fn mark_removed(&self, at: Instant) {
        self.state.lock().forgotten_at.get_or_insert(at);
        self.removed.store(true, Ordering::Release);
    }

    /// Whether the listener was forgotten at least `kept` before `now`.
    pub(crate) fn forgotten_for(&self, now: Instant, kept: Duration) -> bool {
        self.is_removed()
            && self
                .state
                .lock()
                .forgotten_at
                .is_some_and(|at| now.saturating_duration_since(at) >= kept)
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
    }

    /// Takes over what a status recorded before a restart: a suspension of `generation` and
    /// the start of a run of failures. Only a listener the engine has not seen at all yet is
    /// restored; what the engine observed itself is newer.
    pub(crate) fn restore(
        &self,
        generation: i64,
        suspension: Option<Suspension>,
        failing_since: Option<DateTime<Utc>>,
    ) {
        let mut state = self.state.lock();
        if state.generation != i64::MIN {
            return;
        }
        state.generation = generation;
        if let Some(since) = failing_since {
            state.failures.restore(since);
        }
        if let Some(kind) = suspension {
            state.suspension = Some((generation, kind));
            self.suspended_through
                .fetch_max(generation, Ordering::AcqRel);
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ListenerState> {
        self.state.lock()
    }

    pub(crate) fn record_delivered(&self, generation: i64, at: DateTime<Utc>) {
        let mut state = self.state.lock();
        state.observe_generation(generation);
        state.delivered += 1;
        state.last_delivery_time = Some(at);
        if generation == state.generation {
            state.failures.success();
        }
        state.dirty = true;
    }

    /// Counts a final failure; returns the suspension it caused, if any.
    pub(crate) fn record_failed(
        &self,
        generation: i64,
        reason: String,
        at: DateTime<Utc>,
        failing_after: Duration,
        effect: FailureEffect,
    ) -> Option<Suspension> {
        let mut state = self.state.lock();
        state.observe_generation(generation);
        state.failed += 1;
        state.last_error = Some(reason);
        state.dirty = true;
        let current = generation == state.generation;
        let suspension = match effect {
            FailureEffect::Gone => Some(Suspension::EndpointGone),
            FailureEffect::Counted if current && state.failures.failure(at, failing_after) => {
                Some(Suspension::EndpointFailing)
            }
            FailureEffect::Counted | FailureEffect::NotCounted => None,
        }?;
        if self.is_suspended(generation) {
            return None;
        }
        self.suspended_through
            .fetch_max(generation, Ordering::AcqRel);
        if current {
            state.suspension = Some((generation, suspension));
        }
        Some(suspension)
    }

    pub(crate) fn record_dropped(&self, generation: i64, reason: DropReason) {
        let mut state = self.state.lock();
        state.observe_generation(generation);
        state.dropped += 1;
        state.last_drop_reason = Some(reason);
        state.dirty = true;
    }

    /// Counts a dead letter the sink took.
    pub(crate) fn record_dead_lettered(&self, generation: i64) {
        let mut state = self.state.lock();
        state.observe_generation(generation);
        state.dead_lettered += 1;
        state.dirty = true;
    }

    /// The changes since the previous report, or `None` when nothing changed.
    pub(crate) fn take_report(&self) -> Option<ListenerReport> {
        let mut state = self.state.lock();
        if !state.dirty {
            return None;
        }
        state.dirty = false;
        Some(ListenerReport {
            listener: self.id.clone(),
            generation: state.generation,
            delivered: std::mem::take(&mut state.delivered),
            failed: std::mem::take(&mut state.failed),
            dropped: std::mem::take(&mut state.dropped),
            dead_lettered: std::mem::take(&mut state.dead_lettered),
            last_delivery_time: state.last_delivery_time.take(),
            last_error: state.last_error.take(),
            last_drop_reason: state.last_drop_reason.take(),
            suspension: state.current_suspension(),
            failing_since: state.failures.since(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn at(hours: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::hours(hours)
    }

    #[test]
    fn failure_window() {
        /// Deliveries as (hour, succeeded?).
        type History = &'static [(i64, bool)];
        // (case, history, failing after the last delivery?)
        let table: &[(&str, History, bool)] = &[
            ("one failure", &[(0, false)], false),
            (
                "failures for less than a day",
                &[(0, false), (23, false)],
                false,
            ),
            ("failures for a day", &[(0, false), (24, false)], true),
            (
                "failures for longer",
                &[(0, false), (5, false), (30, false)],
                true,
            ),
            (
                "a success restarts the window",
                &[(0, false), (10, true), (25, false), (33, false)],
                false,
            ),
            (
                "a day after the restart",
                &[(0, false), (10, true), (25, false), (49, false)],
                true,
            ),
        ];
        for (name, events, expected) in table {
            let mut window = FailureWindow::default();
            let mut failing = false;
            for (hour, success) in *events {
                if *success {
                    window.success();
                    failing = false;
                } else {
                    failing = window.failure(at(*hour), DAY);
                }
            }
            assert_eq!(failing, *expected, "{name}");
        }
    }

    #[test]
    fn zero_window_suspends_on_the_first_failure() {
        let mut window = FailureWindow::default();
        assert!(window.failure(at(0), Duration::ZERO));
    }

    #[test]
    fn suspension_is_scoped_to_its_generation() {
        let entry = ListenerEntry::new(ListenerId::new("ns", "one"));
        let gone = entry.record_failed(3, "HTTP 410 Gone".into(), at(0), DAY, FailureEffect::Gone);
        assert_eq!(gone, Some(Suspension::EndpointGone));
        assert!(entry.is_suspended(3));
        assert!(entry.is_suspended(2));
        assert!(!entry.is_suspended(4));

        let report = entry.take_report();
        assert_eq!(report.as_ref().map(|r| r.failed), Some(1));
        assert_eq!(
            report.as_ref().and_then(|r| r.suspension),
            Some(Suspension::EndpointGone)
        );
        assert!(entry.take_report().is_none(), "no change, no report");

        // A newer generation lifts the suspension, and that alone is reported.
        entry.lock().observe_generation(4);
        let report = entry.take_report();
        assert_eq!(
            report.as_ref().map(|r| (r.generation, r.failed)),
            Some((4, 0))
        );
        assert_eq!(report.and_then(|r| r.suspension), None);
    }

    #[test]
    fn shutdown_failures_do_not_suspend() {
        let entry = ListenerEntry::new(ListenerId::new("ns", "one"));
        let effect = FailureEffect::NotCounted;
        for hour in [0, 30, 60] {
            let suspension = entry.record_failed(1, "x".into(), at(hour), DAY, effect);
            assert_eq!(suspension, None);
        }
        assert!(!entry.is_suspended(1));
    }

    #[test]
    fn reports_are_deltas() {
        let entry = ListenerEntry::new(ListenerId::new("ns", "one"));
        entry.record_delivered(1, at(1));
        entry.record_delivered(1, at(2));
        entry.record_dropped(1, DropReason::QueueFull);
        let first = entry.take_report();
        assert_eq!(
            first.as_ref().map(|r| (r.delivered, r.failed, r.dropped)),
            Some((2, 0, 1))
        );
        assert_eq!(
            first.as_ref().and_then(|r| r.last_delivery_time),
            Some(at(2))
        );
        assert_eq!(
            first.and_then(|r| r.last_drop_reason),
            Some(DropReason::QueueFull)
        );
        entry.record_failed(
            1,
            "HTTP 500 Internal Server Error".into(),
            at(3),
            DAY,
            FailureEffect::Counted,
        );
        let second = entry.take_report();
        assert_eq!(
            second.as_ref().map(|r| (r.delivered, r.failed, r.dropped)),
            Some((0, 1, 0))
        );
        assert_eq!(second.as_ref().and_then(|r| r.last_delivery_time), None);
        assert_eq!(
            second.and_then(|r| r.last_error).as_deref(),
            Some("HTTP 500 Internal Server Error")
        );
    }

    #[test]
    fn a_restored_suspension_and_failure_window_hold() {
        let entry = ListenerEntry::new(ListenerId::new("ns", "one"));
        entry.restore(3, Some(Suspension::EndpointGone), Some(at(0)));
        assert!(entry.is_suspended(3));
        assert!(!entry.is_suspended(4));
        let report = entry.take_report();
        assert!(report.is_none(), "restoring is not news");
        // The restored window goes on: a failure a day after its start suspends.
        let entry = ListenerEntry::new(ListenerId::new("ns", "two"));
        entry.restore(1, None, Some(at(0)));
        let suspension =
            entry.record_failed(1, "HTTP 500".into(), at(24), DAY, FailureEffect::Counted);
        assert_eq!(suspension, Some(Suspension::EndpointFailing));
        assert_eq!(
            entry.take_report().and_then(|r| r.failing_since),
            Some(at(0))
        );
        // What the engine saw itself is not overwritten by a later restore.
        entry.restore(1, None, None);
        assert!(entry.is_suspended(1));
    }
}
