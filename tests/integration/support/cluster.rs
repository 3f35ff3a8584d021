//! The real control plane the tests run against: started once per test run from the binaries
//! `hack/build-kube.sh` builds (or the one `KUBECONFIG` points at), with the CRDs applied, and a
//! fresh namespace per test so tests run in parallel without seeing each other.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Where the shared control plane is and how to reach it with kubectl.
pub struct ControlPlane {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The control plane of this test run, started on first use.
pub fn control_plane() -> &'static ControlPlane {
    static PLANE: OnceLock<ControlPlane> = OnceLock::new();
    PLANE.get_or_init(|| {
        let bin = PathBuf::from(run(&mut Command::new(
            repo_root().join("hack/build-kube.sh"),
        )));
        let kubectl = bin.join("kubectl");
        let kubeconfig = match std::env::var_os("KUBECONFIG") {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => {
                let dir = std::env::temp_dir()
                    .join(format!("crownstone-webhooks-test-{}", std::process::id()));
                run(Command::new(repo_root().join("hack/control-plane.sh"))
                    .arg("start")
                    .arg(&dir)
                    .arg("--controller-manager")
                    .arg("--watch-pid")
                    .arg(std::process::id().to_string())
                    .arg("--temporary"));
                dir.join("kubeconfig")
            }
        };
        run(Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(repo_root().join("crds")));
        run(Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/listeners.webhooks.crownstone.rocks",
                "crd/webhookusers.webhooks.crownstone.rocks",
            ]));
        ControlPlane {
            kubeconfig,
            kubectl,
        }
    })
}

/// The helm binary, built by `hack/build-helm.sh` on first use.
pub fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        PathBuf::from(run(&mut Command::new(
            repo_root().join("hack/build-helm.sh"),
        )))
    })
}

/// The repository's root directory.
pub fn repo() -> &'static Path {
    repo_root()
}

/// Runs a command to success and returns its standard output; panics with its output if not.
pub fn run_ok(cmd: &mut Command) -> String {
    run(cmd)
}

/// A client for the test run's control plane. Made per test: a client is bound to the runtime
/// it was made on, and every `#[tokio::test]` has its own.
pub async fn client() -> Client {
    client_for(&control_plane().kubeconfig).await
}

/// A client for the control plane of a kubeconfig.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig readable");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Client::try_from(config).expect("client")
}

/// A control plane of one test's own (etcd and kube-apiserver), for tests that restart it.
pub struct PrivatePlane {
    pub dir: tempfile::TempDir,
}

impl PrivatePlane {
    /// Starts it and applies the CRDs.
    pub fn start() -> PrivatePlane {
        let plane = PrivatePlane {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        plane.up();
        run(Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(plane.kubeconfig())
            .args(["apply", "--server-side", "-f"])
            .arg(repo_root().join("crds")));
        plane
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("plane/kubeconfig")
    }

    fn up(&self) {
        run(Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("start")
            .arg(self.dir.path().join("plane"))
            .arg("--watch-pid")
            .arg(std::process::id().to_string()));
    }

    /// Stops etcd and the API server and starts them again on the same ports and data.
    pub fn restart(&self) {
        self.stop();
        self.up();
    }

    pub fn stop(&self) {
        run(Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("stop")
            .arg(self.dir.path().join("plane")));
    }
}

impl Drop for PrivatePlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A namespace of one test's own, deleted when the test ends.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// A namespace on the test run's control plane.
    pub async fn new(prefix: &str) -> TestNamespace {
        TestNamespace::on(&control_plane().kubeconfig, prefix).await
    }

    /// A namespace on the control plane of `kubeconfig`.
    pub async fn on(kubeconfig: &Path, prefix: &str) -> TestNamespace {
        let client = client_for(kubeconfig).await;
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"crownstone-webhooks/test": "true"}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create test namespace");
        TestNamespace {
            name,
            client,
            kubeconfig: kubeconfig.to_owned(),
        }
    }

    /// The kubeconfig of the control plane this namespace lives on.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Runs kubectl against the test run's control plane in this namespace.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--namespace")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("kubectl runs")
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Best effort and non-blocking: a failed test should still leave a clean cluster behind.
        let _ = Command::new(&control_plane().kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--timeout=5s",
            ])
            .output();
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
