//! Scenario `handover`: leader changes under load. Two replicas with leader election (the
//! Lease's default timings), one Listener per token all posting to an audit receiver in this
//! process that records, per event number, every delivery and its `webhook-id`. Two changes,
//! each while events are published: a rollout (a third replica starts, then the leader gets
//! SIGTERM) and a crash (the leader gets SIGKILL). For each: events lost, repeated, repeated
//! under another `webhook-id`, and how long until the new leader delivers; and the standby's
//! memory per token. Its replicas, audit receiver and audit serve `shard.rs` too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cluster::{self, wait_until, Plane, SimulatorProcess, TokenSet};
use crate::load::{EventTemplates, Publisher};
use crate::report::Report;
use crate::scenarios::Context;
use crate::system::{free_addr, rss_kb, unix_ns, ChildGuard};
use crate::BenchError;

/// How the replicas stand by: the scenario `handover` and its two variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Warm standbys sharing a handover key (the chart's default).
    Warm,
    /// Warm standbys without a handover key: a new leader delivers everything it buffered.
    NoKey,
    /// Cold standbys: only the leader streams.
    Cold,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Warm, Variant::NoKey, Variant::Cold];

    /// The scenario's name in `--only` and in the table.
    pub fn scenario(self) -> &'static str {
        match self {
            Variant::Warm => "handover",
            Variant::NoKey => "handover-nokey",
            Variant::Cold => "handover-cold",
        }
    }

    fn namespace(self) -> String {
        format!("bench-{}", self.scenario())
    }

    fn warm(self) -> bool {
        self != Variant::Cold
    }

    fn mode(self) -> ReplicaMode {
        ReplicaMode {
            namespace: self.namespace(),
            warm: self.warm(),
            handover_key: self != Variant::NoKey,
            sharding: false,
        }
    }
}

/// How a replica runs: what it watches, how it stands by, and whether it shards.
pub(crate) struct ReplicaMode {
    pub namespace: String,
    /// `STANDBY=warm`, else cold.
    pub warm: bool,
    /// Whether it gets the shared handover key (sharding needs it).
    pub handover_key: bool,
    /// `--sharding`: each replica owns a share of the tokens.
    pub sharding: bool,
}
/// The operator's default Lease name; the Lease lives in the watched namespace.
const LEASE: &str = "crownstone-webhooks";
/// The key replicas authenticate their progress records with; a benchmark value.
const HANDOVER_KEY: &str = "b7e6d5c4f1d2c8a94f1d2c8a9b7e6d5c4f1d2c8a9b7e6d5c4f1d2c8a9b7e6d5c";
/// The replicas' shutdown grace: what a rollout gives the old leader to drain.
const SHUTDOWN_GRACE: &str = "10s";
/// Publishing after a change: past the default lease duration (15 s), so a crashed leader's
/// Lease expires and the new leader delivers for a while before publishing stops.
const AFTER_CHANGE: Duration = Duration::from_secs(25);
/// How long the audit waits for deliveries still on their way once publishing stopped.
const QUIET: Duration = Duration::from_secs(5);
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// One replica: `crownstone-webhooks controller --leader-election`, named `name` in the Lease.
pub(crate) struct Replica {
    pub name: String,
    process: ChildGuard,
    /// Where it serves `/readyz`, `/metrics` and `/shards`.
    pub health: SocketAddr,
}

impl Replica {
    pub async fn start(
        mode: &ReplicaMode,
        exe: &Path,
        name: &str,
        events_url: &str,
        kubeconfig: &Path,
        logs: &Path,
    ) -> Result<Replica, BenchError> {
        let health = free_addr()?;
        let handover = free_addr()?;
        let mut command = Command::new(exe);
        command
            .args(["controller", "--events-url", events_url])
            .args(["--watch-namespace", &mode.namespace])
            .args(["--health-listen", &health.to_string()])
            .args(["--allow-private-destinations", "--log-format", "json"])
            .args(["--leader-election", "--shutdown-grace", SHUTDOWN_GRACE])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .env("POD_IP", "127.0.0.1")
            .env("HANDOVER_LISTEN", handover.to_string())
            .env("STANDBY", if mode.warm { "warm" } else { "cold" })
            .env("RUST_LOG", "info");
        if mode.handover_key {
            command.env("HANDOVER_KEY", HANDOVER_KEY);
        }
        if mode.sharding {
            command.arg("--sharding");
        }
        let process = ChildGuard::spawn(
            name,
            &mut command,
            &logs.join(format!("operator-{name}.log")),
            Duration::from_secs(30),
        )?;
        let mut replica = Replica {
            name: name.to_owned(),
            process,
            health,
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let ready = format!("http://{}/readyz", replica.health);
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            replica.process.check_running()?;
            if http
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(replica);
            }
            if Instant::now() > until {
                return Err(BenchError::new(format!(
                    "{name} did not become ready in 120 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn signal(&self, signal: &str) -> Result<(), BenchError> {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()?;
        match status.success() {
            true => Ok(()),
            false => Err(BenchError::new(format!(
                "kill {signal} {} failed",
                self.name
            ))),
        }
    }

    pub fn exited(&mut self) -> bool {
        self.process
            .child_mut()
            .is_none_or(|child| matches!(child.try_wait(), Ok(Some(_))))
    }
}

/// One delivery at the audit receiver.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    /// The event's number, as published.
    pub seq: u64,
    pub id: String,
    pub arrived_ns: u64,
}

#[derive(Deserialize)]
struct Envelope {
    data: Stamp,
}

#[derive(Deserialize)]
struct Stamp {
    #[serde(rename = "benchSeq")]
    seq: u64,
}

/// Answers 200 to every POST and records its event number and `webhook-id`.
pub(crate) struct AuditReceiver {
    /// Where Listeners post.
    pub url: String,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    server: tokio::task::JoinHandle<()>,
}

impl AuditReceiver {
    pub async fn start() -> Result<AuditReceiver, BenchError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let router = Router::new()
            .fallback(record)
            .with_state(deliveries.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(AuditReceiver {
            url,
            deliveries,
            server,
        })
    }

    pub fn reset(&self) {
        self.deliveries.lock().clear();
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().clone()
    }
}

impl Drop for AuditReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record(
    State(deliveries): State<Arc<Mutex<Vec<Delivery>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let arrived_ns = unix_ns();
    let Ok(envelope) = serde_json::from_slice::<Envelope>(&body) else {
        return StatusCode::OK;
    };
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    deliveries.lock().push(Delivery {
        seq: envelope.data.seq,
        id,
        arrived_ns,
    });
    StatusCode::OK
}

/// What became of the events `0..published`, from the deliveries of their run.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Tally {
    pub published: u64,
    /// Events no delivery came for.
    pub lost: u64,
    /// Events delivered more than once.
    pub repeated: u64,
    /// Of those, events delivered under more than one `webhook-id`: a receiver that dedups
    /// by id sees them twice.
    pub repeated_with_another_id: u64,
}

impl Tally {
    pub fn of(deliveries: &[Delivery], published: u64) -> Tally {
        let mut ids: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for delivery in deliveries.iter().filter(|d| d.seq < published) {
            ids.entry(delivery.seq).or_default().push(&delivery.id);
        }
        let repeated = ids.values().filter(|ids| ids.len() > 1);
        Tally {
            published,
            lost: published - ids.len() as u64,
            repeated: repeated.clone().count() as u64,
            repeated_with_another_id: repeated
                .filter(|ids| ids.iter().any(|id| *id != ids[0]))
                .count() as u64,
        }
    }

    /// Its three rows, each named after `change`.
    pub fn report(&self, report: &mut Report, scenario: &str, change: &str) {
        for (figure, value) in [
            ("events lost", self.lost),
            ("events repeated", self.repeated),
            (
                "repeated with another webhook-id",
                self.repeated_with_another_id,
            ),
        ] {
            report.figure(scenario, &format!("{change}: {figure}"), value as f64, "");
        }
    }
}

/// What one leader change did to the events published around it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct ChangeOutcome {
    #[serde(flatten)]
    tally: Tally,
    /// Stream frames per published event: how many replicas read each event.
    frames_per_event: f64,
    /// From the signal until another replica held the Lease.
    lease_taken_after_s: f64,
    /// From the signal until the old process had exited.
    old_exited_after_s: f64,
    /// From the signal until the first delivery after the old process had exited.
    new_leader_delivered_after_s: Option<f64>,
    /// The longest time without any delivery during the run.
    longest_gap_s: f64,
    /// The standby's resident memory just before the signal, under load.
    standby_rss_kb: u64,
}

/// Runs the scenario on namespace `bench-handover` and adds its rows to `report`.
pub async fn run(
    context: &Context,
    report: &mut Report,
    plane: &Plane,
    client: &kube::Client,
    simulator: &SimulatorProcess,
    publisher: &Publisher,
    variant: Variant,
) -> Result<(), BenchError> {
    let (sizes, exe, logs) = (&context.sizes, &context.exe, &context.logs);
    let scenario = variant.scenario();
    let namespace = variant.namespace();
    let tokens = sizes.tokens_handover;
    let rate = sizes.handover_rate;
    let before_change = sizes.phase.min(Duration::from_secs(10));
    println!(
        "\n== ({scenario}) leader changes at {tokens} tokens, {rate:.0} events/s: a rollout \
         (SIGTERM) and a crash (SIGKILL)"
    );
    cluster::create_namespace(client, &namespace).await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let receiver = AuditReceiver::start().await?;
    let streams_before = simulator.open_streams().await?;
    let mode = variant.mode();
    let start = |name: &'static str| {
        Replica::start(&mode, exe, name, &simulator.url, &plane.kubeconfig, logs)
    };
    let mut replicas = vec![start("replica-a").await?, start("replica-b").await?];
    let leader = leader_index(&leases, &replicas, None).await?;
    let standby = 1 - leader;
    // The standby's memory with no token at all, after its caches have synced.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_empty_kb = rss_kb(replicas[standby].pid()).unwrap_or(0);

    let mut set = TokenSet::new(&namespace, "ho");
    let took = set
        .grow(
            client,
            &simulator.admin,
            tokens,
            sizes.create_concurrency,
            |_| receiver.url.clone(),
        )
        .await?;
    println!("  {tokens} tokens with a Listener each, created in {took:.1?}");
    simulator
        .wait_streams(streams_before + tokens, Duration::from_secs(300))
        .await?;
    // A warm standby opens its own streams too; a cold one does not. Give it the time.
    if variant.warm() {
        let _ = wait_until("the standby's streams", Duration::from_secs(60), || async {
            simulator
                .open_streams()
                .await
                .is_ok_and(|n| n >= streams_before + 2 * tokens)
        })
        .await;
    }
    let templates = Arc::new(EventTemplates::new(&set.spheres()));
    let spheres = Arc::new((0..set.len()).collect::<Vec<_>>());
    // First events: every token's first delivery opens its path; not audited.
    publisher
        .run(&templates, &spheres, rate, Duration::from_secs(3))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A rollout: the new pod comes up first, then the old leader is stopped.
    replicas.push(start("replica-c").await?);
    if variant.warm() {
        let _ = wait_until(
            "the new replica's streams",
            Duration::from_secs(60),
            || async {
                simulator
                    .open_streams()
                    .await
                    .is_ok_and(|n| n >= streams_before + 3 * tokens)
            },
        )
        .await;
    }
    let load = Load {
        publisher,
        templates: &templates,
        spheres: &spheres,
        rate,
        before_change,
    };
    let rollout = change("rollout", "-TERM", &mut replicas, &leases, &receiver, &load).await?;
    let crash = change("crash", "-KILL", &mut replicas, &leases, &receiver, &load).await?;

    for (name, outcome) in [("rollout (SIGTERM)", &rollout), ("crash (SIGKILL)", &crash)] {
        outcome.tally.report(report, scenario, name);
        match outcome.new_leader_delivered_after_s {
            Some(seconds) => report.figure(
                scenario,
                &format!("{name}: new leader delivers after"),
                seconds,
                "s",
            ),
            None => report.text(
                scenario,
                &format!("{name}: new leader delivers after"),
                "never",
            ),
        }
    }
    let per_token_kb = rollout.standby_rss_kb.saturating_sub(rss_empty_kb) as f64 / tokens as f64;
    report.figure(scenario, "standby memory per token", per_token_kb, "kB");
    report.detail(
        scenario,
        json!({
            "tokens": tokens,
            "eventsPerSecond": rate,
            "standbyRssEmptyKb": rss_empty_kb,
            "rollout": rollout,
            "crash": crash,
        }),
    );
    Ok(())
}

/// The load published around a change.
struct Load<'a> {
    publisher: &'a Publisher,
    templates: &'a Arc<EventTemplates>,
    spheres: &'a Arc<Vec<usize>>,
    rate: f64,
    before_change: Duration,
}

/// The index of the replica holding the Lease, other than `not`; waits up to a minute.
async fn leader_index(
    leases: &Api<Lease>,
    replicas: &[Replica],
    not: Option<usize>,
) -> Result<usize, BenchError> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(index) = holder(leases, replicas).await.filter(|i| Some(*i) != not) {
            return Ok(index);
        }
        if Instant::now() > until {
            return Err(BenchError::new("no replica took the Lease within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The replica whose name the Lease's holder identity starts with.
async fn holder(leases: &Api<Lease>, replicas: &[Replica]) -> Option<usize> {
    let lease = leases.get_opt(LEASE).await.ok()??;
    let identity = lease.spec?.holder_identity?;
    replicas
        .iter()
        .position(|r| identity.starts_with(&format!("{}-", r.name)))
}

/// Publishes for `before_change`, signals the leader, keeps publishing for [`AFTER_CHANGE`],
/// then audits every event of the run. The signalled replica is removed from `replicas`.
async fn change(
    label: &str,
    signal: &str,
    replicas: &mut Vec<Replica>,
    leases: &Api<Lease>,
    receiver: &AuditReceiver,
    load: &Load<'_>,
) -> Result<ChangeOutcome, BenchError> {
    let leader = leader_index(leases, replicas, None).await?;
    let standby = (0..replicas.len())
        .find(|i| *i != leader)
        .ok_or_else(|| BenchError::new("no standby"))?;
    receiver.reset();
    let publishing = {
        let (publisher, templates, spheres) = (
            load.publisher.clone(),
            load.templates.clone(),
            load.spheres.clone(),
        );
        let (rate, duration) = (load.rate, load.before_change + AFTER_CHANGE);
        tokio::spawn(async move { publisher.run(&templates, &spheres, rate, duration).await })
    };
    tokio::time::sleep(load.before_change).await;
    let standby_rss_kb = rss_kb(replicas[standby].pid()).unwrap_or(0);
    let signalled = Instant::now();
    let signalled_ns = unix_ns();
    replicas[leader].signal(signal)?;
    let mut old = replicas.remove(leader);
    let mut exited_ns = None;
    let mut taken = None;
    let until = Instant::now() + Duration::from_secs(90);
    while (exited_ns.is_none() || taken.is_none()) && Instant::now() < until {
        if exited_ns.is_none() && old.exited() {
            exited_ns = Some(unix_ns());
        }
        if taken.is_none() && holder(leases, replicas).await.is_some() {
            taken = Some(signalled.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published = publishing.await?;
    let deliveries = settle(receiver, published.events).await;
    let exited_ns = exited_ns.ok_or_else(|| BenchError::new("the old leader did not exit"))?;
    let mut outcome = audit(&deliveries, published.events, signalled_ns, exited_ns);
    outcome.frames_per_event = published.frames as f64 / published.events.max(1) as f64;
    outcome.lease_taken_after_s = taken.map_or(f64::NAN, |t| t.as_secs_f64());
    outcome.standby_rss_kb = standby_rss_kb;
    println!(
        "  {label}: published {}, lost {}, repeated {} ({} with another webhook-id), Lease \
         taken after {:.2} s, new leader delivers after {}",
        outcome.tally.published,
        outcome.tally.lost,
        outcome.tally.repeated,
        outcome.tally.repeated_with_another_id,
        outcome.lease_taken_after_s,
        outcome
            .new_leader_delivered_after_s
            .map_or("never".to_owned(), |s| format!("{s:.2} s")),
    );
    drop(old);
    Ok(outcome)
}

/// Waits until every one of `events` arrived, or no delivery arrived for [`QUIET`].
pub(crate) async fn settle(receiver: &AuditReceiver, events: u64) -> Vec<Delivery> {
    let until = Instant::now() + SETTLE_LIMIT;
    let mut last = (0, Instant::now());
    loop {
        let deliveries = receiver.deliveries();
        let seen: std::collections::BTreeSet<u64> = deliveries.iter().map(|d| d.seq).collect();
        if seen.len() as u64 >= events || Instant::now() > until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return receiver.deliveries();
        }
        if deliveries.len() != last.0 {
            last = (deliveries.len(), Instant::now());
        } else if last.1.elapsed() >= QUIET {
            return deliveries;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Lost, repeated and repeated under another id, over events `0..events`; and when the first
/// delivery after the old leader's exit arrived.
fn audit(deliveries: &[Delivery], events: u64, signalled_ns: u64, exited_ns: u64) -> ChangeOutcome {
    let mut arrivals: Vec<u64> = deliveries.iter().map(|d| d.arrived_ns).collect();
    arrivals.sort_unstable();
    let longest_gap_ns = arrivals.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let seconds = |ns: u64| ns as f64 / 1e9;
    ChangeOutcome {
        tally: Tally::of(deliveries, events),
        old_exited_after_s: seconds(exited_ns.saturating_sub(signalled_ns)),
        new_leader_delivered_after_s: arrivals
            .iter()
            .find(|at| **at > exited_ns)
            .map(|at| seconds(at - signalled_ns)),
        longest_gap_s: seconds(longest_gap_ns),
        ..ChangeOutcome::default()
    }
}
