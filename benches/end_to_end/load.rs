//! The load: events published through the simulator's admin API at a fixed rate, each stamped
//! with its publish time, and the bare POST loop that measures the machine's ceiling (run as a
//! child process, so its CPU time is its own).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crownstone_webhooks::crownstone::samples;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::system::{cpu_seconds, exit_when_stdin_closes, unix_ns};
use crate::BenchError;

/// How often the generator publishes a batch: every millisecond, so a steady rate arrives as
/// one, not as bursts that queue behind each other (20 events stamped at once every 10 ms at
/// 2,000 events/s); above [`FAST_RATE`] every 10 ms, so the generator's own requests stay few.
const TICK: Duration = Duration::from_millis(1);
const FAST_TICK: Duration = Duration::from_millis(10);
const FAST_RATE: f64 = 10_000.0;
/// Batch POSTs in flight at once; more means the simulator is not keeping up.
const BATCHES_IN_FLIGHT: usize = 8;
/// Largest batch: bounds a request's size when the generator catches up.
const MAX_BATCH: u64 = 5_000;

/// The Crownstone user id of sphere `sphere`'s token.
pub fn user_id(prefix: &str, index: usize) -> String {
    format!("{prefix}-user-{index:05}")
}

/// Sphere id `index` of a set.
pub fn sphere_id(prefix: &str, index: usize) -> String {
    format!("{prefix}-s-{index:05}")
}

/// Events of a set of spheres: a `switchStateUpdate` per sphere, serialized once without its
/// closing brace, so stamping an event is one `format!`.
#[derive(Clone, Debug)]
pub struct EventTemplates {
    open: Vec<String>,
}

impl EventTemplates {
    pub fn new(spheres: &[String]) -> EventTemplates {
        let open = spheres
            .iter()
            .map(|sphere| {
                let mut text = samples::switch_state_update(sphere, 55).to_string();
                text.pop();
                text
            })
            .collect();
        EventTemplates { open }
    }

    /// Event `seq` for sphere `index`, published at `sent_ns`. The webhook body's `data` is
    /// this text byte for byte, so the receiver reads the stamp back.
    pub fn event(&self, index: usize, seq: u64, sent_ns: u64) -> String {
        format!(
            "{},\"benchSeq\":{seq},\"benchSentNs\":{sent_ns}}}",
            self.open[index % self.open.len()]
        )
    }
}

/// A body shaped and sized like a delivery's: `{clientId, clientSecret, userId, data}`.
pub fn delivery_like_body(templates: &EventTemplates, seq: u64, sent_ns: u64) -> String {
    format!(
        "{{\"clientId\":\"bench-u-0000\",\"clientSecret\":\"{}\",\"userId\":\"{}\",\"data\":{}}}",
        "0123456789abcdef0123456789abcdef",
        user_id("bench", 0),
        templates.event(0, seq, sent_ns)
    )
}

/// What one run of the generator did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    /// Events published.
    pub events: u64,
    /// Stream frames the simulator queued for them (its `delivered` answers, summed).
    pub frames: u64,
    /// Unix nanoseconds of the first and after the last publish: the window events are
    /// counted in.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Seconds the generator ran.
    pub seconds: f64,
    /// Whether it published on time: at the end, at most 3 % (or 0.1 s worth) was still due.
    pub kept_up: bool,
    /// Batch requests that failed.
    pub errors: u64,
}

#[derive(Deserialize)]
struct PublishReport {
    delivered: Vec<u64>,
}

/// Publishes through `POST /admin/events`.
#[derive(Clone)]
pub struct Publisher {
    http: reqwest::Client,
    url: String,
}

impl Publisher {
    pub fn new(simulator: &str) -> Result<Publisher, BenchError> {
        Ok(Publisher {
            http: reqwest::Client::builder()
                .no_proxy()
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(30))
                .build()?,
            url: format!("{simulator}/admin/events"),
        })
    }

    /// Publishes `rate` events a second for `duration`, round-robin over `spheres` (indices
    /// into `templates`), in a batch every [`TICK`] (or [`FAST_TICK`] above [`FAST_RATE`]).
    pub async fn run(
        &self,
        templates: &Arc<EventTemplates>,
        spheres: &Arc<Vec<usize>>,
        rate: f64,
        duration: Duration,
    ) -> Published {
        self.run_until(templates, spheres, rate, duration, &AtomicBool::new(false))
            .await
    }

    /// Publishes in the background, as [`run`](Self::run) does, until stopped: for load that
    /// runs through a change of unknown length.
    pub fn start(
        &self,
        templates: &Arc<EventTemplates>,
        spheres: &Arc<Vec<usize>>,
        rate: f64,
    ) -> RunningLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (publisher, templates, spheres, stop) = (
                self.clone(),
                templates.clone(),
                spheres.clone(),
                stop.clone(),
            );
            async move {
                publisher
                    .run_until(&templates, &spheres, rate, Duration::MAX, &stop)
                    .await
            }
        });
        RunningLoad { stop, task }
    }

    /// [`run`](Self::run), ending early once `stop` is set; the rate then counts up to that
    /// moment.
    async fn run_until(
        &self,
        templates: &Arc<EventTemplates>,
        spheres: &Arc<Vec<usize>>,
        rate: f64,
        duration: Duration,
        stop: &AtomicBool,
    ) -> Published {
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        let mut requests = JoinSet::new();
        let mut published = Published {
            start_ns: unix_ns(),
            ..Published::default()
        };
        let started = Instant::now();
        let mut tick = tokio::time::interval(if rate > FAST_RATE { FAST_TICK } else { TICK });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut seq = 0u64;
        loop {
            tick.tick().await;
            let elapsed = started.elapsed();
            let last = elapsed >= duration || stop.load(Ordering::Relaxed);
            // The last tick publishes what is still due, so a run publishes rate × duration.
            let target = if last {
                let total = rate * elapsed.min(duration).as_secs_f64();
                // Kept up: what is still due at the end fits in a moment's worth.
                published.kept_up = total - seq as f64 <= (0.03 * total).max(rate * 0.1);
                total.round() as u64
            } else {
                (rate * elapsed.as_secs_f64()) as u64
            };
            while seq < target {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let batch = (target - seq).min(MAX_BATCH);
                let sent_ns = unix_ns();
                let mut body = String::with_capacity(batch as usize * 320 + 16);
                body.push_str("{\"events\":[");
                for n in 0..batch {
                    if n > 0 {
                        body.push(',');
                    }
                    let sphere = spheres[((seq + n) % spheres.len() as u64) as usize];
                    body.push_str(&templates.event(sphere, seq + n, sent_ns));
                }
                body.push_str("]}");
                seq += batch;
                let request = self
                    .http
                    .post(&self.url)
                    .header("content-type", "application/json")
                    .body(body);
                requests.spawn(async move {
                    let answer = async {
                        let report: PublishReport =
                            request.send().await?.error_for_status()?.json().await?;
                        Ok::<u64, reqwest::Error>(report.delivered.iter().sum())
                    }
                    .await;
                    drop(slot);
                    answer
                });
                while let Some(done) = requests.try_join_next() {
                    tally(&mut published, done);
                }
                if !last {
                    break;
                }
            }
            if last {
                break;
            }
        }
        published.end_ns = unix_ns();
        published.seconds = started.elapsed().as_secs_f64();
        while let Some(done) = requests.join_next().await {
            tally(&mut published, done);
        }
        published.events = seq;
        published
    }
}

/// A load [`Publisher::start`] publishes until [`stop`](Self::stop)ped.
pub struct RunningLoad {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Published>,
}

impl RunningLoad {
    /// Stops publishing and returns what was published.
    pub async fn stop(self) -> Result<Published, BenchError> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

fn tally(
    published: &mut Published,
    done: Result<Result<u64, reqwest::Error>, tokio::task::JoinError>,
) {
    match done {
        Ok(Ok(frames)) => published.frames += frames,
        _ => published.errors += 1,
    }
}

/// The `ceiling-client` role's answer, one JSON line on stdout.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CeilingRun {
    pub posts: u64,
    pub errors: u64,
    pub seconds: f64,
    pub cpu_seconds: f64,
    pub body_bytes: usize,
}

/// The `ceiling-client` role: POSTs delivery-sized bodies from one shared client, `concurrency`
/// at a time per target, for `seconds`, then prints a [`CeilingRun`].
pub fn ceiling_client(
    targets: Vec<String>,
    concurrency: usize,
    seconds: f64,
) -> Result<(), BenchError> {
    exit_when_stdin_closes();
    let runtime = tokio::runtime::Runtime::new()?;
    let run = runtime.block_on(async move {
        // As the operator builds its delivery client: pooled keep-alive HTTP/1.1, no proxy.
        let client = reqwest::Client::builder()
            .user_agent(concat!("crownstone-webhooks/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(concurrency.saturating_mul(2).max(32))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        let templates = Arc::new(EventTemplates::new(&[sphere_id("bench", 0)]));
        let body_bytes = delivery_like_body(&templates, 0, unix_ns()).len();
        let posts = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let pid = std::process::id();
        let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
        let started = Instant::now();
        let until = started + Duration::from_secs_f64(seconds);
        let mut workers = JoinSet::new();
        for target in &targets {
            for _ in 0..concurrency {
                let (client, target, templates) =
                    (client.clone(), target.clone(), templates.clone());
                let (posts, errors) = (posts.clone(), errors.clone());
                workers.spawn(async move {
                    while Instant::now() < until {
                        let seq = posts.load(Ordering::Relaxed);
                        let body = delivery_like_body(&templates, seq, unix_ns());
                        // Headers of a delivery's size: id, timestamp and signature.
                        let sent = client
                            .post(&target)
                            .header("content-type", "application/json")
                            .header("accept", "application/json")
                            .header("webhook-id", "msg_2b7e1f0c9d8a4e6f8a1b2c3d4e5f6a7b")
                            .header("webhook-timestamp", "1700000000")
                            .header(
                                "webhook-signature",
                                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                            )
                            .body(body)
                            .send()
                            .await;
                        match sent {
                            Ok(response) if response.status().is_success() => {
                                let _ = response.bytes().await;
                                posts.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        }
        while workers.join_next().await.is_some() {}
        Ok::<CeilingRun, BenchError>(CeilingRun {
            posts: posts.load(Ordering::Relaxed),
            errors: errors.load(Ordering::Relaxed),
            seconds: started.elapsed().as_secs_f64(),
            cpu_seconds: cpu_seconds(pid).unwrap_or(0.0) - cpu_before,
            body_bytes,
        })
    })?;
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
}
