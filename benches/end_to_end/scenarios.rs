//! The scenarios, in the order they run: the ceiling; on namespace `bench` (one operator)
//! (f) at the small size, (b) latency (also (f) at the middle size), (a) throughput at 8
//! receivers, (g) the REST facade, (a) at 100 receivers, (d) fan-out, (e) a slow receiver,
//! (h) overload, (i) fair sharing of one receiver; then on namespace `bench-scale` (a fresh
//! operator) (c) connection scale and (f) at the large size; then, on namespace
//! `bench-handover` (replicas of their own), leader changes under load (`handover.rs`); last,
//! on namespace `bench-scale-out`, tokens sharded over a growing set of replicas (`shard.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crownstone_webhooks::conventions::API_KEY;
use crownstone_webhooks::resources::Listener;
use crownstone_webhooks::simulator::{Scope, TokenRequest};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::json;

use crate::cluster::{
    self, wait_until, OperatorProcess, Plane, RequestRates, SimulatorProcess, TokenSet, SET_LABEL,
};
use crate::handover::Variant;
use crate::load::{self, CeilingRun, EventTemplates, Publisher};
use crate::phase::{self, Load, Phase, Quantiles, SearchPlan, Stage, DROPS};
use crate::receivers::{Receivers, QUIET_PATH};
use crate::report::Report;
use crate::system::{cpu_seconds, free_addr, rss_kb, unix_ns, ChildGuard, Machine, RssPeak};
use crate::{BenchError, Sizes};

/// What a run needs to start its processes and where it writes.
pub struct Context {
    pub sizes: Sizes,
    pub selected: BTreeSet<String>,
    pub repo: PathBuf,
    pub exe: PathBuf,
    pub logs: PathBuf,
    pub json: PathBuf,
}

impl Context {
    fn wants(&self, scenario: &str) -> bool {
        self.selected.contains(scenario)
    }

    fn wants_any(&self, scenarios: &[&str]) -> bool {
        scenarios.iter().any(|s| self.wants(s))
    }
}

/// Runs the selected scenarios, then prints the table and writes the JSON, also after a
/// failure (with what was measured until then).
pub async fn run_all(context: Context) -> Result<(), BenchError> {
    let mut report = Report::new(Machine::read(), serde_json::to_value(&context.sizes)?);
    report.commit = commit(&context.repo);
    let outcome = run_selected(&context, &mut report).await;
    report.load_average_at_end = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if let Err(error) = &outcome {
        report.note(format!("the run stopped early: {error}"));
    }
    report.print();
    report.write_json(&context.json)?;
    println!("\nresults: {}", context.json.display());
    outcome
}

/// `git rev-parse --short HEAD`, with `-dirty` when the working tree has changes.
fn commit(repo: &std::path::Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{head}-dirty"),
        _ => head,
    }
}

async fn run_selected(context: &Context, report: &mut Report) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let receiver_count = sizes.receivers_few.max(sizes.receivers_many);
    let receivers = Receivers::start(receiver_count, &context.logs.join("receivers.log"))?;
    if context.wants("ceiling") {
        println!("\n== ceiling: bare POSTs over loopback");
        ceiling(context, report, &receivers).await?;
    }
    let handovers: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|variant| context.wants(variant.scenario()))
        .collect();
    if !context.wants_any(&[
        "a",
        "b",
        "c",
        "d",
        "e",
        "f",
        "g",
        "h",
        "i",
        "burst",
        "scale-out",
    ]) && handovers.is_empty()
    {
        return Ok(());
    }
    println!("\n== starting the control plane, the simulator and the operator");
    let plane = Plane::start(&context.repo)?;
    let client = plane.client().await?;
    let simulator =
        SimulatorProcess::start(&context.exe, &context.logs.join("simulator.log")).await?;
    let publisher = Publisher::new(&simulator.url)?;
    let parts = Parts {
        plane: &plane,
        client: &client,
        simulator: &simulator,
        receivers: &receivers,
        publisher: &publisher,
    };
    let mut sustained = Sustained::default();
    if context.wants_any(&["a", "b", "d", "e", "f", "g", "h", "i"]) {
        bench_namespace(context, report, &parts, &mut sustained).await?;
    }
    if context.wants_any(&["c", "f"]) {
        connection_scale(context, report, &parts).await?;
    }
    if context.wants("burst") {
        burst(context, report, &parts).await?;
    }
    for variant in handovers {
        crate::handover::run(
            context, report, &plane, &client, &simulator, &publisher, variant,
        )
        .await?;
    }
    if context.wants("scale-out") {
        crate::shard::run(context, report, &plane, &client, &simulator, &publisher).await?;
    }
    Ok(())
}

/// The processes and clients every scenario shares.
struct Parts<'a> {
    plane: &'a Plane,
    client: &'a kube::Client,
    simulator: &'a SimulatorProcess,
    receivers: &'a Receivers,
    publisher: &'a Publisher,
}

impl<'a> Parts<'a> {
    fn stage(&self, operator: &'a OperatorProcess) -> Stage<'a> {
        Stage {
            plane: self.plane,
            simulator: self.simulator,
            operator,
            receivers: self.receivers,
            publisher: self.publisher,
        }
    }
}

/// Rates found by the searches, for the scenarios that build on them.
#[derive(Default)]
struct Sustained {
    few: Option<f64>,
    many: Option<f64>,
    fanout: Option<(f64, Quantiles)>,
}

async fn ceiling(
    context: &Context,
    report: &mut Report,
    receivers: &Receivers,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let targets: Vec<String> = receivers.urls[..sizes.receivers_few].to_vec();
    receivers.reset(&[], Duration::ZERO).await?;
    let receivers_cpu = cpu_seconds(receivers.pid()).unwrap_or(0.0);
    let started_ns = unix_ns();
    let child = Command::new(std::env::current_exe()?)
        .args(["--role", "ceiling-client", "--targets", &targets.join(",")])
        .args(["--concurrency", &sizes.per_destination.to_string()])
        .args(["--seconds", &sizes.ceiling.as_secs_f64().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(
            context.logs.join("ceiling-client.log"),
        )?)
        .spawn()?;
    let mut guard = ChildGuard::adopt("ceiling client", child, Duration::from_secs(3));
    let stdout = guard
        .child_mut()
        .and_then(|c| c.stdout.take())
        .ok_or_else(|| BenchError::new("the ceiling client's output is not readable"))?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    })
    .await??;
    drop(guard);
    let run: CeilingRun = serde_json::from_str(line.trim())
        .map_err(|e| BenchError::new(format!("the ceiling client answered {line:?}: {e}")))?;
    let receivers_cpu = cpu_seconds(receivers.pid()).unwrap_or(0.0) - receivers_cpu;
    let arrivals = receivers.arrivals().await?;
    let latency = Quantiles::of(phase::window_latencies(
        &arrivals,
        started_ns,
        u64::MAX,
        &[],
    ));
    let posts_per_second = run.posts as f64 / run.seconds.max(1e-9);
    report.ceiling_posts_per_second = Some(posts_per_second);
    let scenario = "ceiling";
    report.throughput(
        scenario,
        &format!(
            "bare POSTs/s, {} receivers x {} in flight, {} B bodies",
            sizes.receivers_few, sizes.per_destination, run.body_bytes
        ),
        posts_per_second,
        "/s",
    );
    report.figure(
        scenario,
        "client CPU per 1,000 POSTs",
        run.cpu_seconds / run.posts.max(1) as f64 * 1000.0,
        "CPU-s",
    );
    report.figure(
        scenario,
        "receivers CPU per 1,000 POSTs",
        receivers_cpu / run.posts.max(1) as f64 * 1000.0,
        "CPU-s",
    );
    report.figure(scenario, "POST p99 (send to arrival)", latency.p99, "ms");
    if run.errors > 0 {
        report.note(format!("ceiling: {} POSTs failed", run.errors));
    }
    report.detail(
        scenario,
        json!({"run": run, "receiversCpuSeconds": receivers_cpu, "latencyMs": latency}),
    );
    Ok(())
}

/// The rows every delivery phase gets: its rate and what each process spent on it.
fn phase_rows(report: &mut Report, scenario: &str, phase: &Phase, latency: bool) {
    report.throughput(scenario, "deliveries/s", phase.deliveries_per_second, "/s");
    for process in ["operator", "simulator", "receivers"] {
        if let Some(cpu) = phase.cpu_per_1000_deliveries.get(process) {
            report.figure(
                scenario,
                &format!("{process} CPU per 1,000 deliveries"),
                *cpu,
                "CPU-s",
            );
        }
    }
    let plane_cpu: f64 = ["kube-apiserver", "etcd"]
        .iter()
        .filter_map(|p| phase.cpu_per_1000_deliveries.get(*p))
        .sum();
    report.figure(
        scenario,
        "kube-apiserver+etcd CPU per 1,000 deliveries",
        plane_cpu,
        "CPU-s",
    );
    report.text(
        scenario,
        "API server requests/s by verb",
        &phase.api_requests.summary(),
    );
    if latency {
        report.figure(scenario, "latency p50", phase.latency_ms.p50, "ms");
        report.figure(scenario, "latency p99", phase.latency_ms.p99, "ms");
        report.figure(scenario, "latency p99.9", phase.latency_ms.p999, "ms");
    }
    if !phase.sustained {
        report.text(scenario, "verdict", &phase.verdict());
    }
}

/// Grows a token set, waits for its streams and checks every token end to end.
async fn grow_and_warm(
    report: &mut Report,
    parts: &Parts<'_>,
    operator: &OperatorProcess,
    set: &mut TokenSet,
    to: usize,
    concurrency: usize,
    url: impl Fn(usize) -> String,
) -> Result<(Duration, Arc<EventTemplates>), BenchError> {
    let took = set
        .grow(parts.client, &parts.simulator.admin, to, concurrency, url)
        .await?;
    println!(
        "  {} tokens with a Listener each, created in {took:.1?}",
        set.len()
    );
    let stage = parts.stage(operator);
    stage.settle(set.len()).await?;
    let templates = Arc::new(EventTemplates::new(&set.spheres()));
    let spheres = Arc::new((0..set.len()).collect::<Vec<_>>());
    let warm = phase::warm_up(&stage, &templates, &spheres, 1).await?;
    if warm.lost > 0 {
        report.note(format!(
            "{}: {} of {} tokens did not deliver a first event",
            set.namespace, warm.lost, warm.expected
        ));
    }
    Ok((took, templates))
}

async fn bench_namespace(
    context: &Context,
    report: &mut Report,
    parts: &Parts<'_>,
    sustained: &mut Sustained,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let namespace = "bench";
    cluster::create_namespace(parts.client, namespace).await?;
    let operator = OperatorProcess::start(
        &context.exe,
        &parts.simulator.url,
        namespace,
        &parts.plane.kubeconfig,
        &context.logs.join("operator-bench.log"),
    )
    .await?;
    let stage = parts.stage(&operator);
    let mut set = TokenSet::new(namespace, "bench");
    let few = parts.receivers.urls[..sizes.receivers_few].to_vec();
    let many = parts.receivers.urls[..sizes.receivers_many].to_vec();
    let url_few = |i: usize| few[i % few.len()].clone();
    let url_many = |i: usize| many[i % many.len()].clone();
    let all_spheres = |set: &TokenSet| Arc::new((0..set.len()).collect::<Vec<_>>());

    if context.wants("f") {
        println!(
            "\n== (f) cost at {} tokens, {:.0} deliveries/s",
            sizes.tokens_small, sizes.fixed_rate
        );
        let (_, templates) = grow_and_warm(
            report,
            parts,
            &operator,
            &mut set,
            sizes.tokens_small,
            sizes.create_concurrency,
            url_few,
        )
        .await?;
        let spheres = all_spheres(&set);
        stage.settle(set.len()).await?;
        let phase = phase::run(&stage, &fixed_load(sizes, &templates, &spheres)).await?;
        phase_rows(report, &format!("f {} tokens", set.len()), &phase, false);
        report.detail(&format!("f {} tokens", set.len()), &phase);
    }

    println!("\n== growing to {} tokens", sizes.tokens);
    let (took, templates) = grow_and_warm(
        report,
        parts,
        &operator,
        &mut set,
        sizes.tokens,
        sizes.create_concurrency,
        url_few,
    )
    .await?;
    report.detail(
        "setup bench",
        json!({"tokens": set.len(), "createSeconds": took.as_secs_f64()}),
    );
    let spheres = all_spheres(&set);

    if context.wants_any(&["b", "f"]) {
        println!(
            "\n== (b) latency at {:.0} events/s over {} tokens",
            sizes.fixed_rate,
            set.len()
        );
        stage.settle(set.len()).await?;
        let phase = phase::run(&stage, &fixed_load(sizes, &templates, &spheres)).await?;
        let scenario = format!("b latency {} tokens", set.len());
        phase_rows(report, &scenario, &phase, true);
        report.detail(&scenario, &phase);
        if context.wants("f") {
            phase_rows(report, &format!("f {} tokens", set.len()), &phase, false);
        }
    }

    if context.wants("a") {
        sustained.few = throughput_to(
            report,
            &stage,
            sizes,
            &templates,
            &spheres,
            set.len(),
            sizes.receivers_few,
        )
        .await?;
    }

    if context.wants("g") {
        println!("\n== (g) the REST facade");
        facade(context, report, parts, &set).await?;
    }

    if context.wants_any(&["a", "d", "e", "h"]) {
        let took = set
            .repoint(parts.client, sizes.create_concurrency, url_many)
            .await?;
        println!(
            "  {} Listeners pointed at {} receivers in {took:.1?}",
            set.len(),
            sizes.receivers_many
        );
        stage.settle(set.len()).await?;
        let warm = phase::warm_up(&stage, &templates, &spheres, 1).await?;
        if warm.lost > 0 {
            report.note(format!(
                "after repointing, {} tokens did not deliver",
                warm.lost
            ));
        }
    }

    if context.wants("a") {
        sustained.many = throughput_to(
            report,
            &stage,
            sizes,
            &templates,
            &spheres,
            set.len(),
            sizes.receivers_many,
        )
        .await?;
    }

    if context.wants_any(&["d", "e"]) {
        fan_out(context, report, parts, &operator, &set, sustained).await?;
    }

    if context.wants("h") {
        let base = match sustained.many.or(sustained.few) {
            Some(rate) => rate,
            None => {
                // Without (a), a search of its own, with short probes only, finds the base.
                println!("\n== (h) finding the sustained rate first");
                let search = phase::search(
                    &stage,
                    &SearchPlan {
                        templates: &templates,
                        spheres: &spheres,
                        fanout: 1,
                        start: sizes.search_start,
                        probe: sizes.probe,
                        confirm: sizes.probe,
                        streams: set.len(),
                    },
                )
                .await?;
                search
                    .sustained
                    .map_or(sizes.fixed_rate, |p| p.offered_events_per_second)
            }
        };
        println!(
            "\n== (h) overload: {:.0} deliveries/s, then {:.0}/s",
            base * 2.0,
            base * 0.1
        );
        overload(
            context, report, parts, &operator, &set, &templates, &spheres, base,
        )
        .await?;
    }

    if context.wants("i") {
        fairness(context, report, parts, &operator, set.len()).await?;
    }
    operator.stop();
    Ok(())
}

fn fixed_load<'a>(
    sizes: &Sizes,
    templates: &'a Arc<EventTemplates>,
    spheres: &'a Arc<Vec<usize>>,
) -> Load<'a> {
    Load {
        templates,
        spheres,
        rate: sizes.fixed_rate,
        fanout: 1,
        duration: sizes.phase,
        slow: &[],
        stall: Duration::from_secs(5),
    }
}

/// Scenario (a) over `receivers` receivers: its heading, then [`throughput`].
async fn throughput_to(
    report: &mut Report,
    stage: &Stage<'_>,
    sizes: &Sizes,
    templates: &Arc<EventTemplates>,
    spheres: &Arc<Vec<usize>>,
    tokens: usize,
    receivers: usize,
) -> Result<Option<f64>, BenchError> {
    println!("\n== (a) throughput: {tokens} tokens -> {receivers} receivers");
    let scenario = format!("a {tokens} tokens -> {receivers} receivers");
    throughput(report, stage, sizes, templates, spheres, tokens, &scenario).await
}

/// (a): the highest rate sustained for a whole phase, with its costs.
async fn throughput(
    report: &mut Report,
    stage: &Stage<'_>,
    sizes: &Sizes,
    templates: &Arc<EventTemplates>,
    spheres: &Arc<Vec<usize>>,
    streams: usize,
    scenario: &str,
) -> Result<Option<f64>, BenchError> {
    let search = phase::search(
        stage,
        &SearchPlan {
            templates,
            spheres,
            fanout: 1,
            start: sizes.search_start,
            probe: sizes.probe,
            confirm: sizes.phase,
            streams,
        },
    )
    .await?;
    let rate = search
        .sustained
        .as_ref()
        .map(|p| p.offered_events_per_second);
    if let Some(best) = search.best_probe {
        report.throughput(
            scenario,
            &format!("highest rate a {:?} probe sustained", sizes.probe),
            best,
            "/s",
        );
    }
    match &search.sustained {
        Some(phase) => {
            report.throughput(
                scenario,
                "highest rate sustained with no drop",
                phase.offered_events_per_second,
                "/s",
            );
            phase_rows(report, scenario, phase, true);
        }
        None => report.text(
            scenario,
            "highest rate sustained with no drop",
            "none found",
        ),
    }
    report.detail(scenario, &search);
    Ok(rate)
}

/// (d) one token, a Listener per receiver; (e) the same with one receiver answering after 5 s.
async fn fan_out(
    context: &Context,
    report: &mut Report,
    parts: &Parts<'_>,
    operator: &OperatorProcess,
    set: &TokenSet,
    sustained: &mut Sustained,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let stage = parts.stage(operator);
    let fanout = sizes.receivers_many;
    let prefix = "fan";
    let sphere = load::sphere_id(prefix, 0);
    let user_id = load::user_id(prefix, 0);
    let token = parts
        .simulator
        .admin
        .create_token(&TokenRequest {
            user_id: user_id.clone(),
            spheres: vec![sphere.clone()],
            scopes: vec![Scope::All],
            ttl_seconds: 7 * 24 * 3600,
            email: None,
            password: None,
        })
        .await
        .map_err(|e| BenchError::new(format!("simulator token: {e}")))?
        .token;
    let urls = parts.receivers.urls[..fanout].to_vec();
    cluster::create_fanout(
        parts.client,
        &set.namespace,
        prefix,
        "fan-u",
        &user_id,
        &token,
        &urls,
    )
    .await?;
    let streams = set.len() + 1;
    stage.settle(streams).await?;
    let templates = Arc::new(EventTemplates::new(&[sphere]));
    let spheres = Arc::new(vec![0usize]);
    let warm = phase::warm_up(&stage, &templates, &spheres, fanout).await?;
    if warm.lost > 0 {
        report.note(format!(
            "fan-out: {} of {} first deliveries missing",
            warm.lost, warm.expected
        ));
    }

    let scenario_d = format!("d fan-out 1 token -> {fanout} Listeners");
    if context.wants("d") {
        println!("\n== (d) {scenario_d}");
        let search = phase::search(
            &stage,
            &SearchPlan {
                templates: &templates,
                spheres: &spheres,
                fanout,
                start: sizes.search_start,
                probe: sizes.probe,
                confirm: sizes.phase,
                streams,
            },
        )
        .await?;
        if let Some(best) = search.best_probe {
            report.throughput(
                &scenario_d,
                &format!("highest rate a {:?} probe sustained", sizes.probe),
                best,
                "/s",
            );
        }
        match &search.sustained {
            Some(phase) => {
                report.throughput(
                    &scenario_d,
                    "highest rate sustained with no drop",
                    phase.deliveries_per_second,
                    "/s",
                );
                phase_rows(report, &scenario_d, phase, true);
                sustained.fanout =
                    Some((phase.offered_events_per_second, phase.latency_ms.clone()));
            }
            None => report.text(
                &scenario_d,
                "highest rate sustained with no drop",
                "none found",
            ),
        }
        report.detail(&scenario_d, &search);
    }

    if context.wants("e") {
        let scenario = format!("e 1 of {fanout} receivers answers after 5 s");
        println!("\n== (e) {scenario}");
        // Half the rate (d) sustained (at the limit itself, queueing swamps the comparison),
        // or the fixed rate; the same rate without a slow receiver is the comparison.
        let rate = match &sustained.fanout {
            Some((rate, _)) => rate * 0.5,
            None => sizes.fixed_rate / fanout as f64,
        };
        stage.settle(streams).await?;
        let baseline = phase::run(
            &stage,
            &Load {
                templates: &templates,
                spheres: &spheres,
                rate,
                fanout,
                duration: sizes.phase,
                slow: &[],
                stall: Duration::from_secs(5),
            },
        )
        .await?
        .latency_ms;
        stage.settle(streams).await?;
        let slow = [0u32];
        let load = Load {
            templates: &templates,
            spheres: &spheres,
            rate,
            fanout,
            duration: sizes.phase,
            slow: &slow,
            stall: Duration::from_secs(5),
        };
        let phase = phase::run(&stage, &load).await?;
        report.throughput(
            &scenario,
            "offered deliveries/s (half of (d))",
            rate * fanout as f64,
            "/s",
        );
        report.throughput(
            &scenario,
            "other receivers' deliveries/s",
            phase.deliveries_per_second,
            "/s",
        );
        report.figure(
            &scenario,
            "other receivers' p99",
            phase.latency_ms.p99,
            "ms",
        );
        report.figure(
            &scenario,
            "p99 at the same rate, no slow receiver",
            baseline.p99,
            "ms",
        );
        report.figure(
            &scenario,
            "other receivers' deliveries lost",
            phase.lost.max(0) as f64,
            "",
        );
        report.text(
            &scenario,
            "drops (the slow receiver's queue)",
            &describe(&phase.drops),
        );
        report.detail(
            &scenario,
            json!({"phase": phase, "baselineLatencyMs": baseline}),
        );
        // Let the slow receiver's last requests finish before anything else runs.
        parts.receivers.reset(&[], Duration::ZERO).await?;
        tokio::time::sleep(phase::RECEIVER_SLOW_DELAY + Duration::from_secs(1)).await;
    }
    Ok(())
}

fn describe(values: &BTreeMap<String, f64>) -> String {
    if values.is_empty() {
        return "none".into();
    }
    values
        .iter()
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How long (h) waits at most for the Listeners' statuses to count the overload's failures.
const STATUS_CATCH_UP_LIMIT: Duration = Duration::from_secs(180);

/// (h): twice the sustained rate for a phase, then a tenth of it: the peak memory, the drops
/// and whether statuses count them, and how soon deliveries keep up again.
#[allow(clippy::too_many_arguments)]
async fn overload(
    context: &Context,
    report: &mut Report,
    parts: &Parts<'_>,
    operator: &OperatorProcess,
    set: &TokenSet,
    templates: &Arc<EventTemplates>,
    spheres: &Arc<Vec<usize>>,
    sustained: f64,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let scenario = format!("h overload {} tokens", set.len());
    let stage = parts.stage(operator);
    stage
        .settle(set.len() + usize::from(context.wants_any(&["d", "e"])))
        .await?;
    let selector = format!("{SET_LABEL}={}", set.prefix);
    let failed_of = |listeners: &[Listener]| -> BTreeMap<String, u64> {
        listeners
            .iter()
            .map(|l| {
                let failed = l.status.as_ref().map_or(0, |s| s.failed);
                (l.metadata.name.clone().unwrap_or_default(), failed)
            })
            .collect()
    };
    // Failures of earlier probes may still be on their way to the statuses (the write budget
    // spreads them out): start from statuses that have stopped changing.
    let mut failed_before =
        failed_of(&cluster::listeners(parts.client, &set.namespace, &selector).await?);
    let (settling, mut unchanged_since) = (Instant::now(), Instant::now());
    while settling.elapsed() < STATUS_CATCH_UP_LIMIT
        && unchanged_since.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = failed_of(&cluster::listeners(parts.client, &set.namespace, &selector).await?);
        if now != failed_before {
            (failed_before, unchanged_since) = (now, Instant::now());
        }
    }
    parts.receivers.reset(&[], Duration::ZERO).await?;
    let metrics_before = operator.metrics().await?;
    let rss = RssPeak::start(operator.pid());
    let rss_before = rss_kb(operator.pid()).unwrap_or(0);

    let high = parts
        .publisher
        .run(templates, spheres, sustained * 2.0, sizes.phase)
        .await;
    let overload_end = unix_ns();
    let recovery = sizes.phase.max(Duration::from_secs(20));
    let low = parts
        .publisher
        .run(templates, spheres, sustained * 0.1, recovery)
        .await;
    let expected = high.events + low.events;
    let mut received = 0;
    let mut last_progress = Instant::now();
    let drain_started = Instant::now();
    while received < expected
        && last_progress.elapsed() < Duration::from_secs(5)
        && drain_started.elapsed() < Duration::from_secs(120)
    {
        let now = parts
            .receivers
            .count(high.start_ns, low.end_ns + 1, false)
            .await?;
        if now > received {
            received = now;
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let peak_kb = rss.finish().await;
    let metrics_after = operator.metrics().await?;
    let arrivals = parts.receivers.arrivals().await?;

    let in_high = |sent: u64| sent >= high.start_ns && sent <= high.end_ns;
    let in_low = |sent: u64| sent >= low.start_ns && sent <= low.end_ns;
    let received_high = arrivals.iter().filter(|a| in_high(a.sent_ns)).count() as u64;
    let received_low = arrivals.iter().filter(|a| in_low(a.sent_ns)).count() as u64;
    let arrived_during_high = arrivals
        .iter()
        .filter(|a| in_high(a.sent_ns) && a.arrived_ns <= overload_end)
        .count() as u64;
    let last_overload_arrival = arrivals
        .iter()
        .filter(|a| in_high(a.sent_ns))
        .map(|a| a.arrived_ns)
        .max()
        .unwrap_or(overload_end);
    // Keeping up again: from the last low-rate event that took over a second on.
    let late = Duration::from_secs(1).as_nanos() as u64;
    let last_late_low = arrivals
        .iter()
        .filter(|a| in_low(a.sent_ns) && a.latency_ns() > late)
        .map(|a| a.sent_ns)
        .max();
    let keep_up_seconds =
        last_late_low.map_or(0.0, |t| t.saturating_sub(overload_end) as f64 / 1e9);
    let backlog_seconds = last_overload_arrival.saturating_sub(overload_end) as f64 / 1e9;

    let drops = metrics_after.growth_by_label(&metrics_before, DROPS, "reason");
    let failed_metric = metrics_after.sum(phase::DELIVERIES, Some(("outcome", "failed")))
        - metrics_before.sum(phase::DELIVERIES, Some(("outcome", "failed")));
    let reconnects =
        metrics_after.sum(phase::RECONNECTS, None) - metrics_before.sum(phase::RECONNECTS, None);

    // Status writes keep within the operator's budget (failures first), so with every Listener
    // failing they take a while: wait until the statuses count what the metrics counted, or
    // stop changing.
    let counted = drops.values().sum::<f64>() + failed_metric;
    let grown = |listeners: &[Listener]| -> u64 {
        failed_of(listeners)
            .iter()
            .map(|(name, after)| {
                after.saturating_sub(failed_before.get(name).copied().unwrap_or(0))
            })
            .sum()
    };
    let status_wait = Instant::now();
    let (mut listeners, mut changed) = (Vec::new(), Instant::now());
    let mut last_sum = None;
    while status_wait.elapsed() < STATUS_CATCH_UP_LIMIT {
        listeners = cluster::listeners(parts.client, &set.namespace, &selector).await?;
        let sum = grown(&listeners);
        if sum as f64 >= counted {
            break;
        }
        if last_sum != Some(sum) {
            (last_sum, changed) = (Some(sum), Instant::now());
        } else if changed.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let status_seconds = status_wait.elapsed().as_secs_f64();
    // Only the Listeners whose count grew: lastError stays from earlier scenarios otherwise.
    let mut status_failed = 0;
    let mut newly_failing = 0;
    let mut last_errors: BTreeMap<String, f64> = BTreeMap::new();
    for (name, after) in failed_of(&listeners) {
        let grew = after.saturating_sub(failed_before.get(&name).copied().unwrap_or(0));
        if grew == 0 {
            continue;
        }
        status_failed += grew;
        newly_failing += 1;
        let error = listeners
            .iter()
            .find(|l| l.metadata.name.as_deref() == Some(name.as_str()))
            .and_then(|l| l.status.as_ref()?.last_error.clone())
            .unwrap_or_else(|| "(none)".into());
        *last_errors.entry(error).or_insert(0.0) += 1.0;
    }
    let stats = parts.simulator.admin.stats().await.ok();

    report.throughput(
        &scenario,
        "offered deliveries/s (2x sustained)",
        high.events as f64 / high.seconds.max(1e-9),
        "/s",
    );
    report.throughput(
        &scenario,
        "arrived/s during overload",
        arrived_during_high as f64 / high.seconds.max(1e-9),
        "/s",
    );
    report.figure(
        &scenario,
        "operator RSS before",
        rss_before as f64 / 1024.0,
        "MB",
    );
    report.figure(
        &scenario,
        "operator peak RSS",
        peak_kb as f64 / 1024.0,
        "MB",
    );
    report.text(&scenario, "drops by reason", &describe(&drops));
    report.figure(&scenario, "failed deliveries (metric)", failed_metric, "");
    report.figure(
        &scenario,
        "lost (never arrived)",
        expected as f64 - (received_high + received_low) as f64,
        "",
    );
    report.figure(
        &scenario,
        "status.failed growth summed over Listeners",
        status_failed as f64,
        "",
    );
    report.figure(
        &scenario,
        "status.failed caught up with the metrics after",
        status_seconds,
        "s",
    );
    report.figure(
        &scenario,
        "Listeners whose status.failed grew",
        newly_failing as f64,
        "",
    );
    report.text(
        &scenario,
        "their status.lastError",
        &if last_errors.is_empty() {
            "none".to_owned()
        } else {
            last_errors
                .iter()
                .map(|(e, n)| format!("{n:.0}x {e:?}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
    );
    report.figure(
        &scenario,
        "overload backlog delivered until",
        backlog_seconds,
        "s after",
    );
    if keep_up_seconds < recovery.as_secs_f64() - 1.0 {
        report.figure(
            &scenario,
            "low-rate deliveries on time (<1 s) from",
            keep_up_seconds,
            "s after",
        );
    } else {
        report.text(
            &scenario,
            "low-rate deliveries on time (<1 s) from",
            &format!("not within the {recovery:?} at the low rate"),
        );
    }
    report.figure(&scenario, "stream reconnects", reconnects, "");
    report.detail(
        &scenario,
        json!({
            "high": high, "low": low, "receivedHigh": received_high, "receivedLow": received_low,
            "drops": drops, "failedMetric": failed_metric, "statusFailed": status_failed, "statusSeconds": status_seconds, "arrivedDuringHigh": arrived_during_high,
            "lastErrors": last_errors, "peakRssMb": peak_kb as f64 / 1024.0, "rssBeforeMb": rss_before as f64 / 1024.0,
            "backlogSeconds": backlog_seconds, "keepUpSeconds": keep_up_seconds, "reconnects": reconnects,
            "simulator": stats,
        }),
    );
    Ok(())
}

/// (g): `GET /api/listeners/active` and `GET /api/listeners` of the REST facade.
async fn facade(
    context: &Context,
    report: &mut Report,
    parts: &Parts<'_>,
    set: &TokenSet,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let help = Command::new(&context.exe)
        .args(["api", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !help.is_ok_and(|s| s.success()) {
        report.note("g: `crownstone-webhooks api` does not exist in this build; the REST facade was not measured");
        return Ok(());
    }
    let addr = free_addr()?;
    let admin_key = format!("{:032x}", rand::random::<u128>());
    let mut process = ChildGuard::spawn(
        "api",
        Command::new(&context.exe)
            .args([
                "api",
                "--api-listen",
                &addr.to_string(),
                "--api-namespace",
                &set.namespace,
                "--api-metrics-listen",
                "127.0.0.1:0",
                // The facade itself is measured here, not the per-key rate limit in front of it.
                "--rate-limit",
                "1000000",
                "--rate-burst",
                "1000000",
            ])
            .args(["--events-url", &parts.simulator.url, "--log-format", "json"])
            .env("CROWNSTONE_USER_ADMIN_KEY", &admin_key)
            .env("KUBECONFIG", &parts.plane.kubeconfig)
            .env("RUST_LOG", "warn"),
        &context.logs.join("api.log"),
        Duration::from_secs(10),
    )?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = format!("http://{addr}");
    let ready = format!("{base}/readyz");
    wait_until(
        "the REST facade to be ready",
        Duration::from_secs(120),
        || async {
            http.get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await?;
    process.check_running()?;

    let owner = set.user(0);
    let secrets: Api<Secret> = Api::namespaced(parts.client.clone(), &set.namespace);
    let secret = secrets.get(&format!("{owner}-credentials")).await?;
    let api_key = secret
        .data
        .and_then(|d| d.get(API_KEY).cloned())
        .and_then(|v| String::from_utf8(v.0).ok())
        .ok_or_else(|| BenchError::new("the WebhookUser's credentials have no apiKey"))?;
    let listeners_of_owner = (0..set.len()).filter(|i| set.user(*i) == owner).count();
    let routes = [
        (
            format!("GET /api/listeners/active ({listeners_of_owner} Listeners)"),
            format!(
                "{base}/api/listeners/active?userId={}",
                load::user_id(&set.prefix, 0)
            ),
        ),
        (
            format!("GET /api/listeners ({listeners_of_owner} Listeners)"),
            format!("{base}/api/listeners"),
        ),
    ];
    let mut details = serde_json::Map::new();
    for (name, url) in routes {
        let cpu_before = cpu_seconds(process.pid()).unwrap_or(0.0);
        let (count, errors, latency, seconds) =
            hammer(&http, &url, &api_key, sizes.api_concurrency, sizes.phase).await;
        let cpu = cpu_seconds(process.pid()).unwrap_or(0.0) - cpu_before;
        let scenario = format!("g REST {name}");
        report.figure(
            &scenario,
            &format!("requests/s at {} in flight", sizes.api_concurrency),
            count as f64 / seconds,
            "/s",
        );
        report.figure(&scenario, "p99", latency.p99, "ms");
        report.figure(
            &scenario,
            "api CPU per 1,000 requests",
            cpu / count.max(1) as f64 * 1000.0,
            "CPU-s",
        );
        if errors > 0 {
            report.figure(&scenario, "errors", errors as f64, "");
        }
        details.insert(name, json!({"requests": count, "errors": errors, "seconds": seconds, "latencyMs": latency, "cpuSeconds": cpu}));
    }
    report.detail("g REST", details);
    Ok(())
}

/// `concurrency` loops of GET `url` for `duration`: (answers 200, other answers, latency, s).
async fn hammer(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    concurrency: usize,
    duration: Duration,
) -> (u64, u64, Quantiles, f64) {
    let started = Instant::now();
    let until = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, url, api_key) = (http.clone(), url.to_owned(), api_key.to_owned());
        workers.spawn(async move {
            let (mut ok, mut errors, mut latencies) = (0u64, 0u64, Vec::new());
            while Instant::now() < until {
                let sent = Instant::now();
                let answer = http.get(&url).header("API_KEY", &api_key).send().await;
                let good = match answer {
                    Ok(response) => {
                        let status = response.status();
                        let _ = response.bytes().await;
                        status.is_success()
                    }
                    Err(_) => false,
                };
                latencies.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
                if good {
                    ok += 1;
                } else {
                    errors += 1;
                }
            }
            (ok, errors, latencies)
        });
    }
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::new());
    while let Some(Ok((o, e, l))) = workers.join_next().await {
        ok += o;
        errors += e;
        latencies.extend(l);
    }
    (
        ok,
        errors,
        Quantiles::of(latencies),
        started.elapsed().as_secs_f64(),
    )
}

/// (c) and the large size of (f), on a namespace and operator of their own.
async fn connection_scale(
    context: &Context,
    report: &mut Report,
    parts: &Parts<'_>,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let namespace = "bench-scale";
    let n = sizes.tokens_scale;
    let scenario = format!("c scale {n} tokens");
    println!("\n== (c) connection scale: {n} tokens with a Listener each");
    cluster::create_namespace(parts.client, namespace).await?;
    let operator = OperatorProcess::start(
        &context.exe,
        &parts.simulator.url,
        namespace,
        &parts.plane.kubeconfig,
        &context.logs.join("operator-scale.log"),
    )
    .await?;
    let stage = parts.stage(&operator);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_zero = rss_kb(operator.pid()).unwrap_or(0);
    let streams_before = parts.simulator.open_streams().await?;
    let simulator_rss_zero = rss_kb(parts.simulator.pid()).unwrap_or(0);

    let few = parts.receivers.urls[..sizes.receivers_few].to_vec();
    let mut set = TokenSet::new(namespace, "scale");
    let api_before = parts.plane.request_totals().await?;
    let api_started = Instant::now();
    let cpu_pids = stage.pids();
    let cpu_before = crate::system::CpuSnapshot::take(&cpu_pids);
    // How the open streams grow, once a second, from the first object created.
    let curve = tokio::spawn({
        let admin = parts.simulator.admin.clone();
        let until = streams_before + n;
        async move {
            let mut samples = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(3600) {
                if let Ok(stats) = admin.stats().await {
                    let open = stats.open_streams.saturating_sub(streams_before);
                    samples.push((started.elapsed().as_secs(), open));
                    if stats.open_streams >= until {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            samples
        }
    });
    let took = set
        .grow(
            parts.client,
            &parts.simulator.admin,
            n,
            sizes.create_concurrency,
            |i| few[i % few.len()].clone(),
        )
        .await?;
    let last_listener = Instant::now();
    let open_at_last_listener = parts
        .simulator
        .open_streams()
        .await?
        .saturating_sub(streams_before);
    println!("  {n} Listeners (and {n} Secrets) created in {took:.1?}; {open_at_last_listener} streams open");
    let simulator = parts.simulator;
    let deadline = Duration::from_secs(120).max(Duration::from_secs_f64(n as f64 * 0.12));
    let opened = wait_until(&format!("{n} open streams"), deadline, || async {
        simulator
            .open_streams()
            .await
            .is_ok_and(|open| open >= streams_before + n)
    })
    .await;
    let to_open = last_listener.elapsed();
    let api_after = parts.plane.request_totals().await?;
    let cpu_after = crate::system::CpuSnapshot::take(&cpu_pids);
    let scale_up =
        RequestRates::between(&api_before, &api_after, api_started.elapsed().as_secs_f64());
    curve.abort();
    let curve = curve.await.unwrap_or_default();
    let open_now = parts.simulator.open_streams().await? - streams_before;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kb(operator.pid()).unwrap_or(0);
    let simulator_rss = rss_kb(parts.simulator.pid()).unwrap_or(0);
    let per_stream_kb = (rss.saturating_sub(rss_zero)) as f64 / open_now.max(1) as f64;
    let simulator_per_stream_kb =
        (simulator_rss.saturating_sub(simulator_rss_zero)) as f64 / open_now.max(1) as f64;

    report.figure(
        &scenario,
        &format!(
            "create {n} Secrets + {n} Listeners ({} in flight)",
            sizes.create_concurrency
        ),
        took.as_secs_f64(),
        "s",
    );
    match opened {
        Ok(()) => report.figure(
            &scenario,
            "last Listener created -> all streams open",
            to_open.as_secs_f64(),
            "s",
        ),
        Err(_) => report.text(
            &scenario,
            "last Listener created -> all streams open",
            &format!("only {open_now} of {n} open after {to_open:.0?}"),
        ),
    }
    report.figure(
        &scenario,
        "operator RSS with 0 streams",
        rss_zero as f64 / 1024.0,
        "MB",
    );
    report.figure(
        &scenario,
        &format!("operator RSS with {open_now} streams"),
        rss as f64 / 1024.0,
        "MB",
    );
    report.figure(
        &scenario,
        "operator RSS per open stream",
        per_stream_kb,
        "KB",
    );
    report.figure(
        &scenario,
        "simulator RSS per open stream",
        simulator_per_stream_kb,
        "KB",
    );
    report.text(
        &scenario,
        "API requests/s by verb, scale-up",
        &scale_up.summary(),
    );
    let per_listener = scale_up
        .busiest
        .iter()
        .take(4)
        .map(|(key, rate)| format!("{key} {:.1}", rate * scale_up.seconds / n as f64))
        .collect::<Vec<_>>()
        .join(", ");
    report.text(
        &scenario,
        "API requests per Listener, scale-up",
        &per_listener,
    );
    let scale_cpu = cpu_after.since(&cpu_before);
    let mut by_cpu: Vec<(&String, &f64)> = scale_cpu.iter().collect();
    by_cpu.sort_by(|a, b| b.1.total_cmp(a.1));
    report.text(
        &scenario,
        "CPU-s spent during scale-up",
        &by_cpu
            .iter()
            .map(|(p, c)| format!("{p} {c:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.figure(
        &scenario,
        "streams open when the last Listener was created",
        open_at_last_listener as f64,
        "",
    );
    report.detail(
        &scenario,
        json!({
            "createSeconds": took.as_secs_f64(), "toOpenSeconds": to_open.as_secs_f64(),
            "openStreams": open_now, "rssZeroKb": rss_zero, "rssKb": rss,
            "simulatorRssZeroKb": simulator_rss_zero, "simulatorRssKb": simulator_rss,
            "scaleUpApiRequests": scale_up, "scaleUpCpuSeconds": scale_cpu,
            "openAtLastListener": open_at_last_listener,
            "openStreamsBySecond": curve,
        }),
    );
    let ready = cluster::listeners(
        parts.client,
        namespace,
        &format!("{SET_LABEL}={}", set.prefix),
    )
    .await?
    .iter()
    .filter(|l: &&Listener| l.condition("Ready").is_some_and(|c| c.status == "True"))
    .count();
    report.figure(&scenario, "Listeners Ready", ready as f64, "");

    if opened.is_ok() {
        println!(
            "\n== (c)/(f) steady delivery at {:.0}/s over {n} tokens",
            sizes.fixed_rate
        );
        let templates = Arc::new(EventTemplates::new(&set.spheres()));
        let spheres = Arc::new((0..n).collect::<Vec<_>>());
        let warm = phase::warm_up(&stage, &templates, &spheres, 1).await?;
        if warm.lost > 0 {
            report.note(format!(
                "{namespace}: {} of {n} tokens did not deliver a first event",
                warm.lost
            ));
        }
        stage.settle(streams_before + n).await?;
        let phase = phase::run(&stage, &fixed_load(sizes, &templates, &spheres)).await?;
        report.text(
            &scenario,
            "API requests/s by verb, steady delivery",
            &phase.api_requests.summary(),
        );
        let f = format!("f {n} tokens");
        phase_rows(report, &f, &phase, true);
        report.detail(&f, &phase);
        let failures = operator
            .metrics()
            .await?
            .by_label("crownstone_webhooks_controller_failures_total", "error");
        report.text(
            &scenario,
            "reconcile failures by kind",
            &describe(&failures),
        );
        operator.stop();
        memory_split(context, report, &scenario, parts, namespace, rss_zero, n).await?;
    } else {
        report.note(format!(
            "{scenario}: not every stream opened; steady delivery not measured"
        ));
        operator.stop();
    }
    Ok(())
}

/// Where the operator's memory per stream goes, and a cold start: a fresh operator whose event
/// server cannot be reached caches every Listener and Secret but opens no stream; then a fresh
/// operator with the simulator opens all `n` streams from nothing.
async fn memory_split(
    context: &Context,
    report: &mut Report,
    scenario: &str,
    parts: &Parts<'_>,
    namespace: &str,
    rss_zero: u64,
    n: usize,
) -> Result<(), BenchError> {
    let reconciled = "crownstone_webhooks_controller_reconciliations_total";
    let nowhere = format!("http://{}", free_addr()?);
    let cached_only = OperatorProcess::start(
        &context.exe,
        &nowhere,
        namespace,
        &parts.plane.kubeconfig,
        &context.logs.join("operator-no-streams.log"),
    )
    .await?;
    let cached_only_ref = &cached_only;
    let all_reconciled = wait_until(
        "every Listener reconciled",
        Duration::from_secs(600),
        || async {
            cached_only_ref
                .metrics()
                .await
                .is_ok_and(|m| m.sum(reconciled, Some(("controller", "listener"))) >= n as f64)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_cached = rss_kb(cached_only.pid()).unwrap_or(0);
    cached_only.stop();
    if all_reconciled.is_err() {
        report.note(format!(
            "{scenario}: the operator without streams had not reconciled every Listener"
        ));
    }

    let started = Instant::now();
    let cold = OperatorProcess::start(
        &context.exe,
        &parts.simulator.url,
        namespace,
        &parts.plane.kubeconfig,
        &context.logs.join("operator-cold-start.log"),
    )
    .await?;
    let simulator = parts.simulator;
    let opened = wait_until(
        &format!("{n} streams after a cold start"),
        Duration::from_secs(600),
        || async { simulator.open_streams().await.is_ok_and(|open| open >= n) },
    )
    .await;
    let cold_start = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_cold = rss_kb(cold.pid()).unwrap_or(0);
    cold.stop();

    report.figure(
        scenario,
        "operator RSS, all cached, no stream (events url unreachable)",
        rss_cached as f64 / 1024.0,
        "MB",
    );
    report.figure(
        scenario,
        "  caches and reconcile state per Listener",
        rss_cached.saturating_sub(rss_zero) as f64 / n.max(1) as f64,
        "KB",
    );
    match opened {
        Ok(()) => {
            report.figure(
                scenario,
                &format!("operator restart -> all {n} streams open"),
                cold_start.as_secs_f64(),
                "s",
            );
            report.figure(
                scenario,
                "operator RSS after a cold start",
                rss_cold as f64 / 1024.0,
                "MB",
            );
            report.figure(
                scenario,
                "  per open stream, caches apart",
                rss_cold.saturating_sub(rss_cached) as f64 / n.max(1) as f64,
                "KB",
            );
        }
        Err(_) => report.text(
            scenario,
            &format!("operator restart -> all {n} streams open"),
            "not within 600 s",
        ),
    }
    report.detail(
        &format!("{scenario} memory"),
        json!({"rssZeroKb": rss_zero, "rssCachedNoStreamsKb": rss_cached,
               "rssColdStartKb": rss_cold, "coldStartSeconds": cold_start.as_secs_f64()}),
    );
    Ok(())
}

/// How long (i)'s receiver takes per delivery: with the operator's 16 requests in flight per
/// destination, it takes 160 deliveries a second.
const FAIR_DELAY: Duration = Duration::from_millis(100);

/// (i)'s quiet owner's rate, in events a second.
const QUIET_RATE: f64 = 10.0;

/// Tokens of (i)'s flooding owner: its rate is spread over a few streams, as a platform's is.
const FLOOD_TOKENS: usize = 4;

/// (i): owner `fairflood-u-0000` offers one receiver 5x what it takes for a phase, owner
/// `fairquiet-u-0000` a few events a second to the same receiver (one destination, told apart by
/// path); the quiet owner's latency and losses, and the flooder's.
async fn fairness(
    context: &Context,
    report: &mut Report,
    parts: &Parts<'_>,
    operator: &OperatorProcess,
    streams: usize,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let index = parts.receivers.urls.len() - 1;
    let flood_url = parts.receivers.urls[index].clone();
    let quiet_url = flood_url.replace("/webhook", QUIET_PATH);
    let takes = sizes.per_destination as f64 / FAIR_DELAY.as_secs_f64();
    let flood_rate = takes * 5.0;
    println!(
        "\n== (i) fair sharing: one owner offers {flood_rate:.0}/s, another {QUIET_RATE:.0}/s, \
         to one receiver that takes {takes:.0}/s"
    );
    let namespace = "bench";
    let mut flood = TokenSet::new(namespace, "fairflood");
    let mut quiet = TokenSet::new(namespace, "fairquiet");
    let concurrency = sizes.create_concurrency;
    let (_, flood_templates) = grow_and_warm(
        report,
        parts,
        operator,
        &mut flood,
        FLOOD_TOKENS,
        concurrency,
        |_| flood_url.clone(),
    )
    .await?;
    let (_, quiet_templates) =
        grow_and_warm(report, parts, operator, &mut quiet, 1, concurrency, |_| {
            quiet_url.clone()
        })
        .await?;
    parts
        .stage(operator)
        .settle(streams + FLOOD_TOKENS + 1)
        .await?;
    parts.receivers.reset(&[index as u32], FAIR_DELAY).await?;
    let metrics_before = operator.metrics().await?;

    let flood_spheres = Arc::new((0..flood.len()).collect::<Vec<_>>());
    let quiet_spheres = Arc::new(vec![0]);
    let (flooded, quieted) = tokio::join!(
        parts
            .publisher
            .run(&flood_templates, &flood_spheres, flood_rate, sizes.phase),
        parts
            .publisher
            .run(&quiet_templates, &quiet_spheres, QUIET_RATE, sizes.phase),
    );
    // The flooder's backlog drains at the receiver's pace: wait until it stops arriving.
    let (from, to) = (
        flooded.start_ns.min(quieted.start_ns),
        flooded.end_ns.max(quieted.end_ns) + 1,
    );
    let expected = flooded.events + quieted.events;
    let (mut received, mut progress, drain) = (0, Instant::now(), Instant::now());
    while received < expected
        && progress.elapsed() < Duration::from_secs(5)
        && drain.elapsed() < Duration::from_secs(180)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = parts.receivers.count(from, to, false).await?;
        if now > received {
            (received, progress) = (now, Instant::now());
        }
    }
    let metrics_after = operator.metrics().await?;
    let arrivals = parts.receivers.arrivals().await?;
    parts.receivers.reset(&[], Duration::ZERO).await?;

    let on_lane = |lane: u32| {
        arrivals
            .iter()
            .filter(move |a| a.lane == lane && a.sent_ns >= from && a.sent_ns < to)
    };
    let quiet_latency = Quantiles::of(on_lane(1).map(|a| a.latency_ns()).collect());
    let quiet_received = on_lane(1).count() as u64;
    let flood_received = on_lane(0).count() as u64;
    let drops = metrics_after.growth_by_label(&metrics_before, DROPS, "reason");

    let scenario = "i fair sharing";
    report.throughput(
        scenario,
        "flooding owner offered/s (5x what the receiver takes)",
        flooded.events as f64 / flooded.seconds.max(1e-9),
        "/s",
    );
    report.throughput(
        scenario,
        "flooding owner delivered/s",
        flood_received as f64 / drain.elapsed().as_secs_f64().max(1e-9),
        "/s",
    );
    report.figure(scenario, "quiet owner latency p50", quiet_latency.p50, "ms");
    report.figure(scenario, "quiet owner latency p99", quiet_latency.p99, "ms");
    report.figure(scenario, "quiet owner published", quieted.events as f64, "");
    report.figure(
        scenario,
        "quiet owner lost (never arrived)",
        quieted.events as f64 - quiet_received as f64,
        "",
    );
    report.figure(
        scenario,
        "flooding owner lost (never arrived)",
        flooded.events as f64 - flood_received as f64,
        "",
    );
    report.text(scenario, "drops by reason", &describe(&drops));
    report.detail(
        scenario,
        json!({
            "flood": flooded, "quiet": quieted, "receiverTakesPerSecond": takes,
            "floodReceived": flood_received, "quietReceived": quiet_received,
            "quietLatencyMs": quiet_latency, "drops": drops,
        }),
    );
    Ok(())
}

/// Rounds of (burst): each publishes one event on every token at once.
const BURST_ROUNDS: usize = 3;

/// (burst): `tokens_scale` tokens whose Listeners all belong to one WebhookUser and post to one
/// receiver url, an event on every token at once, a few times: deliveries lost, the operator's
/// peak memory, and the time from publishing to the last arrival.
async fn burst(
    context: &Context,
    report: &mut Report,
    parts: &Parts<'_>,
) -> Result<(), BenchError> {
    let sizes = &context.sizes;
    let namespace = "bench-burst";
    let n = sizes.tokens_scale;
    let scenario = format!("burst {n} tokens, one owner, one url");
    println!("\n== (burst) {n} tokens of one owner posting to one url, an event on each at once");
    cluster::create_namespace(parts.client, namespace).await?;
    let listeners = n.to_string();
    let operator = OperatorProcess::start_with(
        &context.exe,
        &parts.simulator.url,
        namespace,
        &parts.plane.kubeconfig,
        &context.logs.join("operator-burst.log"),
        &[("MAX_LISTENERS_PER_USER", &listeners)],
    )
    .await?;
    let streams_before = parts.simulator.open_streams().await?;
    let url = parts.receivers.urls[0].clone();
    let mut set = TokenSet::one_owner(namespace, "burst");
    let took = set
        .grow(
            parts.client,
            &parts.simulator.admin,
            n,
            sizes.create_concurrency,
            |_| url.clone(),
        )
        .await?;
    println!("  {n} Listeners of one owner created in {took:.1?}");
    let simulator = parts.simulator;
    let deadline = Duration::from_secs(120).max(Duration::from_secs_f64(n as f64 * 0.12));
    wait_until(&format!("{n} open streams"), deadline, || async {
        simulator
            .open_streams()
            .await
            .is_ok_and(|open| open >= streams_before + n)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    parts.receivers.reset(&[], Duration::ZERO).await?;
    let templates = Arc::new(EventTemplates::new(&set.spheres()));
    let spheres = Arc::new((0..n).collect::<Vec<_>>());
    let metrics_before = operator.metrics().await?;
    let rss_before = rss_kb(operator.pid()).unwrap_or(0);
    let rss = RssPeak::start(operator.pid());

    let (mut published, mut received, mut drains) = (0u64, 0u64, Vec::new());
    for round in 0..BURST_ROUNDS {
        // All n events within a tenth of a second: as one batch of the publisher as it allows.
        let burst_window = Duration::from_millis(100);
        let rate = n as f64 / burst_window.as_secs_f64();
        let sent = parts
            .publisher
            .run(&templates, &spheres, rate, burst_window)
            .await;
        let (from, to) = (sent.start_ns, sent.end_ns + 1);
        let started = Instant::now();
        let (mut arrived, mut progress, mut last) = (0, Instant::now(), Duration::ZERO);
        while arrived < sent.events
            && progress.elapsed() < Duration::from_secs(10)
            && started.elapsed() < Duration::from_secs(300)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = parts.receivers.count(from, to, false).await?;
            if now > arrived {
                (arrived, progress, last) = (now, Instant::now(), started.elapsed());
            }
        }
        println!(
            "  round {}: {} published, {arrived} arrived, drained in {last:.2?}",
            round + 1,
            sent.events
        );
        published += sent.events;
        received += arrived;
        drains.push(last.as_secs_f64());
    }
    let peak_kb = rss.finish().await;
    let metrics_after = operator.metrics().await?;
    let drops = metrics_after.growth_by_label(&metrics_before, DROPS, "reason");
    parts.receivers.reset(&[], Duration::ZERO).await?;
    operator.stop();

    report.figure(&scenario, "deliveries published", published as f64, "");
    report.figure(
        &scenario,
        "deliveries lost (never arrived)",
        published as f64 - received as f64,
        "",
    );
    report.text(&scenario, "drops by reason", &describe(&drops));
    report.figure(
        &scenario,
        "operator RSS before",
        rss_before as f64 / 1024.0,
        "MB",
    );
    report.figure(
        &scenario,
        "operator peak RSS",
        peak_kb as f64 / 1024.0,
        "MB",
    );
    let slowest = drains.iter().copied().fold(0.0, f64::max);
    report.figure(
        &scenario,
        "time to drain (slowest round)",
        slowest * 1000.0,
        "ms",
    );
    report.throughput(
        &scenario,
        "delivered/s while draining",
        received as f64 / drains.iter().sum::<f64>().max(1e-9),
        "/s",
    );
    report.detail(
        &scenario,
        json!({
            "rounds": BURST_ROUNDS, "published": published, "received": received,
            "drainSeconds": drains, "drops": drops, "rssBeforeKb": rss_before,
            "peakRssKb": peak_kb,
        }),
    );
    Ok(())
}
