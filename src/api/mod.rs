//! The REST facade: Crownstone's webhook API (`UPSTREAM.md` §4) served from the resources.
//! Reads answer from caches of the API namespace; writes create, patch and delete Listeners,
//! WebhookUsers and managed token Secrets. This module assembles the router, its settings and
//! the server; each area lives in its own file.

mod auth;
mod cache;
mod error;
mod input;
mod limits;
mod listeners;
mod metrics;
mod names;
mod openapi;
mod server;
mod token_check;
mod users;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::AdminKey;
pub use cache::FacadeCache;
pub use error::ApiError;
pub use limits::RateLimit;
pub use token_check::{TokenCheckSetupError, TokenVerdict};

use crate::forwarder::ForwarderRegistry;
use crate::health::WatchHealth;
use metrics::ApiMetrics;
use token_check::TokenChecker;

/// The field manager of the facade's writes.
pub const FIELD_MANAGER: &str = "crownstone-webhooks-api";

/// How long a write waits for its change to show in the caches before it answers, so the
/// caller's next read on this replica sees it.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// The admin key as given on the command line or in the environment: never shown by `Debug`.
#[derive(Clone)]
pub struct AdminKeyValue(String);

impl FromStr for AdminKeyValue {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(AdminKeyValue(s.to_owned()))
    }
}

impl fmt::Debug for AdminKeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminKeyValue(<redacted>)")
    }
}

/// A key of a Secret in the API namespace, written `name/key` or `name:key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyName {
    pub name: String,
    pub key: String,
}

impl FromStr for SecretKeyName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, key) = s
            .split_once('/')
            .or_else(|| s.split_once(':'))
            .ok_or_else(|| format!("{s:?} is not name/key"))?;
        if name.is_empty() || key.is_empty() {
            return Err(format!("{s:?} is not name/key"));
        }
        Ok(SecretKeyName {
            name: name.to_owned(),
            key: key.to_owned(),
        })
    }
}

/// Settings of the REST facade, from flags or the environment.
#[derive(clap::Args, Clone, Debug)]
pub struct ApiArgs {
    /// Address of the REST API (and of its /healthz and /readyz; never of its metrics).
    #[arg(long, env = "API_LISTEN", default_value = "0.0.0.0:8082")]
    pub api_listen: SocketAddr,

    /// Address of the REST API's /metrics in the `api` process, apart from the public port. In
    /// `run` the API's metrics are served with the operator's, on HEALTH_LISTEN.
    #[arg(long, env = "API_METRICS_LISTEN", default_value = "0.0.0.0:8083")]
    pub api_metrics_listen: SocketAddr,

    /// The namespace the facade's WebhookUsers, Listeners and Secrets live in (default: the
    /// namespace the controller watches, else the one the process runs in, else `default`).
    #[arg(long, env = "API_NAMESPACE")]
    pub api_namespace: Option<String>,

    /// The admin key of the /users routes. Without it (or --admin-key-secret) they answer 401.
    #[arg(
        long,
        env = "CROWNSTONE_USER_ADMIN_KEY",
        hide_env_values = true,
        conflicts_with = "admin_key_secret"
    )]
    pub admin_key: Option<AdminKeyValue>,

    /// The admin key from a Secret of the API namespace, as `name/key`; followed when it changes.
    #[arg(long, env = "CROWNSTONE_USER_ADMIN_KEY_SECRET")]
    pub admin_key_secret: Option<SecretKeyName>,

    /// How long POST /listeners waits for Crownstone's event server to judge a token.
    #[arg(long, env = "TOKEN_CHECK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub token_check_timeout: Duration,

    /// At most this many token checks (streams opened to Crownstone) at once; a check beyond it
    /// waits up to a second for a slot, then is answered 503.
    #[arg(long, env = "TOKEN_CHECK_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub token_check_concurrency: u32,

    /// How long POST /users waits for the operator to make the new user's credentials.
    #[arg(long, env = "API_CREDENTIALS_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub credentials_wait: Duration,

    /// How long a DELETE waits for the operator to confirm that nothing routes to what it
    /// deleted (the objects are gone); past it the DELETE answers 503 and the deletion goes on.
    #[arg(long, env = "API_DELETE_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub delete_wait: Duration,

    /// Requests per second one key (the admin key, or one user's API key) may make, sustained;
    /// requests without a valid key share one such budget.
    #[arg(long, env = "API_RATE_LIMIT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit: u32,

    /// Requests one key may make at once before its rate applies.
    #[arg(long, env = "API_RATE_BURST", default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_burst: u32,

    /// How long one request may run before it is answered 503.
    #[arg(long, env = "API_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long a client may take to send a request's head; a slower one is disconnected.
    #[arg(long, env = "API_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
}

/// The event server the facade checks tokens with and the listener ceiling, for the `api`
/// process (in `run` the controller's settings are used).
#[derive(clap::Args, Clone, Debug)]
pub struct ApiEventsArgs {
    /// Base url of Crownstone's event server; tokens are checked at `{url}/sse`.
    #[arg(
        long,
        env = "CROWNSTONE_EVENTS_URL",
        default_value = "https://events.crownstone.rocks"
    )]
    pub events_url: Url,

    /// A proxy to reach the event server through; HTTP(S)_PROXY from the environment is not used.
    #[arg(long, env = "CROWNSTONE_EVENTS_PROXY")]
    pub events_proxy: Option<Url>,

    /// Listeners per WebhookUser unless it sets `spec.maxListeners`; the same setting as the
    /// controller's, so both refuse at the same count.
    #[arg(long, env = "MAX_LISTENERS_PER_USER", default_value_t = 1000)]
    pub max_listeners_per_user: u32,
}

/// Where the admin key comes from.
#[derive(Clone, Debug)]
pub enum AdminKeySource {
    /// None: the admin routes answer 401.
    None,
    Fixed(AdminKeyValue),
    Secret(SecretKeyName),
}

/// Where the facade's metrics are served: never on the public REST port, which anyone who may
/// call the API reaches.
#[derive(Clone, Debug)]
pub enum ApiMetricsExport {
    /// On `/metrics` of a server of their own at this address.
    Listen(SocketAddr),
    /// In this registry, which the operator of the same process serves on its metrics port.
    Registry(Arc<Mutex<Registry>>),
}

/// Everything the facade runs with.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub listen: SocketAddr,
    pub metrics: ApiMetricsExport,
    pub namespace: String,
    pub admin_key: AdminKeySource,
    pub events_url: Url,
    pub events_proxy: Option<Url>,
    pub token_check_timeout: Duration,
    /// At most this many token checks at once.
    pub token_check_concurrency: usize,
    pub credentials_wait: Duration,
    pub delete_wait: Duration,
    pub rate_limit: RateLimit,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Listeners per WebhookUser unless it sets `spec.maxListeners`.
    pub max_listeners_per_user: u32,
}

impl ApiSettings {
    /// Settings from the flags, in `namespace`, checking tokens with `events`, allowing each
    /// WebhookUser `max_listeners_per_user` Listeners unless it says otherwise.
    pub fn new(
        args: &ApiArgs,
        namespace: String,
        events_url: Url,
        events_proxy: Option<Url>,
        max_listeners_per_user: u32,
    ) -> Self {
        let admin_key = match (&args.admin_key, &args.admin_key_secret) {
            (Some(key), _) if !key.0.trim().is_empty() => AdminKeySource::Fixed(key.clone()),
            (_, Some(secret)) => AdminKeySource::Secret(secret.clone()),
            _ => AdminKeySource::None,
        };
        ApiSettings {
            listen: args.api_listen,
            metrics: ApiMetricsExport::Listen(args.api_metrics_listen),
            namespace,
            admin_key,
            events_url,
            events_proxy,
            token_check_timeout: args.token_check_timeout,
            token_check_concurrency: args.token_check_concurrency as usize,
            credentials_wait: args.credentials_wait,
            delete_wait: args.delete_wait,
            rate_limit: RateLimit {
                per_second: args.rate_limit,
                burst: args.rate_burst,
            },
            request_timeout: args.request_timeout,
            header_read_timeout: args.header_read_timeout,
            max_listeners_per_user,
        }
    }
}

/// Why the facade could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    TokenCheck(#[from] TokenCheckSetupError),
    #[error(transparent)]
    RateLimit(#[from] limits::RateLimitError),
}

/// What every handler shares.
pub(crate) struct Shared {
    client: Client,
    namespace: String,
    cache: Arc<FacadeCache>,
    admin: AdminKey,
    admin_watch: Option<Arc<WatchHealth>>,
    checker: TokenChecker,
    credentials_wait: Duration,
    write_wait: Duration,
    delete_wait: Duration,
    max_listeners_per_user: u32,
    document: String,
}

/// The handlers' state.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The routes of `/api` and the OpenAPI document they make.
pub(crate) fn router_parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(users::is_valid_api_key))
        .routes(routes!(users::is_valid_admin_key))
        .routes(routes!(users::list, users::create))
        .routes(routes!(users::patch, users::delete))
        .routes(routes!(users::rotate))
        .routes(routes!(listeners::list, listeners::create))
        .routes(routes!(listeners::active))
        .routes(routes!(listeners::delete_one))
        .routes(routes!(listeners::delete_by_user_id))
        .routes(routes!(listeners::delete_by_token))
        .split_for_parts()
}

/// The routes of `/api` with the document they make, every route answering 429 past the rate.
fn api_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (routes, mut document) = router_parts();
    openapi::add_rate_limit_answers(&mut document);
    (routes, document)
}

/// A running facade.
pub struct RunningApi {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    cache: Arc<FacadeCache>,
    admin_watch: Option<Arc<WatchHealth>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningApi {
    /// Where the REST API is served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the facade's own metrics server listens; `None` when they are in the operator's
    /// registry.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Waits until the caches have listed once; false after `deadline`.
    pub async fn wait_ready(&self, deadline: Duration) -> bool {
        let admin = self.admin_watch.clone();
        self.cache
            .wait_for(deadline, |c| {
                (c.is_ready() && admin.as_ref().is_none_or(|w| w.is_healthy())).then_some(())
            })
            .await
            .is_some()
    }

    /// Stops serving (requests in flight finish) and stops the watches.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts the facade: its watches of `settings.namespace` and its server. `forwarders`, when
/// this process also runs the controller, vouch for tokens they already stream.
pub async fn start(
    client: Client,
    settings: ApiSettings,
    forwarders: Option<ForwarderRegistry>,
) -> Result<RunningApi, ApiStartError> {
    let (registry, own_metrics) = match &settings.metrics {
        ApiMetricsExport::Listen(addr) => (
            Arc::new(Mutex::new(Registry::with_prefix("crownstone_webhooks"))),
            Some(*addr),
        ),
        ApiMetricsExport::Registry(registry) => (registry.clone(), None),
    };
    let metrics = ApiMetrics::register(&mut registry.lock());
    let checker = TokenChecker::new(
        &settings.events_url,
        settings.events_proxy.as_ref(),
        settings.token_check_timeout,
        settings.token_check_concurrency,
        forwarders,
        metrics.token_checks.clone(),
    )?;
    let (listener, addr) =
        crate::net::bind(settings.listen)
            .await
            .map_err(|source| ApiStartError::Listen {
                addr: settings.listen,
                source,
            })?;

    let metrics_server = match own_metrics {
        Some(addr) => Some(
            crate::net::bind(addr)
                .await
                .map_err(|source| ApiStartError::Listen { addr, source })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_server.as_ref().map(|(_, addr)| *addr);

    let stop = CancellationToken::new();
    let cache = Arc::new(FacadeCache::default());
    let mut tasks = cache.start(&client, &settings.namespace, &stop);
    let admin = match &settings.admin_key {
        AdminKeySource::None => {
            tracing::warn!("No admin key is configured: the /api/users routes answer 401.");
            AdminKey::default()
        }
        AdminKeySource::Fixed(key) => AdminKey::fixed(Some(&key.0)),
        AdminKeySource::Secret(_) => AdminKey::default(),
    };
    let admin_watch = match &settings.admin_key {
        AdminKeySource::Secret(reference) => {
            let health = Arc::new(WatchHealth::default());
            tasks.push(tokio::spawn(follow_admin_key(
                Api::namespaced(client.clone(), &settings.namespace),
                reference.clone(),
                admin.clone(),
                health.clone(),
                stop.clone(),
            )));
            Some(health)
        }
        _ => None,
    };

    let (routes, document) = api_routes();
    let rate_limit = limits::rate_limit_layer(
        settings.rate_limit,
        limits::CallerKeyExtractor::new(cache.clone(), admin.clone()),
    )?;
    let document = serde_json::to_string(&document).unwrap_or_else(|_| "{}".to_owned());
    let state = AppState(Arc::new(Shared {
        client,
        namespace: settings.namespace.clone(),
        cache: cache.clone(),
        admin,
        admin_watch: admin_watch.clone(),
        checker,
        credentials_wait: settings.credentials_wait,
        write_wait: WRITE_WAIT,
        delete_wait: settings.delete_wait,
        max_listeners_per_user: settings.max_listeners_per_user,
        document,
    }));
    // The rate limit and the request timeout guard the API routes; probes and scrapes are
    // never refused for a client's sake.
    let app = routes
        .layer(axum::middleware::from_fn_with_state(
            settings.request_timeout,
            limits::request_timeout,
        ))
        .layer(rate_limit)
        .route("/api/openapi.json", get(openapi_json))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(input::MAX_BODY_BYTES))
        .with_state(state);

    if let Some((metrics_listener, _)) = metrics_server {
        let metrics_app = Router::new()
            .route("/metrics", get(metrics_text))
            .with_state(registry);
        let metrics_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(metrics_listener, metrics_app)
                .with_graceful_shutdown(metrics_stop.cancelled_owned())
                .await;
        }));
    }
    let server_stop = stop.clone();
    let header_read_timeout = settings.header_read_timeout;
    let task = tokio::spawn(async move {
        server::serve(listener, app, header_read_timeout, server_stop.clone()).await;
        server_stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
    });
    tracing::info!(%addr, namespace = %settings.namespace, "REST API started.");
    Ok(RunningApi {
        addr,
        metrics_addr,
        cache,
        admin_watch,
        stop,
        task,
    })
}

/// Keeps the admin key equal to a key of a Secret: a missing Secret or key disables the admin
/// routes until it appears.
async fn follow_admin_key(
    api: Api<Secret>,
    reference: SecretKeyName,
    admin: AdminKey,
    health: Arc<WatchHealth>,
    stop: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", reference.name));
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // The key found by a (re-)list in progress.
    let mut listed: Option<String> = None;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        health.record(event.is_ok());
        let key_of = |secret: &Secret| {
            let key = crate::conventions::secret_value(secret, &reference.key);
            if key.is_none() {
                tracing::warn!(secret = %reference.name, key = %reference.key, "The admin key Secret has no such key: the /api/users routes answer 401.");
            }
            key
        };
        match event {
            Ok(watcher::Event::Init) => listed = None,
            Ok(watcher::Event::InitApply(secret)) => listed = key_of(&secret),
            Ok(watcher::Event::InitDone) => {
                if listed.is_none() {
                    tracing::warn!(secret = %reference.name, "No admin key Secret: the /api/users routes answer 401 until it exists.");
                }
                admin.set(listed.take().as_deref());
                health.mark_synced();
            }
            Ok(watcher::Event::Apply(secret)) => admin.set(key_of(&secret).as_deref()),
            Ok(watcher::Event::Delete(_)) => {
                tracing::warn!(secret = %reference.name, "The admin key Secret was deleted: the /api/users routes answer 401.");
                admin.set(None);
            }
            Err(error) => {
                tracing::warn!(%error, "The watch of the admin key Secret failed; it retries.");
            }
        }
    }
}

async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.document.clone(),
    )
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    if state.cache.is_alive() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: a watch of the Kubernetes API has failed for too long",
        )
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let admin_ready = state.admin_watch.as_ref().is_none_or(|w| w.is_healthy());
    if state.cache.is_ready() && admin_ready {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: caches not synced or a watch is failing",
        )
    }
}

async fn metrics_text(State(registry): State<Arc<Mutex<Registry>>>) -> impl IntoResponse {
    let mut body = String::new();
    let encoded = {
        let registry = registry.lock();
        prometheus_client::encoding::text::encode(&mut body, &registry)
    };
    match encoded {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            "could not encode metrics".to_owned(),
        ),
    }
}

/// The answer of a DELETE whose objects are still there after the delete wait: they are being
/// deleted, but the operator has not confirmed yet that nothing routes to them.
pub(crate) fn deletion_unconfirmed(wait: Duration) -> ApiError {
    ApiError::Unavailable(format!(
        "The deletion is under way, but the operator did not confirm within {} that it stopped \
         delivering events for it; is the controller running?",
        humantime::format_duration(wait)
    ))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Endpoint not found.".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        api: ApiArgs,
    }

    #[test]
    fn defaults_and_the_two_admin_key_sources() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.api.api_listen.port(), 8082);
        assert_eq!(cli.api.api_metrics_listen.port(), 8083);
        assert!(cli.api.api_namespace.is_none());
        assert_eq!(cli.api.delete_wait, Duration::from_secs(10));
        assert_eq!((cli.api.rate_limit, cli.api.rate_burst), (20, 40));
        assert_eq!(cli.api.request_timeout, Duration::from_secs(60));
        assert_eq!(cli.api.header_read_timeout, Duration::from_secs(10));
        // A rate or burst of zero would refuse every request: refused at start instead.
        assert!(Cli::try_parse_from(["x", "--rate-limit", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--rate-burst", "0"]).is_err());
        let cli = Cli::try_parse_from(["x", "--admin-key-secret", "admin/key"]).unwrap();
        assert_eq!(
            cli.api.admin_key_secret,
            Some(SecretKeyName {
                name: "admin".into(),
                key: "key".into()
            })
        );
        assert_eq!("admin:key".parse::<SecretKeyName>().unwrap().key, "key");
        assert!("admin".parse::<SecretKeyName>().is_err());
        assert!("/key".parse::<SecretKeyName>().is_err());
        assert!(
            Cli::try_parse_from(["x", "--admin-key", "k", "--admin-key-secret", "a/b"]).is_err()
        );
        let cli = Cli::try_parse_from(["x", "--admin-key", "very-secret"]).unwrap();
        assert!(!format!("{:?}", cli.api).contains("very-secret"));
    }
}
