//! Readiness of the operator: caches synced, and no watch failing now.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long after a watch error the watch counts as failing, unless it delivers again first.
/// A watch that keeps failing errs at least this often: the watcher's backoff is capped at 30 s.
pub const WATCH_ERROR_WINDOW: Duration = Duration::from_secs(35);

/// The state of one watch, as its event stream shows it. A watch that recovered after an error
/// emits nothing until an object changes, so recovery is also assumed once errors stop.
pub struct WatchHealth {
    start: Instant,
    synced: AtomicBool,
    /// Milliseconds after `start` of the last error not followed by an event; 0 for none.
    last_error_ms: AtomicU64,
}

impl Default for WatchHealth {
    fn default() -> Self {
        WatchHealth {
            start: Instant::now(),
            synced: AtomicBool::new(false),
            last_error_ms: AtomicU64::new(0),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
