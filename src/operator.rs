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
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{predicates, watcher, Predicate, PredicateConfig, WatchStreamExt};
use kube::{Client, CustomResourceExt};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::OperatorArgs;
use crate::controller::{
    run_listener_controller, run_secret_watch, run_webhook_user_controller, scoped_apis,
    scoped_watch, Context, SecretCache, SecretRefs, StatusPacing, StatusWriter, TriggerStreams,
    Triggers,
};
use crate::delivery::{DeliveryConfig, DeliveryEngine, DeliveryError};
use crate::domain::ListenerId;
use crate::forwarder::{ForwarderRegistry, StreamSettings, TokenNotice};
use crate::health::WatchHealth;
use crate::index::RoutingIndex;
use crate::leader::{self, LeaderError, LeadershipEnd, LeaseLock};
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
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The health of the operator's three watches, and whether it only stands by.
#[derive(Default)]
struct Health {
    users: WatchHealth,
    listeners: WatchHealth,
    secrets: Arc<WatchHealth>,
    /// Waiting for the lease: nothing to watch yet, and ready for a rollout to go on.
    standby: AtomicBool,
}

impl Health {
    fn watches(&self) -> [&WatchHealth; 3] {
        [&self.users, &self.listeners, &self.secrets]
    }

    /// Ready: standing by, or every watch synced and none failing now.
    fn ready(&self) -> bool {
        self.standby.load(Ordering::Relaxed) || self.watches().iter().all(|w| w.is_healthy())
    }

    /// Alive: no watch has failed without a break for so long that a restart is the better cure.
    fn alive(&self) -> bool {
        self.watches().iter().all(|w| w.is_alive())
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
    registry: Arc<Mutex<Registry>>,
    forwarders: ForwarderRegistry,
    stop: CancellationToken,
    /// Cancelled when this replica lost its lease and stopped leading.
    lost: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningOperator {
    /// Where /healthz, /readyz and /metrics are served.
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr
    }

    /// The registry served on /metrics at [`Self::health_addr`]: the REST facade of the same
    /// process registers its metrics here, so one port serves them all.
    pub fn metrics_registry(&self) -> Arc<Mutex<Registry>> {
        self.registry.clone()
    }

    /// The forwarders: which tokens stream, and in what state. The REST facade trusts a token
    /// that a forwarder streams instead of opening a second stream to check it.
    pub fn forwarders(&self) -> &ForwarderRegistry {
        &self.forwarders
    }

    /// Resolves when this replica lost its lease: it no longer streams or delivers, and the
    /// process should exit so that it comes back as a standby.
    pub async fn lost_leadership(&self) {
        self.lost.cancelled().await
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

/// Reconciles in flight per controller. Most reconciles answer from caches in microseconds;
/// the rest wait on the API server, and each one in flight holds a connection to it: 10,000 at
/// once (an operator starting over 10,000 Listeners) would open thousands of TLS connections,
/// costing memory on both sides for no more throughput than a few dozen.
const RECONCILE_CONCURRENCY: u16 = 32;

/// Starts the controllers, forwarders, delivery engine and health server.
pub async fn start(
    client: Client,
    args: OperatorArgs,
    clock: SharedClock,
) -> Result<RunningOperator, OperatorError> {
    wait_for_crds(&client).await?;
    let mut registry = Registry::with_prefix("crownstone_webhooks");
    let delivery_config =
        DeliveryConfig::try_from(args.delivery.clone()).map_err(DeliveryError::Config)?;
    let engine = DeliveryEngine::with_clock(delivery_config, &mut registry, clock.clone())?;
    let forwarder_metrics = ForwarderMetrics::register(&mut registry);
    let controller_metrics = ControllerMetrics::register(&mut registry);

    let index = Arc::new(RoutingIndex::new(clock.clone()));
    let (triggers, trigger_streams) = Triggers::new();
    let (forwarders, notices) = ForwarderRegistry::new(
        index.clone(),
        engine.clone(),
        StreamSettings {
            events_url: args.events_url.clone(),
            silence_timeout: args.silence_timeout,
            reconnect_initial: args.reconnect_initial,
            reconnect_max: args.reconnect_max,
            project_name: "crownstone-webhooks".into(),
            proxy: args.events_proxy.clone(),
            max_event_bytes: usize::try_from(args.stream_max_event_bytes).unwrap_or(usize::MAX),
            buffer: args.buffer_limits(),
        },
        forwarder_metrics,
    );

    let scope = args.watch_scope();
    let health = Arc::new(Health::default());
    let (users, users_stream) = reflected(
        scoped_apis::<WebhookUser>(&client, &scope),
        health.clone(),
        |h| &h.users,
    );
    let (listener_events, listener_event_stream) = mpsc::unbounded_channel();
    let (listeners, listeners_stream) = reflected(
        scoped_apis::<Listener>(&client, &scope),
        health.clone(),
        |h| &h.listeners,
    );
    let listeners_stream = listeners_stream.inspect(move |event| {
        if let Ok(event) = event {
            let _ = listener_events.send(ListenerWatchEvent::of(event));
        }
    });
    // Only what the reconcilers act on wakes them: a spec change (generation; deletion bumps it
    // too) or a finalizer change. Their own status writes, hundreds a second under load, do not.
    let listeners_stream = listeners_stream.applied_objects().predicate_filter(
        predicates::generation.combine(predicates::finalizers),
        PredicateConfig::default(),
    );
    let users_stream = users_stream.applied_objects().predicate_filter(
        predicates::generation.combine(predicates::finalizers),
        PredicateConfig::default(),
    );
    let config = controller::Config::default().concurrency(RECONCILE_CONCURRENCY);
    let users_controller =
        Controller::for_stream(users_stream, users.clone()).with_config(config.clone());
    let listeners_controller =
        Controller::for_stream(listeners_stream, listeners.clone()).with_config(config);
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
        default_max_listeners: args.max_listeners_per_user,
        listeners,
        users,
        secrets: SecretCache::default(),
        secret_refs: SecretRefs::default(),
        owned: Default::default(),
        failures_in_a_row: Default::default(),
        last_applied: Default::default(),
        adopting: Default::default(),
        count_refresh_pending: Default::default(),
        triggers,
    });

    let registry = Arc::new(Mutex::new(registry));
    let (listener, health_addr) = crate::net::bind(args.health_listen)
        .await
        .map_err(|source| OperatorError::Listen {
            addr: args.health_listen,
            source,
        })?;

    let lock = match args.leader.leader_election {
        true => {
            let lease_namespace = args
                .leader
                .leader_election_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .or_else(|| scope.namespaces().and_then(|n| n.first()).cloned())
                .unwrap_or_else(|| "default".to_owned());
            let lock = LeaseLock::new(
                client.clone(),
                &args.leader,
                &lease_namespace,
                leader::identity(),
            )?;
            health.standby.store(true, Ordering::Relaxed);
            Some(Arc::new(lock))
        }
        false => None,
    };

    let stop = CancellationToken::new();
    let lost = CancellationToken::new();
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HealthState {
            health: health.clone(),
            registry: registry.clone(),
        });
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(server_stop.cancelled_owned())
            .await;
    });

    let parts = ActiveParts {
        ctx: ctx.clone(),
        users_controller,
        listeners_controller,
        trigger_streams,
        notices,
        listener_event_stream,
        secrets_apis: scoped_apis::<PartialObjectMeta<Secret>>(&client, &scope),
        secrets_health: health.secrets.clone(),
        status_pacing: StatusPacing {
            interval: args.status_interval,
            counters_every: args.counters_interval,
            writes_per_second: args.status_writes_per_second,
        },
    };
    let registry_handle = forwarders.clone();
    let grace = args.shutdown_grace;
    let task_stop = stop.clone();
    let task_lost = lost.clone();
    let task = tokio::spawn(async move {
        lead(parts, lock, health, task_stop, task_lost, grace).await;
        let _ = server.await;
        tracing::info!("Stopped.");
    });
    tracing::info!(%health_addr, events_url = %args.events_url, "Operator started.");
    Ok(RunningOperator {
        health_addr,
        registry,
        forwarders: registry_handle,
        stop,
        lost,
        task,
    })
}

/// What runs only while this replica leads: the controllers, the Secret watch and the status
/// writer (and through them the forwarders and deliveries).
struct ActiveParts {
    ctx: Arc<Context>,
    users_controller: Controller<WebhookUser>,
    listeners_controller: Controller<Listener>,
    trigger_streams: TriggerStreams,
    notices: mpsc::UnboundedReceiver<TokenNotice>,
    listener_event_stream: mpsc::UnboundedReceiver<ListenerWatchEvent>,
    secrets_apis: Vec<Api<PartialObjectMeta<Secret>>>,
    secrets_health: Arc<WatchHealth>,
    status_pacing: StatusPacing,
}

/// Waits for leadership (when elected), runs the active parts until `stop` or until the lease
/// is lost, then takes them down in order: streams first, then deliveries within `grace`, the
/// last status writes, and only then the lease, so a standby never delivers beside this one.
async fn lead(
    parts: ActiveParts,
    lock: Option<Arc<LeaseLock>>,
    health: Arc<Health>,
    stop: CancellationToken,
    lost: CancellationToken,
    grace: Duration,
) {
    if let Some(lock) = &lock {
        tracing::info!(identity = %lock.identity(), "Standing by until this replica leads.");
        if !lock.acquire(&stop).await {
            return;
        }
        health.standby.store(false, Ordering::Relaxed);
    }
    let ActiveParts {
        ctx,
        users_controller,
        listeners_controller,
        trigger_streams,
        notices,
        listener_event_stream,
        secrets_apis,
        secrets_health,
        status_pacing,
    } = parts;
    let controllers_stop = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(run_webhook_user_controller(
            users_controller,
            ctx.clone(),
            trigger_streams.users,
            controllers_stop.clone().cancelled_owned(),
        )),
        tokio::spawn(run_listener_controller(
            listeners_controller,
            ctx.clone(),
            notices,
            trigger_streams.listeners,
            controllers_stop.clone().cancelled_owned(),
        )),
        tokio::spawn(run_secret_watch(
            secrets_apis,
            ctx.clone(),
            secrets_health,
            controllers_stop.clone().cancelled_owned(),
        )),
        tokio::spawn(forget_deleted_listeners(ctx.clone(), listener_event_stream)),
    ];
    let writer_stop = CancellationToken::new();
    let mut writer = StatusWriter::new(ctx.clone(), status_pacing);
    let writer_task = {
        let writer_stop = writer_stop.clone();
        tokio::spawn(async move {
            writer.run(writer_stop).await;
            writer
        })
    };
    let renew_stop = CancellationToken::new();
    let holding = lock.clone().map(|lock| {
        let renew_stop = renew_stop.clone();
        let lost = lost.clone();
        tokio::spawn(async move {
            if lock.hold(&renew_stop).await == LeadershipEnd::Lost {
                lost.cancel();
            }
        })
    });

    tokio::select! {
        _ = stop.cancelled() => {}
        _ = lost.cancelled() => {
            // Another replica may take over after the lease duration: stop at once.
            tracing::warn!("Lost the lease: closing streams and dropping deliveries now.");
            ctx.forwarders.shutdown();
            ctx.engine.shutdown(Duration::ZERO).await;
            controllers_stop.cancel();
            writer_stop.cancel();
            return;
        }
    }
    tracing::info!("Shutting down: closing streams and draining deliveries.");
    ctx.forwarders.shutdown();
    ctx.engine.shutdown(grace).await;
    writer_stop.cancel();
    // The last status write and the controllers' goodbye need the API server: bounded, so an
    // unreachable one cannot hold the process past its grace period.
    let last_writes = async {
        if let Ok(mut writer) = writer_task.await {
            writer.flush_all().await;
        }
        controllers_stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(grace, last_writes).await.is_err() {
        tracing::warn!(
            grace = %humantime::format_duration(grace),
            "Gave up the last status writes: the API server did not answer in time."
        );
    }
    renew_stop.cancel();
    if let (Some(lock), Some(holding)) = (lock, holding) {
        let _ = holding.await;
        if !lost.is_cancelled() {
            lock.release().await;
        }
    }
}

/// A cache of `K` fed by a watch of `apis` (one per watched namespace, or one for all) whose
/// health (first full list, errors) is recorded in `watch`.
fn reflected<K>(
    apis: Vec<Api<K>>,
    health: Arc<Health>,
    watch: fn(&Health) -> &WatchHealth,
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + std::hash::Hash + Eq + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    // Errors pass on to the controller, whose trigger backoff paces the retries.
    let stream = scoped_watch(apis, |api| {
        watcher(api, watcher::Config::default().any_semantic())
            .modify(crate::resources::strip_bookkeeping)
    })
    .reflect(writer)
    .inspect(move |event| {
        let health = watch(&health);
        health.record(event.is_ok());
        if matches!(event, Ok(watcher::Event::InitDone)) {
            health.mark_synced();
        }
    });
    (reader, stream)
}

/// What the Listener watch says about Listeners leaving.
enum ListenerWatchEvent {
    Deleted(ListenerId),
    /// A (re-)list finished: Listeners not in it are gone.
    Listed,
    Other,
}

impl ListenerWatchEvent {
    fn of(event: &watcher::Event<Listener>) -> Self {
        use kube::ResourceExt;
        match event {
            watcher::Event::Delete(listener) => match listener.namespace() {
                Some(namespace) => {
                    ListenerWatchEvent::Deleted(ListenerId::new(namespace, listener.name_any()))
                }
                None => ListenerWatchEvent::Other,
            },
            watcher::Event::InitDone => ListenerWatchEvent::Listed,
            _ => ListenerWatchEvent::Other,
        }
    }
}

/// Stops routing to Listeners that are gone even when their finalizer never ran (removed by
/// hand, or deleted while the watch was down).
async fn forget_deleted_listeners(
    ctx: Arc<Context>,
    mut events: mpsc::UnboundedReceiver<ListenerWatchEvent>,
) {
    while let Some(event) = events.recv().await {
        match event {
            ListenerWatchEvent::Deleted(id) => ctx.forget_listener(&id),
            ListenerWatchEvent::Listed => ctx.forget_vanished_listeners(),
            ListenerWatchEvent::Other => {}
        }
    }
}

async fn healthz(State(state): State<HealthState>) -> impl IntoResponse {
    if state.health.alive() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: a watch of the Kubernetes API has failed for too long",
        )
    }
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
