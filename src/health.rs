//! Readiness of the operator: caches synced, no watch failing now, and for a warm standby its
//! streams open; and the role it reports.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::leader::{Role, StandbyMode};

/// How long after a watch error the watch counts as failing, unless it delivers again first.
/// A watch that keeps failing errs at least this often: the watcher's backoff is capped at 30 s.
pub const WATCH_ERROR_WINDOW: Duration = Duration::from_secs(35);

/// How long a watch may fail without a break before the process counts as unhealthy and is
/// better restarted.
pub const WATCH_LIVENESS_WINDOW: Duration = Duration::from_secs(300);

/// The state of one watch, as its event stream shows it. A watch that recovered after an error
/// emits nothing until an object changes, so recovery is also assumed once errors stop.
pub struct WatchHealth {
    start: Instant,
    synced: AtomicBool,
    /// Milliseconds after `start` of the last error not followed by an event; 0 for none.
    last_error_ms: AtomicU64,
    /// Milliseconds after `start` of the first error of the current run of errors; 0 for none.
    failing_since_ms: AtomicU64,
}

impl Default for WatchHealth {
    fn default() -> Self {
        WatchHealth {
            start: Instant::now(),
            synced: AtomicBool::new(false),
            last_error_ms: AtomicU64::new(0),
            failing_since_ms: AtomicU64::new(0),
        }
    }
}

impl WatchHealth {
    /// Records one item of the watch stream.
    pub fn record(&self, ok: bool) {
        let value = if ok {
            0
        } else {
            (self.start.elapsed().as_millis() as u64).max(1)
        };
        self.last_error_ms.store(value, Ordering::Relaxed);
        if ok {
            self.failing_since_ms.store(0, Ordering::Relaxed);
        } else {
            let _ = self.failing_since_ms.compare_exchange(
                0,
                value,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Alive unless the watch has been failing, with no success in between, for longer than
    /// [`WATCH_LIVENESS_WINDOW`]; a watch whose errors stopped for a while counts as recovered.
    pub fn is_alive(&self) -> bool {
        self.alive_at(self.start.elapsed())
    }

    fn alive_at(&self, now: Duration) -> bool {
        let since = self.failing_since_ms.load(Ordering::Relaxed);
        let last = self.last_error_ms.load(Ordering::Relaxed);
        since == 0
            || now.saturating_sub(Duration::from_millis(last)) > WATCH_ERROR_WINDOW
            || now.saturating_sub(Duration::from_millis(since)) <= WATCH_LIVENESS_WINDOW
    }

    /// The cache has seen its first full list.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy_at(self.start.elapsed())
    }

    fn healthy_at(&self, now: Duration) -> bool {
        let last_error = self.last_error_ms.load(Ordering::Relaxed);
        self.synced.load(Ordering::Relaxed)
            && (last_error == 0
                || now.saturating_sub(Duration::from_millis(last_error)) > WATCH_ERROR_WINDOW)
    }
}

/// What a replica is, as `/readyz` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaRole {
    Leading,
    /// Runs everything but writes and delivers nothing, ready to take over without a gap.
    StandbyWarm,
    /// Runs nothing until it leads.
    StandbyCold,
}

impl ReplicaRole {
    /// The role of a replica with `role`, standing by as `mode` says.
    pub fn of(role: Role, mode: StandbyMode) -> Self {
        match (role, mode) {
            (Role::Leading, _) => ReplicaRole::Leading,
            (Role::Standby, StandbyMode::Warm) => ReplicaRole::StandbyWarm,
            (Role::Standby, StandbyMode::Cold) => ReplicaRole::StandbyCold,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ReplicaRole::Leading => "leading",
            ReplicaRole::StandbyWarm => "standby (warm)",
            ReplicaRole::StandbyCold => "standby (cold)",
        }
    }
}

/// Whether a replica is ready, `Err` saying what it waits for. A leader needs its caches; a
/// warm standby its caches, its streams and every progress record the leader has published,
/// so that a rollout stops the old leader only once the new pod reads every stream and knows
/// where the leader is on each; a cold standby has nothing to wait for.
pub fn readiness(
    role: ReplicaRole,
    watches_healthy: bool,
    streams_open: bool,
    caught_up: bool,
) -> Result<(), &'static str> {
    match role {
        ReplicaRole::StandbyCold => Ok(()),
        _ if !watches_healthy => Err("caches not synced or a watch is failing"),
        ReplicaRole::StandbyWarm if !streams_open => Err("streams not open yet"),
        ReplicaRole::StandbyWarm if !caught_up => {
            Err("not caught up with the leader's progress yet")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_what_the_role_needs() {
        use ReplicaRole::*;
        // (role, watches healthy, streams open, caught up, ready)
        let table = [
            (Leading, true, false, false, true),
            (Leading, false, true, true, false),
            (StandbyWarm, true, true, true, true),
            (StandbyWarm, true, false, true, false),
            (StandbyWarm, true, true, false, false),
            (StandbyWarm, false, true, true, false),
            (StandbyCold, false, false, false, true),
        ];
        for (role, watches, streams, caught_up, ready) in table {
            assert_eq!(
                readiness(role, watches, streams, caught_up).is_ok(),
                ready,
                "{role:?} watches {watches} streams {streams} caught up {caught_up}"
            );
        }
        assert_eq!(
            ReplicaRole::of(Role::Standby, StandbyMode::Warm).describe(),
            "standby (warm)"
        );
        assert_eq!(
            ReplicaRole::of(Role::Leading, StandbyMode::Cold),
            ReplicaRole::Leading
        );
    }

    #[test]
    fn a_watch_is_healthy_once_synced_and_while_it_does_not_fail() {
        let health = WatchHealth::default();
        assert!(!health.is_healthy(), "not before the first list");
        health.mark_synced();
        assert!(health.is_healthy());
        health.record(false);
        assert!(!health.is_healthy());
        health.record(true);
        assert!(
            health.is_healthy(),
            "an event after the error means it recovered"
        );
        health.record(false);
        let error_at = Duration::from_millis(health.last_error_ms.load(Ordering::Relaxed));
        assert!(!health.healthy_at(error_at + WATCH_ERROR_WINDOW / 2));
        assert!(health.healthy_at(error_at + WATCH_ERROR_WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn a_watch_failing_without_a_break_for_too_long_is_not_alive() {
        let health = WatchHealth::default();
        assert!(health.is_alive(), "alive before the first list");
        health.record(false);
        let first = Duration::from_millis(health.failing_since_ms.load(Ordering::Relaxed));
        assert!(health.alive_at(first + WATCH_ERROR_WINDOW));
        // Errors keep coming (the last one just now) for longer than the window.
        let later = first + WATCH_LIVENESS_WINDOW + Duration::from_secs(1);
        health
            .last_error_ms
            .store(later.as_millis() as u64, Ordering::Relaxed);
        assert!(!health.alive_at(later));
        // One good event and it is alive again.
        health.record(true);
        assert!(health.is_alive());
    }
}
