//! The Kubernetes side of the benchmark: a private control plane started by
//! `hack/control-plane.sh`, the objects a run creates (WebhookUsers, token Secrets, Listeners),
//! the API server's request counters, and the operator and simulator processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crownstone_webhooks::conventions::MANAGED_BY;
use crownstone_webhooks::resources::{Listener, WebhookUser};
use crownstone_webhooks::simulator::{Scope, SimulatorClient, TokenRequest};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

use crate::system::{free_addr, ChildGuard};
use crate::BenchError;

/// Label on every object the benchmark creates: which token set it belongs to.
pub const SET_LABEL: &str = "bench.crownstone.rocks/set";
/// Listeners per WebhookUser.
pub const LISTENERS_PER_USER: usize = 100;
/// A daily allowance no run uses up.
const LARGE_ALLOWANCE: u64 = 1_000_000_000_000;
/// The event type every bench Listener subscribes to (the events are `switchStateUpdate`).
const EVENT_TYPE: &str = "switchStateUpdate";

/// A private etcd and kube-apiserver, stopped when dropped.
pub struct Plane {
    script: PathBuf,
    dir: PathBuf,
    _root: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    server: String,
    token: String,
    metrics_http: reqwest::Client,
    pub etcd_pid: u32,
    pub apiserver_pid: u32,
}

fn run(command: &mut Command) -> Result<String, BenchError> {
    let output = command
        .output()
        .map_err(|e| BenchError::new(format!("cannot run {command:?}: {e}")))?;
    if !output.status.success() {
        return Err(BenchError::new(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

impl Plane {
    /// Starts the plane (it also stops itself when this process exits) and applies the CRDs.
    pub fn start(repo: &Path) -> Result<Plane, BenchError> {
        let root = tempfile::Builder::new()
            .prefix("crownstone-webhooks-bench-")
            .tempdir()?;
        let dir = root.path().join("plane");
        let script = repo.join("hack/control-plane.sh");
        run(Command::new(&script)
            .arg("start")
            .arg(&dir)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .arg("--temporary"))?;
        let env = std::fs::read_to_string(dir.join("env"))?;
        let kubectl = env
            .lines()
            .find_map(|l| l.strip_prefix("KUBECTL="))
            .map(PathBuf::from)
            .ok_or_else(|| BenchError::new("the plane's env file names no kubectl"))?;
        let ports = std::fs::read_to_string(dir.join("ports"))?;
        let api_port = ports
            .lines()
            .find_map(|l| l.strip_prefix("api_port="))
            .ok_or_else(|| BenchError::new("the plane's ports file names no API port"))?
            .to_owned();
        let token = std::fs::read_to_string(dir.join("pki/tokens.csv"))?
            .split(',')
            .next()
            .unwrap_or_default()
            .to_owned();
        let ca = std::fs::read(dir.join("pki/ca.crt"))?;
        let pids: Vec<u32> = std::fs::read_to_string(dir.join("pids"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let metrics_http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()?;
        let plane = Plane {
            script,
            kubeconfig: dir.join("kubeconfig"),
            dir,
            _root: root,
            kubectl,
            server: format!("https://127.0.0.1:{api_port}"),
            token,
            metrics_http,
            etcd_pid: pids.first().copied().unwrap_or(0),
            apiserver_pid: pids.get(1).copied().unwrap_or(0),
        };
        let crds = repo.join("crds");
        run(Command::new(&plane.kubectl)
            .arg("--kubeconfig")
            .arg(&plane.kubeconfig)
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(&crds))?;
        run(Command::new(&plane.kubectl)
            .arg("--kubeconfig")
            .arg(&plane.kubeconfig)
            .args([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/listeners.webhooks.crownstone.rocks",
                "crd/webhookusers.webhooks.crownstone.rocks",
            ]))?;
        Ok(plane)
    }

    /// A client of the plane.
    pub async fn client(&self) -> Result<Client, BenchError> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| BenchError::new(format!("kubeconfig: {e}")))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| BenchError::new(format!("kubeconfig: {e}")))?;
        Ok(Client::try_from(config)?)
    }

    /// `apiserver_request_total` summed by `VERB resource[/subresource]`, with ` (code)` added
    /// for answers other than 2xx.
    pub async fn request_totals(&self) -> Result<BTreeMap<String, f64>, BenchError> {
        let text = self
            .metrics_http
            .get(format!("{}/metrics", self.server))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let mut totals = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\""))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let (verb, resource, sub) = (label("verb"), label("resource"), label("subresource"));
            let mut key = if sub.is_empty() {
                format!("{verb} {resource}")
            } else {
                format!("{verb} {resource}/{sub}")
            };
            // Failures apart: conflicts (409) show retried compare-and-swap writes.
            let code = label("code");
            if !code.starts_with('2') {
                key.push_str(&format!(" ({code})"));
            }
            *totals.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        Ok(totals)
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

/// API server requests per second between two `request_totals`, by verb and by the busiest
/// `VERB resource` pairs.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRates {
    pub seconds: f64,
    pub by_verb: BTreeMap<String, f64>,
    pub busiest: Vec<(String, f64)>,
}

impl RequestRates {
    pub fn between(
        before: &BTreeMap<String, f64>,
        after: &BTreeMap<String, f64>,
        seconds: f64,
    ) -> RequestRates {
        let seconds = seconds.max(1e-9);
        let mut by_verb = BTreeMap::new();
        let mut pairs = Vec::new();
        for (key, now) in after {
            let delta = now - before.get(key).copied().unwrap_or(0.0);
            if delta <= 0.0 {
                continue;
            }
            let verb = key.split(' ').next().unwrap_or_default().to_owned();
            *by_verb.entry(verb).or_insert(0.0) += delta / seconds;
            pairs.push((key.clone(), delta / seconds));
        }
        pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
        pairs.truncate(8);
        RequestRates {
            seconds,
            by_verb,
            busiest: pairs,
        }
    }

    /// `LIST 0.2/s, PATCH 31.0/s, …` for the table.
    pub fn summary(&self) -> String {
        self.by_verb
            .iter()
            .filter(|(verb, _)| *verb != "WATCH")
            .map(|(verb, rate)| format!("{verb} {rate:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A set of tokens with one Listener each, in one namespace: Listener `<p>-t-<i>` on Secret
/// `<p>-t-<i>-token`, owned by WebhookUser `<p>-u-<i/100>`, for Crownstone user
/// `<p>-user-<i>` whose token sees sphere `<p>-s-<i>`.
pub struct TokenSet {
    pub namespace: String,
    pub prefix: String,
    /// Tokens by index, as the simulator issued them.
    pub tokens: Vec<String>,
    /// Listeners per WebhookUser.
    pub per_user: usize,
}

impl TokenSet {
    pub fn new(namespace: &str, prefix: &str) -> TokenSet {
        TokenSet {
            namespace: namespace.to_owned(),
            prefix: prefix.to_owned(),
            tokens: Vec::new(),
            per_user: LISTENERS_PER_USER,
        }
    }

    /// A set whose Listeners all belong to one WebhookUser, as a service that registers many
    /// Crownstone users has them.
    pub fn one_owner(namespace: &str, prefix: &str) -> TokenSet {
        TokenSet {
            per_user: usize::MAX,
            ..TokenSet::new(namespace, prefix)
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn user(&self, index: usize) -> String {
        format!("{}-u-{:04}", self.prefix, index / self.per_user)
    }

    pub fn listener(&self, index: usize) -> String {
        format!("{}-t-{index:05}", self.prefix)
    }

    pub fn sphere(&self, index: usize) -> String {
        crate::load::sphere_id(&self.prefix, index)
    }

    pub fn spheres(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.sphere(i)).collect()
    }

    /// Grows the set to `to` tokens: simulator tokens, then (timed) the WebhookUsers, Secrets
    /// and Listeners, `concurrency` requests at a time. `url` gives each Listener's url.
    /// Returns how long the Kubernetes objects took to create.
    pub async fn grow(
        &mut self,
        client: &Client,
        simulator: &SimulatorClient,
        to: usize,
        concurrency: usize,
        url: impl Fn(usize) -> String,
    ) -> Result<Duration, BenchError> {
        let from = self.len();
        if to <= from {
            return Ok(Duration::ZERO);
        }
        let prefix = self.prefix.clone();
        let new_tokens: Vec<String> = futures::stream::iter(from..to)
            .map(|i| {
                let request = TokenRequest {
                    user_id: crate::load::user_id(&prefix, i),
                    spheres: vec![crate::load::sphere_id(&prefix, i)],
                    scopes: vec![Scope::All],
                    ttl_seconds: 7 * 24 * 3600,
                    email: None,
                    password: None,
                };
                async move { simulator.create_token(&request).await.map(|g| g.token) }
            })
            .buffered(concurrency)
            .try_collect()
            .await
            .map_err(|e| BenchError::new(format!("simulator token: {e}")))?;

        let started = Instant::now();
        let users: Vec<String> = {
            let mut users: Vec<String> = (from..to).map(|i| self.user(i)).collect();
            users.dedup();
            users
        };
        let user_api: Api<WebhookUser> = Api::namespaced(client.clone(), &self.namespace);
        futures::stream::iter(users)
            .map(|name| {
                let api = user_api.clone();
                let set = self.prefix.clone();
                async move {
                    let user: WebhookUser = serde_json::from_value(json!({
                        "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
                        "kind": "WebhookUser",
                        "metadata": {"name": name, "labels": {SET_LABEL: set}},
                        "spec": {"displayName": name, "enabled": true,
                                 "dailyAllowance": LARGE_ALLOWANCE},
                    }))?;
                    create_or_keep(&api, &user).await
                }
            })
            .buffer_unordered(concurrency)
            .try_collect::<Vec<()>>()
            .await?;

        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let listeners: Api<Listener> = Api::namespaced(client.clone(), &self.namespace);
        let work: Vec<(usize, String)> = new_tokens
            .iter()
            .enumerate()
            .map(|(n, token)| (from + n, token.clone()))
            .collect();
        futures::stream::iter(work)
            .map(|(i, token)| {
                let (secrets, listeners) = (secrets.clone(), listeners.clone());
                let name = self.listener(i);
                let owner = self.user(i);
                let set = self.prefix.clone();
                let user_id = crate::load::user_id(&self.prefix, i);
                let url = url(i);
                async move {
                    // Labelled as the REST facade labels its token Secrets: the facade reads
                    // them from its cache, and the operator deletes them with their Listener.
                    let secret: Secret = serde_json::from_value(json!({
                        "metadata": {"name": format!("{name}-token"),
                                     "labels": {MANAGED_BY.0: MANAGED_BY.1, SET_LABEL: &set}},
                        "stringData": {"token": token},
                    }))?;
                    create_or_keep(&secrets, &secret).await?;
                    let listener: Listener = serde_json::from_value(json!({
                        "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
                        "kind": "Listener",
                        "metadata": {"name": name, "labels": {SET_LABEL: set}},
                        "spec": {"owner": owner, "userId": user_id, "eventTypes": [EVENT_TYPE],
                                 "url": url,
                                 "tokenSecretRef": {"name": format!("{name}-token"), "key": "token"}},
                    }))?;
                    create_or_keep(&listeners, &listener).await
                }
            })
            .buffer_unordered(concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        let took = started.elapsed();
        self.tokens.extend(new_tokens);
        Ok(took)
    }

    /// Points every Listener of the set at `url(index)`.
    pub async fn repoint(
        &self,
        client: &Client,
        concurrency: usize,
        url: impl Fn(usize) -> String,
    ) -> Result<Duration, BenchError> {
        let started = Instant::now();
        let api: Api<Listener> = Api::namespaced(client.clone(), &self.namespace);
        futures::stream::iter(0..self.len())
            .map(|i| {
                let api = api.clone();
                let name = self.listener(i);
                let patch = json!({"spec": {"url": url(i)}});
                async move {
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(drop)
                }
            })
            .buffer_unordered(concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(started.elapsed())
    }
}

/// Creates `object`; one that exists already is kept.
async fn create_or_keep<K>(api: &Api<K>, object: &K) -> Result<(), BenchError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Creates a namespace.
pub async fn create_namespace(client: &Client, name: &str) -> Result<(), BenchError> {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    create_or_keep(&Api::<Namespace>::all(client.clone()), &namespace).await
}

/// Listeners of a namespace with a label selector.
pub async fn listeners(
    client: &Client,
    namespace: &str,
    selector: &str,
) -> Result<Vec<Listener>, BenchError> {
    let api: Api<Listener> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

/// One Listener (of a WebhookUser `owner`) for each url, all on `token`: the fan-out set.
pub async fn create_fanout(
    client: &Client,
    namespace: &str,
    set: &str,
    owner: &str,
    user_id: &str,
    token: &str,
    urls: &[String],
) -> Result<(), BenchError> {
    let users: Api<WebhookUser> = Api::namespaced(client.clone(), namespace);
    let user: WebhookUser = serde_json::from_value(json!({
        "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
        "kind": "WebhookUser",
        "metadata": {"name": owner, "labels": {SET_LABEL: set}},
        "spec": {"displayName": owner, "enabled": true, "dailyAllowance": LARGE_ALLOWANCE},
    }))?;
    create_or_keep(&users, &user).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret_name = format!("{set}-token");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": secret_name, "labels": {MANAGED_BY.0: MANAGED_BY.1, SET_LABEL: set}},
        "stringData": {"token": token},
    }))?;
    create_or_keep(&secrets, &secret).await?;
    let listeners: Api<Listener> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(urls.iter().enumerate())
        .map(|(i, url)| {
            let listeners = listeners.clone();
            let listener = serde_json::from_value::<Listener>(json!({
                "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
                "kind": "Listener",
                "metadata": {"name": format!("{set}-{i:03}"), "labels": {SET_LABEL: set}},
                "spec": {"owner": owner, "userId": user_id, "eventTypes": [EVENT_TYPE],
                         "url": url, "tokenSecretRef": {"name": secret_name, "key": "token"}},
            }));
            async move { create_or_keep(&listeners, &listener?).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The simulator, as its own release process.
pub struct SimulatorProcess {
    process: ChildGuard,
    pub url: String,
    pub admin: SimulatorClient,
}

impl SimulatorProcess {
    pub async fn start(exe: &Path, log: &Path) -> Result<SimulatorProcess, BenchError> {
        let addr = free_addr()?;
        let mut process = ChildGuard::spawn(
            "simulator",
            Command::new(exe)
                .args(["simulator", "--listen", &addr.to_string()])
                .args(["--ping-interval", "30s", "--log-format", "json"])
                .env("RUST_LOG", "warn"),
            log,
            Duration::from_secs(8),
        )?;
        let url = format!("http://{addr}");
        let admin = SimulatorClient::new(&url)
            .map_err(|e| BenchError::new(format!("simulator client: {e}")))?;
        wait_until("the simulator answers", Duration::from_secs(30), || async {
            admin.stats().await.is_ok()
        })
        .await?;
        process.check_running()?;
        Ok(SimulatorProcess {
            process,
            url,
            admin,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Streams open now.
    pub async fn open_streams(&self) -> Result<usize, BenchError> {
        Ok(self
            .admin
            .stats()
            .await
            .map_err(|e| BenchError::new(format!("simulator stats: {e}")))?
            .open_streams)
    }

    /// Waits, at most `limit`, until at least `streams` streams are open.
    pub async fn wait_streams(&self, streams: usize, limit: Duration) -> Result<(), BenchError> {
        wait_until(&format!("{streams} streams"), limit, || async {
            self.open_streams().await.is_ok_and(|n| n >= streams)
        })
        .await
    }
}

/// The operator (`crownstone-webhooks controller`), as its own release process.
pub struct OperatorProcess {
    process: ChildGuard,
    pub health: SocketAddr,
    http: reqwest::Client,
}

impl OperatorProcess {
    /// Starts it watching `namespace` and waits until it is ready.
    pub async fn start(
        exe: &Path,
        events_url: &str,
        namespace: &str,
        kubeconfig: &Path,
        log: &Path,
    ) -> Result<OperatorProcess, BenchError> {
        Self::start_with(exe, events_url, namespace, kubeconfig, log, &[]).await
    }

    /// Like [`start`](Self::start), with further environment variables.
    pub async fn start_with(
        exe: &Path,
        events_url: &str,
        namespace: &str,
        kubeconfig: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<OperatorProcess, BenchError> {
        let health = free_addr()?;
        let mut process = ChildGuard::spawn(
            "operator",
            Command::new(exe)
                .args(["controller", "--events-url", events_url])
                .args(["--watch-namespace", namespace])
                .args(["--health-listen", &health.to_string()])
                .args(["--allow-private-destinations", "--log-format", "json"])
                // Only so that stopping it between scenarios does not wait the default 20 s.
                .args(["--shutdown-grace", "3s"])
                .env("KUBECONFIG", kubeconfig)
                .env("RUST_LOG", "warn")
                .envs(env.iter().copied()),
            log,
            Duration::from_secs(15),
        )?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?;
        let ready = format!("http://{health}/readyz");
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            process.check_running()?;
            let answer = http.get(&ready).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if Instant::now() > until {
                return Err(BenchError::new(
                    "the operator did not become ready in 120 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(OperatorProcess {
            process,
            health,
            http,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> Result<Metrics, BenchError> {
        Metrics::fetch(&self.http, self.health).await
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        self.process.stop();
    }
}

/// A Prometheus text exposition.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub String);

impl Metrics {
    /// The `/metrics` text of the operator whose health port is `health`.
    pub async fn fetch(http: &reqwest::Client, health: SocketAddr) -> Result<Metrics, BenchError> {
        let text = http
            .get(format!("http://{health}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(Metrics(text))
    }

    /// Every series of `name` (exactly), summed, restricted to those with `label="value"`
    /// when given.
    pub fn sum(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.series(name)
            .filter(|(labels, _)| {
                label.is_none_or(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// How much each series of `name` grew since `before`, by the value of `label`; series
    /// that did not grow are left out.
    pub fn growth_by_label(
        &self,
        before: &Metrics,
        name: &str,
        label: &str,
    ) -> BTreeMap<String, f64> {
        let earlier = before.by_label(name, label);
        let mut grown = self.by_label(name, label);
        for (key, value) in grown.iter_mut() {
            *value -= earlier.get(key).copied().unwrap_or(0.0);
        }
        grown.retain(|_, v| *v > 0.0);
        grown
    }

    /// The values of `name` by the value of `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (labels, value) in self.series(name) {
            let key = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(label)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default();
            *out.entry(key).or_insert(0.0) += value;
        }
        out
    }

    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.lines().filter_map(move |line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
                rest.rsplit_once("} ")?
            } else {
                ("", rest.strip_prefix(' ')?)
            };
            Some((labels, value.split_whitespace().next()?.parse().ok()?))
        })
    }
}

/// Polls `check` until it holds, or fails with `what` after `deadline`.
pub async fn wait_until<F, Fut>(
    what: &str,
    deadline: Duration,
    mut check: F,
) -> Result<(), BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(BenchError::new(format!(
                "timed out after {deadline:?} waiting for {what}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
