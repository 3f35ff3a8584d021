//! Wires the operator together: routing index, delivery engine, forwarders, both controllers,
//! the status writer and the health server; switches the replica between standing by and
//! leading; and takes it all down in order.

use std::net::SocketAddr;
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
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::OperatorArgs;
use crate::controller::{
    run_listener_controller, run_secret_watch, run_webhook_user_controller, scoped_apis,
    scoped_watch, Context, FlushRequest, SecretCache, SecretRefs, StatusPacing, StatusWriter,
    TriggerStreams, Triggers,
};
use crate::delivery::{DeliveryConfig, DeliveryEngine, DeliveryError};
use crate::domain::{ListenerId, TokenHash};
use crate::forwarder::{ForwarderRegistry, StreamSettings, StreamState, TokenNotice};
use crate::handover::peer::{
    watch_lease_holder, CatchUp, FinishOutcome, HandoverError, HandoverMetrics, ProgressClient,
    ProgressServer, ADDRESS_ANNOTATION,
};
use crate::health::{readiness, ReplicaRole, WatchHealth};
use crate::index::RoutingIndex;
use crate::leader::{self, LeaderError, Leadership, LeadershipEnd, LeaseLock, Role, StandbyMode};
use crate::metrics::{ControllerMetrics, ForwarderMetrics};
use crate::resources::{Listener, WebhookUser};
use crate::shard::coordinator::{Coordinator, ShardMetrics, ShardReport, ShardTable};
use crate::shard::members::Members;

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
    #[error(transparent)]
    Handover(#[from] HandoverError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error(transparent)]
    Members(#[from] crate::shard::members::MembersError),
    #[error(
        "sharding needs leader election (--leader-election) and a handover key (--handover-key)"
    )]
    ShardingNeedsElection,
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The health of the operator's three watches, and what it takes for a warm standby to be
/// ready: its streams.
struct Health {
    users: WatchHealth,
    listeners: WatchHealth,
    secrets: Arc<WatchHealth>,
    leadership: Leadership,
    /// What this replica runs while it does not lead.
    standby: StandbyMode,
    index: Arc<RoutingIndex>,
    forwarders: ForwarderRegistry,
    /// Whether this replica has the leader's progress records (always, without a handover key).
    catch_up: CatchUp,
    /// Sharded: streams follow the shards, so only the streams this replica runs must be open.
    sharded: bool,
    /// Sharded: what `/shards` answers.
    shards: Arc<Mutex<ShardReport>>,
    /// Sharded: the member Lease's fence; past it this replica delivers nothing.
    shard_fence: Option<Arc<crate::leader::LeaseFence>>,
}

impl Health {
    fn watches(&self) -> [&WatchHealth; 3] {
        [&self.users, &self.listeners, &self.secrets]
    }

    fn role(&self) -> ReplicaRole {
        ReplicaRole::of(self.leadership.role(), self.standby)
    }

    /// Every token a Listener is routed on has its stream open, or refused for good; sharded,
    /// every token this replica streams.
    fn streams_open(&self) -> bool {
        let open = |state: Option<StreamState>| {
            matches!(
                state,
                Some(StreamState::Streaming | StreamState::InvalidToken(_) | StreamState::Expired)
            )
        };
        if self.sharded {
            return self
                .forwarders
                .token_roles()
                .iter()
                .all(|(token, _)| open(self.forwarders.state(token)));
        }
        self.index.listener_ids().iter().all(|id| {
            let Some(entry) = self.index.listener(id) else {
                return true;
            };
            open(self.forwarders.state(&entry.token))
        })
    }

    /// Ready as [`readiness`] says for this replica's role.
    fn ready(&self) -> Result<(), &'static str> {
        let role = self.role();
        let watches = self.watches().iter().all(|w| w.is_healthy());
        let streams = match self.sharded {
            true => self.streams_open(),
            false => role != ReplicaRole::StandbyWarm || self.streams_open(),
        };
        readiness(role, watches, streams, self.catch_up.is_caught_up())
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
    leadership: Leadership,
    stop: CancellationToken,
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

    /// This replica's role now: [`Role::Leading`] while it holds the Lease (or without leader
    /// election), else [`Role::Standby`].
    pub fn role(&self) -> Role {
        self.leadership.role()
    }

    /// Every change of [`role`](Self::role) from now on. A replica that loses its Lease stands
    /// by again and tries for the Lease again; it does not stop.
    pub fn role_changes(&self) -> watch::Receiver<Role> {
        self.leadership.subscribe()
    }

    /// Stops taking events, lets queued deliveries finish within the grace period, writes the
    /// last counters to status while it still leads, hands the Lease on, then returns.
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
    let sharding = args.shard.sharding;
    if sharding && (!args.leader.leader_election || args.handover.handover_key.is_none()) {
        return Err(OperatorError::ShardingNeedsElection);
    }
    wait_for_crds(&client).await?;
    let mut registry = Registry::with_prefix("crownstone_webhooks");
    let delivery_config =
        DeliveryConfig::try_from(args.delivery.clone()).map_err(DeliveryError::Config)?;
    let engine = DeliveryEngine::with_clock(delivery_config, &mut registry, clock.clone())?;
    engine.set_tracing(crate::telemetry::Tracing::start(&args.telemetry)?);
    let forwarder_metrics = ForwarderMetrics::register(&mut registry);
    let controller_metrics = ControllerMetrics::register(&mut registry);
    let handover_metrics = HandoverMetrics::register(&mut registry);
    let leader_gauge = Gauge::default();
    registry.register(
        "leader",
        "1 while this replica leads (streams are delivered, status written), else 0",
        leader_gauge.clone(),
    );

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
    let lease_namespace = args
        .leader
        .leader_election_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| scope.namespaces().and_then(|n| n.first()).cloned())
        .unwrap_or_else(|| "default".to_owned());
    let lock = match args.leader.leader_election {
        true => {
            let lock = LeaseLock::new(
                client.clone(),
                &args.leader,
                &lease_namespace,
                leader::identity(),
            )?;
            // Sharded, each token's shard fences its deliveries, through the member Lease; the
            // leader Lease then only decides who writes what belongs to no token.
            if !sharding {
                lock.set_fence(engine.fence());
            }
            Some(Arc::new(lock))
        }
        false => None,
    };
    // Without election this replica leads from the start; with it, nothing is routed or
    // written before the Lease is won.
    let leadership = match lock {
        Some(_) => {
            forwarders.set_role(Role::Standby);
            Leadership::new(Role::Standby)
        }
        None => {
            forwarders.set_role(Role::Leading);
            leader_gauge.set(1);
            Leadership::new(Role::Leading)
        }
    };
    // Sharded, every replica streams what its shards need whatever it does about the Lease.
    if sharding && args.leader.standby == StandbyMode::Cold {
        tracing::warn!("STANDBY=cold is ignored with sharding: every replica keeps warm streams of the tokens it stands by for.");
    }
    let standby_mode = match sharding {
        true => StandbyMode::Warm,
        false => args.leader.standby,
    };
    let identity = lock
        .as_ref()
        .map_or_else(leader::identity, |lock| lock.identity().to_owned());
    let shard_table = sharding.then(|| {
        let table = Arc::new(ShardTable::new(identity.clone()));
        forwarders.set_duties(table.clone());
        table
    });
    let shard_report = Arc::new(Mutex::new(ShardReport::default()));
    let health = Arc::new(Health {
        users: WatchHealth::default(),
        listeners: WatchHealth::default(),
        secrets: Arc::new(WatchHealth::default()),
        leadership: leadership.clone(),
        standby: standby_mode,
        index: index.clone(),
        forwarders: forwarders.clone(),
        catch_up: CatchUp::default(),
        sharded: sharding,
        shards: shard_report.clone(),
        shard_fence: sharding.then(|| engine.fence()),
    });
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
        secret_rotation_overlap: args.secret_rotation_overlap,
        listeners,
        users,
        secrets: SecretCache::default(),
        secret_refs: SecretRefs::default(),
        owned: Default::default(),
        failures_in_a_row: Default::default(),
        last_applied: Default::default(),
        adopting: Default::default(),
        reconciled_once: Default::default(),
        count_refresh_pending: Default::default(),
        triggers,
        leadership: leadership.clone(),
        shards: shard_table.clone(),
        identity: identity.clone(),
    });

    let registry = Arc::new(Mutex::new(registry));
    let (listener, health_addr) = crate::net::bind(args.health_listen)
        .await
        .map_err(|source| OperatorError::Listen {
            addr: args.health_listen,
            source,
        })?;

    let stop = CancellationToken::new();
    // The progress server outlives `stop`: a leader shutting down drains, publishes its final
    // batch and waits for the standbys to fetch it, all after `stop`; it ends once the
    // replica has handed the Lease on.
    let handover_stop = CancellationToken::new();
    // The term this replica leads in, for the progress server: `None` while standing by.
    let (leading_term, leading_term_rx) = watch::channel(None);
    let mut handover_address = None;
    let handover = match &lock {
        Some(lock) => match args.handover.server_settings(lock.identity()) {
            Some(settings) => {
                let key = settings.key.clone();
                let server = ProgressServer::start(
                    settings,
                    Arc::new(forwarders.clone()),
                    leading_term_rx,
                    handover_metrics.clone(),
                    handover_stop.clone(),
                )
                .await?;
                let pod_ip = std::env::var("POD_IP").ok();
                let address = args
                    .handover
                    .advertised_address(server.local_addr(), pod_ip.as_deref());
                tracing::info!(%address, "Serving handover progress to the other replicas.");
                lock.set_annotation(ADDRESS_ANNOTATION, address.clone());
                handover_address = Some(address);
                // A cold standby buffers nothing to align, so it follows no leader's progress,
                // and a leader handing over does not wait for it to fetch the final batch.
                // Sharded, the coordinator follows every peer instead.
                if standby_mode == StandbyMode::Warm && !sharding {
                    let holder = watch_lease_holder(
                        Api::namespaced(client.clone(), &lease_namespace),
                        args.leader.leader_election_lease.clone(),
                        args.leader.lease_retry_period,
                        stop.clone(),
                    );
                    ProgressClient::spawn(
                        key,
                        lock.identity().to_owned(),
                        holder,
                        Arc::new(forwarders.clone()),
                        handover_metrics.clone(),
                        health.catch_up.clone(),
                        stop.clone(),
                    )?;
                }
                Some(server)
            }
            None => {
                tracing::warn!("No HANDOVER_KEY: the replicas exchange no progress, so a standby that takes over delivers everything it buffered again (repeats, never losses).");
                None
            }
        },
        None => None,
    };
    let handover = handover.map(Arc::new);
    // Registered without sharding too (at zero), so dashboards and alerts find them.
    let shard_metrics = ShardMetrics::register(&mut registry.lock());
    let (flush_requests, flush_inbox) = mpsc::unbounded_channel();
    let shard = match (&shard_table, &lock, &args.handover.handover_key) {
        (Some(table), Some(_), Some(key)) => {
            let members = Members::new(
                client.clone(),
                &lease_namespace,
                &args.shard.shard_lease_prefix,
                identity.clone(),
                args.leader.lease_duration,
                handover_address,
            )?;
            let fence = engine.fence();
            fence.close();
            let synced_health = health.clone();
            let synced_ctx = ctx.clone();
            let waker = ctx.clone();
            Some(Coordinator {
                members: Arc::new(members),
                table: table.clone(),
                forwarders: forwarders.clone(),
                server: handover.clone(),
                key: key.clone(),
                term: shard_term(),
                fence,
                renew_deadline: args.leader.lease_renew_deadline,
                retry_period: args.leader.lease_retry_period,
                warm_timeout: args.shard.shard_warm_timeout,
                // Listed, and every Listener listed reconciled once: only then are all the
                // tokens a view needs known.
                synced: Arc::new(move || {
                    synced_health.watches().iter().all(|w| w.is_healthy())
                        && synced_ctx.every_listener_reconciled()
                }),
                on_taken_over: Arc::new(move |tokens| {
                    for token in tokens {
                        for id in waker.index.listeners_of_token(token) {
                            waker.wake_listener(&id);
                        }
                    }
                }),
                before_release: {
                    let index = ctx.index.clone();
                    let flushes = flush_requests.clone();
                    Arc::new(move |tokens: Vec<TokenHash>| {
                        let listeners: Vec<ListenerId> = tokens
                            .iter()
                            .flat_map(|token| index.listeners_of_token(token))
                            .collect();
                        let (done, written) = oneshot::channel();
                        let sent = flushes.send(FlushRequest { listeners, done }).is_ok();
                        Box::pin(async move {
                            if sent {
                                let _ = written.await;
                            }
                        })
                    })
                },
                metrics: shard_metrics.clone(),
                handover_metrics: handover_metrics.clone(),
                report: shard_report.clone(),
                wake: Arc::default(),
            })
        }
        _ => None,
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/shards", get(shards))
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

    let parts = ControllerParts {
        ctx: ctx.clone(),
        users_controller,
        listeners_controller,
        trigger_streams,
        notices,
        listener_event_stream,
        secrets_apis: scoped_apis::<PartialObjectMeta<Secret>>(&client, &scope),
        secrets_health: health.secrets.clone(),
    };
    let replica = Replica {
        ctx,
        lock,
        standby: standby_mode,
        status_pacing: StatusPacing {
            interval: args.status_interval,
            counters_every: args.counters_interval,
            writes_per_second: args.status_writes_per_second,
        },
        grace: args.shutdown_grace,
        leader_gauge,
        handover,
        leading_term: Arc::new(leading_term),
        shard,
        flush_inbox: Mutex::new(Some(flush_inbox)),
    };
    let task_stop = stop.clone();
    let task = tokio::spawn(async move {
        replica.run(parts, task_stop).await;
        handover_stop.cancel();
        let _ = server.await;
        tracing::info!("Stopped.");
    });
    tracing::info!(%health_addr, events_url = %args.events_url, standby = ?standby_mode, "Operator started.");
    Ok(RunningOperator {
        health_addr,
        registry,
        forwarders,
        leadership,
        stop,
        task,
    })
}

/// The watches and reconcilers: on a warm standby they run from the start, on a cold one only
/// once it leads.
struct ControllerParts {
    ctx: Arc<Context>,
    users_controller: Controller<WebhookUser>,
    listeners_controller: Controller<Listener>,
    trigger_streams: TriggerStreams,
    notices: mpsc::UnboundedReceiver<TokenNotice>,
    listener_event_stream: mpsc::UnboundedReceiver<ListenerWatchEvent>,
    secrets_apis: Vec<Api<PartialObjectMeta<Secret>>>,
    secrets_health: Arc<WatchHealth>,
}

/// The running watches and reconcilers.
struct RunningControllers {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl ControllerParts {
    fn start(self) -> RunningControllers {
        let ControllerParts {
            ctx,
            users_controller,
            listeners_controller,
            trigger_streams,
            notices,
            listener_event_stream,
            secrets_apis,
            secrets_health,
        } = self;
        let stop = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(run_webhook_user_controller(
                users_controller,
                ctx.clone(),
                trigger_streams.users,
                stop.clone().cancelled_owned(),
            )),
            tokio::spawn(run_listener_controller(
                listeners_controller,
                ctx.clone(),
                notices,
                trigger_streams.listeners,
                stop.clone().cancelled_owned(),
            )),
            tokio::spawn(run_secret_watch(
                secrets_apis,
                ctx.clone(),
                secrets_health,
                stop.clone().cancelled_owned(),
            )),
            tokio::spawn(forget_deleted_listeners(ctx, listener_event_stream)),
        ];
        RunningControllers { stop, tasks }
    }
}

impl RunningControllers {
    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// How a term of leading ended.
enum TermEnd {
    /// Asked to stop: this replica has drained and handed the Lease on.
    Stopped,
    /// The Lease was lost: this replica stands by again.
    Lost,
}

/// One replica: its role, the Lease it competes for, and what it runs in each role.
struct Replica {
    ctx: Arc<Context>,
    lock: Option<Arc<LeaseLock>>,
    standby: StandbyMode,
    status_pacing: StatusPacing,
    grace: Duration,
    leader_gauge: Gauge,
    /// The progress server, when the replicas share a handover key.
    handover: Option<Arc<ProgressServer>>,
    leading_term: Arc<watch::Sender<Option<i32>>>,
    /// Sharded: the coordinator of this replica's shards.
    shard: Option<Coordinator>,
    /// Sharded: the coordinator's requests to write counters before it hands tokens on.
    flush_inbox: Mutex<Option<mpsc::UnboundedReceiver<FlushRequest>>>,
}

impl Replica {
    /// Runs until `stop`: stands by, leads when it wins the Lease, stands by again when it loses
    /// it (a cold standby closes its streams then), and takes everything down in order.
    async fn run(mut self, parts: ControllerParts, stop: CancellationToken) {
        if let Some(coordinator) = self.shard.take() {
            return self.run_sharded(parts, coordinator, stop).await;
        }
        let mut parts = Some(parts);
        let mut controllers = None;
        if self.lock.is_none() || self.standby == StandbyMode::Warm {
            controllers = parts.take().map(ControllerParts::start);
        }
        let mut writer = StatusWriter::new(self.ctx.clone(), self.status_pacing);
        loop {
            if let Some(lock) = &self.lock {
                tracing::info!(identity = %lock.identity(), standby = ?self.standby, "Standing by until this replica leads.");
                if !lock.acquire(&stop).await {
                    break;
                }
            }
            if controllers.is_none() {
                controllers = parts.take().map(ControllerParts::start);
            }
            match self.lead(&mut writer, &stop).await {
                TermEnd::Stopped => {
                    if let Some(controllers) = controllers {
                        self.bounded("stopping the reconcilers", controllers.stop())
                            .await;
                    }
                    return;
                }
                TermEnd::Lost if self.standby == StandbyMode::Cold => {
                    // Back to standing by cold: one stream per token between the replicas, the
                    // leader's. The reconcilers keep their caches (writing nothing), so leading
                    // again is a matter of reopening the streams.
                    self.ctx.forwarders.close_streams();
                    tracing::warn!("A cold standby lost the lease: streams closed, standing by.");
                }
                TermEnd::Lost => {}
            }
        }
        // Standing by when stopped: nothing to drain, nothing to write.
        self.ctx.forwarders.shutdown();
        self.ctx.engine.shutdown(Duration::ZERO).await;
        if let Some(controllers) = controllers {
            self.bounded("stopping the reconcilers", controllers.stop())
                .await;
        }
    }

    /// Sharded: delivers the tokens of this replica's shards from the start, as the coordinator
    /// decides, and writes their Listeners' status; the Lease only decides who writes what
    /// belongs to no token (WebhookUsers, Secrets, finalizers). Stopping hands every token on
    /// first, then drains, publishes the final progress, writes the last counters and gives the
    /// Lease back.
    async fn run_sharded(
        self,
        parts: ControllerParts,
        coordinator: Coordinator,
        stop: CancellationToken,
    ) {
        let controllers = parts.start();
        // Every replica's progress server serves from the start: each leads some tokens.
        self.leading_term.send_replace(Some(coordinator.term));
        let leave = CancellationToken::new();
        let coordinating = tokio::spawn(coordinator.run(leave.clone(), self.grace));
        let writer_stop = CancellationToken::new();
        let mut writer = StatusWriter::new(self.ctx.clone(), self.status_pacing);
        let writing = {
            let writer_stop = writer_stop.clone();
            let (_unused, none) = mpsc::unbounded_channel();
            let requests = self.flush_inbox.lock().take().unwrap_or(none);
            tokio::spawn(async move {
                writer.run_with_requests(writer_stop, requests).await;
                writer
            })
        };
        let hold_stop = CancellationToken::new();
        let electing = self.lock.clone().map(|lock| {
            let ctx = self.ctx.clone();
            let gauge = self.leader_gauge.clone();
            let stop = stop.clone();
            let hold_stop = hold_stop.clone();
            tokio::spawn(async move {
                loop {
                    if !lock.acquire(&stop).await {
                        return;
                    }
                    ctx.leadership.set(Role::Leading);
                    gauge.set(1);
                    ctx.requeue_all();
                    let end = lock.hold(&hold_stop).await;
                    if end == LeadershipEnd::Stopped {
                        return;
                    }
                    ctx.leadership.set(Role::Standby);
                    gauge.set(0);
                    tracing::warn!("Lost the lease: no longer writing WebhookUsers and Secrets.");
                }
            })
        });

        stop.cancelled().await;
        leave.cancel();
        match tokio::time::timeout(self.grace + Duration::from_secs(5), coordinating).await {
            Ok(Ok(departure)) => tracing::info!(?departure, "Left the shards."),
            _ => tracing::warn!("Leaving the shards did not end in time."),
        }
        self.ctx.engine.shutdown(self.grace).await;
        self.bounded("the final progress batch", self.publish_final_progress())
            .await;
        self.ctx.forwarders.shutdown();
        writer_stop.cancel();
        if let Ok(mut writer) = writing.await {
            self.bounded("the last status writes", writer.flush_all())
                .await;
        }
        hold_stop.cancel();
        if let Some(electing) = electing {
            let _ = electing.await;
        }
        if let Some(lock) = &self.lock {
            if self.ctx.leadership.is_leading() {
                self.ctx.leadership.set(Role::Standby);
                self.leader_gauge.set(0);
                lock.release().await;
            }
        }
        self.bounded("stopping the reconcilers", controllers.stop())
            .await;
    }

    /// Becomes the leader: routes and delivers, writes status, and reconciles everything again
    /// for the writes skipped while standing by.
    fn take_over(&self) {
        self.ctx.forwarders.open_streams();
        self.ctx.forwarders.set_role(Role::Leading);
        self.ctx.leadership.set(Role::Leading);
        self.leader_gauge.set(1);
        let term = self.lock.as_ref().and_then(|lock| lock.term());
        self.leading_term.send_replace(term);
        self.ctx.requeue_all();
    }

    /// One term of leading, until `stop` or until the Lease is lost.
    async fn lead(&self, writer: &mut StatusWriter, stop: &CancellationToken) -> TermEnd {
        self.take_over();
        let lost = CancellationToken::new();
        let renew_stop = CancellationToken::new();
        let holding = self.lock.clone().map(|lock| {
            let renew_stop = renew_stop.clone();
            let lost = lost.clone();
            let ctx = self.ctx.clone();
            let gauge = self.leader_gauge.clone();
            let leading_term = self.leading_term.clone();
            tokio::spawn(async move {
                if lock.hold(&renew_stop).await == LeadershipEnd::Lost {
                    // Another replica may take over after the lease duration: stop at once,
                    // whatever this one is doing (draining included).
                    step_down(&ctx, &gauge, &leading_term);
                    lost.cancel();
                }
            })
        });

        // The writer runs until the term ends; it keeps its counters for the next term.
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = lost.cancelled() => {}
            _ = writer.run(CancellationToken::new()) => {}
        }
        if lost.is_cancelled() {
            tracing::warn!(
                "Lost the lease: stopped routing and dropped deliveries; standing by again."
            );
            if let Some(holding) = holding {
                let _ = holding.await;
            }
            return TermEnd::Lost;
        }

        tracing::info!("Shutting down: no longer routing, draining deliveries.");
        self.ctx.forwarders.stop_routing();
        tokio::select! {
            _ = self.ctx.engine.shutdown(self.grace) => {}
            _ = lost.cancelled() => {
                tracing::warn!("Lost the lease while draining: dropped the deliveries left.");
                self.ctx.engine.shutdown(Duration::ZERO).await;
            }
        }
        // The streams stay open until the final progress is out: it is taken from their logs.
        if self.ctx.leadership.is_leading() {
            self.bounded("the final progress batch", self.publish_final_progress())
                .await;
        }
        self.ctx.forwarders.shutdown();
        // Each write checks that this replica still leads: none is made after the Lease is lost.
        self.bounded("the last status writes", writer.flush_all())
            .await;
        renew_stop.cancel();
        if let (Some(lock), Some(holding)) = (&self.lock, holding) {
            let _ = holding.await;
            if !lost.is_cancelled() {
                step_down(&self.ctx, &self.leader_gauge, &self.leading_term);
                lock.release().await;
            }
        }
        TermEnd::Stopped
    }

    /// Publishes the final batch of progress records (`final: true`) and waits, bounded, until
    /// the standbys fetched it: after the last delivery has settled and before the Lease is
    /// handed on, so the next leader starts right after the last event this one delivered.
    async fn publish_final_progress(&self) {
        let Some(server) = &self.handover else {
            return;
        };
        match server.finish(FINAL_BATCH_WAIT).await {
            FinishOutcome::AllFetched => {
                tracing::info!("The standbys fetched the final progress.")
            }
            FinishOutcome::TimedOut { waiting } => {
                let waiting = waiting.join(", ");
                tracing::warn!(%waiting, "Not every standby fetched the final progress in time: the next leader may deliver some events again.")
            }
        }
    }

    /// Runs `work` for at most the grace period: the API server may not answer, and that must
    /// not hold the process past its grace period.
    async fn bounded(&self, what: &str, work: impl std::future::Future<Output = ()>) {
        if tokio::time::timeout(self.grace, work).await.is_err() {
            tracing::warn!(
                grace = %humantime::format_duration(self.grace),
                "Gave up {what}: the API server did not answer in time."
            );
        }
    }
}

/// How long a leader handing over waits for the standbys to fetch its final progress.
const FINAL_BATCH_WAIT: Duration = Duration::from_secs(2);

/// Stops leading at once: nothing more is routed or delivered, and nothing written.
fn step_down(ctx: &Context, gauge: &Gauge, leading_term: &watch::Sender<Option<i32>>) {
    leading_term.send_replace(None);
    ctx.leadership.set(Role::Standby);
    ctx.forwarders.set_role(Role::Standby);
    ctx.engine.abandon_all();
    gauge.set(0);
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

/// 200 or 503 as [`readiness`] says, the body naming the role: `leading`, `standby (warm)` or
/// `standby (cold)`.
async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    let role = state.health.role().describe();
    match state.health.ready() {
        Ok(()) => (StatusCode::OK, role.to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready ({role}): {why}"),
        ),
    }
}

/// This replica's place among the shards, as JSON: its view, the members, the token hashes it
/// leads and stands by for. Empty without sharding.
async fn shards(State(state): State<HealthState>) -> impl IntoResponse {
    let health = &state.health;
    let mut report = health.shards.lock().clone();
    // Which tokens it delivers is read now, from the tokens' logs: the rest of the report is
    // the coordinator's last round. Past its fence it delivers nothing, whatever the logs say.
    if let Some(fence) = &health.shard_fence {
        let delivering = fence.holds();
        let (mut leading, mut standby) = (Vec::new(), Vec::new());
        for (token, leads) in health.forwarders.token_roles() {
            match leads && delivering {
                true => leading.push(token),
                false => standby.push(token),
            }
        }
        leading.sort_unstable();
        standby.sort_unstable();
        report.leading = leading;
        report.standby = standby;
    }
    axum::Json(report)
}

/// A number new with every start of this process, for the progress records of its shards.
fn shard_term() -> i32 {
    i32::try_from(rand::random::<u32>() >> 1)
        .unwrap_or(1)
        .max(1)
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
