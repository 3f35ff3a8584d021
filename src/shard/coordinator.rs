//! Each replica's side of sharding: keeps its member Lease, lists the live members, and moves
//! tokens between replicas in three steps that every replica takes by itself, acknowledged in
//! the member Leases: *warm* (open the streams the new view needs), *release* (stop routing
//! what this replica no longer owns, let it settle, publish its last progress), *take over*
//! (deliver what it newly owns once every member released). No token is delivered by two
//! replicas: a replica starts a token only after every live member said it serves the view in
//! which that token is its own.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::members::{
    Member, Members, LEAVING_ANNOTATION, SERVING_ANNOTATION, TERM_ANNOTATION, WARM_ANNOTATION,
};
use super::ring::Ring;
use crate::domain::TokenHash;
use crate::forwarder::{Duties, Duty, ForwarderRegistry};
use crate::handover::peer::{CatchUp, Holder, ProgressClient, ProgressServer};
use crate::handover::peer::{HandoverKey, HandoverMetrics};
use crate::handover::{GapFill, ProgressSink, Seq, TokenProgress};
use crate::leader::LeaseFence;

/// How replicas shard tokens between them.
#[derive(clap::Args, Clone, Debug)]
pub struct ShardArgs {
    /// Spread tokens over the live replicas, each token streamed for delivery by exactly one
    /// of them and kept warm by another. Needs --leader-election and --handover-key.
    #[arg(long, env = "SHARDING", default_value_t = false)]
    pub sharding: bool,

    /// Member Leases are named `<prefix>-member-<hash of the replica's identity>`.
    #[arg(
        long,
        env = "SHARD_LEASE_PREFIX",
        default_value = "crownstone-webhooks"
    )]
    pub shard_lease_prefix: String,

    /// How long a replica waits for the streams of a new view to open before it says it is
    /// ready for it anyway: a token whose stream does not open must not hold every move.
    #[arg(long, env = "SHARD_WARM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shard_warm_timeout: Duration,
}

/// How long a release waits for the deliveries in flight of the tokens it hands on.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// How long a release waits for the peers to fetch the last progress of those tokens.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

/// How long a release waits for the last status counters of the tokens it hands on: a base,
/// and more per token, since each of their Listeners is a status write; bounded, because the
/// tokens handed on deliver nothing meanwhile.
const COUNTERS_WAIT: Duration = Duration::from_secs(5);
const COUNTERS_WAIT_PER_TOKEN: Duration = Duration::from_millis(5);
const COUNTERS_WAIT_MAX: Duration = Duration::from_secs(15);

fn counters_wait(tokens: usize) -> Duration {
    let per_token =
        COUNTERS_WAIT_PER_TOKEN.saturating_mul(u32::try_from(tokens).unwrap_or(u32::MAX));
    COUNTERS_WAIT
        .saturating_add(per_token)
        .min(COUNTERS_WAIT_MAX)
}

/// How often a release checks whether the deliveries settled.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// Whether a member has taken part in a view: it said it is warm for one, or serves one.
fn takes_part(member: &Member) -> bool {
    member.warm.is_some() || member.serving.is_some()
}

/// The live members views are made of now. Those that took part in a view always count; a
/// newcomer is let in only once all of those serve the one view they make up. A replica that
/// joined while tokens were between owners (released by one, not yet confirmed to the next)
/// could become the owner of some with a stream opened after the last owner let go, and the
/// events in between would be in nobody's reach; once a view is served throughout, a joiner
/// opens its streams while every token still has an owner delivering it.
fn counted(live: &[Member]) -> Vec<&Member> {
    let old: Vec<&Member> = live.iter().filter(|m| takes_part(m)).collect();
    if old.len() == live.len() {
        return old;
    }
    let staying = Ring::new(
        old.iter()
            .filter(|m| !m.leaving)
            .map(|m| m.identity.clone()),
    );
    let settled_id = view_id(&staying);
    let settled = old
        .iter()
        .all(|m| m.serving.as_deref() == Some(settled_id.as_str()));
    if settled {
        live.iter().collect()
    } else {
        old
    }
}

/// Whether every member but `me` serves the view `id`, so that what `me` owns in it is its own
/// to deliver. A member that serves no view yet (let in a moment ago, or starting over after
/// its renewals lapsed) delivers nothing and releases nothing: it does not hold this up. Were
/// it waited for, the view it was let in during would never be confirmed, and the tokens on
/// their way to a new owner in that view would stay undelivered through the next change.
fn served_throughout(members: &[&Member], me: &str, id: &str) -> bool {
    members
        .iter()
        .all(|m| m.identity == me || m.serving.as_deref().is_none_or(|serving| serving == id))
}

/// The id of a view: a hash of its members, the same on every replica.
pub fn view_id(ring: &Ring) -> String {
    let mut hash = Sha256::new();
    for member in ring.members() {
        hash.update((member.len() as u64).to_be_bytes());
        hash.update(member.as_bytes());
    }
    hex::encode(&hash.finalize()[..8])
}

/// Where this replica stands in the moves between views.
#[derive(Default)]
struct Views {
    /// The last view every live member served at once; tokens this replica owns in it (and in
    /// every view of `chain`) are its to deliver.
    confirmed: Ring,
    /// Views this replica switched to since, oldest first: a token it owns in `confirmed` but
    /// not in one of these was released and waits for the next confirmation.
    chain: Vec<Ring>,
    /// The view it warms up for, if other than the one it serves.
    warming: Option<(Ring, Instant)>,
    /// Tokens it hands on right now.
    releasing: HashSet<TokenHash>,
}

/// The most views switched through before one is confirmed; past it this replica leads
/// nothing until the next confirmation, which is always safe.
const MAX_CHAIN: usize = 16;

impl Views {
    fn serving(&self) -> &Ring {
        self.chain.last().unwrap_or(&self.confirmed)
    }

    fn leads(&self, me: &str, token: &TokenHash) -> bool {
        self.chain.len() <= MAX_CHAIN
            && self.confirmed.owner(token) == Some(me)
            && self.chain.iter().all(|ring| ring.owner(token) == Some(me))
    }

    fn duty(&self, me: &str, token: &TokenHash) -> Duty {
        if self.releasing.contains(token) {
            return Duty::Release;
        }
        if self.leads(me, token) {
            return Duty::Lead;
        }
        let holds = |ring: &Ring| {
            let (owner, standby) = ring.owner_and_standby(token);
            owner == Some(me) || standby == Some(me)
        };
        if holds(self.serving()) || self.warming.as_ref().is_some_and(|(ring, _)| holds(ring)) {
            Duty::Standby
        } else {
            Duty::Idle
        }
    }
}

/// The coordinator's views as the forwarders ask them.
pub struct ShardTable {
    me: String,
    views: Mutex<Views>,
}

impl Duties for ShardTable {
    fn duty(&self, token: &TokenHash) -> Duty {
        self.views.lock().duty(&self.me, token)
    }
}

impl ShardTable {
    pub fn new(me: String) -> Self {
        ShardTable {
            me,
            views: Mutex::new(Views::default()),
        }
    }

    /// Whether this replica delivers on the token now.
    pub fn leads(&self, token: &TokenHash) -> bool {
        self.views.lock().leads(&self.me, token)
    }

    /// The token's owner in the view this replica serves.
    pub fn owner(&self, token: &TokenHash) -> Option<String> {
        self.views.lock().serving().owner(token).map(str::to_owned)
    }

    /// Whether this replica writes the status of the token's Listeners: while it delivers on
    /// the token, and while it hands the token on (its last counters).
    pub fn writes(&self, token: &TokenHash) -> bool {
        let views = self.views.lock();
        views.releasing.contains(token) || views.leads(&self.me, token)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// What `/metrics` shows of this replica's shards.
#[derive(Clone, Default)]
pub struct ShardMetrics {
    members: Gauge,
    tokens: Family<RoleLabel, Gauge>,
    moves: Family<DirectionLabel, Counter>,
    view_changes: Counter,
}

impl ShardMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ShardMetrics::default();
        registry.register(
            "shard_members",
            "Live members this replica sees",
            metrics.members.clone(),
        );
        registry.register(
            "shard_tokens",
            "Tokens this replica streams, by role: lead (delivers) or standby (buffers)",
            metrics.tokens.clone(),
        );
        registry.register(
            "shard_moves",
            "Tokens moved to this replica (in) or handed on by it (out)",
            metrics.moves.clone(),
        );
        registry.register(
            "shard_view_changes",
            "Views this replica switched to",
            metrics.view_changes.clone(),
        );
        for role in ["lead", "standby"] {
            metrics.tokens.get_or_create(&RoleLabel { role }).set(0);
        }
        for direction in ["in", "out"] {
            let _ = metrics.moves.get_or_create(&DirectionLabel { direction });
        }
        metrics
    }
}

/// What `GET /shards` answers: this replica's place among the shards. Token hashes and
/// identities only, nothing secret.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardReport {
    pub identity: String,
    pub serving: Vec<String>,
    pub serving_id: String,
    pub confirmed_id: String,
    pub warming: Option<Vec<String>>,
    pub members: Vec<MemberReport>,
    pub leading: Vec<TokenHash>,
    pub standby: Vec<TokenHash>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberReport {
    pub identity: String,
    pub warm: Option<String>,
    pub serving: Option<String>,
    pub leaving: bool,
}

/// Told the tokens this replica started delivering.
pub type TakenOver = Arc<dyn Fn(&[TokenHash]) + Send + Sync>;

/// Writes the last status counters of the Listeners of tokens about to be handed on.
pub type BeforeRelease = Arc<dyn Fn(Vec<TokenHash>) -> BoxFuture<'static, ()> + Send + Sync>;

/// Everything the coordinator works with.
pub struct Coordinator {
    pub members: Arc<Members>,
    pub table: Arc<ShardTable>,
    pub forwarders: ForwarderRegistry,
    pub server: Option<Arc<ProgressServer>>,
    pub key: HandoverKey,
    pub term: i32,
    pub fence: Arc<LeaseFence>,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    pub warm_timeout: Duration,
    /// Whether the caches are synced: a replica that has not listed the Listeners cannot know
    /// which streams a view needs.
    pub synced: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Called with the tokens this replica started delivering, so their Listeners' status
    /// names it.
    pub on_taken_over: TakenOver,
    pub before_release: BeforeRelease,
    pub metrics: ShardMetrics,
    pub handover_metrics: HandoverMetrics,
    pub report: Arc<Mutex<ShardReport>>,
    /// Woken to run a round at once (shutdown).
    pub wake: Arc<Notify>,
}

/// What one peer's progress client hands its records to: every record goes to the forwarders
/// (a token's last owner's records matter to whoever takes it), but only the gap fills of the
/// tokens that peer owns go to it, since no other replica could use them.
struct PeerSink {
    forwarders: ForwarderRegistry,
    table: Arc<ShardTable>,
    peer: String,
}

impl ProgressSink for PeerSink {
    fn apply_progress(&self, records: &[TokenProgress]) {
        self.forwarders.apply_progress(records);
    }

    fn take_fills(&self) -> Vec<GapFill> {
        self.forwarders
            .take_fills_where(|token| self.table.owner(token).as_deref() == Some(&self.peer))
    }

    fn fill_answered(&self, token: &TokenHash, at: Seq, accepted: bool) {
        self.forwarders.fill_answered(token, at, accepted);
    }
}

/// The peers this replica polls for progress, by identity.
struct Peer {
    holder: watch::Sender<Option<Holder>>,
    cancel: CancellationToken,
}

/// How a coordinator's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// Every token was handed on, or nobody was there to take it.
    HandedOn,
    /// The grace period ended first.
    TimedOut,
}

impl Coordinator {
    fn me(&self) -> &str {
        self.members.identity()
    }

    /// Runs until `leave` and then until this replica handed every token on (or `grace` after
    /// `leave`); deletes its member Lease at the end.
    pub async fn run(self, leave: CancellationToken, grace: Duration) -> Departure {
        // A replica joins once it knows every token: as a member it would be counted on to
        // open streams it cannot know of yet, and to say so within the warm timeout.
        let mut waited = false;
        while !(self.synced)() {
            if !waited {
                tracing::info!("Waiting for every Listener to be listed and reconciled before joining the shards.");
                waited = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(SETTLE_POLL * 5) => {}
                _ = leave.cancelled() => return Departure::HandedOn,
            }
        }
        self.members
            .set_annotation(TERM_ANNOTATION, self.term.to_string());
        let mut peers: HashMap<String, Peer> = HashMap::new();
        let mut leaving_since: Option<Instant> = None;
        let departure = loop {
            if leave.is_cancelled() && leaving_since.is_none() {
                leaving_since = Some(Instant::now());
                self.members.set_annotation(LEAVING_ANNOTATION, "true");
                tracing::info!("Leaving the shards: handing every token on.");
            }
            self.renew().await;
            // Bounded: an API server that does not answer must not hold the fence checks.
            match tokio::time::timeout(self.renew_deadline, self.members.live()).await {
                Err(_) => tracing::warn!("Listing the member leases timed out."),
                Ok(Err(error)) => tracing::warn!(%error, "Could not list the member leases."),
                Ok(Ok(live)) => {
                    self.follow_peers(&mut peers, &live);
                    // Fills no peer can take (this replica owns the token now, or nobody does)
                    // would wait for ever.
                    let _ = self.forwarders.take_fills_where(|token| {
                        let owner = self.table.owner(token);
                        owner.is_none_or(|owner| !peers.contains_key(&owner))
                    });
                    if let Some(done) = self.round(&live, leaving_since.is_some()).await {
                        if done {
                            break Departure::HandedOn;
                        }
                    }
                }
            }
            if leaving_since.is_some_and(|since| since.elapsed() >= grace) {
                break Departure::TimedOut;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.retry_period) => {}
                _ = leave.cancelled(), if leaving_since.is_none() => {}
                _ = self.wake.notified() => {}
            }
        };
        for (_, peer) in peers {
            peer.cancel.cancel();
        }
        if departure == Departure::TimedOut {
            // Whatever was not handed on goes with the Lease: the others take it over as from
            // a crash, from the progress already published.
            self.drop_everything();
        }
        if let Err(error) = self.members.release().await {
            tracing::warn!(%error, "Could not delete this replica's member lease; it expires.");
        }
        departure
    }

    /// One round over the live members. `Some(true)` once a leaving replica has handed
    /// everything on.
    async fn round(&self, live: &[Member], leaving: bool) -> Option<bool> {
        let me = self.me().to_owned();
        self.metrics.members.set(live.len() as i64);
        // Not in its own list (its Lease not written yet): no view to take part in.
        if !live.iter().any(|m| m.identity == me) {
            return None;
        }
        let counted = counted(live);
        if !counted.iter().any(|m| m.identity == me) {
            // A newcomer waiting to be let in holds nothing: it may leave at once.
            self.update_report(live);
            return Some(leaving);
        }
        let desired = Ring::new(
            counted
                .iter()
                .filter(|m| !(m.leaving || leaving && m.identity == me))
                .map(|m| m.identity.clone()),
        );
        let desired_id = view_id(&desired);
        let serving = self.table.views.lock().serving().clone();
        if desired != serving {
            self.warm_up(&desired, &desired_id, live);
        }
        // Every member has this view's streams open: switch to it.
        let all_warm = counted.iter().all(|m| {
            m.warm.as_deref() == Some(desired_id.as_str())
                || m.serving.as_deref() == Some(desired_id.as_str())
        });
        if desired != serving && all_warm {
            self.switch_to(desired.clone(), &desired_id).await;
        }
        // Every member serves this view: what this replica owns in it is its own to deliver,
        // even while the next change is on its way. Waiting for that one too would leave the
        // tokens released into this view undelivered for as long as changes keep coming, and
        // their next owner might open its stream only after events the old one left behind.
        let serving = self.table.views.lock().serving().clone();
        let serving_id = view_id(&serving);
        let all_serving = served_throughout(&counted, &me, &serving_id);
        let confirmed = {
            let mut views = self.table.views.lock();
            if all_serving && !views.chain.is_empty() {
                views.confirmed = serving.clone();
                views.chain.clear();
                true
            } else {
                false
            }
        };
        if confirmed {
            let before: HashSet<TokenHash> = self.leading_now();
            let changes = self.forwarders.refresh_duties();
            let taken: Vec<TokenHash> = self
                .leading_now()
                .into_iter()
                .filter(|t| !before.contains(t))
                .collect();
            self.metrics
                .moves
                .get_or_create(&DirectionLabel { direction: "in" })
                .inc_by(taken.len() as u64);
            tracing::info!(view = %serving_id, members = serving.len(), tokens_taken_over = changes.taken_over, events_routed = changes.events_routed, "Serving a new view: every member released.");
            (self.on_taken_over)(&taken);
        }
        self.update_report(live);
        let done = leaving
            && !serving.members().contains(&me)
            && self.table.views.lock().releasing.is_empty()
            && self.leading_now().is_empty()
            && serving == desired;
        Some(done)
    }

    fn leading_now(&self) -> HashSet<TokenHash> {
        self.forwarders
            .token_roles()
            .into_iter()
            .filter_map(|(token, leading)| leading.then_some(token))
            .collect()
    }

    /// Opens the streams `desired` needs and says so once they are open.
    fn warm_up(&self, desired: &Ring, desired_id: &str, live: &[Member]) {
        let started = {
            let mut views = self.table.views.lock();
            match &views.warming {
                Some((ring, started)) if ring == desired => Some(*started),
                _ => {
                    views.warming = Some((desired.clone(), Instant::now()));
                    None
                }
            }
        };
        let started = match started {
            Some(started) => started,
            None => {
                self.forwarders.refresh_duties();
                tracing::info!(view = %desired_id, members = desired.len(), "Warming up for a new view.");
                Instant::now()
            }
        };
        let said = live
            .iter()
            .find(|m| m.identity == self.me())
            .and_then(|m| m.warm.clone());
        if said.as_deref() == Some(desired_id) {
            return;
        }
        let open = (self.synced)() && self.forwarders.duty_streams_open();
        if open || started.elapsed() >= self.warm_timeout {
            if !open {
                tracing::warn!(view = %desired_id, "Not every stream of the new view opened in time; ready for it anyway.");
            }
            self.members.set_annotation(WARM_ANNOTATION, desired_id);
            self.wake.notify_one();
        }
    }

    /// Serves `desired`: hands on the tokens this replica no longer owns in it (routing stops,
    /// deliveries in flight settle, the last progress reaches the peers), then says it serves it.
    async fn switch_to(&self, desired: Ring, desired_id: &str) {
        let known = self.forwarders.known_tokens();
        let released: Vec<TokenHash> = {
            let mut views = self.table.views.lock();
            let before: Vec<bool> = known.iter().map(|t| views.leads(self.me(), t)).collect();
            views.chain.push(desired);
            views.warming = None;
            let released: Vec<TokenHash> = known
                .iter()
                .zip(before)
                .filter(|(t, led)| *led && !views.leads(self.me(), t))
                .map(|(t, _)| *t)
                .collect();
            views.releasing = released.iter().copied().collect();
            released
        };
        self.metrics.view_changes.inc();
        if !released.is_empty() {
            self.forwarders.refresh_duties();
            // A release can take longer than the renew deadline (settling, counters, the
            // peers' fetch): the Lease is renewed meanwhile, or the fence would lapse and drop
            // the tokens this replica keeps.
            self.renewing(async {
                let deadline = Instant::now() + SETTLE_WAIT;
                while !self.forwarders.settled(&released) && Instant::now() < deadline {
                    tokio::time::sleep(SETTLE_POLL).await;
                }
                if !self.forwarders.settled(&released) {
                    tracing::warn!(tokens = released.len(), "Deliveries of tokens handed on did not settle in time: the next owner may deliver some again.");
                }
                if tokio::time::timeout(counters_wait(released.len()), (self.before_release)(released.clone()))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "The last status counters of the tokens handed on were not written in time."
                    );
                }
                if let Some(server) = &self.server {
                    server.publish_now(PUBLISH_WAIT).await;
                }
            })
            .await;
        }
        self.table.views.lock().releasing.clear();
        self.forwarders.refresh_duties();
        self.metrics
            .moves
            .get_or_create(&DirectionLabel { direction: "out" })
            .inc_by(released.len() as u64);
        self.members.set_annotation(SERVING_ANNOTATION, desired_id);
        tracing::info!(view = %desired_id, tokens_released = released.len(), "Switched to a new view; waiting until every member serves it.");
        // Says so at once: the others wait for it.
        self.renew().await;
    }

    /// Runs `work`, renewing this replica's member Lease every retry period until it is done.
    async fn renewing<T>(&self, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.retry_period,
            self.retry_period,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = tick.tick() => {
                    self.renew().await;
                }
            }
        }
    }

    /// Renews this replica's member Lease, within the renew deadline, and moves the fence on
    /// from when the renewal was sent. True when it was renewed.
    async fn renew(&self) -> bool {
        // The renewals lapsed (a cut, a frozen process): another replica may own this one's
        // tokens by now, so it drops them all before a renewal makes the fence hold again.
        if !self.fence.holds() {
            self.drop_everything();
        }
        let sent = Instant::now();
        match tokio::time::timeout(self.renew_deadline, self.members.renew()).await {
            Ok(Ok(())) => {
                self.fence.extend_to(sent + self.renew_deadline);
                true
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "Could not renew this replica's member lease.");
                false
            }
            Err(_) => {
                tracing::warn!("Renewing this replica's member lease timed out.");
                false
            }
        }
    }

    /// This replica's renewals lapsed, or it leaves without handing on: it delivers nothing
    /// more and starts over as a member serving nothing.
    fn drop_everything(&self) {
        let had = {
            let mut views = self.table.views.lock();
            let had = !views.confirmed.is_empty() || !views.chain.is_empty();
            *views = Views::default();
            had
        };
        if had {
            self.members.set_annotation(SERVING_ANNOTATION, "");
            self.members.set_annotation(WARM_ANNOTATION, "");
            let changes = self.forwarders.refresh_duties();
            tracing::warn!(
                tokens = changes.stood_by,
                "Stopped delivering every token: this replica's member lease lapsed or it left."
            );
        }
    }

    /// Polls the progress of every other live member that says where it serves it.
    fn follow_peers(&self, peers: &mut HashMap<String, Peer>, live: &[Member]) {
        let wanted: HashMap<&str, Holder> = live
            .iter()
            .filter(|m| m.identity != self.me())
            .filter_map(|m| {
                Some((
                    m.identity.as_str(),
                    Holder {
                        identity: m.identity.clone(),
                        term: m.term?,
                        address: Some(m.address.clone()?),
                    },
                ))
            })
            .collect();
        peers.retain(|identity, peer| {
            let keep = wanted.contains_key(identity.as_str());
            if !keep {
                peer.cancel.cancel();
            }
            keep
        });
        for (identity, holder) in wanted {
            if let Some(peer) = peers.get(identity) {
                peer.holder.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&holder);
                    *current = Some(holder.clone());
                    changed
                });
                continue;
            }
            let (sender, receiver) = watch::channel(Some(holder));
            let cancel = CancellationToken::new();
            match ProgressClient::spawn(
                self.key.clone(),
                self.me().to_owned(),
                receiver,
                Arc::new(PeerSink {
                    forwarders: self.forwarders.clone(),
                    table: self.table.clone(),
                    peer: identity.to_owned(),
                }),
                self.handover_metrics.clone(),
                CatchUp::default(),
                cancel.clone(),
            ) {
                Ok(_) => {
                    peers.insert(
                        identity.to_owned(),
                        Peer {
                            holder: sender,
                            cancel,
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, peer = identity, "Could not follow a peer's progress.")
                }
            }
        }
    }

    fn update_report(&self, live: &[Member]) {
        let roles = self.forwarders.token_roles();
        let (mut leading, mut standby): (Vec<_>, Vec<_>) =
            roles.into_iter().partition(|(_, leads)| *leads);
        leading.sort_unstable();
        standby.sort_unstable();
        self.metrics
            .tokens
            .get_or_create(&RoleLabel { role: "lead" })
            .set(leading.len() as i64);
        self.metrics
            .tokens
            .get_or_create(&RoleLabel { role: "standby" })
            .set(standby.len() as i64);
        let views = self.table.views.lock();
        *self.report.lock() = ShardReport {
            identity: self.me().to_owned(),
            serving: views.serving().members().to_vec(),
            serving_id: view_id(views.serving()),
            confirmed_id: view_id(&views.confirmed),
            warming: views
                .warming
                .as_ref()
                .map(|(ring, _)| ring.members().to_vec()),
            members: live
                .iter()
                .map(|m| MemberReport {
                    identity: m.identity.clone(),
                    warm: m.warm.clone(),
                    serving: m.serving.clone(),
                    leaving: m.leaving,
                })
                .collect(),
            leading: leading.into_iter().map(|(t, _)| t).collect(),
            standby: standby.into_iter().map(|(t, _)| t).collect(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(members: &[&str]) -> Ring {
        Ring::new(members.iter().map(|m| m.to_string()))
    }

    fn tokens() -> Vec<TokenHash> {
        (0..300).map(|i| TokenHash::of(&format!("t{i}"))).collect()
    }

    #[test]
    fn the_counters_wait_grows_with_the_tokens_handed_on_up_to_a_bound() {
        assert_eq!(counters_wait(0), COUNTERS_WAIT);
        assert_eq!(counters_wait(1_000), Duration::from_secs(10));
        assert_eq!(counters_wait(100_000), COUNTERS_WAIT_MAX);
        assert_eq!(counters_wait(usize::MAX), COUNTERS_WAIT_MAX);
    }

    #[test]
    fn view_ids_name_the_members_not_their_order() {
        assert_eq!(view_id(&ring(&["a", "b"])), view_id(&ring(&["b", "a"])));
        assert_ne!(
            view_id(&ring(&["a", "b"])),
            view_id(&ring(&["a", "b", "c"]))
        );
        // Lengths are hashed too: no two member lists read the same.
        assert_ne!(view_id(&ring(&["ab", "c"])), view_id(&ring(&["a", "bc"])));
    }

    #[test]
    fn nothing_is_led_before_a_view_is_confirmed() {
        let mut views = Views::default();
        views.chain.push(ring(&["a"]));
        assert!(tokens().iter().all(|t| !views.leads("a", t)));
        assert!(tokens().iter().all(|t| views.duty("a", t) == Duty::Standby));
        views.confirmed = ring(&["a"]);
        views.chain.clear();
        assert!(tokens().iter().all(|t| views.duty("a", t) == Duty::Lead));
    }

    #[test]
    fn a_token_is_led_only_where_every_view_since_the_confirmed_one_owns_it() {
        let old = ring(&["a", "b"]);
        let new = ring(&["a", "b", "c"]);
        let newer = ring(&["a", "b"]);
        let mut views = Views {
            confirmed: old.clone(),
            ..Views::default()
        };
        views.chain.push(new.clone());
        for t in tokens() {
            for me in ["a", "b", "c"] {
                let expected = old.owner(&t) == Some(me) && new.owner(&t) == Some(me);
                assert_eq!(views.leads(me, &t), expected);
            }
        }
        // A view that gives back what the one before took: still not led until confirmed,
        // since another replica may have confirmed the view between.
        views.chain.push(newer);
        for t in tokens() {
            if new.owner(&t) == Some("c") {
                assert!(!views.leads("a", &t) && !views.leads("b", &t));
            }
        }
    }

    fn member(identity: &str, warm: Option<&Ring>, serving: Option<&Ring>) -> Member {
        Member {
            identity: identity.to_owned(),
            address: None,
            term: None,
            warm: warm.map(view_id),
            serving: serving.map(view_id),
            leaving: false,
        }
    }

    fn identities(members: &[&Member]) -> Vec<String> {
        let mut names: Vec<String> = members.iter().map(|m| m.identity.clone()).collect();
        names.sort();
        names
    }

    #[test]
    fn replicas_starting_together_are_all_counted() {
        let live = [
            member("a", None, None),
            member("b", None, None),
            member("c", None, None),
        ];
        assert_eq!(identities(&counted(&live)), ["a", "b", "c"]);
    }

    #[test]
    fn a_newcomer_waits_until_the_view_under_way_is_served_by_everyone() {
        let old = ring(&["a", "b", "c"]);
        let new = ring(&["a", "b"]);
        // "c" leaves; "a" serves the view without it, "b" has not switched yet.
        let mut leaving = member("c", Some(&new), Some(&new));
        leaving.leaving = true;
        let live = [
            member("a", Some(&new), Some(&new)),
            member("b", Some(&new), Some(&old)),
            leaving,
            member("d", None, None),
        ];
        assert_eq!(identities(&counted(&live)), ["a", "b", "c"]);
        // Once every member that took part serves the view they make up, "d" is let in.
        let mut live = live;
        live[1] = member("b", Some(&new), Some(&new));
        assert_eq!(identities(&counted(&live)), ["a", "b", "c", "d"]);
        // The leaving member gone, the same.
        assert_eq!(
            identities(&counted(&[
                live[0].clone(),
                live[1].clone(),
                live[3].clone()
            ])),
            ["a", "b", "d"]
        );
    }

    #[test]
    fn a_member_that_took_part_always_counts() {
        let served = ring(&["a", "b"]);
        let next = ring(&["a", "b", "c"]);
        // "c" was let in and warms up; another newcomer, "d", waits for the next settled view.
        let live = [
            member("a", Some(&next), Some(&served)),
            member("b", Some(&served), Some(&served)),
            member("c", Some(&next), None),
            member("d", None, None),
        ];
        assert_eq!(identities(&counted(&live)), ["a", "b", "c"]);
        // A member whose renewals lapsed says nothing any more: a newcomer again.
        let live = [
            member("a", Some(&served), Some(&served)),
            member("b", None, None),
        ];
        assert_eq!(identities(&counted(&live)), ["a"]);
    }

    #[test]
    fn a_view_is_served_throughout_once_every_member_that_serves_any_serves_it() {
        let served = ring(&["a", "b"]);
        let next = ring(&["a", "b", "c"]);
        let id = view_id(&served);
        // "c" was just let in and serves nothing yet: it does not hold "a" back.
        let a = member("a", Some(&next), Some(&served));
        let b = member("b", Some(&next), Some(&served));
        let c = member("c", Some(&next), None);
        assert!(served_throughout(&[&a, &b, &c], "a", &id));
        // A member still on the view before, or already on the next, does.
        let b_before = member("b", Some(&served), Some(&ring(&["a", "b", "d"])));
        assert!(!served_throughout(&[&a, &b_before, &c], "a", &id));
        let b_next = member("b", Some(&next), Some(&next));
        assert!(!served_throughout(&[&a, &b_next, &c], "a", &id));
        // "a" itself is not asked.
        let a_next = member("a", Some(&next), Some(&next));
        assert!(served_throughout(&[&a_next, &b, &c], "a", &id));
    }

    #[test]
    fn at_every_moment_at_most_one_replica_leads_a_token() {
        // Three replicas at different points of the same two changes of view: one that has
        // confirmed the newest view (possible only once every member serves it), one that
        // switched to it, one still on the view before. No token has two leaders.
        let v1 = ring(&["a", "b", "c"]);
        let v2 = ring(&["a", "b", "c", "d"]);
        let a = Views {
            confirmed: v2.clone(),
            ..Views::default()
        };
        let b = Views {
            confirmed: v1.clone(),
            chain: vec![v2.clone()],
            ..Views::default()
        };
        let d = Views {
            confirmed: Ring::default(),
            chain: vec![v2.clone()],
            ..Views::default()
        };
        let c = Views {
            confirmed: v1,
            chain: vec![v2],
            ..Views::default()
        };
        for t in tokens() {
            let leaders = [("a", &a), ("b", &b), ("c", &c), ("d", &d)]
                .iter()
                .filter(|(me, views)| views.leads(me, &t))
                .count();
            assert!(leaders <= 1);
        }
    }

    #[test]
    fn releasing_tokens_route_nothing_and_others_stream_only_where_held() {
        let view = ring(&["a", "b", "c"]);
        let mut views = Views {
            confirmed: view.clone(),
            ..Views::default()
        };
        let ts = tokens();
        views.releasing.insert(ts[0]);
        assert_eq!(views.duty("a", &ts[0]), Duty::Release);
        for t in &ts[1..] {
            let (owner, standby) = view.owner_and_standby(t);
            let expected = if owner == Some("a") {
                Duty::Lead
            } else if standby == Some("a") {
                Duty::Standby
            } else {
                Duty::Idle
            };
            assert_eq!(views.duty("a", t), expected);
        }
    }
}
