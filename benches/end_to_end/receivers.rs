//! Webhook receivers in a child process of their own, so their CPU time is theirs alone: N axum
//! servers on 127.0.0.1 that answer 200 (or, for the ones made slow, 200 after a delay) and
//! record when each delivery arrived and when its event was published (`data.benchSentNs`), and
//! a control server the harness resets and reads them through. A delivery to a url ending in
//! [`QUIET_PATH`] is recorded on lane 1, any other on lane 0, so two Listeners can share one
//! receiver (one destination) and still be told apart.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::system::{exit_when_stdin_closes, unix_ns, ChildGuard};
use crate::BenchError;

/// The path that puts a delivery on lane 1.
pub const QUIET_PATH: &str = "/quiet";

/// Arrivals kept at most; later ones are counted but not kept (a few hundred MB at worst).
const MAX_RECORDS: usize = 10_000_000;

/// One delivery as it arrived.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// When its event was published, Unix nanoseconds (0 when the body had no stamp).
    pub sent_ns: u64,
    /// When its body had arrived, Unix nanoseconds.
    pub arrived_ns: u64,
    /// Which receiver got it.
    pub receiver: u32,
    /// 1 if it was posted to [`QUIET_PATH`], else 0.
    pub lane: u32,
}

impl Arrival {
    const BYTES: usize = 24;

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sent_ns.to_le_bytes());
        out.extend_from_slice(&self.arrived_ns.to_le_bytes());
        out.extend_from_slice(&self.receiver.to_le_bytes());
        out.extend_from_slice(&self.lane.to_le_bytes());
    }

    fn read(chunk: &[u8]) -> Option<Arrival> {
        Some(Arrival {
            sent_ns: u64::from_le_bytes(chunk.get(0..8)?.try_into().ok()?),
            arrived_ns: u64::from_le_bytes(chunk.get(8..16)?.try_into().ok()?),
            receiver: u32::from_le_bytes(chunk.get(16..20)?.try_into().ok()?),
            lane: u32::from_le_bytes(chunk.get(20..24)?.try_into().ok()?),
        })
    }

    /// Publish-to-arrival time in nanoseconds.
    pub fn latency_ns(&self) -> u64 {
        self.arrived_ns.saturating_sub(self.sent_ns)
    }
}

/// `POST /reset`: forget every arrival and choose the slow receivers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResetRequest {
    /// Receivers (by index) that answer only after `delay_ms`.
    pub slow: Vec<u32>,
    pub delay_ms: u64,
}

/// `GET /count` query: arrivals whose event was published in `[from, to)`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CountQuery {
    pub from: u64,
    pub to: u64,
    /// Leave out the slow receivers' arrivals.
    #[serde(default)]
    pub exclude_slow: bool,
}

/// `GET /count` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CountReply {
    pub count: u64,
    /// Every request since the reset, stamped or not, kept or not.
    pub total: u64,
}

struct Fleet {
    arrivals: Mutex<Vec<Arrival>>,
    slow: RwLock<(Vec<bool>, Duration)>,
    total: AtomicU64,
}

#[derive(Deserialize)]
struct Envelope {
    data: Stamp,
}

#[derive(Deserialize)]
struct Stamp {
    #[serde(rename = "benchSentNs", default)]
    sent_ns: u64,
}

async fn receive(
    State((fleet, index)): State<(Arc<Fleet>, u32)>,
    uri: Uri,
    body: Bytes,
) -> StatusCode {
    let arrived_ns = unix_ns();
    let lane = u32::from(uri.path().ends_with(QUIET_PATH));
    let sent_ns = serde_json::from_slice::<Envelope>(&body).map_or(0, |e| e.data.sent_ns);
    fleet.total.fetch_add(1, Ordering::Relaxed);
    {
        let mut arrivals = fleet.arrivals.lock();
        if arrivals.len() < MAX_RECORDS {
            arrivals.push(Arrival {
                sent_ns,
                arrived_ns,
                receiver: index,
                lane,
            });
        }
    }
    let delay = {
        let slow = fleet.slow.read();
        let is_slow = slow.0.get(index as usize).copied().unwrap_or(false);
        is_slow.then_some(slow.1)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    StatusCode::OK
}

async fn reset(State(fleet): State<Arc<Fleet>>, Json(request): Json<ResetRequest>) -> StatusCode {
    {
        let mut slow = fleet.slow.write();
        slow.0.iter_mut().for_each(|s| *s = false);
        for index in request.slow {
            if let Some(s) = slow.0.get_mut(index as usize) {
                *s = true;
            }
        }
        slow.1 = Duration::from_millis(request.delay_ms);
    }
    let mut arrivals = fleet.arrivals.lock();
    arrivals.clear();
    arrivals.shrink_to(1 << 20);
    fleet.total.store(0, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn count_arrivals(
    State(fleet): State<Arc<Fleet>>,
    Query(q): Query<CountQuery>,
) -> Json<CountReply> {
    let slow = fleet.slow.read().0.clone();
    let count = fleet
        .arrivals
        .lock()
        .iter()
        .filter(|a| a.sent_ns >= q.from && a.sent_ns < q.to)
        .filter(|a| !(q.exclude_slow && slow.get(a.receiver as usize).copied().unwrap_or(false)))
        .count() as u64;
    Json(CountReply {
        count,
        total: fleet.total.load(Ordering::Relaxed),
    })
}

async fn records(State(fleet): State<Arc<Fleet>>) -> impl IntoResponse {
    let arrivals = fleet.arrivals.lock().clone();
    let mut out = Vec::with_capacity(arrivals.len() * Arrival::BYTES);
    for arrival in &arrivals {
        arrival.write(&mut out);
    }
    out
}

/// The `receivers` role: serves `count` receivers and the control server until the harness
/// closes this process's standard input. Prints `{"control": port, "receivers": [ports]}` once.
pub fn serve(count: usize) -> Result<(), BenchError> {
    exit_when_stdin_closes();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let fleet = Arc::new(Fleet {
            arrivals: Mutex::new(Vec::with_capacity(1 << 20)),
            slow: RwLock::new((vec![false; count], Duration::ZERO)),
            total: AtomicU64::new(0),
        });
        let mut ports = Vec::with_capacity(count);
        for index in 0..count {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            ports.push(listener.local_addr()?.port());
            let router = Router::new()
                .fallback(receive)
                .with_state((fleet.clone(), index as u32));
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, router).await {
                    eprintln!("receiver {index} stopped: {error}");
                }
            });
        }
        let control = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let control_port = control.local_addr()?.port();
        let router = Router::new()
            .route("/reset", post(reset))
            .route("/count", get(count_arrivals))
            .route("/records", get(records))
            .with_state(fleet);
        println!(
            "{}",
            serde_json::json!({"control": control_port, "receivers": ports})
        );
        axum::serve(control, router).await?;
        Ok(())
    })
}

/// The receivers process, seen from the harness.
pub struct Receivers {
    process: ChildGuard,
    control: String,
    /// `http://127.0.0.1:<port>/webhook` of each receiver, by index.
    pub urls: Vec<String>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Announcement {
    control: u16,
    receivers: Vec<u16>,
}

impl Receivers {
    /// Starts `count` receivers in a child process (this benchmark binary in its `receivers`
    /// role).
    pub fn start(count: usize, log: &Path) -> Result<Receivers, BenchError> {
        let exe = std::env::current_exe()?;
        let err = std::fs::File::create(log)?;
        let child = Command::new(exe)
            .args(["--role", "receivers", "--count", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()?;
        let mut process = ChildGuard::adopt("receivers", child, Duration::from_secs(3));
        let stdout = process
            .child_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| BenchError::new("the receivers' output is not readable"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let announcement: Announcement = serde_json::from_str(line.trim())
            .map_err(|e| BenchError::new(format!("receivers did not announce ports: {e}")))?;
        let urls = announcement
            .receivers
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}/webhook"))
            .collect();
        Ok(Receivers {
            process,
            control: format!("http://127.0.0.1:{}", announcement.control),
            urls,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Forgets every arrival; `slow` receivers answer after `delay` from now on.
    pub async fn reset(&self, slow: &[u32], delay: Duration) -> Result<(), BenchError> {
        let request = ResetRequest {
            slow: slow.to_vec(),
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        };
        self.http
            .post(format!("{}/reset", self.control))
            .json(&request)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Arrivals of events published in `[from, to)`.
    pub async fn count(&self, from: u64, to: u64, exclude_slow: bool) -> Result<u64, BenchError> {
        let reply: CountReply = self
            .http
            .get(format!("{}/count", self.control))
            .query(&CountQuery {
                from,
                to,
                exclude_slow,
            })
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(reply.count)
    }

    /// Every arrival since the last reset.
    pub async fn arrivals(&self) -> Result<Vec<Arrival>, BenchError> {
        let bytes = self
            .http
            .get(format!("{}/records", self.control))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        Ok(bytes
            .chunks_exact(Arrival::BYTES)
            .filter_map(Arrival::read)
            .collect())
    }
}
