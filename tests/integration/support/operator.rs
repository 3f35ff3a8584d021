//! An operator under test: the simulator, the operator itself (in this process, scoped to the
//! test's namespace), and helpers to create WebhookUsers, token Secrets and Listeners.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use crownstone_webhooks::clock::{SharedClock, SystemClock};
use crownstone_webhooks::config::OperatorArgs;
use crownstone_webhooks::conventions::{managed_labels, CLIENT_SECRET};
use crownstone_webhooks::operator::{self, RunningOperator};
use crownstone_webhooks::resources::{Listener, ListenerStatus, WebhookUser};
use crownstone_webhooks::simulator::{RunningSimulator, Scope, SimulatorClient};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use serde_json::json;
use url::Url;

use super::cluster::{eventually, TestNamespace};
use super::sim;

/// How long a test waits for any one thing.
pub const WAIT: Duration = Duration::from_secs(30);

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    operator: OperatorArgs,
}

/// Lets deliveries reach the tests' receivers on loopback.
pub const ALLOW_LOOPBACK: &[&str] = &["--allow-private-destinations"];

/// Operator settings for tests, watching one namespace: fast status writes, reconnects and
/// retries, plus `extra`.
pub fn test_args(events_url: &str, namespace: &str, extra: &[&str]) -> OperatorArgs {
    let mut flags = vec!["--watch-namespace", namespace];
    flags.extend_from_slice(extra);
    all_namespaces_args(events_url, &flags)
}

/// Operator settings for tests, watching every namespace; a flag in `extra` replaces the
/// test default of the same name.
pub fn all_namespaces_args(events_url: &str, extra: &[&str]) -> OperatorArgs {
    let defaults = [
        ("--events-url", events_url),
        ("--health-listen", "127.0.0.1:0"),
        ("--status-interval", "200ms"),
        ("--counters-interval", "200ms"),
        ("--silence-timeout", "5s"),
        ("--reconnect-initial", "100ms"),
        ("--reconnect-max", "500ms"),
        ("--delivery-retry-initial", "10ms"),
        ("--delivery-retry-max", "50ms"),
        ("--shutdown-grace", "2s"),
    ];
    let mut flags = vec!["operator"];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            flags.extend([flag, value]);
        }
    }
    flags.extend_from_slice(extra);
    Flags::try_parse_from(flags)
        .expect("test flags parse")
        .operator
}

/// A namespace, a simulator and an operator watching that namespace.
pub struct Harness {
    pub ns: TestNamespace,
    /// Shared, so a second namespace's harness can use the same simulator.
    pub sim: Arc<RunningSimulator>,
    pub admin: SimulatorClient,
    pub operator: Option<RunningOperator>,
}

impl Harness {
    pub async fn start(prefix: &str) -> Harness {
        Harness::start_with(prefix, Arc::new(SystemClock), ALLOW_LOOPBACK).await
    }

    pub async fn start_with(prefix: &str, clock: SharedClock, extra: &[&str]) -> Harness {
        Harness::start_in(TestNamespace::new(prefix).await, clock, extra).await
    }

    /// An operator watching `ns`, which may live on a control plane of the test's own.
    pub async fn start_in(ns: TestNamespace, clock: SharedClock, extra: &[&str]) -> Harness {
        let (sim, admin) = sim::start(Duration::from_millis(500)).await;
        let operator = operator::start(
            ns.client.clone(),
            test_args(&sim.base_url(), &ns.name, extra),
            clock,
        )
        .await
        .expect("operator starts");
        Harness {
            ns,
            sim: Arc::new(sim),
            admin,
            operator: Some(operator),
        }
    }

    /// An operator watching every namespace of the control plane `ns` lives on; give it a plane
    /// of the test's own, or it would reconcile other tests' objects.
    pub async fn start_all_namespaces(ns: TestNamespace, extra: &[&str]) -> Harness {
        let (sim, admin) = sim::start(Duration::from_millis(500)).await;
        let operator = operator::start(
            ns.client.clone(),
            all_namespaces_args(&sim.base_url(), extra),
            Arc::new(SystemClock),
        )
        .await
        .expect("operator starts");
        Harness {
            ns,
            sim: Arc::new(sim),
            admin,
            operator: Some(operator),
        }
    }

    /// A harness for another namespace that shares this one's simulator, without an operator
    /// of its own (an all-namespaces operator, or none, watches it).
    pub fn beside(&self, ns: TestNamespace) -> Harness {
        Harness {
            ns,
            sim: self.sim.clone(),
            admin: self.admin.clone(),
            operator: None,
        }
    }

    /// Stops the operator, as a SIGTERM would.
    pub async fn stop_operator(&mut self) {
        if let Some(operator) = self.operator.take() {
            operator.shutdown().await;
        }
    }

    /// Starts the operator again.
    pub async fn restart_operator(&mut self) {
        self.stop_operator().await;
        let operator = operator::start(
            self.ns.client.clone(),
            test_args(&self.sim.base_url(), &self.ns.name, ALLOW_LOOPBACK),
            Arc::new(SystemClock),
        )
        .await
        .expect("operator restarts");
        self.operator = Some(operator);
    }

    /// A token for `user_id` on sphere `sphere` with scope `all`.
    pub async fn token(&self, user_id: &str, sphere: &str) -> String {
        sim::token(&self.admin, user_id, &[sphere], &[Scope::All], 3600).await
    }

    pub async fn create_user(&self, name: &str, enabled: bool, allowance: Option<u64>) {
        let mut spec = json!({"displayName": name, "enabled": enabled});
        if let Some(allowance) = allowance {
            spec["dailyAllowance"] = json!(allowance);
        }
        let user: WebhookUser = serde_json::from_value(json!({
            "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
            "kind": "WebhookUser",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .unwrap();
        self.ns
            .api::<WebhookUser>()
            .create(&PostParams::default(), &user)
            .await
            .expect("create WebhookUser");
    }

    /// The client secret the operator generated for a user.
    pub async fn client_secret(&self, user: &str) -> String {
        let secrets = self.ns.api::<Secret>();
        let name = format!("{user}-credentials");
        eventually("the credentials Secret", WAIT, || async {
            let secret = secrets.get_opt(&name).await.ok()??;
            let value = secret.data?.get(CLIENT_SECRET)?.0.clone();
            String::from_utf8(value).ok()
        })
        .await
    }

    pub async fn create_token_secret(&self, name: &str, token: &str) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "token".to_owned(),
                ByteString(token.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        self.ns
            .api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .expect("create token Secret");
    }

    /// A token Secret marked as managed by the operator, as the REST facade makes them: it is
    /// deleted with the last Listener that names it.
    pub async fn create_managed_token_secret(&self, name: &str, token: &str) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(managed_labels()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "token".to_owned(),
                ByteString(token.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        self.ns
            .api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .expect("create managed token Secret");
    }

    /// The fixture most tests start from: WebhookUser `owner` (made if missing), a fresh token of
    /// `user-1` on `sphere-1` in Secret `<name>-token`, and Listener `name` on it posting `types`
    /// to `url`, waited for until it is Ready. Returns the token.
    pub async fn ready_listener(
        &self,
        name: &str,
        owner: &str,
        types: &[&str],
        url: &Url,
    ) -> String {
        if self
            .ns
            .api::<WebhookUser>()
            .get_opt(owner)
            .await
            .expect("read WebhookUser")
            .is_none()
        {
            self.create_user(owner, true, None).await;
        }
        let token = self.token("user-1", "sphere-1").await;
        let secret = format!("{name}-token");
        self.create_token_secret(&secret, &token).await;
        self.create_listener(name, owner, &secret, types, url.as_str(), None)
            .await;
        self.wait_ready(name).await;
        token
    }

    /// The value of one series of the in-process operator's metrics, such as
    /// `crownstone_webhooks_forwarder_skipped_total{reason="owner_disabled"}`; 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let operator = self
            .operator
            .as_ref()
            .expect("the operator runs in this process");
        let text = reqwest::get(format!("http://{}/metrics", operator.health_addr()))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until a metric series reaches at least `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64) {
        eventually(&format!("{series} >= {at_least}"), WAIT, || async {
            (self.metric(series).await >= at_least).then_some(())
        })
        .await
    }

    /// Waits until a Listener's status satisfies `check`, and returns that status.
    pub async fn wait_status<F>(&self, listener: &str, what: &str, check: F) -> ListenerStatus
    where
        F: Fn(&ListenerStatus) -> bool,
    {
        let api = self.ns.api::<Listener>();
        eventually(&format!("{listener}: {what}"), WAIT, || async {
            let status = api.get(listener).await.ok()?.status?;
            check(&status).then_some(status)
        })
        .await
    }

    /// Waits until a WebhookUser's Ready condition has this reason.
    pub async fn wait_user_reason(&self, user: &str, status: &str, reason: &str) {
        let api = self.ns.api::<WebhookUser>();
        eventually(
            &format!("{user}: Ready={status} ({reason})"),
            WAIT,
            || async {
                let c = api.get(user).await.ok()?.condition("Ready")?.clone();
                (c.status == status && c.reason == reason).then_some(())
            },
        )
        .await
    }

    /// Waits until a Secret is gone.
    pub async fn wait_secret_gone(&self, name: &str) {
        let secrets = self.ns.api::<Secret>();
        eventually(&format!("Secret {name} deleted"), WAIT, || async {
            secrets.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await
    }

    /// A Listener for `owner` on the token in Secret `secret`, posting `types` to `url`.
    pub async fn create_listener(
        &self,
        name: &str,
        owner: &str,
        secret: &str,
        types: &[&str],
        url: &str,
        expires_at: Option<&str>,
    ) {
        let mut spec = json!({
            "owner": owner,
            "userId": "user-1",
            "eventTypes": types,
            "url": url,
            "tokenSecretRef": {"name": secret, "key": "token"},
        });
        if let Some(at) = expires_at {
            spec["expiresAt"] = json!(at);
        }
        let listener: Listener = serde_json::from_value(json!({
            "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
            "kind": "Listener",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .unwrap();
        self.ns
            .api::<Listener>()
            .create(&PostParams::default(), &listener)
            .await
            .expect("create Listener");
    }

    /// Waits until the Listener's condition has this status and reason.
    pub async fn wait_condition(&self, listener: &str, type_: &str, status: &str, reason: &str) {
        self.wait_condition_within(listener, type_, status, reason, WAIT)
            .await
    }

    /// Like `wait_condition`, with a deadline of its own.
    pub async fn wait_condition_within(
        &self,
        listener: &str,
        type_: &str,
        status: &str,
        reason: &str,
        deadline: Duration,
    ) {
        let api = self.ns.api::<Listener>();
        eventually(
            &format!("{listener}: {type_}={status} ({reason})"),
            deadline,
            || async {
                let l = api.get(listener).await.ok()?;
                let c = l.condition(type_)?;
                (c.status == status && c.reason == reason).then_some(())
            },
        )
        .await
    }

    /// Waits until the Listener streams.
    pub async fn wait_ready(&self, listener: &str) {
        self.wait_condition(listener, "Ready", "True", "Forwarding")
            .await
    }

    /// Waits until a Listener is gone from the API server.
    pub async fn wait_gone(&self, listener: &str) {
        let api = self.ns.api::<Listener>();
        eventually(&format!("{listener} deleted"), WAIT, || async {
            match api.get_opt(listener).await {
                Ok(None) => Some(()),
                _ => None,
            }
        })
        .await
    }

    /// Waits until the simulator has exactly `n` open streams.
    pub async fn wait_streams(&self, n: usize) {
        eventually(&format!("{n} open streams"), WAIT, || async {
            (self.admin.stats().await.ok()?.open_streams == n).then_some(())
        })
        .await
    }
}

/// The operator binary run as its own process, as a pod runs it, with its output in a file.
pub struct OperatorProcess {
    /// `None` once stopped.
    child: Option<std::process::Child>,
    log: tempfile::NamedTempFile,
}

impl OperatorProcess {
    /// Starts `crownstone-webhooks controller` against the test run's control plane, watching
    /// `namespace`, with fast test settings, `RUST_LOG=rust_log`, logs in `log_format`, and
    /// `extra` flags.
    pub fn spawn(
        events_url: &str,
        namespace: &str,
        log_format: &str,
        rust_log: &str,
        extra: &[&str],
    ) -> OperatorProcess {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let out = log.reopen().expect("log file opens");
        let err = log.reopen().expect("log file opens");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
            .args([
                "controller",
                "--events-url",
                events_url,
                "--watch-namespace",
                namespace,
                "--health-listen",
                "127.0.0.1:0",
                "--status-interval",
                "200ms",
                "--counters-interval",
                "200ms",
                "--delivery-retry-initial",
                "10ms",
                "--delivery-retry-max",
                "20ms",
                "--delivery-max-attempts",
                "2",
                "--allow-private-destinations",
                "--log-format",
                log_format,
            ])
            .args(extra)
            .env("KUBECONFIG", &super::cluster::control_plane().kubeconfig)
            .env("RUST_LOG", rust_log)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("operator binary starts");
        OperatorProcess {
            child: Some(child),
            log,
        }
    }

    /// Stops it with SIGTERM, as Kubernetes stops a pod, and returns everything it logged.
    pub async fn stop(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
        std::fs::read_to_string(self.log.path()).expect("log readable")
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
    }
}
