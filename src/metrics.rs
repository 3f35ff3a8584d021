//! Prometheus metrics of the forwarders and controllers. No label ever holds a token, a secret
//! or a url: tokens are counted, not named.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::domain::Skip;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
    pub error: &'static str,
}

/// Metrics of the event streams.
#[derive(Clone, Default)]
pub struct ForwarderMetrics {
    pub streams: Gauge,
    pub reconnects: Counter,
    pub events: Counter,
    pub malformed_frames: Counter,
    pub skipped: Family<ReasonLabel, Counter>,
    /// Events a standby holds for a takeover, over every token.
    pub buffered_events: Gauge,
    /// The bytes of those events.
    pub buffered_bytes: Gauge,
    /// Events dropped from a standby's buffers before the leader settled them, by bound:
    /// `age`, `bytes` (the token's share), `total_bytes` (every token's). A crash of the leader
    /// could lose these.
    pub buffer_drops: Family<ReasonLabel, Counter>,
    /// Progress records a standby matched against the events it read.
    pub alignments: Counter,
    /// Progress records waiting for events this replica has not read yet.
    pub pending_records: Gauge,
    /// Buffered events delivered when this replica took the lead.
    pub takeover_events: Counter,
    /// Gaps in a leading stream: it reconnected and may have missed events.
    pub gaps_opened: Counter,
    /// Gaps a standby filled with the events it read there.
    pub gaps_filled: Counter,
    /// Events delivered from standbys' fills.
    pub events_filled: Counter,
    /// Gaps no fill came for in time: events published in them may be lost.
    pub gaps_timed_out: Counter,
}

impl ForwarderMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ForwarderMetrics::default();
        let registry = registry.sub_registry_with_prefix("forwarder");
        registry.register(
            "streams",
            "Open event streams, one per token",
            metrics.streams.clone(),
        );
        registry.register(
            "reconnects",
            "Stream reconnects",
            metrics.reconnects.clone(),
        );
        registry.register(
            "events",
            "Data events received on the streams",
            metrics.events.clone(),
        );
        registry.register(
            "malformed_frames",
            "Frames that could not be parsed",
            metrics.malformed_frames.clone(),
        );
        registry.register(
            "skipped",
            "Listeners an event was not routed to, by reason",
            metrics.skipped.clone(),
        );
        registry.register(
            "buffered_events",
            "Events a standby holds for a takeover",
            metrics.buffered_events.clone(),
        );
        registry.register(
            "buffered_bytes",
            "Bytes of the events a standby holds for a takeover",
            metrics.buffered_bytes.clone(),
        );
        registry.register(
            "buffer_drops",
            "Events dropped from a standby's buffers before the leader settled them, by bound",
            metrics.buffer_drops.clone(),
        );
        registry.register(
            "alignments",
            "Progress records matched against the events this replica read",
            metrics.alignments.clone(),
        );
        registry.register(
            "pending_records",
            "Progress records waiting for events this replica has not read yet",
            metrics.pending_records.clone(),
        );
        registry.register(
            "takeover_events",
            "Buffered events delivered on taking the lead",
            metrics.takeover_events.clone(),
        );
        registry.register(
            "gaps_opened",
            "Reconnects of a leading stream, each a gap a standby may fill",
            metrics.gaps_opened.clone(),
        );
        registry.register(
            "gaps_filled",
            "Gaps filled with the events a standby read in them",
            metrics.gaps_filled.clone(),
        );
        registry.register(
            "events_filled",
            "Events delivered from standbys' fills of gaps",
            metrics.events_filled.clone(),
        );
        registry.register(
            "gaps_timed_out",
            "Gaps no standby filled in time",
            metrics.gaps_timed_out.clone(),
        );
        metrics
    }

    /// Counts an event dropped from a standby's buffer at one of its bounds.
    pub fn buffer_dropped(&self, reason: &'static str) {
        self.buffer_drops
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn skipped(&self, skip: Skip) {
        self.skipped
            .get_or_create(&ReasonLabel {
                reason: skip.as_label(),
            })
            .inc();
    }
}

/// Metrics of the reconcilers.
#[derive(Clone, Default)]
pub struct ControllerMetrics {
    pub reconciliations: Family<ControllerLabel, Counter>,
    pub failures: Family<ControllerLabel, Counter>,
    pub status_writes: Counter,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ControllerMetrics::default();
        let registry = registry.sub_registry_with_prefix("controller");
        registry.register(
            "reconciliations",
            "Reconciliations by controller",
            metrics.reconciliations.clone(),
        );
        registry.register(
            "failures",
            "Failed reconciliations by controller and error kind",
            metrics.failures.clone(),
        );
        registry.register(
            "status_writes",
            "Status patches of delivery counters and usage",
            metrics.status_writes.clone(),
        );
        metrics
    }
}
