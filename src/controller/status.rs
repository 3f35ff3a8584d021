//! Writes delivery outcomes and daily usage to status in batches: every few seconds, one patch
//! per Listener or WebhookUser that changed, never one API call per delivery. Failures are also
//! raised as Kubernetes Events, at most one per Listener per minute.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::Resource;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{is_not_found, Context};
use crate::delivery::{ListenerId, ListenerReport};
use crate::resources::{Listener, WebhookUser};

/// Field manager of the delivery counters: the reconcilers own the rest of the status.
const DELIVERY_MANAGER: &str = "crownstone-webhooks-delivery";
/// Field manager of `status.usage`.
const USAGE_MANAGER: &str = "crownstone-webhooks-usage";
/// At most one failure Event per Listener this often.
const EVENT_EVERY: Duration = Duration::from_secs(60);

/// A Listener's counters since it was created.
#[derive(Clone, Debug, Default)]
struct Totals {
    delivered: u64,
    failed: u64,
    last_delivery_time: Option<DateTime<Utc>>,
    last_error: Option<String>,
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
    totals: HashMap<ListenerId, Totals>,
    failures: HashMap<ListenerId, PendingFailures>,
    triggers: mpsc::UnboundedSender<ObjectRef<Listener>>,
}

impl StatusWriter {
    /// `triggers` asks the Listener controller to reconcile a Listener whose receiver was given up on.
    pub fn new(ctx: Arc<Context>, triggers: mpsc::UnboundedSender<ObjectRef<Listener>>) -> Self {
        StatusWriter {
            ctx,
            totals: HashMap::new(),
            failures: HashMap::new(),
            triggers,
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

    /// Writes what changed since the last flush.
    pub async fn flush(&mut self) {
        for report in self.ctx.engine.take_reports() {
            self.write_listener(report).await;
        }
        for (owner, usage) in self.ctx.index.take_usage_changes() {
            let api: Api<WebhookUser> = Api::namespaced(self.ctx.client.clone(), &owner.namespace);
            let patch = json!({
                "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
                "kind": "WebhookUser",
                "status": {"usage": usage},
            });
            self.ctx.metrics.status_writes.inc();
            if let Err(error) = api
                .patch_status(
                    &owner.name,
                    &PatchParams::apply(USAGE_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                if !is_not_found(&error) {
                    tracing::warn!(user = %owner.name, %error, "could not write usage");
                }
            }
        }
    }

    async fn write_listener(&mut self, report: ListenerReport) {
        let Some((namespace, name)) = report.listener.as_str().split_once('/') else {
            return;
        };
        let reference = ObjectRef::<Listener>::new(name).within(namespace);
        let cached = self.ctx.listeners.get(&reference);
        // The Listener controller reads the suspension from the engine and reports it.
        if report.suspension.is_some() {
            let _ = self.triggers.send(reference.clone());
        }
        let totals = self
            .totals
            .entry(report.listener.clone())
            .or_insert_with(|| {
                // After a restart the counters go on from what the status says.
                let status = cached
                    .as_ref()
                    .and_then(|l| l.status.clone())
                    .unwrap_or_default();
                Totals {
                    delivered: status.delivered,
                    failed: status.failed,
                    last_delivery_time: status.last_delivery_time,
                    last_error: status.last_error,
                }
            });
        let failed_now = report.failed + report.dropped;
        totals.delivered += report.delivered;
        totals.failed += failed_now;
        if report.last_delivery_time.is_some() {
            totals.last_delivery_time = report.last_delivery_time;
        }
        if report.last_error.is_some() {
            totals.last_error = report.last_error.clone();
        }
        let patch = json!({
            "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
            "kind": "Listener",
            "status": {
                "delivered": totals.delivered,
                "failed": totals.failed,
                "lastDeliveryTime": totals.last_delivery_time,
                "lastError": totals.last_error,
            }
        });
        let api: Api<Listener> = Api::namespaced(self.ctx.client.clone(), namespace);
        self.ctx.metrics.status_writes.inc();
        match api
            .patch_status(
                name,
                &PatchParams::apply(DELIVERY_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {}
            Err(error) if is_not_found(&error) => {
                self.totals.remove(&report.listener);
                self.failures.remove(&report.listener);
                return;
            }
            Err(error) => {
                tracing::warn!(listener = %report.listener, %error, "could not write delivery status")
            }
        }

        if failed_now > 0 {
            let pending = self.failures.entry(report.listener.clone()).or_default();
            pending.count += failed_now;
            if let Some(error) = &report.last_error {
                pending.last_error.clone_from(error);
            }
        }
        self.raise_failure_event(&report.listener, cached.as_deref())
            .await;
    }

    async fn raise_failure_event(&mut self, id: &ListenerId, listener: Option<&Listener>) {
        let (Some(pending), Some(listener)) = (self.failures.get_mut(id), listener) else {
            return;
        };
        let due = pending
            .last_event
            .is_none_or(|at| at.elapsed() >= EVENT_EVERY);
        if pending.count == 0 || !due {
            return;
        }
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
            tracing::warn!(listener = %id, %error, "could not record a DeliveryFailed event");
            return;
        }
        pending.count = 0;
        pending.last_event = Some(Instant::now());
    }
}
