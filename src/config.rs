//! Every setting of the operator, from flags or the environment, with defaults that work locally.

use std::net::SocketAddr;
use std::time::Duration;

use url::Url;

use crate::delivery::DeliveryArgs;
use crate::handover::peer::HandoverArgs;
use crate::handover::BufferLimits;
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

    /// Watch only these namespaces: a comma-separated list, and the flag may repeat. Unset or
    /// empty: every namespace.
    #[arg(long, env = "WATCH_NAMESPACE", value_parser = NamespaceList::parse)]
    pub watch_namespace: Vec<NamespaceList>,

    /// Listeners per WebhookUser, unless the WebhookUser sets its own `spec.maxListeners`: the
    /// newest past it are not streamed (`Ready=False`, `ListenerLimitExceeded`) and the REST API
    /// refuses to register more.
    #[arg(long, env = "MAX_LISTENERS_PER_USER", default_value_t = 1000)]
    pub max_listeners_per_user: u32,

    /// How long a replaced client secret still signs every delivery beside the new one, so
    /// receivers can switch without rejecting a delivery; 0 replaces it at once. At most three
    /// previous secrets sign; past that the oldest stops first.
    #[arg(long, env = "SECRET_ROTATION_OVERLAP", default_value = "24h", value_parser = humantime::parse_duration)]
    pub secret_rotation_overlap: Duration,

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

    /// How many bytes of events a standby holds per token for a takeover; past it the oldest
    /// go (counted in `forwarder_buffer_drops`), and a crash of the leader could lose them.
    #[arg(long, env = "HANDOVER_BUFFER_BYTES", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024 * 1024))]
    pub handover_buffer_bytes: u64,

    /// How long a standby holds an event the leader has not settled.
    #[arg(long, env = "HANDOVER_BUFFER_AGE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub handover_buffer_age: Duration,

    /// How many bytes of events a standby holds over every token; past it, the token adding an
    /// event drops its own oldest.
    #[arg(long, env = "HANDOVER_BUFFER_TOTAL_BYTES", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024 * 1024))]
    pub handover_buffer_total_bytes: u64,

    /// On shutdown, how long queued deliveries may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub delivery: DeliveryArgs,

    #[command(flatten)]
    pub leader: LeaderArgs,

    #[command(flatten)]
    pub handover: HandoverArgs,

    #[command(flatten)]
    pub shard: crate::shard::coordinator::ShardArgs,

    #[command(flatten)]
    pub telemetry: crate::telemetry::TelemetryArgs,
}

impl OperatorArgs {
    /// How much a standby buffers for a takeover.
    pub fn buffer_limits(&self) -> BufferLimits {
        BufferLimits {
            bytes: usize::try_from(self.handover_buffer_bytes).unwrap_or(usize::MAX),
            age: self.handover_buffer_age,
            total_bytes: usize::try_from(self.handover_buffer_total_bytes).unwrap_or(usize::MAX),
        }
    }

    /// Where the controllers watch, from every `--watch-namespace` given.
    pub fn watch_scope(&self) -> WatchScope {
        let mut namespaces: Vec<String> = Vec::new();
        for name in self.watch_namespace.iter().flat_map(|list| &list.0) {
            if !namespaces.contains(name) {
                namespaces.push(name.clone());
            }
        }
        if namespaces.is_empty() {
            WatchScope::AllNamespaces
        } else {
            WatchScope::Namespaces(namespaces)
        }
    }
}

/// One `--watch-namespace` value: namespace names separated by commas; empty for none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceList(Vec<String>);

impl NamespaceList {
    /// Parses `team-a,team-b`; refuses an empty item and a name Kubernetes would refuse.
    pub fn parse(value: &str) -> Result<NamespaceList, String> {
        if value.trim().is_empty() {
            return Ok(NamespaceList(Vec::new()));
        }
        value
            .split(',')
            .map(|name| {
                let name = name.trim();
                if name.is_empty() {
                    Err(format!(
                        "{value:?} has an empty namespace name between commas"
                    ))
                } else if is_dns_label(name) {
                    Ok(name.to_owned())
                } else {
                    Err(format!(
                        "{name:?} is not a namespace name: at most 63 lower-case letters, digits \
                         and '-', starting and ending with a letter or digit"
                    ))
                }
            })
            .collect::<Result<_, _>>()
            .map(NamespaceList)
    }
}

/// Whether `name` is an RFC 1123 label, as namespace names are.
fn is_dns_label(name: &str) -> bool {
    let alphanumeric = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            bytes.len() <= 63
                && alphanumeric(first)
                && alphanumeric(last)
                && bytes.iter().all(|&c| alphanumeric(c) || c == b'-')
        }
        _ => false,
    }
}

/// The namespaces the operator watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchScope {
    /// Every namespace: one cluster-wide watch per resource.
    AllNamespaces,
    /// These namespaces, each with its own watch per resource; never a cluster-wide list.
    Namespaces(Vec<String>),
}

impl WatchScope {
    /// Whether objects of `namespace` are watched.
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            WatchScope::AllNamespaces => true,
            WatchScope::Namespaces(namespaces) => namespaces.iter().any(|n| n == namespace),
        }
    }

    /// The REST API's namespace when the API runs beside this controller: `requested` if the
    /// controller watches it, else the one watched namespace, else `fallback` when every
    /// namespace is watched. `Err` says why none fits.
    pub fn api_namespace(&self, requested: Option<&str>, fallback: &str) -> Result<String, String> {
        match (requested, self) {
            (Some(api), scope) if !scope.contains(api) => Err(format!(
                "the REST API's namespace ({api}) is not one the controller watches: its \
                 Listeners would never be reconciled"
            )),
            (Some(namespace), _) => Ok(namespace.to_owned()),
            (None, WatchScope::Namespaces(watched)) => match watched.as_slice() {
                [only] => Ok(only.clone()),
                _ => Err(
                    "the controller watches several namespaces: set the REST API's namespace \
                     (--api-namespace, API_NAMESPACE) to one of them"
                        .to_owned(),
                ),
            },
            (None, WatchScope::AllNamespaces) => Ok(fallback.to_owned()),
        }
    }

    /// The watched namespaces in the order given; `None` when every namespace is watched.
    pub fn namespaces(&self) -> Option<&[String]> {
        match self {
            WatchScope::AllNamespaces => None,
            WatchScope::Namespaces(namespaces) => Some(namespaces),
        }
    }
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
        assert_eq!(cli.operator.watch_scope(), WatchScope::AllNamespaces);
    }

    #[test]
    fn buffer_limits_default_to_the_documented_values_and_take_the_flags() {
        let defaults = Cli::try_parse_from(["x"]).unwrap().operator.buffer_limits();
        assert_eq!(defaults, BufferLimits::default());
        let set = Cli::try_parse_from([
            "x",
            "--handover-buffer-bytes",
            "4096",
            "--handover-buffer-age",
            "5s",
            "--handover-buffer-total-bytes",
            "65536",
        ])
        .unwrap()
        .operator
        .buffer_limits();
        assert_eq!(
            set,
            BufferLimits {
                bytes: 4096,
                age: Duration::from_secs(5),
                total_bytes: 65536,
            }
        );
        assert!(Cli::try_parse_from(["x", "--handover-buffer-bytes", "10"]).is_err());
    }

    fn scope(args: &[&str]) -> Result<WatchScope, clap::Error> {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|cli| cli.operator.watch_scope())
    }

    fn namespaces(names: &[&str]) -> WatchScope {
        WatchScope::Namespaces(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn watched_namespaces_are_a_list_the_flag_repeats_and_empty_means_all() {
        assert_eq!(
            scope(&["--watch-namespace", "a"]).unwrap(),
            namespaces(&["a"])
        );
        assert_eq!(
            scope(&["--watch-namespace", "team-a,team-b"]).unwrap(),
            namespaces(&["team-a", "team-b"])
        );
        assert_eq!(
            scope(&["--watch-namespace", "b, a", "--watch-namespace", "c,a"]).unwrap(),
            namespaces(&["b", "a", "c"]),
            "in the order given, each once"
        );
        assert_eq!(
            scope(&["--watch-namespace", ""]).unwrap(),
            WatchScope::AllNamespaces
        );
        assert_eq!(
            scope(&["--watch-namespace", " "]).unwrap(),
            WatchScope::AllNamespaces
        );
        let two = namespaces(&["a", "b"]);
        assert!(two.contains("a") && two.contains("b") && !two.contains("c"));
        assert!(WatchScope::AllNamespaces.contains("kube-system"));
        assert_eq!(WatchScope::AllNamespaces.namespaces(), None);
    }

    #[test]
    fn the_apis_namespace_must_be_a_watched_one() {
        let two = namespaces(&["a", "b"]);
        assert_eq!(two.api_namespace(Some("b"), "pod").unwrap(), "b");
        let outside = two.api_namespace(Some("c"), "pod").unwrap_err();
        assert!(
            outside.contains("(c) is not one the controller watches"),
            "{outside}"
        );
        let unset = two.api_namespace(None, "pod").unwrap_err();
        assert!(unset.contains("set the REST API's namespace"), "{unset}");
        assert_eq!(namespaces(&["a"]).api_namespace(None, "pod").unwrap(), "a");
        let all = WatchScope::AllNamespaces;
        assert_eq!(all.api_namespace(None, "pod").unwrap(), "pod");
        assert_eq!(all.api_namespace(Some("x"), "pod").unwrap(), "x");
    }

    #[test]
    fn a_bad_namespace_list_is_refused_naming_the_culprit() {
        for (value, culprit) in [
            ("a,,b", "empty namespace name"),
            ("a,", "empty namespace name"),
            ("Team-A", "\"Team-A\" is not a namespace name"),
            ("a,b_c", "\"b_c\" is not a namespace name"),
            ("-a", "\"-a\" is not a namespace name"),
            ("a-", "\"a-\" is not a namespace name"),
        ] {
            let flag = format!("--watch-namespace={value}");
            let error = scope(&[&flag]).unwrap_err().to_string();
            assert!(error.contains(culprit), "{value}: {error}");
        }
        let long = "a".repeat(64);
        assert!(scope(&["--watch-namespace", &long]).is_err());
        assert!(scope(&["--watch-namespace", &"a".repeat(63)]).is_ok());
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
