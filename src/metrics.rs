//! Prometheus metrics of the forwarders and controllers. No label ever holds a token, a secret
//! or a url: tokens are counted, not named.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::controller::ErrorKind;
use crate::domain::Skip;

/// The bounds a standby's buffer drops events at, as `buffer_drops_total`'s `reason`: its age,
/// the token's share of bytes, every token's bytes.
pub const BUFFER_DROP_REASONS: [&str; 3] = ["age", "bytes", "total_bytes"];

/// The controllers, as the `controller` label.
pub const CONTROLLERS: [&str; 2] = ["listener", "webhookuser"];

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
    /// Creates the metrics, every closed label set at zero, and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ForwarderMetrics::default();
        for skip in Skip::ALL {
            let _ = metrics.skipped.get_or_create(&ReasonLabel {
                reason: skip.as_label(),
            });
        }
        for reason in BUFFER_DROP_REASONS {
            let _ = metrics.buffer_drops.get_or_create(&ReasonLabel { reason });
        }
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
    /// Creates the metrics, every controller and error kind at zero, and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ControllerMetrics::default();
        for controller in CONTROLLERS {
            let _ = metrics.reconciliations.get_or_create(&ControllerLabel {
                controller,
                error: "",
            });
            for kind in ErrorKind::ALL {
                let _ = metrics.failures.get_or_create(&ControllerLabel {
                    controller,
                    error: kind.as_label(),
                });
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_label_sets_are_visible_before_their_first_sample() {
        let mut registry = Registry::with_prefix("crownstone_webhooks");
        ForwarderMetrics::register(&mut registry);
        ControllerMetrics::register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut expected = vec![
            r#"crownstone_webhooks_forwarder_skipped_total{reason="allowance_used"} 0"#.to_owned(),
            r#"crownstone_webhooks_forwarder_skipped_total{reason="owner_without_credentials"} 0"#
                .to_owned(),
        ];
        for reason in BUFFER_DROP_REASONS {
            expected.push(format!(
                r#"crownstone_webhooks_forwarder_buffer_drops_total{{reason="{reason}"}} 0"#
            ));
        }
        for controller in CONTROLLERS {
            expected.push(format!(
                r#"crownstone_webhooks_controller_reconciliations_total{{controller="{controller}",error=""}} 0"#
            ));
            for error in ["conflict", "transient", "permanent"] {
                expected.push(format!(
                    r#"crownstone_webhooks_controller_failures_total{{controller="{controller}",error="{error}"}} 0"#
                ));
            }
        }
        for line in expected {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
