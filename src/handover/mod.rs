//! Leader changes that lose no event. Crownstone's event stream has no replay, so a standby
//! keeps its own stream open on every token the leader streams and buffers what it reads; the
//! leader tells the standbys how far it has delivered on each token; whoever leads next starts
//! right after that point. Events carry a place in their token's stream that replicas agree on,
//! so the same event delivered by two replicas carries the same `webhook-id`.

mod ids;
mod log;

pub use ids::webhook_id;
pub use log::{
    BufferLimits, EventPlace, FillDecision, LogShared, LoggedEvent, Settle, TokenLog, GAP_TIMEOUT,
};
pub mod peer;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::TokenHash;

/// The place of an event in its token's stream, in the numbering the replicas agree on: the
/// first replica to stream a token numbers its events from 1, and every standby aligns its own
/// count with the leader's through the progress records.
pub type Seq = u64;

/// The most digests a progress record carries to say where it is.
pub const MAX_TAIL: usize = 4;

/// Places of live events stay below this; the events filled into a gap take places above it.
const GAP_SHIFT: u32 = 48;

/// The most events one gap takes: its events' places count them in 16 bits.
pub const MAX_GAP_EVENTS: usize = (1 << (64 - GAP_SHIFT)) - 1;

/// The place of the `k`-th event (from 1) filled into the gap after the leader's `at`: the
/// same on every replica, and no live event's, as long as `at` < 2^48 and `k` < 2^16.
pub fn gap_place(at: Seq, k: u64) -> Seq {
    (k << GAP_SHIFT) | (at & ((1 << GAP_SHIFT) - 1))
}

/// The gap (`at`) and the event's number in it (`k`) of a gap place; `None` for a live place.
pub fn split_gap_place(place: Seq) -> Option<(Seq, u64)> {
    let k = place >> GAP_SHIFT;
    (k > 0).then_some((place & ((1 << GAP_SHIFT) - 1), k))
}

/// The events a standby read in a gap of the leader's stream, in order, for the leader to
/// deliver as if it had read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GapFill {
    pub token: TokenHash,
    /// The leader's last event before the gap.
    pub at: Seq,
    /// Each event's JSON as the standby read it.
    pub events: Vec<Bytes>,
}

/// What identifies an event's bytes: the first 8 bytes of their SHA-256, the same on every
/// replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventDigest(pub u64);

impl EventDigest {
    pub fn of(bytes: &[u8]) -> Self {
        let hash = Sha256::digest(bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        EventDigest(u64::from_be_bytes(first))
    }
}

/// A running hash over the digests of a leader's consecutive places `from + 1 ..= seq`, folded
/// one event at a time: a standby that folds its own events alike and gets the same value knows
/// it read exactly the events the leader numbered there, not just the record's tail. Records are
/// authenticated, so it only has to tell different runs apart, not resist forgery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventChain {
    /// The place before the first event folded: 0 from the leader's first event, else where a
    /// takeover or a skipped place started the chain again.
    pub from: Seq,
    /// The fold of every digest since `from`.
    pub hash: u64,
}

impl EventChain {
    /// The value of a chain with nothing folded yet.
    const EMPTY: u64 = 0x6372_6f77_6e73_746f;

    /// A chain with nothing folded after `from`.
    pub fn starting_at(from: Seq) -> Self {
        Self {
            from,
            hash: Self::EMPTY,
        }
    }

    /// The chain with one more event.
    pub fn fold(self, digest: EventDigest) -> Self {
        Self {
            from: self.from,
            hash: mix(self.hash ^ digest.0),
        }
    }
}

/// A bijection on 64 bits that spreads every input bit (splitmix64's finalizer): a change of
/// any digest, or of their order, changes the chain.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How far the leader is on one token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenProgress {
    /// The token's SHA-256 (never the token), hex.
    pub token: TokenHash,
    /// The place of the last event the leader read on this token.
    pub seq: Seq,
    /// The digests of the last events up to and including `seq`, oldest first, at most
    /// [`MAX_TAIL`]: what a standby matches against its buffer to align its numbering.
    pub tail: Vec<EventDigest>,
    /// Every event up to this place is settled (delivered, or given up for good, on every
    /// Listener it was routed to): nobody needs to deliver it again.
    pub delivered_through: Seq,
    /// The chain over the leader's events up to `seq`. Absent from a leader that does not make
    /// one: only the tail then vouches for events on a standby's first alignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<EventChain>,
    /// Gaps in the leader's stream waiting for a standby's fill: each the place of the last
    /// event the leader read before its stream reconnected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<Seq>,
}

/// What a replica does with the events it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Buffers them and delivers nothing: another replica leads.
    Standby,
    /// Routes and delivers them.
    Leading,
}

/// The leader's forwarders, as the transport between replicas sees them.
pub trait ProgressSource: Send + Sync + 'static {
    /// The records of the tokens whose progress changed since the previous call.
    fn changed_progress(&self) -> Vec<TokenProgress>;

    /// Delivers a standby's events of a gap in this replica's stream, if the gap is open and
    /// nobody filled it yet.
    fn fill_gap(&self, _fill: GapFill) -> FillDecision {
        FillDecision::Ignored
    }
}

/// A standby's forwarders, as the transport between replicas sees them.
pub trait ProgressSink: Send + Sync + 'static {
    /// Aligns the buffers of these tokens with the leader's records and drops what is settled.
    fn apply_progress(&self, records: &[TokenProgress]);

    /// The fills of the leader's gaps found since the previous call, to send to it.
    fn take_fills(&self) -> Vec<GapFill> {
        Vec::new()
    }

    /// What the leader made of a fill this replica sent.
    fn fill_answered(&self, _token: &TokenHash, _at: Seq, _accepted: bool) {}
}
