//! The `crownstone-webhooks` binary: one subcommand per process kind.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use crownstone_webhooks::api::{self, ApiArgs, ApiEventsArgs, ApiMetricsExport, ApiSettings};
use crownstone_webhooks::clock::SystemClock;
use crownstone_webhooks::config::{LogArgs, OperatorArgs};
use crownstone_webhooks::receiver::{self, ReceiveArgs};
use crownstone_webhooks::simulator::{self, SimulatorArgs};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

// Parsed once at start; boxing the settings would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run everything: controllers, forwarders, delivery and the REST API.
    Run {
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run the controllers, forwarders and delivery engine, without the REST API.
    Controller {
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run the REST API alone (any number of replicas, beside a `controller`).
    Api {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        events: ApiEventsArgs,
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
    /// Receive webhooks as a client would: verify each delivery's signature and print it.
    Receive {
        #[command(flatten)]
        receive: ReceiveArgs,
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
        Command::Run { operator, api, log } => {
            log.init();
            run_async(run_all(operator, api))
        }
        Command::Controller { operator, log } => {
            log.init();
            run_async(run_operator(operator))
        }
        Command::Api { api, events, log } => {
            log.init();
            run_async(run_api(api, events))
        }
        Command::Receive { receive } => run_async(async {
            receiver::run(receive, Box::new(std::io::stdout()))
                .await
                .map_err(|e| e.to_string())
        }),
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

async fn kube_client() -> Result<kube::Client, String> {
    kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes configuration found: {e}"))
}

async fn run_operator(args: OperatorArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let operator = crownstone_webhooks::operator::start(client, args, Arc::new(SystemClock))
        .await
        .map_err(|e| e.to_string())?;
    // A replica that loses its lease stands by again and keeps running, warm or cold.
    shutdown_signal().await;
    operator.shutdown().await;
    Ok(())
}

/// The REST facade alone; the controller runs elsewhere.
async fn run_api(args: ApiArgs, events: ApiEventsArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let namespace = args
        .api_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let settings = ApiSettings::new(
        &args,
        namespace,
        events.events_url,
        events.events_proxy,
        events.max_listeners_per_user,
    );
    let facade = api::start(client, settings, None)
        .await
        .map_err(|e| e.to_string())?;
    shutdown_signal().await;
    facade.shutdown().await;
    Ok(())
}

/// The controller and the REST facade in one process; the facade trusts the tokens this
/// process's forwarders already stream.
async fn run_all(operator_args: OperatorArgs, api_args: ApiArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let namespace = operator_args.watch_scope().api_namespace(
        api_args.api_namespace.as_deref(),
        client.default_namespace(),
    )?;
    let mut settings = ApiSettings::new(
        &api_args,
        namespace,
        operator_args.events_url.clone(),
        operator_args.events_proxy.clone(),
        operator_args.max_listeners_per_user,
    );
    let operator =
        crownstone_webhooks::operator::start(client.clone(), operator_args, Arc::new(SystemClock))
            .await
            .map_err(|e| e.to_string())?;
    // One metrics port for the whole process: the operator's, off the public API port.
    settings.metrics = ApiMetricsExport::Registry(operator.metrics_registry());
    let facade = match api::start(client, settings, Some(operator.forwarders().clone())).await {
        Ok(facade) => facade,
        Err(error) => {
            operator.shutdown().await;
            return Err(error.to_string());
        }
    };
    shutdown_signal().await;
    // The API stops taking writes before the controller stops reconciling them.
    facade.shutdown().await;
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
