//! Every setting of the operator, from flags or the environment, with defaults that work locally.

use std::net::SocketAddr;
use std::time::Duration;

use url::Url;

use crate::delivery::DeliveryArgs;
use crate::leader::LeaderArgs;

/// Settings of the controller, the forwarders and the delivery engine.
#[derive(clap::Args, Clone, Debug)]
pub struct OperatorArgs {
    /// Base url of Crownstone's event server; streams are opened at `{url}/sse`.
    #[arg(
        long,
        env = "CROWNSTONE_EVENTS_URL",
        default_value = "https://events.crownstone.rocks"
    )]
    pub events_url: Url,

    /// Deliveries per WebhookUser per UTC day, unless the WebhookUser sets its own.
    #[arg(long, env = "DAILY_ALLOWANCE", default_value_t = 1000)]
    pub daily_allowance: u64,

    /// Listeners per WebhookUser, unless the WebhookUser sets its own `spec.maxListeners`: the
    /// newest past it are not streamed (`Ready=False`, `ListenerLimitExceeded`) and the REST API
    /// refuses to register more.
    #[arg(long, env = "MAX_LISTENERS_PER_USER", default_value_t = 1000)]
    pub max_listeners_per_user: u32,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Address of /healthz, /readyz and /metrics; on every interface by default, so a kubelet's
    /// probes and a Prometheus scrape reach it.
    #[arg(long, env = "HEALTH_LISTEN", default_value = "0.0.0.0:8081")]
    pub health_listen: SocketAddr,

    /// How often failures, drops and usage are written to status.
    #[arg(long, env = "STATUS_INTERVAL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub status_interval: Duration,

    /// How often a Listener's success counters (`delivered`, `lastDeliveryTime`) alone are
    /// written: each write is an API request, and a busy Listener changes them all the time.
    #[arg(long, env = "COUNTERS_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub counters_interval: Duration,

    /// At most this many delivery-status writes, usage writes and `DeliveryFailed` Events a
    /// second, spread over the flushes: each is an API request that the API server and etcd pay
    /// for, and 10,000 busy Listeners would otherwise write hundreds a second. Failures go first,
    /// then their Events, then usage, then the counters written longest ago; the rest wait for
    /// the next flush.
    #[arg(long, env = "STATUS_WRITES_PER_SECOND", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub status_writes_per_second: u32,

    /// A stream silent for this long is dead and reconnected.
    #[arg(long, env = "STREAM_SILENCE_TIMEOUT", default_value = "35s", value_parser = humantime::parse_duration)]
    pub silence_timeout: Duration,

    /// A proxy to reach the event server through (http:// or https://). Without it streams
    /// connect directly: HTTP_PROXY and HTTPS_PROXY from the environment are not used.
    #[arg(long, env = "CROWNSTONE_EVENTS_PROXY")]
    pub events_proxy: Option<Url>,

    /// The longest line or event an event stream may send, in bytes; a longer one ends the
    /// connection as broken.
    #[arg(long, env = "STREAM_MAX_EVENT_BYTES", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    pub stream_max_event_bytes: u64,

    /// First reconnect delay of a stream; doubles up to --reconnect-max.
    #[arg(long, env = "STREAM_RECONNECT_INITIAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reconnect_initial: Duration,

    /// Longest reconnect delay of a stream.
    #[arg(long, env = "STREAM_RECONNECT_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    pub reconnect_max: Duration,

    /// On shutdown, how long queued deliveries may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub delivery: DeliveryArgs,

    #[command(flatten)]
    pub leader: LeaderArgs,
}

/// How logs are written.
#[derive(clap::Args, Clone, Debug)]
pub struct LogArgs {
    /// `text` for people, `json` for log collectors.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl LogArgs {
    /// Installs the global subscriber. `RUST_LOG` filters, `info` by default.
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Colour codes only for a person at a terminal, never into a file or a log collector.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi);
        if self.log_format == "json" {
            builder.json().init();
        } else {
            builder.init();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        operator: OperatorArgs,
    }

    #[test]
    fn defaults_work_without_any_setting() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(
            cli.operator.events_url.as_str(),
            "https://events.crownstone.rocks/"
        );
        assert_eq!(cli.operator.daily_allowance, 1000);
        assert_eq!(cli.operator.silence_timeout, Duration::from_secs(35));
        assert!(cli.operator.watch_namespace.is_none());
    }

    #[test]
    fn flags_override_defaults_and_bad_values_are_refused() {
        let cli = Cli::try_parse_from([
            "x",
            "--events-url",
            "http://127.0.0.1:8080",
            "--daily-allowance",
            "5",
            "--silence-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(cli.operator.daily_allowance, 5);
        assert_eq!(cli.operator.silence_timeout, Duration::from_secs(2));
        assert!(Cli::try_parse_from(["x", "--daily-allowance", "-1"]).is_err());
        assert!(Cli::try_parse_from(["x", "--events-url", "not a url"]).is_err());
        assert!(Cli::try_parse_from(["x", "--status-interval", "soon"]).is_err());
    }
}
