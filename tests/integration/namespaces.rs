//! One operator over several namespaces, under nothing but the chart's ServiceAccount and its
//! namespaced RBAC (so a cluster-wide list would be refused): it delivers in every watched
//! namespace, and a token's expiry deletes its Listeners in all of them. Also: the REST API's
//! metrics are served on the metrics port, never on the public API port.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crownstone_webhooks::crownstone::samples;
use reqwest::Method;

use crate::chart::{apply, free_port, kubeconfig_with_token, render};
use crate::support::api::{metric_value, Facade, Key};
use crate::support::cluster::{control_plane, eventually, run_ok, TestNamespace};
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::Receiver;
use crate::support::sim;

const SPHERE: &str = "sphere-1";
const ADMIN_KEY: &str = "namespaces-test-admin-key";

/// The `run` process, killed when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_watches_two_namespaces_on_the_charts_rbac_and_delivers_in_both() {
    let a = TestNamespace::new("ns-a").await;
    let b = TestNamespace::new("ns-b").await;
    let release = a.name.clone();
    let manifests = render(
        &release,
        &a.name,
        &[
            "--set",
            &format!("watchNamespaces={{{},{}}}", a.name, b.name),
            "--set",
            &format!("fullnameOverride={release}"),
            "--set",
            "leaderElection.enabled=false",
        ],
    );
    apply(a.kubeconfig(), &manifests, false);
    let token = run_ok(
        Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(a.kubeconfig())
            .args([
                "create",
                "token",
                &release,
                "-n",
                &a.name,
                "--duration",
                "1h",
            ]),
    );
    let dir = tempfile::tempdir().unwrap();
    let sa_kubeconfig = kubeconfig_with_token(dir.path(), &token);

    let (simulator, admin) = sim::start(Duration::from_millis(500)).await;
    let events_url = simulator.base_url();
    let api = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let _process = Process(
        Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
            .args([
                "run",
                "--watch-namespace",
                &format!("{},{}", a.name, b.name),
                "--api-namespace",
                &a.name,
                "--api-listen",
                &api,
                "--health-listen",
                &health,
                "--events-url",
                &events_url,
                "--status-interval",
                "200ms",
                "--allow-private-destinations",
            ])
            .env("KUBECONFIG", &sa_kubeconfig)
            .env("CROWNSTONE_USER_ADMIN_KEY", ADMIN_KEY)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the binary starts"),
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // Ready only once every watch of both namespaces has listed: under namespaced RBAC.
    eventually("the operator is ready", WAIT, || async {
        let response = http
            .get(format!("http://{health}/readyz"))
            .send()
            .await
            .ok()?;
        response.status().is_success().then_some(())
    })
    .await;

    let ha = Harness {
        ns: a,
        sim: Arc::new(simulator),
        admin,
        operator: None,
    };
    let hb = ha.beside(b);
    let receiver = Receiver::start().await;
    let token = ha.token("user-1", SPHERE).await;
    for h in [&ha, &hb] {
        h.create_user("acme", true, None).await;
        // The credentials Secret, made by the operator in each namespace.
        h.client_secret("acme").await;
        h.create_token_secret("token", &token).await;
        h.create_listener(
            "hook",
            "acme",
            "token",
            &["command"],
            receiver.url().as_str(),
            None,
        )
        .await;
        h.wait_ready("hook").await;
    }
    ha.wait_streams(1).await;
    ha.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(2, WAIT).await;

    // The API's metrics: off the public port, on the operator's metrics port.
    let answer = http
        .get(format!("http://{api}/api/users/isValidAdminKey"))
        .header("admin_key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    let public = http
        .get(format!("http://{api}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        public.status(),
        404,
        "the public API port serves no metrics"
    );
    let metrics = http
        .get(format!("http://{health}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric_value(
            &metrics,
            r#"crownstone_webhooks_api_requests_total{method="GET",route="/api/users/isValidAdminKey",status="200"}"#
        ) >= 1.0,
        "the API's requests are on the metrics port:\n{metrics}"
    );
    assert!(
        metrics.contains("crownstone_webhooks_forwarder_"),
        "{metrics}"
    );

    // The event server says the token expired: its Listeners go in both namespaces.
    ha.admin.revoke_token(&token).await.unwrap();
    ha.wait_gone("hook").await;
    hb.wait_gone("hook").await;
    ha.wait_streams(0).await;

    let _ = Command::new(&control_plane().kubectl)
        .arg("--kubeconfig")
        .arg(ha.ns.kubeconfig())
        .args([
            "delete",
            "clusterrole,clusterrolebinding",
            "-l",
            &format!("app.kubernetes.io/instance={release}"),
        ])
        .output();
}

#[tokio::test]
async fn the_api_process_serves_its_metrics_apart_from_the_public_port() {
    let f = Facade::start("api-metrics").await;
    let admin = f.admin();
    f.call(Method::GET, "/api/users/isValidAdminKey", admin, None)
        .await
        .expect(200);
    let public = f
        .call_at(f.base(), Method::GET, "/metrics", Key::None, None, None)
        .await;
    public.expect(404);
    let series = r#"crownstone_webhooks_api_requests_total{method="GET",route="/api/users/isValidAdminKey",status="200"}"#;
    eventually("the request counted on the metrics port", WAIT, || async {
        (f.metric(series).await >= 1.0).then_some(())
    })
    .await;
    assert_ne!(f.base(), f.metrics_base());
}
