//! The end-to-end benchmark (`hack/bench.sh`, docs/BENCHMARKS.md): starts a private control
//! plane, the simulator, the operator and webhook receivers as processes of their own, measures
//! the machine's ceiling for bare POSTs, then runs the scenarios and prints one table.
//!
//! It only runs when given `--bench` (as `cargo bench` does): `cargo test --all-targets` builds
//! it and runs it without, and then it does nothing.

mod cluster;
mod handover;
mod load;
mod phase;
mod receivers;
mod report;
mod scenarios;
mod shard;
mod system;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// A failure of the harness, with what failed.
#[derive(Debug)]
pub struct BenchError(String);

impl BenchError {
    pub fn new(message: impl Into<String>) -> BenchError {
        BenchError(message.into())
    }
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

macro_rules! bench_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for BenchError {
            fn from(error: $t) -> BenchError {
                BenchError(error.to_string())
            }
        }
    )*};
}
bench_error_from!(
    std::io::Error,
    reqwest::Error,
    kube::Error,
    serde_json::Error,
    tokio::task::JoinError
);

/// Every scenario, in the order they run.
pub const SCENARIOS: [&str; 15] = [
    "ceiling",
    "f",
    "b",
    "a",
    "g",
    "d",
    "e",
    "h",
    "i",
    "c",
    "burst",
    "handover",
    "handover-nokey",
    "handover-cold",
    "scale-out",
];

/// The order of the table.
pub const SCENARIOS_IN_TABLE_ORDER: [&str; 15] = [
    "ceiling",
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
    "handover",
    "handover-nokey",
    "handover-cold",
    "scale-out",
];

#[derive(Parser, Debug)]
#[command(
    name = "end_to_end",
    about = "End-to-end benchmark of crownstone-webhooks; run it with hack/bench.sh"
)]
struct Args {
    /// Set by `cargo bench`; without it (as under `cargo test`) nothing runs.
    #[arg(long)]
    bench: bool,

    /// Every size 10x smaller and 5 s phases: a run of a few minutes.
    #[arg(long)]
    quick: bool,

    /// Multiply every size (tokens, receivers, rates) by this instead (`--quick` is 0.1).
    #[arg(long)]
    scale: Option<f64>,

    /// Length of each measured phase in seconds (30, or 5 with `--quick`).
    #[arg(long)]
    phase: Option<f64>,

    /// Only these scenarios, comma-separated: ceiling,a,b,c,d,e,f,g,h,i,burst,handover,
    /// handover-nokey,handover-cold,scale-out.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,

    /// Where the JSON results go (default: target/bench/results-<timestamp>.json).
    #[arg(long)]
    json: Option<PathBuf>,

    /// The crownstone-webhooks binary (default: the release build cargo made for this bench).
    #[arg(long)]
    exe: Option<PathBuf>,

    /// Internal: run as a child process of the harness (`receivers` or `ceiling-client`).
    #[arg(long, hide = true)]
    role: Option<String>,
    #[arg(long, hide = true, default_value_t = 8)]
    count: usize,
    #[arg(long, hide = true, value_delimiter = ',')]
    targets: Vec<String>,
    #[arg(long, hide = true, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, hide = true, default_value_t = 10.0)]
    seconds: f64,
}

/// The sizes of a run.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sizes {
    pub scale: f64,
    /// Tokens of (f)'s smallest set, (a)/(b)'s set and (c)'s set.
    pub tokens_small: usize,
    pub tokens: usize,
    pub tokens_scale: usize,
    /// Tokens and events a second of the leader changes (`handover`).
    pub tokens_handover: usize,
    pub handover_rate: f64,
    /// Tokens and events a second of the sharded installation (`scale-out`), and the rate
    /// that saturates its replicas.
    pub tokens_scale_out: usize,
    pub scale_out_rate: f64,
    pub saturating_rate: f64,
    /// Receivers of the ceiling and of (a)'s first half.
    pub receivers_few: usize,
    /// Receivers of (a)'s second half and of the fan-out.
    pub receivers_many: usize,
    /// The fixed rate of (b), (c) and (f), in deliveries a second.
    pub fixed_rate: f64,
    /// The first probe of a search, in deliveries a second.
    pub search_start: f64,
    pub phase: Duration,
    pub probe: Duration,
    pub ceiling: Duration,
    /// Requests in flight when creating objects, and of the REST facade's load.
    pub create_concurrency: usize,
    pub api_concurrency: usize,
    /// The operator's requests in flight per destination (its default).
    pub per_destination: usize,
}

impl Sizes {
    fn new(args: &Args) -> Sizes {
        let scale = args.scale.unwrap_or(if args.quick { 0.1 } else { 1.0 });
        let phase =
            Duration::from_secs_f64(args.phase.unwrap_or(if args.quick { 5.0 } else { 30.0 }));
        let n = |full: f64, least: f64| (full * scale).round().max(least);
        Sizes {
            scale,
            tokens_small: n(100.0, 2.0) as usize,
            tokens: n(1000.0, 4.0) as usize,
            tokens_scale: n(10_000.0, 10.0) as usize,
            tokens_handover: n(10_000.0, 10.0) as usize,
            handover_rate: n(500.0, 50.0),
            tokens_scale_out: n(10_000.0, 10.0) as usize,
            scale_out_rate: n(500.0, 50.0),
            saturating_rate: n(20_000.0, 2_000.0),
            receivers_few: 8,
            receivers_many: n(100.0, 2.0) as usize,
            fixed_rate: n(2000.0, 20.0),
            // Not scaled: a smaller set of tokens does not make the operator slower.
            search_start: 1000.0,
            phase,
            probe: phase.min(Duration::from_secs(10)),
            ceiling: phase.min(Duration::from_secs(15)),
            create_concurrency: 32,
            api_concurrency: 16,
            per_destination: 16,
        }
    }
}

fn main() -> ExitCode {
    // `cargo test` runs bench targets too, passing its own test filters: without `--bench` or a
    // role, say what this is and leave, whatever else was passed.
    let raw: Vec<String> = std::env::args().collect();
    if !raw.iter().any(|a| a == "--bench" || a == "--role") {
        println!("end_to_end: a benchmark, not a test; run it with hack/bench.sh");
        return ExitCode::SUCCESS;
    }
    let args = Args::parse();
    let outcome = match args.role.as_deref() {
        Some("receivers") => receivers::serve(args.count),
        Some("ceiling-client") => {
            load::ceiling_client(args.targets, args.concurrency, args.seconds)
        }
        Some(other) => Err(BenchError::new(format!("unknown role {other}"))),
        None if !args.bench => {
            println!("end_to_end: a benchmark, not a test; run it with hack/bench.sh");
            Ok(())
        }
        None => run(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), BenchError> {
    let sizes = Sizes::new(&args);
    let only: BTreeSet<String> = args.only.iter().map(|s| s.trim().to_owned()).collect();
    if let Some(unknown) = only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        return Err(BenchError::new(format!(
            "unknown scenario {unknown}; known: {}",
            SCENARIOS.join(",")
        )));
    }
    let selected: BTreeSet<String> = if only.is_empty() {
        SCENARIOS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        only
    };
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = args
        .exe
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_crownstone-webhooks")));
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let out_dir = repo.join("target/bench");
    let json = args
        .json
        .clone()
        .unwrap_or_else(|| out_dir.join(format!("results-{stamp}.json")));
    let logs = out_dir.join(format!("logs-{stamp}"));
    std::fs::create_dir_all(&logs)?;
    println!(
        "crownstone-webhooks end-to-end benchmark: scenarios {}, scale {}, {:?} phases; logs in {}",
        selected.iter().cloned().collect::<Vec<_>>().join(","),
        sizes.scale,
        sizes.phase,
        logs.display()
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let context = scenarios::Context {
        sizes,
        selected,
        repo,
        exe,
        logs,
        json,
    };
    runtime.block_on(async move {
        tokio::select! {
            result = scenarios::run_all(context) => result,
            _ = tokio::signal::ctrl_c() => Err(BenchError::new("interrupted")),
        }
    })
}
