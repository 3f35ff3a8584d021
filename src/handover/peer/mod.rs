//! The transport between replicas: the leader serves its progress records over HTTP on a port
//! of its own, and every standby long-polls the replica that holds the Lease. Both directions
//! are authenticated with HMAC-SHA256 under a key the replicas share, so a record no leader
//! signed can never make a standby drop events it would have to deliver.

pub mod auth;
pub mod client;
pub mod server;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use super::TokenProgress;
use crate::metrics::ReasonLabel;

pub use auth::{HandoverKey, KeyTooShort};
pub use client::{read_holder, watch_lease_holder, CatchUp, Holder, ProgressClient};
pub use server::{FinishOutcome, ProgressServer, ServerSettings};

/// The Lease annotation where the leader says where its progress is served (`host:port`).
pub const ADDRESS_ANNOTATION: &str = "webhooks.crownstone.rocks/handover-address";

/// The path of the progress records.
pub const PROGRESS_PATH: &str = "/handover/progress";

/// The path where a standby sends the leader the events of a gap in the leader's stream.
pub const GAP_PATH: &str = "/handover/gap";

/// The most events one fill carries.
pub const MAX_FILL_EVENTS: usize = 4096;

/// The largest fill body the leader reads; a standby does not send a larger one.
pub const MAX_FILL_BYTES: usize = 1024 * 1024;

/// The most records one answer carries; more are paged through with the version.
pub const MAX_RECORDS_PER_ANSWER: usize = 1000;

/// How replicas hand over between them.
#[derive(clap::Args, Clone, Debug)]
pub struct HandoverArgs {
    /// Address the leader serves its progress records on, for the standbys.
    #[arg(long, env = "HANDOVER_LISTEN", default_value = "0.0.0.0:8084")]
    pub handover_listen: SocketAddr,

    /// The key replicas authenticate each other with, at least 32 bytes; the same on every
    /// replica. Unset: no handover transport, and a standby that takes over delivers all it
    /// buffered (repeats, never losses).
    #[arg(long, env = "HANDOVER_KEY", hide_env_values = true, value_parser = KeyParser)]
    pub handover_key: Option<HandoverKey>,

    /// How often the leader publishes the progress of the tokens that changed.
    #[arg(long, env = "HANDOVER_PROGRESS_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub handover_progress_interval: Duration,

    /// Where standbys reach this replica (`host:port`), written into the Lease; default: POD_IP
    /// and the port of --handover-listen, else the address bound.
    #[arg(long, env = "HANDOVER_ADDRESS")]
    pub handover_address: Option<String>,
}

/// Parses `--handover-key` so that a refusal never repeats the key, as clap's own error would.
#[derive(Clone, Copy, Debug)]
struct KeyParser;

impl clap::builder::TypedValueParser for KeyParser {
    type Value = HandoverKey;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<HandoverKey, clap::Error> {
        HandoverKey::new(value.as_encoded_bytes()).map_err(|error| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{error}\n"),
            )
        })
    }
}

impl HandoverArgs {
    /// The server's settings for this replica, named `identity` in the Lease; `None` without a
    /// key: no transport at all.
    pub fn server_settings(&self, identity: &str) -> Option<ServerSettings> {
        Some(ServerSettings {
            listen: self.handover_listen,
            key: self.handover_key.clone()?,
            identity: identity.to_owned(),
            interval: self.handover_progress_interval,
        })
    }

    /// The address to advertise in the Lease, given the address the server bound and the
    /// pod's IP (`POD_IP`) if there is one.
    pub fn advertised_address(&self, bound: SocketAddr, pod_ip: Option<&str>) -> String {
        if let Some(address) = self.handover_address.as_deref().filter(|a| !a.is_empty()) {
            return address.to_owned();
        }
        match pod_ip.and_then(|ip| ip.trim().parse::<IpAddr>().ok()) {
            Some(ip) => SocketAddr::new(ip, bound.port()).to_string(),
            None => bound.to_string(),
        }
    }
}

/// What the leader answers a poll with. Its MAC covers the exact bytes sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressAnswer {
    /// The identity of the replica answering: a standby accepts only the Lease's holder.
    pub leader: String,
    /// The Lease's `leaseTransitions` when that replica took it.
    pub term: i32,
    /// Poll again with `after` set to this.
    pub version: u64,
    /// The leader has stopped routing and this is its last word.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// The latest record of every token that changed after the `after` asked for.
    pub records: Vec<TokenProgress>,
}

/// A standby's fill of a gap in the leader's stream. The request's MAC covers these bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillRequest {
    /// The replica the standby takes for the Lease's holder: a fill for another is refused.
    pub leader: String,
    /// The Lease term it takes that replica to lead in.
    pub term: i32,
    /// The token's hash.
    pub token: crate::domain::TokenHash,
    /// The leader's last place before the gap.
    pub gap: super::Seq,
    /// The events read in the gap, in order, each its JSON as read.
    pub events: Vec<String>,
}

/// The leader's answer to a fill. Its MAC covers its exact body bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillAnswer {
    pub leader: String,
    pub term: i32,
    /// The gap was open and these events are delivered; false: it was unknown, closed, or
    /// filled already, and nothing was done.
    pub accepted: bool,
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("could not listen for handover on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not build the handover HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct SideLabel {
    pub side: &'static str,
    pub reason: &'static str,
}

/// Metrics of the transport, on both sides.
#[derive(Clone, Debug, Default)]
pub struct HandoverMetrics {
    /// Records the leader answered polls with.
    pub records_sent: Counter,
    /// Records a standby accepted and applied.
    pub records_received: Counter,
    /// Polls a standby made.
    pub polls: Counter,
    /// Refused requests (leader side) and answers (standby side), by reason.
    pub auth_failures: Family<SideLabel, Counter>,
    /// Polls that failed for another reason than authentication, by reason.
    pub poll_errors: Family<ReasonLabel, Counter>,
    /// Seconds since a standby last accepted an answer from the leader.
    pub progress_age: ProgressAge,
}

impl HandoverMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = HandoverMetrics::default();
        // Every reason either side counts, at zero, so the series exist before the first one.
        let refused = [
            auth::AuthError::MissingHeader,
            auth::AuthError::BadTime,
            auth::AuthError::Stale,
            auth::AuthError::BadMac,
        ]
        .map(auth::AuthError::as_label);
        for (side, answers) in [
            ("leader", &["wrong_leader"][..]),
            ("standby", &["wrong_leader", "backwards"][..]),
        ] {
            for reason in refused.iter().chain(answers) {
                let _ = metrics
                    .auth_failures
                    .get_or_create(&SideLabel { side, reason });
            }
        }
        for reason in [
            "bad_address",
            "unreachable",
            "refused",
            "not_leading",
            "status",
            "too_large",
            "malformed",
        ] {
            let _ = metrics.poll_errors.get_or_create(&ReasonLabel { reason });
        }
        let registry = registry.sub_registry_with_prefix("handover");
        registry.register(
            "records_sent",
            "Progress records the leader sent to standbys",
            metrics.records_sent.clone(),
        );
        registry.register(
            "records_received",
            "Progress records this standby accepted from the leader",
            metrics.records_received.clone(),
        );
        registry.register(
            "polls",
            "Polls of the leader's progress",
            metrics.polls.clone(),
        );
        registry.register(
            "auth_failures",
            "Handover requests (side=leader) or answers (side=standby) refused, by reason",
            metrics.auth_failures.clone(),
        );
        registry.register(
            "poll_errors",
            "Polls of the leader's progress that failed, by reason",
            metrics.poll_errors.clone(),
        );
        registry.register(
            "progress_age_seconds",
            "Seconds since this standby last accepted the leader's progress (-1: never)",
            metrics.progress_age.clone(),
        );
        metrics
    }

    fn auth_failure(&self, side: &'static str, reason: &'static str) {
        self.auth_failures
            .get_or_create(&SideLabel { side, reason })
            .inc();
    }

    fn poll_error(&self, reason: &'static str) {
        self.poll_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// A gauge computed when scraped: the age of the last accepted answer, so a standby whose
/// polls stall shows a growing age instead of a frozen one.
#[derive(Clone, Default)]
pub struct ProgressAge(Arc<Mutex<Option<Instant>>>);

impl ProgressAge {
    /// An answer was accepted now.
    pub fn touch(&self) {
        *self.0.lock() = Some(Instant::now());
    }

    /// Seconds since the last answer; `None` before the first.
    pub fn seconds(&self) -> Option<f64> {
        self.0.lock().map(|at| at.elapsed().as_secs_f64())
    }
}

impl fmt::Debug for ProgressAge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProgressAge({:?})", self.seconds())
    }
}

impl EncodeMetric for ProgressAge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_gauge(&self.seconds().unwrap_or(-1.0))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        handover: HandoverArgs,
    }

    #[test]
    fn defaults_serve_on_8084_every_half_second_without_a_key() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.handover.handover_listen.to_string(), "0.0.0.0:8084");
        assert_eq!(
            cli.handover.handover_progress_interval,
            Duration::from_millis(500)
        );
        assert!(cli.handover.handover_key.is_none());
    }

    #[test]
    fn a_short_key_is_refused_with_a_clear_error_that_does_not_show_it() {
        let error = Cli::try_parse_from(["x", "--handover-key", "hunter2-hunter2"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("at least 32"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        let cli = Cli::try_parse_from(["x", "--handover-key", &"k".repeat(40)]).unwrap();
        let shown = format!("{:?}", cli.handover);
        assert!(!shown.contains("kkkk"), "{shown}");
    }

    #[test]
    fn the_advertised_address_is_the_setting_else_the_pod_ip_else_the_bound_address() {
        let bound: SocketAddr = "0.0.0.0:8084".parse().unwrap();
        let mut args = Cli::try_parse_from(["x"]).unwrap().handover;
        assert_eq!(
            args.advertised_address(bound, Some("10.1.2.3")),
            "10.1.2.3:8084"
        );
        assert_eq!(
            args.advertised_address(bound, Some("fd00::7")),
            "[fd00::7]:8084"
        );
        assert_eq!(args.advertised_address(bound, None), "0.0.0.0:8084");
        assert_eq!(
            args.advertised_address(bound, Some("not an ip")),
            "0.0.0.0:8084"
        );
        args.handover_address = Some("operator-0.example:9000".into());
        assert_eq!(
            args.advertised_address(bound, Some("10.1.2.3")),
            "operator-0.example:9000"
        );
    }

    #[test]
    fn the_age_gauge_says_never_until_an_answer_came() {
        let age = ProgressAge::default();
        assert_eq!(age.seconds(), None);
        age.touch();
        assert!(age.seconds().unwrap() < 60.0);
        let mut registry = Registry::default();
        let metrics = HandoverMetrics::register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("handover_progress_age_seconds -1"), "{text}");
        metrics.progress_age.touch();
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("handover_progress_age_seconds -1"), "{text}");
    }
}

#[cfg(test)]
mod transport_tests;
