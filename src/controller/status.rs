//! Writes delivery outcomes and daily usage to status in batches: every few seconds, one patch
//! per Listener or WebhookUser that changed, never one API call per delivery. Failures are also
//! raised as Kubernetes Events, at most one per Listener per minute.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::Resource;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{apply_status, cap_message, describe_kube_error, is_not_found, Context};
use crate::clock::format_day;
use crate::delivery::ListenerReport;
use crate::domain::ListenerId;
use crate::resources::{FailureWindow, Listener, Usage, WebhookUser};

/// Field manager of the delivery counters: the reconcilers own the rest of the status.
const DELIVERY_MANAGER: &str = "crownstone-webhooks-delivery";
/// Field manager of `status.usage`.
const USAGE_MANAGER: &str = "crownstone-webhooks-usage";
/// At most one failure Event per Listener this often.
const EVENT_EVERY: Duration = Duration::from_secs(60);

/// A Listener's counters since it was created: the part of its status this writer owns.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryStatus {
    delivered: u64,
    failed: u64,
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

/// Failures not yet reported as an Event.
#[derive(Default)]
struct PendingFailures {
    count: u64,
    last_error: String,
    last_event: Option<Instant>,
}

/// Batches delivery outcomes and usage into status patches.
pub struct StatusWriter {
    ctx: Arc<Context>,
    totals: HashMap<ListenerId, DeliveryStatus>,
    failures: HashMap<ListenerId, PendingFailures>,
}

impl StatusWriter {
    pub fn new(ctx: Arc<Context>) -> Self {
        StatusWriter {
            ctx,
            totals: HashMap::new(),
            failures: HashMap::new(),
        }
    }

    /// Flushes every `interval` until `stop` is cancelled; the caller flushes once more after
    /// the delivery engine has drained.
    pub async fn run(&mut self, interval: Duration, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => self.flush().await,
            }
        }
    }

    /// Writes what changed since the last flush, and the failure Events whose rate-limit window
    /// has ended.
    pub async fn flush(&mut self) {
        for report in self.ctx.engine.take_reports() {
            self.write_listener(report).await;
        }
        self.prune();
        self.publish_due_failures().await;
        for (owner, usage) in self.ctx.index.take_usage_changes() {
            let api: Api<WebhookUser> = Api::namespaced(self.ctx.client.clone(), owner.namespace());
            let status = UsageStatus {
                usage: Usage {
                    day: format_day(usage.day),
                    deliveries: usage.deliveries,
                },
            };
            self.ctx.metrics.status_writes.inc();
            if let Err(error) = apply_status(&api, owner.name(), USAGE_MANAGER, &status).await {
                if !is_not_found(&error) {
                    tracing::warn!(user = %owner, error = %describe_kube_error(&error), "Could not write the user's usage.");
                }
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
        self.totals.retain(|id, _| exists(id));
        self.failures.retain(|id, _| exists(id));
    }

    async fn write_listener(&mut self, report: ListenerReport) {
        let id = report.listener.clone();
        let reference = ObjectRef::<Listener>::new(id.name()).within(id.namespace());
        let cached = self.ctx.listeners.get(&reference);
        // The Listener controller reads the suspension from the engine and reports it.
        if report.suspension.is_some() {
            self.ctx.wake_listener(&id);
        }
        let totals = self.totals.entry(id.clone()).or_insert_with(|| {
            // After a restart the counters go on from what the status says.
            let status = cached
                .as_ref()
                .and_then(|l| l.status.clone())
                .unwrap_or_default();
            DeliveryStatus {
                delivered: status.delivered,
                failed: status.failed,
                last_delivery_time: status.last_delivery_time,
                last_error: status.last_error,
                failure_window: status.failure_window,
            }
        });
        let failed_now = report.failed + report.dropped;
        totals.delivered += report.delivered;
        totals.failed += failed_now;
        if report.last_delivery_time.is_some() {
            totals.last_delivery_time = report.last_delivery_time;
        }
        let last_error = report
            .last_error
            .as_deref()
            .map(cap_message)
            .or_else(|| report.last_drop_reason.map(|r| r.describe().to_owned()));
        if last_error.is_some() {
            totals.last_error.clone_from(&last_error);
        }
        totals.failure_window = report.failing_since.map(|since| FailureWindow {
            since,
            generation: report.generation,
        });
        let api: Api<Listener> = Api::namespaced(self.ctx.client.clone(), id.namespace());
        self.ctx.metrics.status_writes.inc();
        match apply_status(&api, id.name(), DELIVERY_MANAGER, &*totals).await {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {
                self.totals.remove(&id);
                self.failures.remove(&id);
                return;
            }
            Err(error) => {
                tracing::warn!(listener = %id, error = %describe_kube_error(&error), "Could not write the Listener's delivery status.")
            }
        }

        if failed_now > 0 {
            let pending = self.failures.entry(id).or_default();
            pending.count += failed_now;
            if let Some(error) = last_error {
                pending.last_error = error;
            }
        }
    }

    /// Raises one `DeliveryFailed` Event per Listener with failures not yet reported, once its
    /// last Event is at least [`EVENT_EVERY`] old: failures inside the window wait, not vanish.
    async fn publish_due_failures(&mut self) {
        let due: Vec<ListenerId> = self
            .failures
            .iter()
            .filter(|(_, pending)| {
                pending.count > 0
                    && pending
                        .last_event
                        .is_none_or(|at| at.elapsed() >= EVENT_EVERY)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let reference = ObjectRef::<Listener>::new(id.name()).within(id.namespace());
            let Some(listener) = self.ctx.listeners.get(&reference) else {
                continue;
            };
            let Some(pending) = self.failures.get_mut(&id) else {
                continue;
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
                continue;
            }
            pending.count = 0;
            pending.last_event = Some(Instant::now());
        }
    }
}
