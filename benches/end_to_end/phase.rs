//! One measured phase: publish at a rate for a time, wait until the deliveries have arrived (or
//! stopped arriving), and read what every process spent; and the search for the highest rate
//! sustained without a drop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{wait_until, OperatorProcess, Plane, RequestRates, SimulatorProcess};
use crate::load::{EventTemplates, Published, Publisher};
use crate::receivers::{Arrival, Receivers};
use crate::system::{CpuSnapshot, RssPeak};
use crate::BenchError;

/// Operator metric names.
pub const DROPS: &str = "crownstone_webhooks_webhook_delivery_drops_total";
pub const DELIVERIES: &str = "crownstone_webhooks_webhook_deliveries_total";
pub const QUEUE_DEPTH: &str = "crownstone_webhooks_webhook_delivery_queue_depth";
pub const RECONNECTS: &str = "crownstone_webhooks_forwarder_reconnects_total";
pub const SKIPPED: &str = "crownstone_webhooks_forwarder_skipped_total";
pub const STATUS_WRITES: &str = "crownstone_webhooks_controller_status_writes_total";

/// A p99 above this means the system is falling behind, not keeping up.
const SUSTAINED_P99: Duration = Duration::from_secs(2);

/// The processes a phase measures.
pub struct Stage<'a> {
    pub plane: &'a Plane,
    pub simulator: &'a SimulatorProcess,
    pub operator: &'a OperatorProcess,
    pub receivers: &'a Receivers,
    pub publisher: &'a Publisher,
}

impl Stage<'_> {
    pub fn pids(&self) -> BTreeMap<String, u32> {
        BTreeMap::from([
            ("operator".to_owned(), self.operator.pid()),
            ("simulator".to_owned(), self.simulator.pid()),
            ("receivers".to_owned(), self.receivers.pid()),
            ("kube-apiserver".to_owned(), self.plane.apiserver_pid),
            ("etcd".to_owned(), self.plane.etcd_pid),
            ("harness".to_owned(), std::process::id()),
        ])
    }

    /// Waits until the operator holds no delivery and the simulator has `streams` open.
    pub async fn settle(&self, streams: usize) -> Result<(), BenchError> {
        let operator = self.operator;
        wait_until(
            "the operator's queues to empty",
            Duration::from_secs(90),
            || async {
                operator
                    .metrics()
                    .await
                    .is_ok_and(|m| m.sum(QUEUE_DEPTH, None) == 0.0)
            },
        )
        .await?;
        let simulator = self.simulator;
        wait_until(
            &format!("{streams} open streams"),
            Duration::from_secs(120),
            || async { simulator.open_streams().await.is_ok_and(|n| n >= streams) },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }
}

/// What to publish.
pub struct Load<'a> {
    pub templates: &'a Arc<EventTemplates>,
    /// Sphere indices, round-robin.
    pub spheres: &'a Arc<Vec<usize>>,
    /// Events a second.
    pub rate: f64,
    /// Deliveries each event makes (Listeners per token).
    pub fanout: usize,
    pub duration: Duration,
    /// Receivers that answer slowly; their deliveries are left out of counts and latencies.
    pub slow: &'a [u32],
    /// How long the arrivals may stall before the phase ends short.
    pub stall: Duration,
}

/// Latency quantiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Quantiles {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Quantiles {
    pub fn of(mut nanos: Vec<u64>) -> Quantiles {
        if nanos.is_empty() {
            return Quantiles::default();
        }
        nanos.sort_unstable();
        let at = |q: f64| {
            let index = ((q * nanos.len() as f64).ceil() as usize).clamp(1, nanos.len()) - 1;
            nanos[index] as f64 / 1e6
        };
        Quantiles {
            count: nanos.len(),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// What a phase measured.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Phase {
    pub offered_events_per_second: f64,
    pub fanout: usize,
    pub published: Published,
    pub expected: u64,
    pub received: u64,
    pub lost: i64,
    pub deliveries_per_second: f64,
    pub latency_ms: Quantiles,
    pub drops: BTreeMap<String, f64>,
    pub failed: f64,
    pub skipped: f64,
    pub reconnects: f64,
    pub status_writes: f64,
    pub cpu_seconds: BTreeMap<String, f64>,
    pub cpu_per_1000_deliveries: BTreeMap<String, f64>,
    pub operator_peak_rss_mb: f64,
    pub drain_seconds: f64,
    pub api_requests: RequestRates,
    pub sustained: bool,
}

impl Phase {
    pub fn drops_total(&self) -> f64 {
        self.drops.values().sum()
    }

    fn judge(&mut self) {
        self.sustained = self.lost <= 0
            && self.drops_total() == 0.0
            && self.failed == 0.0
            && self.published.kept_up
            && self.published.errors == 0
            && self.latency_ms.p99 < SUSTAINED_P99.as_secs_f64() * 1000.0;
    }

    /// Why it was not sustained, in a few words.
    pub fn verdict(&self) -> String {
        if self.sustained {
            return "sustained".into();
        }
        let mut why = Vec::new();
        if self.lost > 0 {
            why.push(format!("{} lost", self.lost));
        }
        if self.drops_total() > 0.0 {
            why.push(format!("{} dropped", self.drops_total()));
        }
        if self.failed > 0.0 {
            why.push(format!("{} failed", self.failed));
        }
        if !self.published.kept_up {
            why.push("generator fell behind".into());
        }
        if self.published.errors > 0 {
            why.push(format!("{} publish errors", self.published.errors));
        }
        if self.latency_ms.p99 >= SUSTAINED_P99.as_secs_f64() * 1000.0 {
            why.push(format!("p99 {:.0} ms", self.latency_ms.p99));
        }
        why.join(", ")
    }
}

/// Runs one phase: reset the receivers, publish, wait for the deliveries, read the counters.
pub async fn run(stage: &Stage<'_>, load: &Load<'_>) -> Result<Phase, BenchError> {
    let receivers = stage.receivers;
    let pids = stage.pids();
    receivers.reset(load.slow, RECEIVER_SLOW_DELAY).await?;
    let metrics_before = stage.operator.metrics().await?;
    let api_before = stage.plane.request_totals().await?;
    let cpu_before = CpuSnapshot::take(&pids);
    let api_started = Instant::now();
    let rss = RssPeak::start(stage.operator.pid());

    let published = stage
        .publisher
        .run(load.templates, load.spheres, load.rate, load.duration)
        .await;

    let per_event = load.fanout.saturating_sub(load.slow.len()) as u64;
    let expected = published.events * per_event;
    let exclude_slow = !load.slow.is_empty();
    let drain_started = Instant::now();
    let cap = load.stall.max(Duration::from_secs(60));
    let mut received = 0;
    let mut last_progress = Instant::now();
    loop {
        let now = receivers
            .count(published.start_ns, published.end_ns + 1, exclude_slow)
            .await?;
        if now > received {
            received = now;
            last_progress = Instant::now();
        }
        if received >= expected
            || last_progress.elapsed() > load.stall
            || drain_started.elapsed() > cap
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();

    let cpu_after = CpuSnapshot::take(&pids);
    let metrics_after = stage.operator.metrics().await?;
    let api_after = stage.plane.request_totals().await?;
    let api_seconds = api_started.elapsed().as_secs_f64();
    let peak_rss_kb = rss.finish().await;

    let arrivals = receivers.arrivals().await?;
    let latencies = window_latencies(&arrivals, published.start_ns, published.end_ns, load.slow);

    let delta = |name: &str, label: Option<(&str, &str)>| {
        metrics_after.sum(name, label) - metrics_before.sum(name, label)
    };
    let drops = metrics_after.growth_by_label(&metrics_before, DROPS, "reason");
    let cpu_seconds = cpu_after.since(&cpu_before);
    let cpu_per_1000_deliveries = cpu_seconds
        .iter()
        .map(|(name, cpu)| (name.clone(), cpu / (received.max(1) as f64) * 1000.0))
        .collect();
    let mut phase = Phase {
        offered_events_per_second: load.rate,
        fanout: load.fanout,
        deliveries_per_second: received as f64 / published.seconds.max(1e-9),
        published,
        expected,
        received,
        lost: expected as i64 - received as i64,
        latency_ms: Quantiles::of(latencies),
        drops,
        failed: delta(DELIVERIES, Some(("outcome", "failed"))),
        skipped: delta(SKIPPED, None),
        reconnects: delta(RECONNECTS, None),
        status_writes: delta(STATUS_WRITES, None),
        cpu_seconds,
        cpu_per_1000_deliveries,
        operator_peak_rss_mb: peak_rss_kb as f64 / 1024.0,
        drain_seconds,
        api_requests: RequestRates::between(&api_before, &api_after, api_seconds),
        sustained: false,
    };
    phase.judge();
    Ok(phase)
}

/// How long a slow receiver waits before answering.
pub const RECEIVER_SLOW_DELAY: Duration = Duration::from_secs(5);

/// Latencies of the arrivals of events published in `[from, to]`, slow receivers left out.
pub fn window_latencies(arrivals: &[Arrival], from: u64, to: u64, slow: &[u32]) -> Vec<u64> {
    arrivals
        .iter()
        .filter(|a| a.sent_ns >= from && a.sent_ns <= to && !slow.contains(&a.receiver))
        .map(Arrival::latency_ns)
        .collect()
}

/// Publishes one event to every sphere and waits until they have all arrived: the operator
/// routes every token end to end. Tries up to three times; returns the last attempt.
pub async fn warm_up(
    stage: &Stage<'_>,
    templates: &Arc<EventTemplates>,
    spheres: &Arc<Vec<usize>>,
    fanout: usize,
) -> Result<Phase, BenchError> {
    let mut last = Phase::default();
    for _ in 0..3 {
        let load = Load {
            templates,
            spheres,
            // Each sphere once, over a second or more.
            rate: (spheres.len() as f64).min(5_000.0),
            fanout,
            duration: Duration::from_secs_f64((spheres.len() as f64 / 5_000.0).max(1.0)),
            slow: &[],
            stall: Duration::from_secs(10),
        };
        last = run(stage, &load).await?;
        if last.lost <= 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    Ok(last)
}

/// One probe of the search.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub offered_deliveries_per_second: f64,
    pub seconds: f64,
    pub deliveries_per_second: f64,
    pub p99_ms: f64,
    pub verdict: String,
}

/// The highest rate sustained: short probes doubling, then bisecting, then a full-length run
/// at the best rate found (lowered by 10 % and run again, up to three times, if that fails).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Search {
    pub probes: Vec<Probe>,
    /// The highest rate a short probe sustained.
    pub best_probe: Option<f64>,
    /// The full-length run at the rate found, if one was sustained.
    pub sustained: Option<Phase>,
}

/// How a search runs.
pub struct SearchPlan<'a> {
    pub templates: &'a Arc<EventTemplates>,
    pub spheres: &'a Arc<Vec<usize>>,
    pub fanout: usize,
    /// Deliveries a second of the first probe.
    pub start: f64,
    pub probe: Duration,
    pub confirm: Duration,
    /// Streams that must be open before each probe.
    pub streams: usize,
}

pub async fn search(stage: &Stage<'_>, plan: &SearchPlan<'_>) -> Result<Search, BenchError> {
    // Doubling from the start finds a failing rate within a few probes; then bisections until
    // the passing and failing rates are within about 6 % of each other.
    const MAX_PROBES: usize = 16;
    const BISECTIONS: usize = 4;
    const RESOLUTION: f64 = 1.06;
    const MAX_RATE: f64 = 1_000_000.0;
    let mut result = Search::default();
    let (mut pass, mut fail): (Option<f64>, Option<f64>) = (None, None);
    let mut bisections = 0;
    for _ in 0..MAX_PROBES {
        let rate = match (pass, fail) {
            (None, None) => plan.start,
            (Some(p), None) => p * 2.0,
            (None, Some(f)) => f / 2.0,
            (Some(p), Some(f)) if f / p > RESOLUTION && bisections < BISECTIONS => {
                bisections += 1;
                (p + f) / 2.0
            }
            _ => break,
        };
        if rate > MAX_RATE || rate < plan.fanout as f64 {
            break;
        }
        let phase = probe(stage, plan, rate, plan.probe).await?;
        println!(
            "    probe {rate:.0} deliveries/s for {:?}: {:.0}/s, p99 {:.1} ms — {}",
            plan.probe,
            phase.deliveries_per_second,
            phase.latency_ms.p99,
            phase.verdict()
        );
        result.probes.push(Probe {
            offered_deliveries_per_second: rate,
            seconds: plan.probe.as_secs_f64(),
            deliveries_per_second: phase.deliveries_per_second,
            p99_ms: phase.latency_ms.p99,
            verdict: phase.verdict(),
        });
        if phase.sustained {
            pass = Some(rate);
        } else {
            fail = Some(rate);
        }
    }
    result.best_probe = pass;
    let Some(mut rate) = pass else {
        return Ok(result);
    };
    // A full-length run can fail where a short probe passed (a backlog that grows slowly, or
    // other work on the machine): lower the rate and run again, a few times.
    for _ in 0..4 {
        let phase = probe(stage, plan, rate, plan.confirm).await?;
        println!(
            "    confirm {rate:.0} deliveries/s for {:?}: {:.0}/s, p99 {:.1} ms — {}",
            plan.confirm,
            phase.deliveries_per_second,
            phase.latency_ms.p99,
            phase.verdict()
        );
        result.probes.push(Probe {
            offered_deliveries_per_second: rate,
            seconds: plan.confirm.as_secs_f64(),
            deliveries_per_second: phase.deliveries_per_second,
            p99_ms: phase.latency_ms.p99,
            verdict: phase.verdict(),
        });
        if phase.sustained {
            result.sustained = Some(phase);
            break;
        }
        rate *= 0.9;
    }
    Ok(result)
}

async fn probe(
    stage: &Stage<'_>,
    plan: &SearchPlan<'_>,
    deliveries_per_second: f64,
    duration: Duration,
) -> Result<Phase, BenchError> {
    stage.settle(plan.streams).await?;
    run(
        stage,
        &Load {
            templates: plan.templates,
            spheres: plan.spheres,
            rate: deliveries_per_second / plan.fanout as f64,
            fanout: plan.fanout,
            duration,
            slow: &[],
            stall: Duration::from_secs(3),
        },
    )
    .await
}
