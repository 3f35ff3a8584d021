//! Leader changes that lose no event. Crownstone's event stream has no replay, so a standby
//! keeps its own stream open on every token the leader streams and buffers what it reads; the
//! leader tells the standbys how far it has delivered on each token; whoever leads next starts
//! right after that point. Events carry a place in their token's stream that replicas agree on,
//! so the same event delivered by two replicas carries the same `webhook-id`.

mod ids;
mod log;

pub use ids::webhook_id;
pub use log::{BufferLimits, EventPlace, LogShared, LoggedEvent, Settle, TokenLog};
pub mod peer;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::TokenHash;

/// The place of an event in its token's stream, in the numbering the replicas agree on: the
/// first replica to stream a token numbers its events from 1, and every standby aligns its own
/// count with the leader's through the progress records.
pub type Seq = u64;

/// The most digests a progress record carries to say where it is.
pub const MAX_TAIL: usize = 4;

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
}

/// A standby's forwarders, as the transport between replicas sees them.
pub trait ProgressSink: Send + Sync + 'static {
    /// Aligns the buffers of these tokens with the leader's records and drops what is settled.
    fn apply_progress(&self, records: &[TokenProgress]);
}
