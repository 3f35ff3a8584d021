//! Prometheus metrics of the delivery engine. Labels name outcomes, reasons and destinations
//! (`scheme://host:port`), never a url path, a query, a token or a secret.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType},
    registry::{Registry, Unit},
};

use super::dead_letter::DeadLetterOutcome;
use super::retry::AttemptLabel;
use super::DropReason;

/// Label of the final outcome of a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Label of an attempt's result.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AttemptLabels {
    result: &'static str,
}

/// Label of a drop's reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// Label of a destination: `scheme://host:port`, without path, query or user information.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct DestinationLabels {
    destination: String,
}

/// The final outcomes a delivery is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered,
    Failed,
    Dropped,
}

/// Every metric of the engine. Label sets are resolved when the engine starts (and once per
/// destination for the queue gauge), so the hot path only touches atomics: no family lookup and
/// no lock.
#[derive(Debug)]
pub(crate) struct DeliveryMetrics {
    delivered: Counter,
    failed: Counter,
    dropped: Counter,
    attempts: Vec<(AttemptLabel, Counter)>,
    retries: Counter,
    drops: Vec<(DropReason, Counter)>,
    attempt_duration: LatencyHistogram,
    queue_depth: Family<DestinationLabels, Gauge>,
    queue_bytes: Gauge,
    dead_letters: Vec<(DeadLetterOutcome, Counter)>,
}

impl DeliveryMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        let outcome = |name| {
            deliveries
                .get_or_create(&OutcomeLabels { outcome: name })
                .clone()
        };
        let (delivered, failed, dropped) =
            (outcome("delivered"), outcome("failed"), outcome("dropped"));
        registry.register(
            "webhook_deliveries",
            "Deliveries by final outcome: delivered, failed or dropped",
            deliveries,
        );

        let attempt_family = Family::<AttemptLabels, Counter>::default();
        let attempts = AttemptLabel::ALL
            .iter()
            .map(|label| {
                let counter = attempt_family
                    .get_or_create(&AttemptLabels {
                        result: label.as_str(),
                    })
                    .clone();
                (*label, counter)
            })
            .collect();
        registry.register(
            "webhook_delivery_attempts",
            "HTTP attempts by result",
            attempt_family,
        );

        let retries = Counter::default();
        registry.register(
            "webhook_delivery_retries",
            "Attempts scheduled again after a transient failure",
            retries.clone(),
        );

        let drop_family = Family::<DropLabels, Counter>::default();
        let drops = DropReason::ALL
            .iter()
            .map(|reason| {
                let counter = drop_family
                    .get_or_create(&DropLabels {
                        reason: reason.as_label(),
                    })
                    .clone();
                (*reason, counter)
            })
            .collect();
        registry.register(
            "webhook_delivery_drops",
            "Deliveries dropped without an attempt, by reason",
            drop_family,
        );

        let attempt_duration = LatencyHistogram::new();
        registry.register_with_unit(
            "webhook_delivery_attempt_duration",
            "Duration of one HTTP attempt, from sending to the end of the response",
            Unit::Seconds,
            attempt_duration.clone(),
        );

        let queue_depth = Family::<DestinationLabels, Gauge>::default();
        registry.register(
            "webhook_delivery_queue_depth",
            "Deliveries held per destination: queued, in flight or waiting to retry",
            queue_depth.clone(),
        );

        let queue_bytes = Gauge::default();
        registry.register_with_unit(
            "webhook_delivery_queue",
            "Bytes held by the deliveries of every queue, counted against the memory budget",
            Unit::Bytes,
            queue_bytes.clone(),
        );

        let dead_letter_family = Family::<OutcomeLabels, Counter>::default();
        let dead_letters = DeadLetterOutcome::ALL
            .iter()
            .map(|outcome| {
                let counter = dead_letter_family
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome.as_label(),
                    })
                    .clone();
                (*outcome, counter)
            })
            .collect();
        registry.register(
            "dead_letters",
            "Dead letters (deliveries that ended without success, sent to their sink) by outcome: delivered, failed or dropped",
            dead_letter_family,
        );

        Self {
            delivered,
            failed,
            dropped,
            attempts,
            retries,
            drops,
            attempt_duration,
            queue_depth,
            queue_bytes,
            dead_letters,
        }
    }

    pub(crate) fn dead_letter(&self, outcome: DeadLetterOutcome) {
        if let Some((_, counter)) = self.dead_letters.iter().find(|(o, _)| *o == outcome) {
            counter.inc();
        }
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        match outcome {
            Outcome::Delivered => self.delivered.inc(),
            Outcome::Failed => self.failed.inc(),
            Outcome::Dropped => self.dropped.inc(),
        };
    }

    pub(crate) fn attempt(&self, label: AttemptLabel, seconds: f64) {
        if let Some((_, counter)) = self.attempts.iter().find(|(l, _)| *l == label) {
            counter.inc();
        }
        self.attempt_duration.observe(seconds);
    }

    pub(crate) fn retry(&self) {
        self.retries.inc();
    }

    pub(crate) fn dropped(&self, reason: DropReason) {
        self.outcome(Outcome::Dropped);
        if let Some((_, counter)) = self.drops.iter().find(|(r, _)| *r == reason) {
            counter.inc();
        }
    }

    /// The gauge of the bytes held by every queue.
    pub(crate) fn queue_bytes(&self) -> Gauge {
        self.queue_bytes.clone()
    }

    /// The queue gauge of a destination, resolved once when the destination is created.
    pub(crate) fn queue_gauge(&self, destination: &str) -> Gauge {
        self.queue_depth
            .get_or_create(&DestinationLabels {
                destination: destination.to_owned(),
            })
            .clone()
    }

    /// Forgets the gauge of a destination that was released, so idle hosts do not pile up.
    pub(crate) fn forget_queue_gauge(&self, destination: &str) {
        self.queue_depth.remove(&DestinationLabels {
            destination: destination.to_owned(),
        });
    }
}

/// Upper bounds of the attempt duration buckets, in seconds.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A histogram of atomics. prometheus-client's `Histogram` takes a write lock per observation,
/// which every destination would contend on.
#[derive(Debug, Clone, Default)]
pub(crate) struct LatencyHistogram {
    inner: std::sync::Arc<HistogramCells>,
}

#[derive(Debug, Default)]
struct HistogramCells {
    /// Per bucket (not cumulative), the last one for values above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    /// The sum in nanoseconds, so it is an integer add.
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn observe(&self, seconds: f64) {
        let index = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        let cells = &self.inner;
        if let Some(bucket) = cells.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        cells.count.fetch_add(1, Ordering::Relaxed);
        // Saturating float-to-int conversion: a negative or huge value cannot wrap.
        cells
            .sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let cells = &self.inner;
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(cells.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = cells.count.load(Ordering::Relaxed);
        let sum = cells.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn histogram_encodes_cumulative_buckets() {
        let mut registry = Registry::default();
        let histogram = LatencyHistogram::new();
        registry.register_with_unit("latency", "test", Unit::Seconds, histogram.clone());
        histogram.observe(0.0004);
        histogram.observe(0.003);
        histogram.observe(100.0);
        let mut text = String::new();
        assert!(encode(&mut text, &registry).is_ok());
        assert!(text.contains("latency_seconds_count 3"), "{text}");
        assert!(
            text.contains("latency_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("latency_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("latency_seconds_bucket{le=\"60.0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("latency_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(text.contains("latency_seconds_sum 100.0034"), "{text}");
    }
}
