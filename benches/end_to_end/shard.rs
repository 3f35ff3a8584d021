//! Scenario `scale-out`: tokens sharded over replicas (`--sharding`) as the installation grows
//! from one replica to two and three under a steady load, then one of the three killed. One
//! Listener per token, all posting to the audit receiver of `handover.rs`. For each replica
//! count: every replica's streams, memory and CPU per delivery; for each move and the crash:
//! events lost and repeated; and, on a machine with cores enough for replicas not to share
//! them, deliveries a second at 1, 2 and 4 replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crownstone_webhooks::domain::TokenHash;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cluster::{self, wait_until, Metrics, Plane, SimulatorProcess, TokenSet};
use crate::handover::{settle, AuditReceiver, Delivery, Replica, ReplicaMode, Tally};
use crate::load::{EventTemplates, Published, Publisher, RunningLoad};
use crate::phase::DELIVERIES;
use crate::report::Report;
use crate::scenarios::Context;
use crate::system::{cpu_seconds, open_files, rss_kb, unix_ns, RssPeak};
use crate::BenchError;

const SCENARIO: &str = "scale-out";
const NAMESPACE: &str = "bench-scale-out";
/// Simulator streams per token at the worst moment: an owner and a standby each (2), and while
/// a third replica warms for its share it opens a third of those again (2/3) before the other
/// two close theirs.
const PEAK_STREAMS_PER_TOKEN: f64 = 2.0 + 2.0 / 3.0;
/// The simulator's descriptors besides streams: its listener, the publisher's and the
/// harness's connections, its log.
const SIMULATOR_SPARE_FDS: u64 = 256;
/// The longest a change of view may take until every token has one owner.
const BALANCE_LIMIT: Duration = Duration::from_secs(300);
/// How long to wait, past a balanced view, for every standby stream to be open and every
/// stream the view no longer needs to be closed.
const STANDBY_LIMIT: Duration = Duration::from_secs(60);
/// Cores at which replicas no longer share them, so that adding one can add deliveries.
const CORES_FOR_THROUGHPUT: usize = 8;
/// The replica counts of the throughput figures.
const THROUGHPUT_REPLICAS: [usize; 3] = [1, 2, 4];

/// What a replica's `GET /shards` says, as far as the scenario reads it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ShardsView {
    serving: Vec<String>,
    serving_id: String,
    confirmed_id: String,
    leading: Vec<String>,
    standby: Vec<String>,
}

/// The sharded replicas, started one after another as `replica-1`, `replica-2`, ...
struct Installation<'a> {
    context: &'a Context,
    plane: &'a Plane,
    simulator: &'a SimulatorProcess,
    mode: ReplicaMode,
    http: reqwest::Client,
    replicas: Vec<Replica>,
    started: usize,
    tokens: usize,
}

impl Installation<'_> {
    /// Starts one more replica and waits until it answers `/readyz`.
    async fn add(&mut self) -> Result<(), BenchError> {
        self.started += 1;
        let name = format!("replica-{}", self.started);
        let replica = Replica::start(
            &self.mode,
            &self.context.exe,
            &name,
            &self.simulator.url,
            &self.plane.kubeconfig,
            &self.context.logs,
        )
        .await?;
        self.replicas.push(replica);
        Ok(())
    }

    /// Every replica's `/shards`, `None` for one that does not answer.
    async fn views(&self) -> Vec<Option<ShardsView>> {
        futures::future::join_all(self.replicas.iter().map(|replica| async {
            let response = self
                .http
                .get(format!("http://{}/shards", replica.health))
                .send()
                .await
                .ok()?;
            response.json::<ShardsView>().await.ok()
        }))
        .await
    }

    /// Waits until every replica serves the same confirmed view of all of them and every token
    /// is led by exactly one; then, for at most [`STANDBY_LIMIT`], until every token has one
    /// standby stream too (none with a single replica). Returns how long the first took.
    async fn wait_balanced(&self) -> Result<Duration, BenchError> {
        let started = Instant::now();
        let count = self.replicas.len();
        wait_until(
            &format!("{} tokens led over {count} replicas", self.tokens),
            BALANCE_LIMIT,
            || async {
                let views = self.views().await;
                let agreed = views.iter().all(|view| {
                    view.as_ref()
                        .is_some_and(|v| v.serving.len() == count && v.serving_id == v.confirmed_id)
                });
                let mut leaders: BTreeMap<&str, usize> = BTreeMap::new();
                for view in views.iter().flatten() {
                    for hash in &view.leading {
                        *leaders.entry(hash).or_default() += 1;
                    }
                }
                agreed && leaders.len() == self.tokens && leaders.values().all(|n| *n == 1)
            },
        )
        .await?;
        let balanced = started.elapsed();
        let standbys = if count > 1 { self.tokens } else { 0 };
        let settled = wait_until("one standby stream per token", STANDBY_LIMIT, || async {
            let views = self.views().await;
            views
                .iter()
                .flatten()
                .map(|v| v.standby.len())
                .sum::<usize>()
                == standbys
        })
        .await;
        if let Err(error) = settled {
            println!("  {error}; measuring as it is");
        }
        Ok(balanced)
    }

    /// Each replica's deliveries so far, from its metrics.
    async fn deliveries(&self) -> Vec<f64> {
        futures::future::join_all(self.replicas.iter().map(|replica| async {
            Metrics::fetch(&self.http, replica.health)
                .await
                .map_or(0.0, |m| m.sum(DELIVERIES, Some(("outcome", "delivered"))))
        }))
        .await
    }
}

/// The load every step publishes, and where it lands.
struct Load<'a> {
    publisher: &'a Publisher,
    templates: Arc<EventTemplates>,
    spheres: Arc<Vec<usize>>,
    rate: f64,
    receiver: &'a AuditReceiver,
    /// Publishing before a change, and again once the view is balanced after it.
    around_change: Duration,
}

impl Load<'_> {
    /// Starts publishing for a change: the receiver forgets what came before, and the change
    /// comes `around_change` into the load.
    async fn start_for_change(&self) -> RunningLoad {
        self.receiver.reset();
        let running = self
            .publisher
            .start(&self.templates, &self.spheres, self.rate);
        tokio::time::sleep(self.around_change).await;
        running
    }

    /// Ends a change's load, `around_change` after the view balanced (at once if it did not),
    /// and returns every delivery of what was published.
    async fn end_of_change(
        &self,
        running: RunningLoad,
        balanced: Result<impl Sized, BenchError>,
    ) -> Result<(Vec<Delivery>, Published), BenchError> {
        if balanced.is_ok() {
            tokio::time::sleep(self.around_change).await;
        }
        let published = running.stop().await?;
        balanced?;
        Ok((settle(self.receiver, published.events).await, published))
    }
}

/// One replica under the steady load.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ReplicaCost {
    name: String,
    leading: usize,
    standby: usize,
    rss_kb: u64,
    cpu_seconds: f64,
    deliveries: u64,
    /// CPU seconds per 1,000 of its own deliveries, over the window.
    cpu_seconds_per_1000: Option<f64>,
}

/// The installation at one replica count, measured over one window of steady load.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Step {
    replicas: usize,
    /// Streams the simulator holds for the scenario.
    simulator_streams: usize,
    window_s: f64,
    tally: Tally,
    per_replica: Vec<ReplicaCost>,
}

/// One change of the replica count (or the crash), under load.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Move {
    from: usize,
    to: usize,
    tally: Tally,
    /// From starting the new replica (or the kill) until every token had one owner again.
    balanced_after_s: f64,
    /// Whether the publisher kept the rate through the move.
    kept_up: bool,
}

/// The crash of one of three replicas.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Crash {
    #[serde(flatten)]
    change: Move,
    victim: String,
    tokens_it_led: usize,
    /// From the kill until the first delivery, after the process was gone, of a token it led.
    its_tokens_deliver_after_s: Option<f64>,
}

/// How many of `wanted` tokens the simulator can stream at the scenario's peak: what its
/// open-files limit and the ephemeral ports to its one address leave. With the reason, when it
/// is fewer.
fn token_cap(simulator_pid: u32, wanted: usize) -> (usize, Option<String>) {
    let limits =
        std::fs::read_to_string(format!("/proc/{simulator_pid}/limits")).unwrap_or_default();
    let files_limit: Option<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok());
    let in_use = open_files(simulator_pid).unwrap_or(0);
    let ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut range = s.split_whitespace().map(|p| p.parse::<u64>().ok());
            Some(range.next()??.abs_diff(range.next()??) + 1)
        });
    let per_token = |budget: u64| (budget as f64 / PEAK_STREAMS_PER_TOKEN).floor() as usize;
    let mut cap = (wanted, None);
    if let Some(limit) = files_limit {
        let budget = limit.saturating_sub(in_use + SIMULATOR_SPARE_FDS);
        if per_token(budget) < cap.0 {
            cap = (
                per_token(budget),
                Some(format!(
                    "the simulator's open-files limit is {limit} ({in_use} in use, \
                     {SIMULATOR_SPARE_FDS} kept spare) and sharding holds up to \
                     {PEAK_STREAMS_PER_TOKEN:.2} streams per token (an owner and a standby, and \
                     a third replica's share while it warms)"
                )),
            );
        }
    }
    if let Some(ports) = ports {
        if per_token(ports) < cap.0 {
            cap = (
                per_token(ports),
                Some(format!(
                    "the ephemeral port range has {ports} ports to the simulator's one \
                     address and sharding holds up to {PEAK_STREAMS_PER_TOKEN:.2} streams per \
                     token"
                )),
            );
        }
    }
    cap
}

/// Runs the scenario on namespace `bench-scale-out` and adds its rows to `report`.
pub async fn run(
    context: &Context,
    report: &mut Report,
    plane: &Plane,
    client: &kube::Client,
    simulator: &SimulatorProcess,
    publisher: &Publisher,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let wanted = sizes.tokens_scale_out;
    let (tokens, capped) = token_cap(simulator.pid(), wanted);
    let rate = sizes.scale_out_rate;
    println!(
        "\n== ({SCENARIO}) sharding at {tokens} tokens, {rate:.0} events/s: 1 -> 2 -> 3 \
         replicas, then one killed"
    );
    report.figure(SCENARIO, "tokens", tokens as f64, "");
    if let Some(reason) = &capped {
        report.note(format!(
            "{SCENARIO}: ran {tokens} tokens, not {wanted}: {reason}. On a machine that \
             allows {:.0} descriptors it runs all {wanted}.",
            (wanted as f64 * PEAK_STREAMS_PER_TOKEN).ceil() + SIMULATOR_SPARE_FDS as f64
        ));
    }
    cluster::create_namespace(client, NAMESPACE).await?;
    let simulator_pid = simulator.pid();
    let simulator_files = RssPeak::sampling(move || open_files(simulator_pid));
    let receiver = AuditReceiver::start().await?;
    let streams_before = simulator.open_streams().await?;
    let mut installation = Installation {
        context,
        plane,
        simulator,
        mode: ReplicaMode {
            namespace: NAMESPACE.to_owned(),
            warm: true,
            handover_key: true,
            sharding: true,
        },
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?,
        replicas: Vec::new(),
        started: 0,
        tokens,
    };
    installation.add().await?;

    let mut set = TokenSet::new(NAMESPACE, "so");
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
    installation.wait_balanced().await?;
    simulator
        .wait_streams(streams_before + tokens, Duration::from_secs(300))
        .await?;
    let load = Load {
        publisher,
        templates: Arc::new(EventTemplates::new(&set.spheres())),
        spheres: Arc::new((0..set.len()).collect()),
        rate,
        receiver: &receiver,
        around_change: sizes.phase.min(Duration::from_secs(10)),
    };
    // First events: every token's first delivery opens its path; not audited.
    publisher
        .run(&load.templates, &load.spheres, rate, Duration::from_secs(3))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut steps = vec![steady(&installation, &load, sizes.phase, streams_before).await?];
    let mut moves = Vec::new();
    for _ in 0..2 {
        moves.push(scale_up(&mut installation, &load).await?);
        steps.push(steady(&installation, &load, sizes.phase, streams_before).await?);
    }
    let crash = kill_one(&mut installation, &load, &set).await?;
    let simulator_files_peak = simulator_files.finish().await;
    report.figure(
        SCENARIO,
        "simulator's open files at the peak",
        simulator_files_peak as f64,
        "",
    );

    for step in &steps {
        for cost in &step.per_replica {
            let at = format!("{}, {}", replicas(step.replicas), cost.name);
            report.text(
                SCENARIO,
                &format!("{at}: streams (lead + standby)"),
                &format!("{} + {}", cost.leading, cost.standby),
            );
            report.figure(
                SCENARIO,
                &format!("{at}: RSS"),
                cost.rss_kb as f64 / 1024.0,
                "MB",
            );
            match cost.cpu_seconds_per_1000 {
                Some(seconds) => report.figure(
                    SCENARIO,
                    &format!("{at}: CPU per 1,000 deliveries"),
                    seconds,
                    "s",
                ),
                None => report.text(
                    SCENARIO,
                    &format!("{at}: CPU per 1,000 deliveries"),
                    &format!("no deliveries ({:.2} CPU s)", cost.cpu_seconds),
                ),
            }
        }
    }
    for change in &moves {
        let name = format!("scale {} -> {}", change.from, change.to);
        change.tally.report(report, SCENARIO, &name);
        report.figure(
            SCENARIO,
            &format!("{name}: balanced after"),
            change.balanced_after_s,
            "s",
        );
    }
    let killed = "kill -9 of one of 3";
    crash.change.tally.report(report, SCENARIO, killed);
    match crash.its_tokens_deliver_after_s {
        Some(seconds) => report.figure(
            SCENARIO,
            &format!("{killed}: its tokens deliver again after"),
            seconds,
            "s",
        ),
        None => report.text(
            SCENARIO,
            &format!("{killed}: its tokens deliver again after"),
            "never",
        ),
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let throughput = if cores >= CORES_FOR_THROUGHPUT {
        let figures = throughput(&mut installation, &load, sizes.saturating_rate).await?;
        for (replicas, per_second) in &figures {
            report.throughput(
                SCENARIO,
                &format!("{replicas} replicas: deliveries"),
                *per_second,
                "/s",
            );
        }
        Some(figures)
    } else {
        report.text(
            SCENARIO,
            "deliveries/s at 1, 2 and 4 replicas",
            &format!("skipped ({cores} cores)"),
        );
        report.note(format!(
            "{SCENARIO}: deliveries/s at 1, 2 and 4 replicas skipped: {cores} cores, and \
             replicas sharing them cannot show a speed-up (it needs {CORES_FOR_THROUGHPUT}); \
             the cost per replica above is the figure that carries over"
        ));
        None
    };
    report.detail(
        SCENARIO,
        json!({
            "tokens": tokens,
            "tokensWanted": wanted,
            "tokensCapped": capped,
            "simulatorOpenFilesPeak": simulator_files_peak,
            "eventsPerSecond": rate,
            "steps": steps,
            "moves": moves,
            "crash": crash,
            "deliveriesPerSecondByReplicas": throughput,
        }),
    );
    Ok(())
}

/// Publishes at the steady rate for `window` and measures each replica: its streams, memory,
/// and CPU over the window per delivery it made.
async fn steady(
    installation: &Installation<'_>,
    load: &Load<'_>,
    window: Duration,
    streams_before: usize,
) -> Result<Step, BenchError> {
    let pids: Vec<u32> = installation.replicas.iter().map(Replica::pid).collect();
    let cpu = || -> Vec<f64> {
        pids.iter()
            .map(|p| cpu_seconds(*p).unwrap_or(0.0))
            .collect()
    };
    let deliveries_before = installation.deliveries().await;
    let cpu_before: Vec<f64> = cpu();
    let started = Instant::now();
    load.receiver.reset();
    let published = load
        .publisher
        .run(&load.templates, &load.spheres, load.rate, window)
        .await;
    let deliveries = settle(load.receiver, published.events).await;
    let cpu_after: Vec<f64> = cpu();
    let window_s = started.elapsed().as_secs_f64();
    let deliveries_after = installation.deliveries().await;
    let views = installation.views().await;
    let per_replica = installation
        .replicas
        .iter()
        .enumerate()
        .map(|(i, replica)| {
            let view = views[i].as_ref();
            let delivered = (deliveries_after[i] - deliveries_before[i]).max(0.0) as u64;
            let cpu_seconds = cpu_after[i] - cpu_before[i];
            ReplicaCost {
                name: replica.name.clone(),
                leading: view.map_or(0, |v| v.leading.len()),
                standby: view.map_or(0, |v| v.standby.len()),
                rss_kb: rss_kb(replica.pid()).unwrap_or(0),
                cpu_seconds,
                deliveries: delivered,
                cpu_seconds_per_1000: (delivered > 0)
                    .then(|| cpu_seconds / delivered as f64 * 1000.0),
            }
        })
        .collect::<Vec<_>>();
    let step = Step {
        replicas: installation.replicas.len(),
        simulator_streams: installation
            .simulator
            .open_streams()
            .await?
            .saturating_sub(streams_before),
        window_s,
        tally: Tally::of(&deliveries, published.events),
        per_replica,
    };
    println!(
        "  {}: {} streams at the simulator; {}",
        replicas(step.replicas),
        step.simulator_streams,
        step.per_replica
            .iter()
            .map(|c| format!(
                "{} leads {} + stands by for {}, {} MB, {:.2} CPU s for {} deliveries",
                c.name,
                c.leading,
                c.standby,
                c.rss_kb / 1024,
                c.cpu_seconds,
                c.deliveries
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(step)
}

/// "1 replica", "2 replicas".
fn replicas(count: usize) -> String {
    match count {
        1 => "1 replica".to_owned(),
        n => format!("{n} replicas"),
    }
}

/// Starts one more replica while the load runs, waits until the view is balanced, keeps the
/// load on a while longer, and audits every event published meanwhile.
async fn scale_up(
    installation: &mut Installation<'_>,
    load: &Load<'_>,
) -> Result<Move, BenchError> {
    let from = installation.replicas.len();
    let running = load.start_for_change().await;
    let started = Instant::now();
    let balanced = async {
        installation.add().await?;
        installation.wait_balanced().await
    }
    .await;
    let balanced_after_s = started.elapsed().as_secs_f64();
    let (deliveries, published) = load.end_of_change(running, balanced).await?;
    let change = Move {
        from,
        to: installation.replicas.len(),
        tally: Tally::of(&deliveries, published.events),
        balanced_after_s,
        kept_up: published.kept_up,
    };
    println!(
        "  scale {} -> {}: published {}, lost {}, repeated {} ({} with another webhook-id), \
         balanced after {balanced_after_s:.1} s",
        change.from,
        change.to,
        change.tally.published,
        change.tally.lost,
        change.tally.repeated,
        change.tally.repeated_with_another_id,
    );
    Ok(change)
}

/// Kills the second replica with SIGKILL while the load runs; audits as [`scale_up`] does, and
/// times how long until the tokens it led deliver again.
async fn kill_one(
    installation: &mut Installation<'_>,
    load: &Load<'_>,
    set: &TokenSet,
) -> Result<Crash, BenchError> {
    let from = installation.replicas.len();
    let victim = 1.min(from - 1);
    let index_of: BTreeMap<String, usize> = set
        .tokens
        .iter()
        .enumerate()
        .map(|(i, token)| (TokenHash::of(token).to_hex(), i))
        .collect();
    let running = load.start_for_change().await;
    // Which tokens it leads, read just before the kill.
    let led: BTreeSet<usize> = installation.views().await[victim]
        .as_ref()
        .map(|v| {
            v.leading
                .iter()
                .filter_map(|h| index_of.get(h).copied())
                .collect()
        })
        .unwrap_or_default();
    let started = Instant::now();
    let killed_ns = unix_ns();
    installation.replicas[victim].signal("-KILL")?;
    let mut dead = installation.replicas.remove(victim);
    wait_until(
        "the killed replica to exit",
        Duration::from_secs(10),
        || std::future::ready(dead.exited()),
    )
    .await?;
    let exited_ns = unix_ns();
    let balanced = installation.wait_balanced().await;
    let balanced_after_s = started.elapsed().as_secs_f64();
    let (deliveries, published) = load.end_of_change(running, balanced).await?;
    let tokens = set.len() as u64;
    let resumed_ns = deliveries
        .iter()
        .filter(|d| d.arrived_ns > exited_ns && led.contains(&((d.seq % tokens) as usize)))
        .map(|d| d.arrived_ns)
        .min();
    let crash = Crash {
        change: Move {
            from,
            to: installation.replicas.len(),
            tally: Tally::of(&deliveries, published.events),
            balanced_after_s,
            kept_up: published.kept_up,
        },
        victim: dead.name.clone(),
        tokens_it_led: led.len(),
        its_tokens_deliver_after_s: resumed_ns.map(|ns| (ns - killed_ns) as f64 / 1e9),
    };
    println!(
        "  kill -9 of {} (led {} tokens): published {}, lost {}, repeated {} ({} with another \
         webhook-id), its tokens deliver again after {}",
        crash.victim,
        crash.tokens_it_led,
        crash.change.tally.published,
        crash.change.tally.lost,
        crash.change.tally.repeated,
        crash.change.tally.repeated_with_another_id,
        crash
            .its_tokens_deliver_after_s
            .map_or("never".to_owned(), |s| format!("{s:.2} s")),
    );
    Ok(crash)
}

/// Deliveries a second at each of [`THROUGHPUT_REPLICAS`], publishing at `rate` (more than
/// they deliver): the replicas are stopped and started again one by one from a single one.
async fn throughput(
    installation: &mut Installation<'_>,
    load: &Load<'_>,
    rate: f64,
) -> Result<Vec<(usize, f64)>, BenchError> {
    installation.replicas.clear();
    let mut figures = Vec::new();
    for count in THROUGHPUT_REPLICAS {
        while installation.replicas.len() < count {
            installation.add().await?;
            installation.wait_balanced().await?;
        }
        load.receiver.reset();
        let published = load
            .publisher
            .run(&load.templates, &load.spheres, rate, load.around_change)
            .await;
        let arrived = load
            .receiver
            .deliveries()
            .iter()
            .filter(|d| d.arrived_ns <= published.end_ns)
            .count();
        let per_second = arrived as f64 / published.seconds.max(f64::EPSILON);
        println!(
            "  {count} replicas: {per_second:.0} deliveries/s at {rate:.0} events/s published"
        );
        figures.push((count, per_second));
        // What is still queued drains before the next count.
        settle(load.receiver, published.events).await;
    }
    Ok(figures)
}
