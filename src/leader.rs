//! Leader election through a `coordination.k8s.io` Lease, so that of several replicas exactly
//! one streams and delivers. A replica takes the Lease when it is free or its holder stopped
//! renewing it for a whole lease duration (measured on this replica's own clock, so clock skew
//! between nodes does not matter), renews it while it leads, gives it up when it stops, and
//! stops leading by itself when it cannot renew before its renew deadline, which is shorter than
//! the lease duration: the next leader cannot start before the old one has stopped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::conventions::describe_kube_error;
pub use crate::handover::Role;

/// How replicas elect a leader.
#[derive(clap::Args, Clone, Debug)]
pub struct LeaderArgs {
    /// Elect a leader among replicas through a Lease; only the leader streams and delivers.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = false)]
    pub leader_election: bool,

    /// Namespace of the Lease (default: the pod's namespace, POD_NAMESPACE, else `default`).
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the Lease.
    #[arg(
        long,
        env = "LEADER_ELECTION_LEASE",
        default_value = "crownstone-webhooks"
    )]
    pub leader_election_lease: String,

    /// How long a Lease not renewed stays with its holder.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// How long the leader tries to renew before it stops leading; shorter than the duration.
    #[arg(long, env = "LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_renew_deadline: Duration,

    /// How often the Lease is renewed, or tried for.
    #[arg(long, env = "LEASE_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry_period: Duration,

    /// What a replica that does not hold the Lease runs: `warm` keeps its caches, reconcilers
    /// and its own streams going (writing and delivering nothing), so a leader change loses no
    /// event; `cold` runs nothing until it leads, for event servers that limit connections.
    #[arg(long, env = "STANDBY", value_enum, default_value_t = StandbyMode::Warm)]
    pub standby: StandbyMode,
}

/// What a replica runs while another one leads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandbyMode {
    /// Caches, reconcilers and streams run; nothing is written or delivered.
    Warm,
    /// Nothing runs until the Lease is won: one stream per token across the replicas.
    Cold,
}

/// This replica's role, which every writer to the API server and every delivery checks: only
/// a leader writes status, Events, finalizers and Secrets, and only a leader delivers.
#[derive(Clone)]
pub struct Leadership {
    role: Arc<watch::Sender<Role>>,
}

impl Leadership {
    /// A role that starts as `role`.
    pub fn new(role: Role) -> Self {
        Leadership {
            role: Arc::new(watch::Sender::new(role)),
        }
    }

    /// The role now.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Whether this replica leads now, and so may write and deliver.
    pub fn is_leading(&self) -> bool {
        self.role() == Role::Leading
    }

    /// Switches the role; returns whether it changed.
    pub fn set(&self, role: Role) -> bool {
        self.role.send_if_modified(|current| {
            let changed = *current != role;
            *current = role;
            changed
        })
    }

    /// Every change of role, from now on.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }
}

/// Leader election cannot work as configured.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "the renew deadline ({deadline:?}) must be shorter than the lease duration ({duration:?}), \
         and the retry period ({retry:?}) shorter than the deadline"
    )]
    Timing {
        duration: Duration,
        deadline: Duration,
        retry: Duration,
    },
    /// The Lease holds its duration in whole seconds: a fraction would be cut off, and other
    /// replicas would take over before this one's renew deadline has passed.
    #[error("the lease duration ({0:?}) must be a whole number of seconds, from 1 s to 68 years")]
    WholeSeconds(Duration),
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadershipEnd {
    /// Asked to stop (shutdown).
    Stopped,
    /// The Lease could not be renewed in time, or another replica holds it.
    Lost,
}

/// The outcome of one round of taking or renewing the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// This replica holds it.
    Held,
    /// Another replica holds it and has renewed it within its duration.
    HeldByOther,
    /// The Lease changed between the read and the write (409): read it again.
    Conflict,
}

/// What this replica last saw of the Lease, and when, by its own clock.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    at: Instant,
}

/// Until when this replica may act as the leader, by its own monotonic clock: the renew
/// deadline counted from the last renewal sent. Checked before every delivery attempt, so a
/// leader frozen past its Lease (a stopped process, a paused VM) sends nothing when it wakes,
/// before its renew loop has even noticed.
#[derive(Debug)]
pub struct LeaseFence {
    base: Instant,
    /// Nanoseconds after `base`; `u64::MAX`: no election, always holds.
    until: AtomicU64,
}

impl LeaseFence {
    /// A fence that always holds: a replica without leader election.
    pub fn open() -> Self {
        LeaseFence {
            base: Instant::now(),
            until: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether this replica may still act as the leader now.
    pub fn holds(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until == u64::MAX || nanos(self.base.elapsed()) < until
    }

    /// Leading until `deadline`.
    pub(crate) fn extend_to(&self, deadline: Instant) {
        let until = nanos(deadline.saturating_duration_since(self.base)).min(u64::MAX - 1);
        self.until.store(until, Ordering::Release);
    }

    /// Not leading any more.
    pub(crate) fn close(&self) {
        self.until.store(0, Ordering::Release);
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One replica's handle on the Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
    observed: Mutex<Option<Observed>>,
    /// When the round that took the Lease was started: the renew deadline of the first term
    /// counts from there, not from when the answer came.
    won_at: Mutex<Option<Instant>>,
    /// Annotations written with every take and renewal (where the handover is served).
    annotations: Mutex<BTreeMap<String, String>>,
    /// The Lease's `leaseTransitions` as this replica last wrote it: its term while it holds it.
    term: Mutex<Option<i32>>,
    /// The fence this replica's deliveries check, moved on with every renewal.
    fence: Mutex<Option<Arc<LeaseFence>>>,
}

/// Refuses timing under which two replicas could lead at once: a renew deadline not shorter
/// than the lease duration, a retry period not shorter than the deadline, or a duration the
/// Lease's whole seconds would cut short.
fn validate_timing(args: &LeaderArgs) -> Result<(), LeaderError> {
    let duration = args.lease_duration;
    if duration.subsec_nanos() != 0
        || duration.as_secs() == 0
        || i32::try_from(duration.as_secs()).is_err()
    {
        return Err(LeaderError::WholeSeconds(duration));
    }
    if args.lease_renew_deadline >= duration || args.lease_retry_period >= args.lease_renew_deadline
    {
        return Err(LeaderError::Timing {
            duration,
            deadline: args.lease_renew_deadline,
            retry: args.lease_retry_period,
        });
    }
    Ok(())
}

impl LeaseLock {
    /// A lock on Lease `args.leader_election_lease` in `namespace`, held as `identity`.
    pub fn new(
        client: Client,
        args: &LeaderArgs,
        namespace: &str,
        identity: String,
    ) -> Result<Self, LeaderError> {
        validate_timing(args)?;
        Ok(LeaseLock {
            api: Api::namespaced(client, namespace),
            name: args.leader_election_lease.clone(),
            identity,
            duration: args.lease_duration,
            renew_deadline: args.lease_renew_deadline,
            retry_period: args.lease_retry_period,
            observed: Mutex::new(None),
            won_at: Mutex::new(None),
            annotations: Mutex::new(BTreeMap::new()),
            term: Mutex::new(None),
            fence: Mutex::new(None),
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The Lease's `leaseTransitions` of the term this replica holds, or last held: it grows
    /// with every change of holder, so it tells two terms of the same replica apart.
    pub fn term(&self) -> Option<i32> {
        *self.term.lock()
    }

    /// Writes `key: value` into the Lease's annotations whenever this replica takes or renews
    /// it, so standbys reading the Lease learn it from its holder.
    pub fn set_annotation(&self, key: impl Into<String>, value: impl Into<String>) {
        self.annotations.lock().insert(key.into(), value.into());
    }

    fn annotate(&self, metadata: &mut ObjectMeta) {
        let ours = self.annotations.lock();
        if !ours.is_empty() {
            let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
            annotations.extend(ours.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }

    /// Makes `fence` follow this replica's hold on the Lease; closed until it is won.
    pub fn set_fence(&self, fence: Arc<LeaseFence>) {
        fence.close();
        *self.fence.lock() = Some(fence);
    }

    fn fence_until(&self, deadline: Option<Instant>) {
        if let Some(fence) = self.fence.lock().as_ref() {
            match deadline {
                Some(deadline) => fence.extend_to(deadline),
                None => fence.close(),
            }
        }
    }

    /// Waits until this replica holds the Lease. False when cancelled first.
    pub async fn acquire(&self, cancel: &CancellationToken) -> bool {
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(Round::Held) => {
                    *self.won_at.lock() = Some(started);
                    self.fence_until(Some(started + self.renew_deadline));
                    tracing::info!(identity = %self.identity, lease = %self.name, term = ?self.term(), "Leading: took the lease.");
                    return true;
                }
                Ok(Round::HeldByOther | Round::Conflict) => {}
                Err(error) => {
                    tracing::warn!(lease = %self.name, error = %describe_kube_error(&error), "Could not read or take the lease; trying again.")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(self.retry_period) => {}
            }
        }
    }

    /// Renews the Lease until `cancel`, or until it cannot be renewed before the renew deadline.
    /// Stopping does not hand the Lease back: the caller does with [`release`](Self::release)
    /// once it has stopped delivering, so no standby starts before.
    pub async fn hold(&self, cancel: &CancellationToken) -> LeadershipEnd {
        let end = self.renew_until_stopped(cancel).await;
        if end == LeadershipEnd::Lost {
            self.fence_until(None);
        }
        end
    }

    async fn renew_until_stopped(&self, cancel: &CancellationToken) -> LeadershipEnd {
        // Counted from when each successful round was sent: the other replicas start counting
        // the lease duration no earlier than the write landed, so this side stops first.
        let mut renewed = self.won_at.lock().take().unwrap_or_else(Instant::now);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return LeadershipEnd::Stopped,
                _ = tokio::time::sleep(self.retry_period) => {}
            }
            let sent = Instant::now();
            let attempt = tokio::time::timeout(
                self.renew_deadline.saturating_sub(renewed.elapsed()),
                self.renew(),
            )
            .await;
            match attempt {
                Ok(Ok(true)) => {
                    renewed = sent;
                    self.fence_until(Some(sent + self.renew_deadline));
                }
                Ok(Ok(false)) => {
                    tracing::warn!(lease = %self.name, "Another replica holds the lease: no longer leading.");
                    return LeadershipEnd::Lost;
                }
                Ok(Err(error)) => {
                    tracing::warn!(lease = %self.name, error = %describe_kube_error(&error), "Could not renew the lease.")
                }
                Err(_) => {}
            }
            if renewed.elapsed() >= self.renew_deadline {
                tracing::warn!(lease = %self.name, deadline = ?self.renew_deadline, "The lease was not renewed before its deadline: no longer leading.");
                return LeadershipEnd::Lost;
            }
        }
    }

    /// One renewal. A conflict (someone wrote the Lease between this replica's read and write,
    /// a label edit for one) is no loss: the Lease is read again and, if this replica still
    /// holds it, renewed again, until the caller's deadline cuts the round off. True when held.
    async fn renew(&self) -> Result<bool, kube::Error> {
        loop {
            match self.try_acquire_or_renew().await? {
                Round::Held => return Ok(true),
                Round::HeldByOther => return Ok(false),
                Round::Conflict => {
                    tracing::debug!(lease = %self.name, "The lease changed while renewing it; reading it again.");
                    // A short pause, so a writer racing on the Lease is not hammered.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Hands the Lease back, so a standby takes over at once instead of after its duration.
    pub async fn release(&self) {
        self.fence_until(None);
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "Handed the lease back."),
            Err(error) => {
                tracing::warn!(lease = %self.name, error = %describe_kube_error(&error), "Could not hand the lease back; it expires by itself.")
            }
        }
    }

    /// One round: take the Lease if it is free or expired, renew it if held.
    async fn try_acquire_or_renew(&self) -> Result<Round, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(None, 0)),
            };
            self.annotate(&mut lease.metadata);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    *self.term.lock() = Some(0);
                    Ok(Round::Held)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Round::Conflict),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if !ours && holder.is_some() && !self.expired(&spec) {
            return Ok(Round::HeldByOther);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.held_spec(acquired, transitions));
        self.annotate(&mut lease.metadata);
        // `replace` carries the resourceVersion read above: a concurrent taker makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                *self.term.lock() = Some(transitions);
                Ok(Round::Held)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Round::Conflict),
            Err(error) => Err(error),
        }
    }

    /// Whether the holder has not renewed for a lease duration, by this replica's clock: the
    /// time since this replica first saw the current record.
    fn expired(&self, spec: &LeaseSpec) -> bool {
        let record = (spec.holder_identity.clone(), spec.renew_time.clone());
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.duration, Duration::from_secs);
        let mut observed = self.observed.lock();
        match observed.as_ref() {
            Some(seen) if seen.record == record => seen.at.elapsed() >= duration,
            _ => {
                *observed = Some(Observed {
                    record,
                    at: Instant::now(),
                });
                false
            }
        }
    }

    fn held_spec(&self, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            // Whole seconds that fit, as `validate_timing` made sure.
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or_else(now)),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// This replica's name in the Lease: the pod name where there is one, else the host name, with
/// a random suffix so two processes on one machine differ.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "crownstone-webhooks".to_owned());
    format!("{base}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        leader: LeaderArgs,
    }

    #[test]
    fn a_role_change_is_seen_by_subscribers_and_only_a_change_counts() {
        let leadership = Leadership::new(Role::Standby);
        let mut roles = leadership.subscribe();
        assert!(!leadership.is_leading());
        assert!(!leadership.set(Role::Standby), "no change");
        assert!(!roles.has_changed().unwrap());
        assert!(leadership.set(Role::Leading));
        assert!(leadership.clone().is_leading(), "clones share the role");
        assert!(roles.has_changed().unwrap());
        assert_eq!(*roles.borrow_and_update(), Role::Leading);
    }

    #[test]
    fn defaults_leave_election_off_with_sane_timing() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(!cli.leader.leader_election);
        assert_eq!(cli.leader.standby, StandbyMode::Warm);
        let cold = Cli::try_parse_from(["x", "--standby", "cold"]).unwrap();
        assert_eq!(cold.leader.standby, StandbyMode::Cold);
        assert!(cli.leader.lease_renew_deadline < cli.leader.lease_duration);
        assert!(cli.leader.lease_retry_period < cli.leader.lease_renew_deadline);
    }

    #[tokio::test]
    async fn timing_that_allows_two_leaders_is_refused() {
        let cli = Cli::try_parse_from([
            "x",
            "--lease-duration",
            "10s",
            "--lease-renew-deadline",
            "10s",
        ])
        .unwrap();
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        assert!(matches!(
            LeaseLock::new(client, &cli.leader, "ns", "me".into()),
            Err(LeaderError::Timing { .. })
        ));
    }

    #[test]
    fn lease_durations_the_lease_would_cut_short_are_refused() {
        let args = |duration: &str, deadline: &str, retry: &str| {
            Cli::try_parse_from([
                "x",
                "--lease-duration",
                duration,
                "--lease-renew-deadline",
                deadline,
                "--lease-retry-period",
                retry,
            ])
            .unwrap()
            .leader
        };
        // 10.5 s would be written as 10 s: another replica could take over at 10 s, before this
        // one's renew deadline of 10.2 s has passed.
        assert!(matches!(
            validate_timing(&args("10500ms", "10200ms", "2s")),
            Err(LeaderError::WholeSeconds(_))
        ));
        assert!(matches!(
            validate_timing(&args("500ms", "200ms", "100ms")),
            Err(LeaderError::WholeSeconds(_))
        ));
        assert!(matches!(
            validate_timing(&args("10s", "12s", "2s")),
            Err(LeaderError::Timing { .. })
        ));
        assert!(matches!(
            validate_timing(&args("10s", "8s", "8s")),
            Err(LeaderError::Timing { .. })
        ));
        assert!(validate_timing(&args("15s", "10s", "2s")).is_ok());
        assert!(validate_timing(&args("11s", "10500ms", "2s")).is_ok());
    }
}
