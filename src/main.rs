//! The `crownstone-webhooks` binary: one subcommand per process kind.

use clap::{Parser, Subcommand};
use crownstone_webhooks::simulator::{self, SimulatorArgs};
use tracing_subscriber::EnvFilter;

/// Forwards Crownstone smart-home events to webhooks.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a stand-in for Crownstone's event server, for local runs, demos, tests and benchmarks.
    Simulator(SimulatorArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulator(args) => simulator::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "exiting");
            std::process::ExitCode::FAILURE
        }
    }
}
