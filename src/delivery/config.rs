//! Delivery settings, and the command-line flags and environment variables they come from.

use std::time::Duration;

use ipnet::IpNet;

use super::{
    retry::{Backoff, RetryPolicy},
    url_policy::UrlPolicy,
};

/// How deliveries are made. `Default` gives the production defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Time for one attempt, from connecting to the end of the response (10 s).
    pub timeout: Duration,
    /// Attempts per delivery, the first one included (5).
    pub max_attempts: u32,
    /// Ceiling of the backoff after the first failed attempt; it doubles per attempt (1 s).
    pub initial_backoff: Duration,
    /// Largest wait between two attempts, also the bound of a receiver's `Retry-After` (60 s).
    pub max_backoff: Duration,
    /// Bytes of deliveries held per owner per destination (queued, in flight or waiting to
    /// retry) before that owner's new ones are dropped as `queue_full` (64 MiB).
    pub queue_bytes: usize,
    /// Bytes all queued deliveries of the operator may hold together; past half of it, each
    /// owner's lane at a destination holds at most its share (256 MiB).
    pub memory_budget: usize,
    /// Deprecated: deliveries held per owner per destination, a bound besides the bytes
    /// (unbounded).
    pub queue_capacity: usize,
    /// Concurrent requests per destination, taken by its owners in turn (16).
    pub concurrency_per_destination: usize,
    /// Allows loopback, private and shared (CGNAT) addresses, for development (false).
    pub allow_private_destinations: bool,
    /// Further networks never delivered to, such as the cluster's pod and service ranges.
    pub denied_networks: Vec<IpNet>,
    /// A listener whose deliveries all failed for this long, with no success in between, is
    /// suspended as `EndpointFailing` (24 h).
    pub endpoint_failing_after: Duration,
    /// Longest time a delivery is kept: after it, no new attempt starts and the delivery fails
    /// (5 min). With the per-attempt timeout it bounds how long an event stays in memory.
    pub max_delivery_age: Duration,
    /// A destination with nothing to do for this long releases its queue and task (2 min).
    pub destination_idle_timeout: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            queue_bytes: 64 * MIB,
            memory_budget: 256 * MIB,
            queue_capacity: usize::MAX,
            concurrency_per_destination: 16,
            allow_private_destinations: false,
            denied_networks: Vec::new(),
            endpoint_failing_after: Duration::from_secs(24 * 60 * 60),
            max_delivery_age: Duration::from_secs(5 * 60),
            destination_idle_timeout: Duration::from_secs(2 * 60),
        }
    }
}

/// The configuration cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A setting that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// The backoff bounds are reversed.
    #[error("the initial retry delay ({initial}) is larger than the largest one ({max})")]
    BackoffReversed {
        /// The initial delay, formatted.
        initial: String,
        /// The largest delay, formatted.
        max: String,
    },
}

impl DeliveryConfig {
    /// Checks the settings that the engine cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zero = [
            (self.timeout.is_zero(), "the delivery timeout"),
            (self.max_attempts == 0, "the number of attempts"),
            (self.queue_capacity == 0, "the queue capacity"),
            (self.queue_bytes == 0, "the queue's bytes per owner"),
            (self.memory_budget == 0, "the delivery memory budget"),
            (
                self.concurrency_per_destination == 0,
                "the concurrency per destination",
            ),
            (self.max_delivery_age.is_zero(), "the delivery age limit"),
        ];
        if let Some((_, what)) = zero.iter().find(|(is_zero, _)| *is_zero) {
            return Err(ConfigError::Zero(what));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(ConfigError::BackoffReversed {
                initial: humantime::format_duration(self.initial_backoff).to_string(),
                max: humantime::format_duration(self.max_backoff).to_string(),
            });
        }
        Ok(())
    }

    /// The operator's default policy, which a resource's `spec.delivery` overrides field by
    /// field.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff: Backoff::Exponential,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            timeout: self.timeout,
            max_age: self.max_delivery_age,
        }
    }

    /// How much one owner's lane at a destination may hold.
    pub(crate) fn lane_bounds(&self) -> super::fair::LaneBounds {
        super::fair::LaneBounds {
            bytes: self.queue_bytes,
            items: self.queue_capacity,
        }
    }

    /// The address rules.
    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy {
            allow_private_destinations: self.allow_private_destinations,
            denied_networks: self.denied_networks.clone(),
        }
    }
}

/// Delivery flags; each can also be set by the environment variable named beside it.
#[derive(Debug, Clone, clap::Args)]
pub struct DeliveryArgs {
    /// Time for one delivery attempt, e.g. `10s`.
    #[arg(long = "delivery-timeout", env = "DELIVERY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub delivery_timeout: Duration,

    /// Attempts per delivery, the first one included.
    #[arg(long = "delivery-max-attempts", env = "DELIVERY_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub delivery_max_attempts: u32,

    /// Ceiling of the wait after the first failed attempt; it doubles per attempt.
    #[arg(long = "delivery-retry-initial", env = "DELIVERY_RETRY_INITIAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub delivery_retry_initial: Duration,

    /// Largest wait between attempts, and the bound of a receiver's Retry-After.
    #[arg(long = "delivery-retry-max", env = "DELIVERY_RETRY_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    pub delivery_retry_max: Duration,

    /// Bytes of deliveries held per owner (WebhookUser) per destination before that owner's new
    /// ones are dropped, e.g. `64Mi`.
    #[arg(long = "delivery-queue-bytes", env = "DELIVERY_QUEUE_BYTES", default_value = "64Mi", value_parser = parse_bytes)]
    pub delivery_queue_bytes: usize,

    /// Bytes all queued deliveries may hold together, e.g. `256Mi`; past half of it each owner
    /// holds at most its share.
    #[arg(long = "delivery-memory-budget", env = "DELIVERY_MEMORY_BUDGET", default_value = "256Mi", value_parser = parse_bytes)]
    pub delivery_memory_budget: usize,

    /// Deprecated: deliveries held per owner per destination, a bound besides the bytes.
    #[arg(long = "delivery-queue-capacity", env = "DELIVERY_QUEUE_CAPACITY", value_parser = parse_positive)]
    pub delivery_queue_capacity: Option<usize>,

    /// Concurrent requests per destination (scheme, host, port), taken by its owners in turn.
    #[arg(long = "delivery-concurrency", env = "DELIVERY_CONCURRENCY", default_value_t = 16, value_parser = parse_positive)]
    pub delivery_concurrency: usize,

    /// Longest time a delivery is kept before it fails, e.g. `5m`.
    #[arg(long = "delivery-max-age", env = "DELIVERY_MAX_AGE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub delivery_max_age: Duration,

    /// Allows deliveries to loopback, private and CGNAT addresses: for development only.
    #[arg(
        long = "allow-private-destinations",
        env = "ALLOW_PRIVATE_DESTINATIONS",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = parse_switch,
    )]
    pub allow_private_destinations: bool,

    /// Comma-separated networks never delivered to, e.g. the cluster's pod and service CIDRs.
    #[arg(long = "denied-networks", env = "DENIED_NETWORKS", default_value = "", value_parser = parse_networks)]
    pub denied_networks: NetworkList,

    /// Suspends a listener whose deliveries have all failed for this long, e.g. `24h`.
    #[arg(long = "endpoint-failing-after", env = "ENDPOINT_FAILING_AFTER", default_value = "24h", value_parser = humantime::parse_duration)]
    pub endpoint_failing_after: Duration,
}

impl TryFrom<DeliveryArgs> for DeliveryConfig {
    type Error = ConfigError;

    fn try_from(args: DeliveryArgs) -> Result<Self, ConfigError> {
        if let Some(capacity) = args.delivery_queue_capacity {
            tracing::warn!(
                capacity,
                "DELIVERY_QUEUE_CAPACITY is deprecated: queues are bounded by DELIVERY_QUEUE_BYTES and DELIVERY_MEMORY_BUDGET"
            );
        }
        let config = Self {
            timeout: args.delivery_timeout,
            max_attempts: args.delivery_max_attempts,
            initial_backoff: args.delivery_retry_initial,
            max_backoff: args.delivery_retry_max,
            queue_bytes: args.delivery_queue_bytes,
            memory_budget: args.delivery_memory_budget,
            queue_capacity: args.delivery_queue_capacity.unwrap_or(usize::MAX),
            concurrency_per_destination: args.delivery_concurrency,
            allow_private_destinations: args.allow_private_destinations,
            denied_networks: args.denied_networks.0,
            endpoint_failing_after: args.endpoint_failing_after,
            max_delivery_age: args.delivery_max_age,
            ..Self::default()
        };
        config.validate()?;
        Ok(config)
    }
}

/// Bytes in a mebibyte.
const MIB: usize = 1 << 20;

/// A positive size in bytes: a number with an optional binary (`Ki`, `Mi`, `Gi`, also with a
/// trailing `B`) or decimal (`k`, `M`, `G`) suffix, as Kubernetes quantities write them.
fn parse_bytes(value: &str) -> Result<usize, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{value:?} is not a size such as 256Mi"))?;
    let unit: usize = match suffix.trim() {
        "" | "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "k" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "{other:?} is not a unit: use Ki, Mi, Gi, k, M or G"
            ))
        }
    };
    match number.checked_mul(unit) {
        Some(0) => Err("must be greater than zero".to_owned()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{value:?} is too large")),
    }
}

fn parse_positive(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(0) => Err("must be greater than zero".to_owned()),
        Ok(number) => Ok(number),
        Err(error) => Err(error.to_string()),
    }
}

/// A comma-separated list of networks, as one flag or variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkList(pub Vec<IpNet>);

/// Parses a comma-separated list of CIDRs (a single address is its own network). Empty, as a
/// chart leaves an unset value, is the empty list.
fn parse_networks(value: &str) -> Result<NetworkList, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{item:?} is not a CIDR such as 10.96.0.0/12"))
        })
        .collect::<Result<_, _>>()
        .map(NetworkList)
}

/// A boolean switch: true/false, yes/no, on/off, 1/0; empty, as a chart leaves an unset value,
/// is false.
fn parse_switch(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "false" | "no" | "off" | "0" | "n" | "f" => Ok(false),
        "true" | "yes" | "on" | "1" | "y" | "t" => Ok(true),
        other => Err(format!("{other:?} is not true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        delivery: DeliveryArgs,
    }

    fn parse(args: &[&str]) -> Result<DeliveryConfig, String> {
        let command = Command::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .map_err(|error| error.kind().to_string())?;
        DeliveryConfig::try_from(command.delivery).map_err(|error| error.to_string())
    }

    fn net(text: &str) -> IpNet {
        match text.parse() {
            Ok(network) => network,
            Err(error) => panic!("{text}: {error}"),
        }
    }

    #[test]
    fn flag_defaults_are_the_config_defaults() {
        // Only holds when none of the variables is set, as in the test environment.
        assert_eq!(parse(&[]), Ok(DeliveryConfig::default()));
    }

    #[test]
    fn flags_set_every_field() {
        let config = parse(&[
            "--delivery-timeout=3s",
            "--delivery-max-attempts=2",
            "--delivery-retry-initial=250ms",
            "--delivery-retry-max=1m 30s",
            "--delivery-queue-capacity=50",
            "--delivery-queue-bytes=8Mi",
            "--delivery-memory-budget=1G",
            "--delivery-concurrency=4",
            "--delivery-max-age=90s",
            "--allow-private-destinations",
            "--denied-networks=10.96.0.0/12, 10.244.0.0/16,fd00::/8,192.0.2.7",
            "--endpoint-failing-after=2h",
        ]);
        let expected = DeliveryConfig {
            timeout: Duration::from_secs(3),
            max_attempts: 2,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(90),
            queue_capacity: 50,
            queue_bytes: 8 * MIB,
            memory_budget: 1_000_000_000,
            concurrency_per_destination: 4,
            allow_private_destinations: true,
            denied_networks: vec![
                net("10.96.0.0/12"),
                net("10.244.0.0/16"),
                net("fd00::/8"),
                net("192.0.2.7/32"),
            ],
            endpoint_failing_after: Duration::from_secs(7200),
            max_delivery_age: Duration::from_secs(90),
            ..DeliveryConfig::default()
        };
        assert_eq!(config, Ok(expected));
    }

    #[test]
    fn boolean_flag_takes_a_value() {
        let table = [
            (&["--allow-private-destinations=false"][..], false),
            (&["--allow-private-destinations=true"][..], true),
            (&["--allow-private-destinations=yes"][..], true),
            (&["--allow-private-destinations=0"][..], false),
            (&["--allow-private-destinations"][..], true),
            (&[][..], false),
        ];
        for (args, expected) in table {
            assert_eq!(
                parse(args).map(|config| config.allow_private_destinations),
                Ok(expected),
                "{args:?}"
            );
        }
    }

    #[test]
    fn empty_values_mean_unset() {
        let config = parse(&["--denied-networks=", "--allow-private-destinations="]);
        assert_eq!(config, Ok(DeliveryConfig::default()));
        assert_eq!(parse_networks(" , "), Ok(NetworkList::default()));
    }

    #[test]
    fn bad_values_are_refused() {
        let table: &[&[&str]] = &[
            &["--delivery-timeout=ten"],
            &["--delivery-timeout=0s"],
            &["--delivery-max-attempts=0"],
            &["--delivery-queue-capacity=0"],
            &["--delivery-queue-bytes=0Mi"],
            &["--delivery-memory-budget=lots"],
            &["--delivery-memory-budget=256Tb"],
            &["--delivery-memory-budget=-1Mi"],
            &["--delivery-memory-budget=99999999999999999999Gi"],
            &["--delivery-concurrency=-1"],
            &["--denied-networks=10.0.0.0/33"],
            &["--denied-networks=cluster"],
            &["--delivery-retry-initial=2m", "--delivery-retry-max=1m"],
            &["--allow-private-destinations=maybe"],
        ];
        for args in table {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn sizes_take_kubernetes_units() {
        let table = [
            ("256Mi", Ok(256 * MIB)),
            ("256MiB", Ok(256 * MIB)),
            (" 64Ki ", Ok(64 << 10)),
            ("2Gi", Ok(2 << 30)),
            ("300M", Ok(300_000_000)),
            ("5k", Ok(5_000)),
            ("1024", Ok(1024)),
            ("0", Err(())),
            ("Mi", Err(())),
            ("1.5Gi", Err(())),
            ("1Ti", Err(())),
        ];
        for (text, expected) in table {
            assert_eq!(parse_bytes(text).map_err(|_| ()), expected, "{text}");
        }
    }
}
