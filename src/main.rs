//! The `crownstone-webhooks` binary: one subcommand per process kind.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use crownstone_webhooks::clock::SystemClock;
use crownstone_webhooks::config::{LogArgs, OperatorArgs};
use crownstone_webhooks::simulator::{self, SimulatorArgs};

#[derive(Parser)]
#[command(
    name = "crownstone-webhooks",
    version,
    about = "Forwards Crownstone events to webhooks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: controllers, forwarders and delivery (the REST API joins it here).
    Run {
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run the controllers, forwarders and delivery engine alone.
    Controller {
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run a stand-in for Crownstone's event server, for local runs, demos, tests and benchmarks.
    Simulator {
        #[command(flatten)]
        simulator: SimulatorArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Print the CustomResourceDefinitions as YAML.
    Crdgen,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => match crownstone_webhooks::resources::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: could not render the CRDs: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run { operator, log } | Command::Controller { operator, log } => {
            log.init();
            run_async(run_operator(operator))
        }
        Command::Simulator { simulator, log } => {
            log.init();
            run_async(async { simulator::run(simulator).await.map_err(|e| e.to_string()) })
        }
    }
}

fn run_async(future: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run_operator(args: OperatorArgs) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes configuration found: {e}"))?;
    let operator = crownstone_webhooks::operator::start(client, args, Arc::new(SystemClock))
        .await
        .map_err(|e| e.to_string())?;
    shutdown_signal().await;
    operator.shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
