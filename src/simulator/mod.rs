//! A stand-in for Crownstone's event server: the `/sse` stream with its frames, pings, expiry,
//! sphere routing and scope filter, the cloud's login route, and an admin API for tests and demos.
//!
//! Routes:
//! - `GET /sse`: the event stream (Crownstone's event server protocol).
//! - `POST /api/users/login` `{email, password: sha1 hex}` → `{id: <token>, ttl, created, userId}`.
//! - `POST /admin/tokens` [`TokenRequest`] → 201 [`TokenGrant`].
//! - `DELETE /admin/tokens/{token}` → 204 (404 for an unknown token); the token counts as expired.
//! - `POST /admin/events` one event or `{"events": [...]}` → [`PublishReport`]
//!   `{"delivered": [n, ...]}`: per event, in order, the streams that received it.
//! - `GET /admin/stats` → [`SimulatorStats`].
//! - `PUT /admin/outage` `{"enabled": bool}` → the same; while on, new streams get `NO_CONNECTION`.
//! - `POST /admin/streams/drop` → [`DropReport`] `{"dropped": n}`; open streams are cut off
//!   without a frame.
//!
//! Errors are JSON in LoopBack's shape: `{"error": {"statusCode", "name", "message"}}`.

mod admin;
mod client;
mod registry;
pub mod scope;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use admin::{
    AdminError, DropReport, OutageSwitch, PublishReport, SimulatorStats, TokenGrant, TokenRequest,
};
pub use client::{SimulatorClient, SimulatorClientError};
pub use registry::token_ref;
pub use scope::{EventFacts, Scope, ScopeFilter};

use registry::Registry;

/// Largest admin request body: room for big event batches.
const ADMIN_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// How long `shutdown` waits for streams to finish before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the simulator runs.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Time between pings on every stream.
    pub ping_interval: Duration,
    /// Start with the simulated upstream outage on: new streams get `NO_CONNECTION`.
    pub no_connection: bool,
    /// Frames that may wait per stream; a stream with a full queue is closed as too slow.
    pub stream_buffer: usize,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ping_interval: Duration::from_secs(30),
            no_connection: false,
            stream_buffer: 1024,
        }
    }
}

/// Failures to start or run the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed while serving.
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The server task panicked or was cancelled.
    #[error("server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// State shared by the handlers.
#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    ping_interval: Duration,
}

fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/tokens", post(admin::create_token))
        .route("/admin/tokens/{token}", delete(admin::revoke_token))
        .route("/admin/events", post(admin::publish))
        .route("/admin/stats", get(admin::stats))
        .route("/admin/outage", put(admin::set_outage))
        .route("/admin/streams/drop", post(admin::drop_streams))
        .layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT));
    Router::new()
        .route("/sse", get(stream::sse))
        .route("/api/users/login", post(admin::login))
        .merge(admin)
        .with_state(state)
}

/// The simulator server.
pub struct Simulator;

impl Simulator {
    /// Binds the listener and serves in a spawned task.
    pub async fn start(config: SimulatorConfig) -> Result<RunningSimulator, SimulatorError> {
        if config.ping_interval.is_zero() {
            return Err(SimulatorError::Config(
                "the ping interval must be positive".into(),
            ));
        }
        let (listener, addr) =
            crate::net::bind(config.listen)
                .await
                .map_err(|source| SimulatorError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let registry = Arc::new(Registry::new(config.stream_buffer, config.no_connection));
        let app = router(AppState {
            registry: Arc::clone(&registry),
            ping_interval: config.ping_interval,
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Frames are small and must leave at once: no Nagle delay waiting for an ACK.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender also stops the server.
                    let _ = stop_rx.await;
                })
                .await
                .map_err(SimulatorError::Serve)
        });
        tracing::info!(%addr, "simulator listening");
        Ok(RunningSimulator {
            addr,
            registry,
            stop: Some(stop_tx),
            task,
        })
    }
}

/// A simulator serving in the background. Dropping it stops the server without the graceful
/// `STREAM_CLOSED` frames; call [`RunningSimulator::shutdown`] for those.
pub struct RunningSimulator {
    addr: SocketAddr,
    registry: Arc<Registry>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), SimulatorError>>,
}

impl RunningSimulator {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections, ends every open stream with `STREAM_CLOSED` (500) and waits
    /// for the connections to finish (at most a few seconds, then they are cut off).
    pub async fn shutdown(mut self) -> Result<(), SimulatorError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let closed = self.registry.stop();
        tracing::info!(closed, "simulator stopping");
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(result) => result?,
            Err(_) => {
                self.task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Command-line flags of the `simulator` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct SimulatorArgs {
    /// Address to listen on.
    #[arg(long, env = "SIMULATOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Time between pings on every stream (e.g. `30s`, `500ms`).
    #[arg(long, env = "SIMULATOR_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    /// Start with the upstream outage on: every new stream gets `NO_CONNECTION`.
    #[arg(long, env = "SIMULATOR_NO_CONNECTION")]
    pub no_connection: bool,
    /// Frames that may wait per stream before it is closed as too slow.
    #[arg(long, env = "SIMULATOR_STREAM_BUFFER", default_value_t = 1024)]
    pub stream_buffer: usize,
}

impl From<SimulatorArgs> for SimulatorConfig {
    fn from(args: SimulatorArgs) -> Self {
        SimulatorConfig {
            listen: args.listen,
            ping_interval: args.ping_interval,
            no_connection: args.no_connection,
            stream_buffer: args.stream_buffer,
        }
    }
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(args: SimulatorArgs) -> Result<(), SimulatorError> {
    let mut running = Simulator::start(args.into()).await?;
    tokio::select! {
        () = termination() => running.shutdown().await,
        // The server only ends on its own when it fails.
        result = &mut running.task => result?,
    }
}

async fn termination() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
