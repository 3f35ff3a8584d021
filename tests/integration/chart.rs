//! The Helm chart on a real API server: lint, render with default and with every option, apply
//! (server-side dry run, then for real), and run two replicas with nothing but the chart's
//! ServiceAccount token through a Listener's life, a denied Secret read, and a leader failover.
//! Also keeps the Dockerfile and Tiltfile honest against the chart.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crownstone_webhooks::crownstone::samples;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde::Deserialize;
use serde_yaml::Value;

use crate::support::cluster::{
    client_for, control_plane, eventually, helm, repo, run_ok, TestNamespace,
};
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::Receiver;
use crate::support::sim;

const SPHERE: &str = "sphere-1";

fn chart() -> PathBuf {
    repo().join("charts/crownstone-webhooks")
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/integration/fixtures").join(name)
}

/// `helm template` of the chart as release `release` in `namespace`, with `args`.
pub(crate) fn render(release: &str, namespace: &str, args: &[&str]) -> String {
    run_ok(
        Command::new(helm())
            .args(["template", release])
            .arg(chart())
            .args(["--namespace", namespace])
            .args(args),
    )
}

/// Applies manifests with kubectl, server-side; `dry_run` asks the server to check them only.
pub(crate) fn apply(kubeconfig: &Path, manifests: &str, dry_run: bool) {
    let mut child = Command::new(&control_plane().kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "--server-side", "--force-conflicts", "-f", "-"])
        .args(if dry_run {
            &["--dry-run=server"][..]
        } else {
            &[][..]
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifests.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kubectl apply (dry run: {dry_run}) failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn values() -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap()
}

/// Every leaf path of a YAML mapping, such as `delivery.timeout`.
fn leaf_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Mapping(map) if !map.is_empty() => {
            for (key, child) in map {
                let key = key.as_str().unwrap();
                let path = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                if matches!(
                    path.as_str(),
                    "resources" | "podSecurityContext" | "securityContext"
                ) {
                    out.push(path);
                } else {
                    leaf_paths(child, &path, out);
                }
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn the_charts_crds_are_the_repositorys() {
    let ours = std::fs::read(repo().join("crds/crownstone-webhooks.yaml")).unwrap();
    let charts = std::fs::read(chart().join("crds/crownstone-webhooks.yaml")).unwrap();
    assert!(
        ours == charts,
        "charts/crownstone-webhooks/crds differs from crds/: copy crds/crownstone-webhooks.yaml"
    );
}

#[test]
fn the_chart_lints_clean_and_its_readme_lists_every_value() {
    for extra in [
        vec![],
        vec!["-f", "tests/integration/fixtures/chart-all-options.yaml"],
    ] {
        let output = run_ok(
            Command::new(helm())
                .current_dir(repo())
                .arg("lint")
                .arg(chart())
                .args(&extra),
        );
        assert!(
            !output.contains("[WARNING]") && !output.contains("[INFO]"),
            "{output}"
        );
    }
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let mut paths = Vec::new();
    leaf_paths(&values(), "", &mut paths);
    for path in paths {
        assert!(
            readme.contains(&format!("`{path}`")),
            "the chart README misses {path}"
        );
    }
}

#[test]
fn the_schema_refuses_bad_values_with_a_clear_message() {
    for (set, says) in [
        ("replicaCount=two", "/replicaCount"),
        ("delivery.timeout=soon", "/delivery/timeout"),
        ("mode=everything", "/mode"),
        ("eventsUrl=ftp://x", "/eventsUrl"),
        ("containerPorts.api=70000", "/containerPorts/api"),
        ("replicas=2", "replicas"),
        ("watchNamespaces={team-a,Team_B}", "/watchNamespaces/1"),
        ("watchNamespaces=team-a", "/watchNamespaces"),
        ("clusterWide=maybe", "/clusterWide"),
        ("standby=hot", "/standby"),
        (
            "handover.progressInterval=fast",
            "/handover/progressInterval",
        ),
        ("containerPorts.handover=0", "/containerPorts/handover"),
        ("traces.otlpEndpoint=collector:4317", "/traces/otlpEndpoint"),
        ("dashboards.label=", "/dashboards/label"),
        ("sharding.enabled=yes", "/sharding/enabled"),
        ("autoscaling.maxReplicas=0", "/autoscaling/maxReplicas"),
        (
            "autoscaling.targetCPUUtilizationPercentage=high",
            "/autoscaling/targetCPUUtilizationPercentage",
        ),
    ] {
        let output = Command::new(helm())
            .args(["template", "r"])
            .arg(chart())
            .args(["--set", set])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{set} was accepted");
        assert!(stderr.contains(says), "{set}: {stderr}");
    }
}

/// The documents of a render, by kind and name.
pub(crate) fn documents(rendered: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(rendered)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

pub(crate) fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

/// The operator container's environment variable `name`.
fn env<'a>(deployment: &'a Value, name: &str) -> Option<&'a Value> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
}

fn container_port(deployment: &Value, name: &str) -> Option<u64> {
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
}

#[test]
fn the_handover_parts_render_as_configured() {
    let docs = documents(&render("r", "ns", &[]));
    let deployment = find(&docs, "Deployment", "r-crownstone-webhooks").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    // A generated key, long enough for the binary to accept it.
    let secret = find(&docs, "Secret", "r-crownstone-webhooks-handover").unwrap();
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        secret["data"]["handoverKey"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(key.len(), 48);
    assert_eq!(
        secret["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let key_ref = &env(deployment, "HANDOVER_KEY").unwrap()["valueFrom"]["secretKeyRef"];
    assert_eq!(key_ref["name"], "r-crownstone-webhooks-handover");
    assert_eq!(key_ref["key"], "handoverKey");
    assert_eq!(
        env(deployment, "POD_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(
        env(deployment, "HANDOVER_LISTEN").unwrap()["value"],
        "0.0.0.0:8084"
    );
    assert_eq!(
        env(deployment, "HANDOVER_PROGRESS_INTERVAL").unwrap()["value"],
        "500ms"
    );
    assert_eq!(env(deployment, "STANDBY").unwrap()["value"], "warm");
    assert_eq!(container_port(deployment, "handover"), Some(8084));
    // 2 x 20 s of drain and status writes, 2 s for the final batch, 3 s to hand over.
    assert_eq!(pod["terminationGracePeriodSeconds"], 45);
    let startup = &pod["containers"][0]["startupProbe"];
    assert_eq!(startup["httpGet"]["path"], "/readyz");
    assert_eq!(startup["failureThreshold"], 150);
    let spread = &pod["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "r"
    );

    for (grace, seconds) in [("1m30s", 185), ("1500ms", 8)] {
        let docs = documents(&render(
            "r",
            "ns",
            &["--set", &format!("shutdownGrace={grace}")],
        ));
        let deployment = find(&docs, "Deployment", "r-crownstone-webhooks").unwrap();
        assert_eq!(
            deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], seconds,
            "{grace}"
        );
    }

    // Every option: the key from the Secret named, its port, the policy letting replicas in.
    let all = fixture("chart-all-options.yaml");
    let docs = documents(&render("r", "ns", &["-f", all.to_str().unwrap()]));
    let deployment = find(&docs, "Deployment", "r-crownstone-webhooks").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(!docs.iter().any(|d| d["kind"] == "Secret"
        && d["metadata"]["name"]
            .as_str()
            .unwrap()
            .ends_with("-handover")));
    let key_ref = &env(deployment, "HANDOVER_KEY").unwrap()["valueFrom"]["secretKeyRef"];
    assert_eq!(key_ref["name"], "my-handover-key");
    assert_eq!(key_ref["key"], "key");
    assert_eq!(container_port(deployment, "handover"), Some(9084));
    assert_eq!(env(deployment, "STANDBY").unwrap()["value"], "cold");
    assert_eq!(pod["terminationGracePeriodSeconds"], 90);
    assert!(pod["affinity"].is_null(), "spreadAcrossNodes is off");
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "topology.kubernetes.io/zone"
    );
    let policy = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("NetworkPolicy"))
        .unwrap();
    let handover_rule = policy["spec"]["ingress"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|rule| rule["ports"][0]["port"] == "handover")
        .expect("replicas may reach each other's handover port");
    assert_eq!(
        handover_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "r"
    );

    // No transport: no key, no port, no Secret.
    for off in ["handover.enabled=false", "leaderElection.enabled=false"] {
        let docs = documents(&render(
            "r",
            "ns",
            &["--set", off, "--set", "networkPolicy.enabled=true"],
        ));
        let deployment = find(&docs, "Deployment", "r-crownstone-webhooks").unwrap();
        assert!(env(deployment, "HANDOVER_KEY").is_none(), "{off}");
        assert!(env(deployment, "POD_IP").is_none(), "{off}");
        assert_eq!(container_port(deployment, "handover"), None, "{off}");
        assert!(find(&docs, "Secret", "r-crownstone-webhooks-handover").is_none());
        let policy = find(&docs, "NetworkPolicy", "r-crownstone-webhooks").unwrap();
        assert!(!serde_yaml::to_string(policy).unwrap().contains("handover"));
    }
}

/// The verbs the chart's `-leader` Role grants on Leases of any name.
fn unnamed_lease_verbs(docs: &[Value], release: &str) -> HashSet<String> {
    let role = find(
        docs,
        "Role",
        &format!("{release}-crownstone-webhooks-leader"),
    )
    .unwrap();
    role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|rule| rule["resources"][0] == "leases" && rule["resourceNames"].is_null())
        .flat_map(|rule| rule["verbs"].as_sequence().unwrap().iter())
        .map(|verb| verb.as_str().unwrap().to_owned())
        .collect()
}

/// A render the chart refuses, and what it says.
fn refused(sets: &[&str]) -> String {
    let mut command = Command::new(helm());
    command.args(["template", "r"]).arg(chart());
    for set in sets {
        command.args(["--set", set]);
    }
    let output = command.output().unwrap();
    assert!(!output.status.success(), "{sets:?} rendered");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn sharding_and_autoscaling_render_only_when_they_can_work() {
    // Off by default: no sharding variables, a fixed replica count, no autoscaler, and no Lease
    // rule beyond the leader's.
    let docs = documents(&render("r", "ns", &[]));
    let deployment = find(&docs, "Deployment", "r-crownstone-webhooks").unwrap();
    assert!(env(deployment, "SHARDING").is_none());
    assert!(env(deployment, "SHARD_LEASE_PREFIX").is_none());
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert!(!docs.iter().any(|d| d["kind"] == "HorizontalPodAutoscaler"));
    assert_eq!(
        unnamed_lease_verbs(&docs, "r"),
        HashSet::from(["create".to_owned()])
    );

    // On: member Leases named after the leader's Lease, and the rule to apply, list and delete
    // them; the replica count is still the chart's.
    let docs = documents(&render(
        "r",
        "ns",
        &["--set", "sharding.enabled=true", "--set", "replicaCount=4"],
    ));
    let deployment = find(&docs, "Deployment", "r-crownstone-webhooks").unwrap();
    assert_eq!(env(deployment, "SHARDING").unwrap()["value"], "true");
    let prefix = &env(deployment, "SHARD_LEASE_PREFIX").unwrap()["value"];
    assert_eq!(prefix, "r-crownstone-webhooks");
    assert_eq!(
        prefix,
        &env(deployment, "LEADER_ELECTION_LEASE").unwrap()["value"]
    );
    assert_eq!(deployment["spec"]["replicas"], 4);
    assert!(!docs.iter().any(|d| d["kind"] == "HorizontalPodAutoscaler"));
    assert_eq!(
        unnamed_lease_verbs(&docs, "r"),
        ["get", "list", "create", "patch", "delete"]
            .map(str::to_owned)
            .into()
    );

    // With an autoscaler: it scales the Deployment as configured, and the Deployment leaves its
    // replica count to it (a count there would reset the autoscaler's on every upgrade).
    let docs = documents(&render(
        "r",
        "ns",
        &[
            "--set",
            "sharding.enabled=true",
            "--set",
            "autoscaling.enabled=true",
            "--set",
            "autoscaling.minReplicas=3",
            "--set",
            "autoscaling.maxReplicas=8",
            "--set",
            "autoscaling.targetCPUUtilizationPercentage=60",
        ],
    ));
    let deployment = find(&docs, "Deployment", "r-crownstone-webhooks").unwrap();
    assert!(
        !deployment["spec"]
            .as_mapping()
            .unwrap()
            .contains_key("replicas"),
        "{deployment:?}"
    );
    let hpa = find(&docs, "HorizontalPodAutoscaler", "r-crownstone-webhooks").unwrap();
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["metadata"]["namespace"], "ns");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["apiVersion"], "apps/v1");
    assert_eq!(target["kind"], "Deployment");
    assert_eq!(target["name"], "r-crownstone-webhooks");
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    assert_eq!(hpa["spec"]["maxReplicas"], 8);
    let metric = &hpa["spec"]["metrics"][0];
    assert_eq!(metric["type"], "Resource");
    assert_eq!(metric["resource"]["name"], "cpu");
    assert_eq!(metric["resource"]["target"]["type"], "Utilization");
    assert_eq!(metric["resource"]["target"]["averageUtilization"], 60);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"],
        "100m"
    );
    assert!(find(&docs, "PodDisruptionBudget", "r-crownstone-webhooks").is_some());
    // The budget follows the autoscaler's floor, not the unused replicaCount.
    let docs = documents(&render(
        "r",
        "ns",
        &[
            "--set",
            "sharding.enabled=true",
            "--set",
            "autoscaling.enabled=true",
            "--set",
            "autoscaling.minReplicas=1",
            "--set",
            "replicaCount=3",
        ],
    ));
    assert!(find(&docs, "PodDisruptionBudget", "r-crownstone-webhooks").is_none());

    // Values that cannot work are refused, saying what is missing.
    for (sets, says) in [
        (
            &["sharding.enabled=true", "leaderElection.enabled=false"][..],
            "sharding.enabled needs leaderElection.enabled",
        ),
        (
            &["sharding.enabled=true", "handover.enabled=false"][..],
            "sharding.enabled needs handover.enabled",
        ),
        (
            &["autoscaling.enabled=true"][..],
            "autoscaling.enabled needs sharding.enabled",
        ),
        (
            &[
                "sharding.enabled=true",
                "autoscaling.enabled=true",
                "resources.requests.cpu=null",
            ][..],
            "autoscaling.enabled needs resources.requests.cpu",
        ),
    ] {
        let stderr = refused(sets);
        assert!(stderr.contains(says), "{sets:?}: {stderr}");
    }
}

#[test]
fn the_dockerfile_and_tiltfile_agree_with_the_chart() {
    let values = values();
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let tiltfile = std::fs::read_to_string(repo().join("Tiltfile")).unwrap();
    let user = values["podSecurityContext"]["runAsUser"].as_u64().unwrap();
    assert!(
        dockerfile.contains(&format!("USER {user}:{user}")),
        "image user"
    );
    assert!(
        dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/crownstone-webhooks"]"#),
        "entrypoint"
    );
    let mode = values["mode"].as_str().unwrap();
    assert!(
        dockerfile.contains(&format!(r#"CMD ["{mode}"]"#)),
        "default subcommand"
    );
    let api = values["containerPorts"]["api"].as_u64().unwrap();
    let health = values["containerPorts"]["health"].as_u64().unwrap();
    let handover = values["containerPorts"]["handover"].as_u64().unwrap();
    assert!(
        dockerfile.contains(&format!("EXPOSE {api} {health} {handover}")),
        "ports"
    );
    let image = values["image"]["repository"].as_str().unwrap();
    assert!(
        tiltfile.contains(&format!("IMAGE = '{image}'")),
        "Tilt image"
    );
    // The build arguments Tilt passes are ones the Dockerfile reads.
    for argument in ["RELEASE_LTO", "RELEASE_CODEGEN_UNITS"] {
        assert!(
            tiltfile.contains(&format!("'{argument}':")),
            "Tilt sets {argument}"
        );
        assert!(
            dockerfile.contains(&format!("ARG {argument}=")),
            "the Dockerfile reads {argument}"
        );
    }
    for port in [api, health] {
        assert!(
            tiltfile.contains(&format!("'{port}:{port}'")),
            "Tilt forwards {port}"
        );
    }
    // Tilt's workload is the Deployment of release `crownstone-webhooks`, with its values.
    let rendered = render(
        "crownstone-webhooks",
        "crownstone-webhooks",
        &["-f", repo().join("hack/tilt-values.yaml").to_str().unwrap()],
    );
    assert!(rendered.contains("kind: Deployment\nmetadata:\n  name: crownstone-webhooks\n"));
    assert!(tiltfile.contains("k8s_resource('crownstone-webhooks'"));
    // The binary really has the subcommand the image runs.
    let help =
        run_ok(Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks")).args([mode, "--help"]));
    assert!(help.contains("--health-listen"));
}

#[tokio::test]
async fn both_renders_apply_to_a_real_api_server() {
    let ns = TestNamespace::new("chart-apply").await;
    let kubeconfig = ns.kubeconfig().to_owned();
    run_ok(
        Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["apply", "--server-side", "-f"])
            .arg(fixture("servicemonitor-crd.yaml"))
            .arg("-f")
            .arg(fixture("prometheusrule-crd.yaml")),
    );
    run_ok(
        Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "wait",
                "--for=condition=Established",
                "crd/servicemonitors.monitoring.coreos.com",
                "crd/prometheusrules.monitoring.coreos.com",
            ]),
    );
    let all = fixture("chart-all-options.yaml");
    let renders = [
        (
            format!("{}-default", ns.name),
            render(&format!("{}-default", ns.name), &ns.name, &[]),
        ),
        (
            format!("{}-all", ns.name),
            render(
                &format!("{}-all", ns.name),
                &ns.name,
                &[
                    "-f",
                    all.to_str().unwrap(),
                    "--set",
                    &format!("watchNamespaces={{{}}}", ns.name),
                ],
            ),
        ),
    ];
    for (release, manifests) in &renders {
        apply(&kubeconfig, manifests, true);
        apply(&kubeconfig, manifests, false);
        let deployments = run_ok(
            Command::new(&control_plane().kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["get", "deployments", "-n", &ns.name, "-o", "name"]),
        );
        assert!(deployments.contains(release.as_str()), "{deployments}");
    }
    let kinds = run_ok(
        Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "get",
                "servicemonitors,prometheusrules,configmaps,networkpolicies,poddisruptionbudgets,roles,rolebindings,serviceaccounts,services,horizontalpodautoscalers",
                "-n",
                &ns.name,
                "-o",
                "name",
            ]),
    );
    for kind in [
        "servicemonitor",
        "prometheusrule",
        "configmap/chart-apply",
        "networkpolicy",
        "poddisruptionbudget",
        "role.rbac",
        "serviceaccount/webhooks-operator",
        "horizontalpodautoscaler",
    ] {
        assert!(kinds.contains(kind), "{kind} missing in:\n{kinds}");
    }
    // Cluster-scoped leftovers of this test's releases.
    for (release, _) in &renders {
        let _ = Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "delete",
                "clusterrole,clusterrolebinding",
                "-l",
                &format!("app.kubernetes.io/instance={release}"),
            ])
            .output();
    }
}

/// A kubeconfig for the test run's control plane that authenticates with `token` alone.
pub(crate) fn kubeconfig_with_token(dir: &Path, token: &str) -> PathBuf {
    let admin = std::fs::read_to_string(&control_plane().kubeconfig).unwrap();
    let text: String = admin
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("token:") {
                format!("    token: {token}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text + "\n").unwrap();
    path
}

/// One `run` process (operator and REST API) under the ServiceAccount's kubeconfig.
struct Replica {
    name: &'static str,
    /// Base url of its REST API.
    api: String,
    child: std::process::Child,
}

const ADMIN_KEY: &str = "chart-test-admin-key";

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_replica(
    name: &'static str,
    lease: &str,
    kubeconfig: &Path,
    events_url: &str,
    namespace: &str,
    logs: &Path,
) -> Replica {
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
        .args([
            "run",
            "--api-listen",
            &api,
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
            "--allow-private-destinations",
            "--leader-election",
            "--leader-election-namespace",
            namespace,
            "--leader-election-lease",
            lease,
            "--lease-duration",
            "3s",
            "--lease-renew-deadline",
            "2s",
            "--lease-retry-period",
            "300ms",
            "--handover-listen",
            "127.0.0.1:0",
        ])
        .env(
            "HANDOVER_KEY",
            "a key both test replicas share, 32 bytes or more",
        )
        .env("KUBECONFIG", kubeconfig)
        .env("CROWNSTONE_USER_ADMIN_KEY", ADMIN_KEY)
        .env("POD_NAME", name)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("operator binary starts");
    Replica {
        name,
        api: format!("http://{api}/api"),
        child,
    }
}

/// Waits until a replica's REST API answers, then sends `request` to it.
async fn call(request: reqwest::RequestBuilder) -> serde_json::Value {
    let response = request.send().await.expect("the REST API answers");
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "{status}: {text}");
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// Publishes a command whose sphere uid is `n`, to tell deliveries apart.
async fn publish(h: &Harness, n: u64) {
    let mut event = samples::multi_switch(SPHERE);
    event["sphere"]["uid"] = n.into();
    h.admin.publish(&[event]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_run_on_the_charts_service_account_alone() {
    let ns = TestNamespace::new("chart-sa").await;
    let other = TestNamespace::new("chart-other").await;
    let release = ns.name.clone();
    let manifests = render(
        &release,
        &ns.name,
        &[
            "--set",
            &format!("watchNamespaces={{{}}}", ns.name),
            "--set",
            &format!("fullnameOverride={release}"),
        ],
    );
    apply(ns.kubeconfig(), &manifests, false);
    let token = run_ok(
        Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(ns.kubeconfig())
            .args([
                "create",
                "token",
                &release,
                "-n",
                &ns.name,
                "--duration",
                "1h",
            ]),
    );
    let dir = tempfile::tempdir().unwrap();
    let sa_kubeconfig = kubeconfig_with_token(dir.path(), &token);

    // The ServiceAccount may not read Secrets of a namespace it does not manage.
    let sa = client_for(&sa_kubeconfig).await;
    let denied = Api::<Secret>::namespaced(sa.clone(), &other.name)
        .list(&Default::default())
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(status)) if status.code == 403),
        "{denied:?}"
    );
    assert!(Api::<Secret>::namespaced(sa, &ns.name)
        .list(&Default::default())
        .await
        .is_ok());

    let (simulator, admin) = sim::start(Duration::from_millis(500)).await;
    let events_url = simulator.base_url();
    let h = Harness {
        ns,
        sim: std::sync::Arc::new(simulator),
        admin,
        operator: None,
    };
    let mut replicas = vec![
        start_replica(
            "replica-a",
            &release,
            &sa_kubeconfig,
            &events_url,
            &h.ns.name,
            dir.path(),
        ),
        start_replica(
            "replica-b",
            &release,
            &sa_kubeconfig,
            &events_url,
            &h.ns.name,
            dir.path(),
        ),
    ];
    let receiver = Receiver::start().await;
    let http = reqwest::Client::new();
    for replica in &replicas {
        let ready = format!("{}/users/isValidAdminKey", replica.api);
        eventually("the REST API of every replica", WAIT, || async {
            let response = http
                .get(&ready)
                .header("admin_key", ADMIN_KEY)
                .send()
                .await
                .ok()?;
            response.status().is_success().then_some(())
        })
        .await;
    }
    // A whole life through the REST API, under the ServiceAccount's RBAC alone: a user, whose
    // credentials the leader's controller makes, then a listener, on whichever replica.
    let user = call(
        http.post(format!("{}/users", replicas[0].api))
            .header("admin_key", ADMIN_KEY)
            .json(&serde_json::json!({"name": "Acme"})),
    )
    .await;
    let user_id = user["id"].as_str().unwrap().to_owned();
    let api_key = user["apiKey"].as_str().unwrap().to_owned();
    let token = h.token("user-1", SPHERE).await;
    // The other replica knows the new key once its cache of credentials Secrets has the user's.
    eventually("the new key known on the other replica", WAIT, || async {
        let response = http
            .get(format!("{}/listeners", replicas[1].api))
            .header("API_KEY", &api_key)
            .send()
            .await
            .ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    let listener = call(
        http.post(format!("{}/listeners", replicas[1].api))
            .header("API_KEY", &api_key)
            .json(&serde_json::json!({
                "token": token,
                "userId": "user-1",
                "eventTypes": ["command"],
                "url": receiver.url().as_str(),
            })),
    )
    .await;
    let hook = listener["id"].as_str().unwrap().to_owned();
    h.wait_ready(&hook).await;
    // The leader's stream and the warm standby's.
    h.wait_streams(2).await;
    for n in 0..3 {
        publish(&h, n).await;
    }
    receiver.wait_for_requests(3, WAIT).await;

    // Kill the leader outright: the standby takes over once the lease runs out.
    let leases = h.ns.api::<Lease>();
    let holder = eventually("a lease holder", WAIT, || async {
        leases.get_opt(&release).await.ok()??.spec?.holder_identity
    })
    .await;
    let leader = replicas
        .iter()
        .position(|r| holder.starts_with(r.name))
        .expect("the holder is one of the replicas");
    let mut killed = replicas.remove(leader);
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    eventually("the standby leads", WAIT, || async {
        let holder = leases
            .get_opt(&release)
            .await
            .ok()??
            .spec?
            .holder_identity?;
        holder.starts_with(replicas[0].name).then_some(())
    })
    .await;
    h.wait_streams(1).await;
    h.wait_ready(&hook).await;
    for n in 3..6 {
        publish(&h, n).await;
    }
    let deliveries: Vec<(u64, String)> =
        eventually("the events after the failover", WAIT, || async {
            let deliveries: Vec<(u64, String)> = receiver
                .requests()
                .iter()
                .filter_map(|r| {
                    let uid = r.json()["data"]["sphere"]["uid"].as_u64()?;
                    Some((uid, r.header("webhook-id")?.to_owned()))
                })
                .collect();
            (3..6)
                .all(|n| deliveries.iter().any(|(uid, _)| *uid == n))
                .then_some(deliveries)
        })
        .await;
    // A crash may repeat what came after the last progress record, always under its first id.
    let ids: HashSet<&String> = deliveries.iter().map(|(_, id)| id).collect();
    let uids: HashSet<u64> = deliveries.iter().map(|(uid, _)| *uid).collect();
    assert_eq!(
        ids.len(),
        uids.len(),
        "an event was delivered again under another webhook-id: {deliveries:?}"
    );

    // The rest of its life through the survivor's REST API.
    let survivor = &replicas[0].api;
    let deleted = call(
        http.delete(format!("{survivor}/listeners/{hook}"))
            .header("API_KEY", &api_key),
    )
    .await;
    assert_eq!(deleted["count"], 1);
    h.wait_gone(&hook).await;
    h.wait_streams(0).await;
    let response = http
        .delete(format!("{survivor}/users/{user_id}"))
        .header("admin_key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    h.wait_secret_gone(&format!("{user_id}-credentials")).await;
    let _ = Command::new(&control_plane().kubectl)
        .arg("--kubeconfig")
        .arg(h.ns.kubeconfig())
        .args([
            "delete",
            "clusterrole,clusterrolebinding",
            "-l",
            &format!("app.kubernetes.io/instance={release}"),
        ])
        .output();
}
