//! Wires the operator together: routing index, delivery engine, forwarders, both controllers,
//! the status writer and the health server; and takes them down in order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use dashmap::DashMap;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher;
use kube::{Client, CustomResourceExt};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::OperatorArgs;
use crate::controller::{
    run_listener_controller, run_webhook_user_controller, Context, StatusWriter,
};
use crate::delivery::{DeliveryEngine, DeliveryError};
use crate::forwarder::{ForwarderRegistry, StreamSettings};
use crate::index::RoutingIndex;
use crate::metrics::{ControllerMetrics, ForwarderMetrics};
use crate::resources::{Listener, WebhookUser};

/// Why the operator could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("could not reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("CRD {0} is not installed or not established; apply crds/ first")]
    CrdMissing(String),
    #[error("could not set up the delivery engine: {0}")]
    Delivery(#[from] DeliveryError),
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Readiness: both caches synced and no watch currently failing.
#[derive(Default)]
struct Health {
    users_synced: AtomicBool,
    listeners_synced: AtomicBool,
    users_watch_ok: AtomicBool,
    listeners_watch_ok: AtomicBool,
}

impl Health {
    fn ready(&self) -> bool {
        [
            &self.users_synced,
            &self.listeners_synced,
            &self.users_watch_ok,
            &self.listeners_watch_ok,
        ]
        .iter()
        .all(|flag| flag.load(Ordering::Relaxed))
    }
}

#[derive(Clone)]
struct HealthState {
    health: Arc<Health>,
    registry: Arc<Mutex<Registry>>,
}

/// A running operator.
pub struct RunningOperator {
    health_addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningOperator {
    /// Where /healthz, /readyz and /metrics are served.
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr
    }

    /// Stops taking events, lets queued deliveries finish within the grace period, writes the
    /// last counters to status, then returns.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Waits until the CRDs are established, so the controllers never start on missing kinds.
async fn wait_for_crds(client: &Client) -> Result<(), OperatorError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [Listener::crd_name(), WebhookUser::crd_name()] {
        let established = await_condition(crds.clone(), name, conditions::is_crd_established());
        match tokio::time::timeout(Duration::from_secs(30), established).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, crd = name, "waiting for CRD failed");
                return Err(OperatorError::CrdMissing(name.to_owned()));
            }
            Err(_) => return Err(OperatorError::CrdMissing(name.to_owned())),
        }
    }
    Ok(())
}

fn api_in<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Starts the controllers, forwarders, delivery engine and health server.
pub async fn start(
    client: Client,
    args: OperatorArgs,
    clock: SharedClock,
) -> Result<RunningOperator, OperatorError> {
    wait_for_crds(&client).await?;
    let mut registry = Registry::with_prefix("crownstone_webhooks");
    let engine = DeliveryEngine::new(args.delivery.clone().into(), &mut registry)?;
    let forwarder_metrics = ForwarderMetrics::register(&mut registry);
    let controller_metrics = ControllerMetrics::register(&mut registry);

    let index = Arc::new(RoutingIndex::new(clock.clone()));
    let (forwarders, notices) = ForwarderRegistry::new(
        index.clone(),
        engine.clone(),
        StreamSettings {
            events_url: args.events_url.clone(),
            silence_timeout: args.silence_timeout,
            reconnect_initial: args.reconnect_initial,
            reconnect_max: args.reconnect_max,
            project_name: "crownstone-webhooks".into(),
        },
        forwarder_metrics,
    );

    let namespace = args.watch_namespace.as_deref();
    let users_controller = Controller::new(
        api_in::<WebhookUser>(&client, namespace),
        watcher::Config::default(),
    );
    let listeners_controller = Controller::new(
        api_in::<Listener>(&client, namespace),
        watcher::Config::default(),
    );
    let reporter = Reporter {
        controller: "crownstone-webhooks".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        index,
        forwarders: forwarders.clone(),
        engine: engine.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        clock,
        metrics: controller_metrics,
        default_daily_allowance: args.daily_allowance,
        suspensions: DashMap::new(),
        listeners: listeners_controller.store(),
        users: users_controller.store(),
    });

    let health = Arc::new(Health::default());
    let registry = Arc::new(Mutex::new(registry));
    let listener = tokio::net::TcpListener::bind(args.health_listen)
        .await
        .map_err(|source| OperatorError::Listen {
            addr: args.health_listen,
            source,
        })?;
    let health_addr = listener
        .local_addr()
        .map_err(|source| OperatorError::Listen {
            addr: args.health_listen,
            source,
        })?;

    let stop = CancellationToken::new();
    let controllers_stop = CancellationToken::new();
    let (triggers, trigger_stream) = mpsc::unbounded_channel();

    let mut tasks = Vec::new();
    {
        let health = health.clone();
        let flag = move |ok: bool| health.users_watch_ok.store(ok, Ordering::Relaxed);
        flag(true);
        tasks.push(tokio::spawn(run_webhook_user_controller(
            users_controller,
            api_in::<Listener>(&client, namespace),
            ctx.clone(),
            controllers_stop.clone().cancelled_owned(),
            flag,
        )));
    }
    {
        let health = health.clone();
        let flag = move |ok: bool| health.listeners_watch_ok.store(ok, Ordering::Relaxed);
        flag(true);
        tasks.push(tokio::spawn(run_listener_controller(
            listeners_controller,
            api_in::<PartialObjectMeta<Secret>>(&client, namespace),
            api_in::<WebhookUser>(&client, namespace),
            ctx.clone(),
            notices,
            trigger_stream,
            controllers_stop.clone().cancelled_owned(),
            flag,
        )));
    }
    mark_when_synced(ctx.users.clone(), health.clone(), |h| &h.users_synced);
    mark_when_synced(ctx.listeners.clone(), health.clone(), |h| {
        &h.listeners_synced
    });

    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HealthState { health, registry });
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(server_stop.cancelled_owned())
            .await;
    });

    let writer_stop = CancellationToken::new();
    let mut writer = StatusWriter::new(ctx.clone(), triggers);
    let writer_task = {
        let writer_stop = writer_stop.clone();
        let interval = args.status_interval;
        tokio::spawn(async move {
            writer.run(interval, writer_stop).await;
            writer
        })
    };

    let grace = args.shutdown_grace;
    let task_stop = stop.clone();
    let task = tokio::spawn(async move {
        task_stop.cancelled().await;
        tracing::info!("shutting down: closing streams and draining deliveries");
        forwarders.shutdown();
        engine.shutdown(grace).await;
        writer_stop.cancel();
        if let Ok(mut writer) = writer_task.await {
            writer.flush().await;
        }
        controllers_stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        let _ = server.await;
        tracing::info!("stopped");
    });
    tracing::info!(%health_addr, events_url = %args.events_url, "operator started");
    Ok(RunningOperator {
        health_addr,
        stop,
        task,
    })
}

fn mark_when_synced<K>(store: Store<K>, health: Arc<Health>, flag: fn(&Health) -> &AtomicBool)
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    tokio::spawn(async move {
        if store.wait_until_ready().await.is_ok() {
            flag(&health).store(true, Ordering::Relaxed);
        }
    });
}

async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    if state.health.ready() {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: caches not synced or a watch is failing",
        )
    }
}

async fn metrics(State(state): State<HealthState>) -> impl IntoResponse {
    let mut body = String::new();
    let registry = state.registry.lock();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "could not encode metrics".to_owned(),
        ),
    }
}
