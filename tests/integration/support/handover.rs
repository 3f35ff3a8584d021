//! Leader changes under load, measured from outside: replicas of the operator binary as
//! processes of their own, one Listener per token all posting to one receiver, a publisher that
//! numbers every event, and an audit of what the receiver got: per event, how many deliveries
//! and with which `webhook-id`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::simulator::{Scope, SimulatorClient};
use k8s_openapi::api::coordination::v1::Lease;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cluster::{control_plane, eventually, TestNamespace};
use super::operator::{Harness, WAIT};
use super::receiver::Receiver;
use super::sim;

/// The Lease the replicas share (the operator's default name, in the test's namespace).
pub const LEASE: &str = "crownstone-webhooks";
/// Short lease timings, as `leader.rs` uses: a crashed leader is replaced after about 3 s.
pub const LEASE_DURATION: Duration = Duration::from_secs(3);
const LEASE_FLAGS: &[&str] = &[
    "--leader-election",
    "--lease-duration",
    "3s",
    "--lease-renew-deadline",
    "2s",
    "--lease-retry-period",
    "300ms",
];
/// The key replicas authenticate their progress records with; a test value, not a secret.
const HANDOVER_KEY: &str = "4f1d2c8a9b7e6d5c4f1d2c8a9b7e6d5c4f1d2c8a9b7e6d5c4f1d2c8a9b7e6d5c";
/// Every Listener receives this type; [`event`] makes events of it.
pub const EVENT_TYPE: &str = "command";

/// A signal for a replica process.
#[derive(Clone, Copy, Debug)]
pub enum Signal {
    /// Stop gracefully, as Kubernetes stops a pod in a rollout.
    Term,
    /// Die at once, as a crashed node or an OOM kill.
    Kill,
    /// Freeze (a paused VM, a long GC-like stall, a partition of the whole process).
    Stop,
    /// Wake after [`Signal::Stop`].
    Cont,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "-TERM",
            Signal::Kill => "-KILL",
            Signal::Stop => "-STOP",
            Signal::Cont => "-CONT",
        }
    }
}

/// Sends `signal` to process `pid` with `kill(1)`; panics when it cannot be sent.
pub fn send_signal(pid: u32, signal: Signal) {
    let status = Command::new("kill")
        .args([signal.name(), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {} {pid} failed", signal.name());
}

/// One replica: the operator binary with `controller` and leader election, as a pod runs it,
/// named `name` in the Lease (its holder identity starts with `<name>-`), with its own health
/// port and its output in a file.
pub struct Replica {
    pub name: String,
    /// Where it serves `/healthz`, `/readyz` and `/metrics`.
    pub health: std::net::SocketAddr,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Replica {
    /// Starts a replica against the test run's control plane and `events_url`, watching
    /// `namespace` (where its Lease lives too).
    pub fn start(name: &str, events_url: &str, namespace: &str) -> Replica {
        Replica::start_with(name, events_url, namespace, true)
    }

    /// [`Replica::start`], with the transport between replicas only if `handover` (without it,
    /// no key: a standby neither learns the leader's progress nor sends it anything).
    pub fn start_with(name: &str, events_url: &str, namespace: &str, handover: bool) -> Replica {
        Replica::start_args(name, events_url, namespace, handover, &[])
    }

    /// [`Replica::start_with`] with `extra` flags after the usual ones.
    pub fn start_args(
        name: &str,
        events_url: &str,
        namespace: &str,
        handover: bool,
        extra: &[&str],
    ) -> Replica {
        Replica::start_through(
            name,
            events_url,
            namespace,
            handover,
            extra,
            &control_plane().kubeconfig,
        )
    }

    /// [`Replica::start_args`], reaching the API server as `kubeconfig` says (through a proxy
    /// the test can cut).
    pub fn start_through(
        name: &str,
        events_url: &str,
        namespace: &str,
        handover: bool,
        extra: &[&str],
        kubeconfig: &std::path::Path,
    ) -> Replica {
        let health = free_addr();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let out = log.reopen().expect("log file opens");
        let err = log.reopen().expect("log file opens");
        let health_flag = health.to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
            .args([
                "controller",
                "--events-url",
                events_url,
                "--watch-namespace",
                namespace,
                "--health-listen",
                &health_flag,
                "--status-interval",
                "200ms",
                "--counters-interval",
                "200ms",
                "--silence-timeout",
                "5s",
                "--reconnect-initial",
                "100ms",
                "--reconnect-max",
                "500ms",
                "--delivery-retry-initial",
                "10ms",
                "--delivery-retry-max",
                "50ms",
                "--shutdown-grace",
                "5s",
                "--allow-private-destinations",
            ])
            .args(LEASE_FLAGS)
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .env("POD_IP", "127.0.0.1")
            // Progress records between replicas: on loopback, any free port, a shared key.
            .env("HANDOVER_LISTEN", "127.0.0.1:0")
            .envs(handover.then_some(("HANDOVER_KEY", HANDOVER_KEY)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("operator binary starts");
        Replica {
            name: name.to_owned(),
            health,
            child: Some(child),
            log,
        }
    }

    /// Whether `/readyz` answers 200, as a kubelet's readiness probe asks.
    pub async fn is_ready(&self) -> bool {
        reqwest::get(format!("http://{}/readyz", self.health))
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the replica runs").id()
    }

    /// Sends it a signal.
    pub fn signal(&self, signal: Signal) {
        send_signal(self.pid(), signal);
    }

    /// Waits (up to `deadline`) until the process has exited; panics if it has not.
    pub async fn wait_exit(&mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        let child = self.child.as_mut().expect("the replica runs");
        loop {
            if child.try_wait().expect("wait on replica").is_some() {
                return;
            }
            assert!(
                Instant::now() < until,
                "replica {} still runs after {deadline:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // A replica left frozen by a failed test must be woken to die cleanly.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

/// The sphere of token `index`: one sphere per token, so each event reaches one Listener.
pub fn sphere(index: usize) -> String {
    format!("sphere-{index}")
}

/// Event number `seq`, for the sphere of token `seq % tokens`; the number travels in
/// `sphere.uid`, which deliveries pass through unchanged.
pub fn event(seq: u64, tokens: usize) -> serde_json::Value {
    let mut event = samples::multi_switch(&sphere((seq % tokens as u64) as usize));
    event["sphere"]["uid"] = seq.into();
    event
}

/// The replicas, the simulator, N tokens with a Listener each, and the receiver they post to.
pub struct Rig {
    pub harness: Harness,
    pub receiver: Receiver,
    pub replicas: Vec<Replica>,
    pub tokens: usize,
    prefix: String,
}

impl Rig {
    /// A namespace, a simulator, `replicas` replicas named `<prefix>-<i>`, and `tokens` tokens
    /// with a Ready Listener each, all posting to one receiver.
    pub async fn start(prefix: &str, replicas: usize, tokens: usize) -> Rig {
        let mut rig = Rig::without_replicas(prefix, tokens).await;
        rig.replicas = (0..replicas)
            .map(|i| {
                Replica::start(
                    &format!("{prefix}-{i}"),
                    &rig.harness.sim.base_url(),
                    &rig.harness.ns.name,
                )
            })
            .collect();
        rig.wait_streaming().await;
        rig
    }

    /// The namespace, simulator, tokens, Listeners and receiver of [`Rig::start`], with no
    /// replica yet: a test starts its own and then calls [`Rig::wait_streaming`].
    pub async fn without_replicas(prefix: &str, tokens: usize) -> Rig {
        let ns = TestNamespace::new(prefix).await;
        let (simulator, admin) = sim::start(Duration::from_millis(500)).await;
        let harness = Harness {
            ns,
            sim: Arc::new(simulator),
            admin,
            operator: None,
        };
        let receiver = Receiver::start().await;
        // An allowance no test reaches: deliveries are not cut off by the daily budget.
        harness.create_user("acme", true, Some(1_000_000_000)).await;
        for index in 0..tokens {
            let token = sim::token(
                &harness.admin,
                "user-1",
                &[&sphere(index)],
                &[Scope::All],
                3600,
            )
            .await;
            let secret = format!("hook-{index}-token");
            harness.create_token_secret(&secret, &token).await;
            harness
                .create_listener(
                    &format!("hook-{index}"),
                    "acme",
                    &secret,
                    &[EVENT_TYPE],
                    receiver.url().as_str(),
                    None,
                )
                .await;
        }
        Rig {
            harness,
            receiver,
            replicas: Vec::new(),
            tokens,
            prefix: prefix.to_owned(),
        }
    }

    /// Waits until every Listener is Ready and the leader streams every token, then gives the
    /// standbys time to open theirs: with a warm standby every replica streams every token,
    /// with a cold one only the leader does.
    pub async fn wait_streaming(&self) {
        eventually("a leader", WAIT, || self.leader_name()).await;
        for index in 0..self.tokens {
            self.harness.wait_ready(&format!("hook-{index}")).await;
        }
        eventually(&format!("{} open streams", self.tokens), WAIT, || async {
            (self.harness.admin.stats().await.ok()?.open_streams >= self.tokens).then_some(())
        })
        .await;
        let all = self.tokens * self.replicas.len();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if self.open_streams().await >= all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts one more replica, as a rollout's surge pod starts, and waits until it streams
    /// every token beside the others and says it is ready; returns its index.
    pub async fn add_replica(&mut self) -> usize {
        let index = self.replicas.len();
        self.replicas.push(Replica::start(
            &format!("{}-{index}", self.prefix),
            &self.harness.sim.base_url(),
            &self.harness.ns.name,
        ));
        let all = self.tokens * self.replicas.len();
        eventually(&format!("{all} open streams"), WAIT, || async {
            (self.open_streams().await >= all).then_some(())
        })
        .await;
        let added = &self.replicas[index];
        eventually(&format!("{} ready", added.name), WAIT, || async {
            added.is_ready().await.then_some(())
        })
        .await;
        index
    }

    /// Streams open at the simulator now.
    pub async fn open_streams(&self) -> usize {
        self.harness
            .admin
            .stats()
            .await
            .map(|s| s.open_streams)
            .unwrap_or(0)
    }

    /// The holder of the Lease, as the replica name it was started with.
    pub async fn leader_name(&self) -> Option<String> {
        let lease = self.harness.ns.api::<Lease>().get_opt(LEASE).await.ok()??;
        let holder = lease.spec?.holder_identity.filter(|h| !h.is_empty())?;
        self.replicas
            .iter()
            .map(|r| r.name.clone())
            .find(|name| holder.starts_with(&format!("{name}-")))
    }

    /// The index in `replicas` of the current leader; waits for one.
    pub async fn leader(&self) -> usize {
        let name = eventually("a leader", WAIT, || self.leader_name()).await;
        self.index(&name)
    }

    /// Waits until a replica other than `old` holds the Lease and returns its index.
    pub async fn next_leader(&self, old: usize) -> usize {
        let old = self.replicas[old].name.clone();
        let name = eventually("another leader", WAIT, || async {
            self.leader_name().await.filter(|name| *name != old)
        })
        .await;
        self.index(&name)
    }

    fn index(&self, name: &str) -> usize {
        self.replicas
            .iter()
            .position(|r| r.name == name)
            .expect("the holder is one of the replicas")
    }

    /// Starts publishing [`event`]s numbered from 0 at `per_second`.
    pub fn publish(&self, per_second: f64) -> Publisher {
        Publisher::start(self.harness.admin.clone(), self.tokens, per_second)
    }

    /// Waits until every published event has arrived at least once, or until `quiet` passes
    /// without a new delivery; then audits.
    pub async fn settle(&self, published: &[Published], quiet: Duration) -> Audit {
        let wanted: BTreeSet<u64> = published.iter().map(|p| p.seq).collect();
        let mut last = (self.receiver.request_count(), Instant::now());
        loop {
            let audit = Audit::of(published, &self.receiver);
            if audit.lost.is_empty() && audit.delivered_events == wanted.len() {
                // Everything arrived; a little longer, for repeats still in flight.
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Audit::of(published, &self.receiver);
            }
            let count = self.receiver.request_count();
            if count != last.0 {
                last = (count, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return audit;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every replica's log, to explain a failure.
    pub fn logs(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("----- {} -----\n{}", r.name, tail(&r.log(), 80)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One published event.
#[derive(Clone, Debug)]
pub struct Published {
    pub seq: u64,
    /// When it was posted to the simulator.
    pub at: Instant,
    /// How many streams it reached (0: no replica could read it).
    pub streams: usize,
}

/// A publisher running in the background; [`Publisher::stop`] ends it.
pub struct Publisher {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<Published>>,
}

impl Publisher {
    fn start(admin: SimulatorClient, tokens: usize, per_second: f64) -> Publisher {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut published = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut seq = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return published,
                }
                let at = Instant::now();
                let streams = admin
                    .publish(&[event(seq, tokens)])
                    .await
                    .expect("the simulator takes the event");
                published.push(Published {
                    seq,
                    at,
                    streams: streams.first().copied().unwrap_or(0),
                });
                seq += 1;
            }
        });
        Publisher { stop, task }
    }

    /// Stops publishing and returns every event published.
    pub async fn stop(self) -> Vec<Published> {
        let _ = self.stop.send(true);
        self.task.await.expect("publisher ends")
    }
}

/// One delivery as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: String,
    pub at: Instant,
}

/// What the receiver got, against what was published.
#[derive(Debug)]
pub struct Audit {
    pub published: usize,
    /// Published events no stream received at all (no replica could have read them).
    pub unread: usize,
    /// Distinct events delivered.
    pub delivered_events: usize,
    /// Published and never delivered.
    pub lost: Vec<u64>,
    /// Delivered more than once.
    pub repeated: Vec<u64>,
    /// Delivered more than once with more than one `webhook-id`.
    pub repeated_with_new_id: Vec<u64>,
    /// Deliveries of numbers that were never published (a bug in the harness or the operator).
    pub unknown: usize,
    /// Every delivery per event.
    pub deliveries: BTreeMap<u64, Vec<Delivery>>,
}

impl Audit {
    /// Audits the receiver's requests against `published`.
    pub fn of(published: &[Published], receiver: &Receiver) -> Audit {
        let mut deliveries: BTreeMap<u64, Vec<Delivery>> = BTreeMap::new();
        let mut unknown = 0;
        let wanted: BTreeSet<u64> = published.iter().map(|p| p.seq).collect();
        for request in receiver.requests() {
            let seq = request.json()["data"]["sphere"]["uid"].as_u64();
            match seq.filter(|seq| wanted.contains(seq)) {
                Some(seq) => deliveries.entry(seq).or_default().push(Delivery {
                    id: request.header("webhook-id").unwrap_or_default().to_owned(),
                    at: request.received_at,
                }),
                None => unknown += 1,
            }
        }
        let lost = wanted
            .iter()
            .copied()
            .filter(|seq| !deliveries.contains_key(seq))
            .collect();
        let repeated = deliveries
            .iter()
            .filter(|(_, d)| d.len() > 1)
            .map(|(seq, _)| *seq)
            .collect();
        let repeated_with_new_id = deliveries
            .iter()
            .filter(|(_, d)| d.iter().map(|d| &d.id).collect::<BTreeSet<_>>().len() > 1)
            .map(|(seq, _)| *seq)
            .collect();
        Audit {
            published: published.len(),
            unread: published.iter().filter(|p| p.streams == 0).count(),
            delivered_events: deliveries.len(),
            lost,
            repeated,
            repeated_with_new_id,
            unknown,
            deliveries,
        }
    }

    /// One line of figures, for assertion messages and the test's output.
    pub fn summary(&self) -> String {
        format!(
            "published {}, unread by any stream {}, delivered {}, lost {} {}, repeated {} {}, \
             repeated with another webhook-id {} {}, unknown {}",
            self.published,
            self.unread,
            self.delivered_events,
            self.lost.len(),
            span(&self.lost),
            self.repeated.len(),
            span(&self.repeated),
            self.repeated_with_new_id.len(),
            span(&self.repeated_with_new_id),
            self.unknown,
        )
    }
}

/// The first and last number of a set, to show where a gap or a run of repeats lies.
fn span(seqs: &[u64]) -> String {
    match (seqs.first(), seqs.last()) {
        (Some(first), Some(last)) => format!("({first}..={last})"),
        _ => String::new(),
    }
}
