//! One token's log of the events its forwarder read: their places, what the leader has settled,
//! and, on a standby, the events held for a takeover and how its count lines up with the
//! leader's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{
    gap_place, split_gap_place, EventChain, EventDigest, GapFill, Seq, TokenProgress,
    MAX_GAP_EVENTS, MAX_TAIL,
};
use crate::crownstone::EventType;
use crate::domain::TokenHash;
use crate::metrics::ForwarderMetrics;

/// How many recent digests a standby keeps to find a record's tail in, even after their bytes
/// left the buffer: 16 KiB per busy token, several seconds of a busy token's events.
const HISTORY: usize = 1024;

/// The most gaps a leader's log keeps open, and a standby remembers, per token: a stream that
/// reconnects more often than this within a few progress intervals gets the oldest gaps dropped.
const MAX_GAPS: usize = 8;

/// How long a gap in the leader's stream holds its watermark after the first event read behind
/// it, waiting for a standby's fill: a few progress intervals, the time a standby needs to see
/// the gap in a record, find the events and send them.
pub const GAP_TIMEOUT: Duration = Duration::from_secs(2);

/// What a buffered event costs beyond its bytes: its place in the buffer and the history.
const EVENT_OVERHEAD: usize = 96;

/// How much a standby holds for a takeover. At each bound the oldest events go, counted in
/// `forwarder_buffer_drops`: a crash of the leader before it delivered them loses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferLimits {
    /// Per token. In normal operation a token holds about one progress interval of events,
    /// so 256 KiB is hundreds of typical events: room for a leader that lags seconds behind.
    pub bytes: usize,
    /// An event older than this is dropped: a leader that has not settled it after a minute
    /// is gone, and the Lease passed to someone long before.
    pub age: Duration,
    /// Over every token. 10,000 tokens at their full share would hold 2.5 GiB; this caps the
    /// sum at 256 MiB, the token that adds an event over it drops its own oldest.
    pub total_bytes: usize,
}

impl Default for BufferLimits {
    fn default() -> Self {
        Self {
            bytes: 256 * 1024,
            age: Duration::from_secs(60),
            total_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What the logs of one replica share: the limits, the bytes buffered over every token, the
/// tokens whose progress changed, and the metrics.
pub struct LogShared {
    limits: BufferLimits,
    total_bytes: AtomicUsize,
    changed: Mutex<Vec<TokenHash>>,
    /// Standby: the events found in gaps of the leader's streams, to send to the leader.
    fills: Mutex<Vec<GapFill>>,
    metrics: ForwarderMetrics,
}

impl LogShared {
    pub fn new(limits: BufferLimits, metrics: ForwarderMetrics) -> Self {
        Self {
            limits,
            total_bytes: AtomicUsize::new(0),
            changed: Mutex::new(Vec::new()),
            fills: Mutex::new(Vec::new()),
            metrics,
        }
    }

    /// The tokens whose progress changed since the previous call, each once.
    pub fn take_changed(&self) -> Vec<TokenHash> {
        std::mem::take(&mut *self.changed.lock())
    }

    /// The gap fills found since the previous call, to send to the leader.
    pub fn take_fills(&self) -> Vec<GapFill> {
        std::mem::take(&mut *self.fills.lock())
    }

    /// The gap fills found since the previous call that `wanted` picks; the others stay.
    pub fn take_fills_where(&self, wanted: impl Fn(&GapFill) -> bool) -> Vec<GapFill> {
        let mut fills = self.fills.lock();
        let (taken, kept) = std::mem::take(&mut *fills).into_iter().partition(wanted);
        *fills = kept;
        taken
    }

    pub fn limits(&self) -> BufferLimits {
        self.limits
    }
}

/// A data event as a forwarder read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedEvent {
    pub event_type: EventType,
    /// The event's JSON as it arrived.
    pub json: Bytes,
    pub digest: EventDigest,
}

/// What the log does with an event, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Numbers events and tracks their deliveries.
    Leading,
    /// Stopped routing for a rollout: reads nothing more, still tracks deliveries in flight.
    Frozen,
    /// Buffers events and aligns with the leader's records.
    Standby,
}

/// An event held by a standby.
#[derive(Debug)]
struct Held {
    event: LoggedEvent,
    /// This replica's count of it.
    local: u64,
    arrived: Instant,
    /// Its place in the leader's numbering, once a record vouched for it.
    place: Option<Seq>,
    /// Read in a gap of the leader's stream at this `Seq` (its place is then a gap place), and
    /// whether the leader accepted this replica's fill of it.
    gap: Option<(Seq, bool)>,
}

impl Held {
    fn cost(&self) -> usize {
        self.event.json.len() + EVENT_OVERHEAD
    }
}

/// One token's log. Lives behind a `parking_lot::Mutex`: the forwarder, the settle handles of
/// its deliveries and the transport between replicas reach it.
pub struct TokenLog {
    token: TokenHash,
    shared: Arc<LogShared>,
    mode: Mode,
    /// Changes on every change of role, so a settle handle of an earlier lead is ignored.
    epoch: u64,
    /// The last event's number: its `Seq` while leading, this replica's own count on standby.
    count: u64,
    /// The latest digests with their numbers, oldest first: `MAX_TAIL` of them while leading
    /// (the records' tail), `HISTORY` on standby (where records are looked for).
    history: VecDeque<(u64, EventDigest)>,
    /// Standby: the count before the first event it buffered in this role. While the history
    /// still starts right after it, nothing before its first entry was read, so a record's
    /// tail may match with its older digests before what this replica ever read.
    standby_from: u64,
    /// Leading: every event up to here is settled.
    delivered_through: Seq,
    /// Leading: deliveries not settled yet of each event after `delivered_through`.
    unsettled: VecDeque<u32>,
    /// Leading: progress changed since the last record was taken.
    dirty: bool,
    /// Leading: the chain over the places numbered without a break, up to `chain_end`.
    chain: EventChain,
    chain_end: Seq,
    /// Leading: the gaps in this replica's stream, oldest first.
    gaps: Vec<Gap>,
    /// Standby: the events held for a takeover, oldest first.
    buffer: VecDeque<Held>,
    buffer_bytes: usize,
    /// Standby: the leader's `Seq` of an event is its local count plus this, once aligned.
    offset: Option<i64>,
    /// Standby: the last aligned event, as (local count, leader's `Seq`).
    anchor: Option<(u64, Seq)>,
    /// Standby: a record whose events this replica has not read (yet).
    pending: Option<TokenProgress>,
    /// Standby: the chain of the record it last aligned with.
    anchor_chain: Option<EventChain>,
    /// Standby: the gaps the leader's records named, oldest first.
    known_gaps: VecDeque<Seq>,
}

/// A gap in the leader's stream: it reconnected after reading the event at `at`, and may have
/// missed events published in between.
#[derive(Debug)]
struct Gap {
    at: Seq,
    /// When the first event behind it was read: the timeout runs from there, since a standby
    /// can only place the gap once the leader has read past it.
    behind: Option<Instant>,
    filled: bool,
    /// Deliveries of its filled events not settled yet.
    unsettled: u32,
}

impl Gap {
    /// Whether it keeps the leader's watermark at `at`.
    fn holds(&self, now: Instant) -> bool {
        if self.filled {
            return self.unsettled > 0;
        }
        self.behind
            .is_none_or(|behind| now.saturating_duration_since(behind) < GAP_TIMEOUT)
    }
}

/// What the leader's log made of a fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillDecision {
    /// The gap was open and takes these events: route them with their gap places.
    Accepted,
    /// No such gap is open (unknown, filled already, timed out), or the log does not lead.
    Ignored,
}

/// Tells a token's log that one delivery of an event is settled. Dropped without
/// [`settled`](Self::settled), the event stays unsettled: the leader's watermark stays before
/// it, so whoever leads next delivers it again.
pub struct Settle {
    log: Arc<Mutex<TokenLog>>,
    seq: Seq,
    epoch: u64,
}

/// An event's delivery as the leader submits it: what its `webhook-id` is made of, and how it
/// reports back.
#[derive(Debug)]
pub struct EventPlace {
    pub token: TokenHash,
    pub seq: Seq,
    pub digest: EventDigest,
    pub settle: Settle,
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settle").field("seq", &self.seq).finish()
    }
}

impl Settle {
    /// A handle for one delivery of the event at `seq` of the lead `epoch` (from
    /// [`TokenLog::epoch`]).
    pub fn new(log: Arc<Mutex<TokenLog>>, seq: Seq, epoch: u64) -> Self {
        Self { log, seq, epoch }
    }

    /// The delivery is delivered, failed for good, or dropped for a reason that stands.
    pub fn settled(self) {
        self.log.lock().settle(self.seq, self.epoch);
    }

    /// Whether the token's log is still in the lead this delivery was made in: false once it
    /// stood by (the token moved to another replica), so the delivery must not be attempted.
    pub fn is_current(&self) -> bool {
        let log = self.log.lock();
        log.epoch == self.epoch && log.mode != Mode::Standby
    }
}

impl TokenLog {
    /// A log with nothing read, in `leading` or standby role.
    pub fn new(token: TokenHash, leading: bool, shared: Arc<LogShared>) -> Self {
        Self {
            token,
            shared,
            mode: if leading {
                Mode::Leading
            } else {
                Mode::Standby
            },
            epoch: 0,
            count: 0,
            history: VecDeque::new(),
            standby_from: 0,
            delivered_through: 0,
            unsettled: VecDeque::new(),
            dirty: false,
            chain: EventChain::starting_at(0),
            chain_end: 0,
            gaps: Vec::new(),
            buffer: VecDeque::new(),
            buffer_bytes: 0,
            offset: None,
            anchor: None,
            pending: None,
            anchor_chain: None,
            known_gaps: VecDeque::new(),
        }
    }

    /// Whether events are routed (true) or buffered (false). A frozen log does neither.
    pub fn is_leading(&self) -> bool {
        self.mode == Mode::Leading
    }

    /// Whether events are buffered.
    pub fn is_standby(&self) -> bool {
        self.mode == Mode::Standby
    }

    /// The current lead, for [`Settle::new`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Leading: the next event's place, for an event routed to `deliveries` deliveries; `None`
    /// unless leading. An event routed to none is settled at once.
    pub fn record(&mut self, digest: EventDigest, deliveries: u32) -> Option<Seq> {
        if self.mode != Mode::Leading {
            return None;
        }
        let seq = self.count + 1;
        self.record_at(seq, digest, deliveries);
        Some(seq)
    }

    /// Numbers an event `seq`, after the last one; the places skipped are settled.
    fn record_at(&mut self, seq: Seq, digest: EventDigest, deliveries: u32) {
        self.skip_to(seq - 1);
        // A place skipped has no digest to fold: the chain starts again after it.
        if self.chain_end != seq - 1 {
            self.chain = EventChain::starting_at(seq - 1);
        }
        self.chain = self.chain.fold(digest);
        self.chain_end = seq;
        self.count = seq;
        if self.gaps.iter().any(|gap| gap.behind.is_none()) {
            let now = Instant::now();
            for gap in self.gaps.iter_mut().filter(|gap| gap.behind.is_none()) {
                gap.behind = Some(now);
            }
        }
        self.unsettled.push_back(deliveries);
        self.history.push_back((seq, digest));
        while self.history.len() > MAX_TAIL {
            self.history.pop_front();
        }
        self.advance();
        self.touch();
    }

    /// Leading: moves the count up to `last`, the places in between settled.
    fn skip_to(&mut self, last: Seq) {
        while self.count < last {
            self.count += 1;
            self.unsettled.push_back(0);
        }
    }

    /// Leading: one delivery of the event at `seq` is settled.
    fn settle(&mut self, seq: Seq, epoch: u64) {
        if epoch != self.epoch || self.mode == Mode::Standby {
            return;
        }
        if let Some((at, _)) = split_gap_place(seq) {
            if let Some(gap) = self.gaps.iter_mut().find(|gap| gap.at == at && gap.filled) {
                gap.unsettled = gap.unsettled.saturating_sub(1);
                self.touch();
            }
            return;
        }
        if seq <= self.delivered_through {
            return;
        }
        let index = usize::try_from(seq - self.delivered_through - 1).unwrap_or(usize::MAX);
        if let Some(left) = self.unsettled.get_mut(index) {
            *left = left.saturating_sub(1);
        }
        self.advance();
    }

    fn advance(&mut self) {
        let before = self.delivered_through;
        while self.unsettled.front() == Some(&0) {
            self.unsettled.pop_front();
            self.delivered_through += 1;
        }
        if self.delivered_through != before {
            self.touch();
        }
    }

    fn touch(&mut self) {
        if !self.dirty {
            self.dirty = true;
            self.shared.changed.lock().push(self.token);
        }
    }

    /// Leading or frozen: the record of this token's progress if it changed since the previous
    /// call. A standby has none.
    pub fn progress(&mut self) -> Option<TokenProgress> {
        self.progress_at(Instant::now())
    }

    /// [`Self::progress`] at `now`, which decides the gaps timed out.
    fn progress_at(&mut self, now: Instant) -> Option<TokenProgress> {
        if self.mode == Mode::Standby || !self.dirty {
            return None;
        }
        self.dirty = false;
        // The tail ends at the last event numbered: after a takeover the count may have moved
        // past it.
        let seq = self.history.back().map_or(self.count, |(seq, _)| *seq);
        let metrics = &self.shared.metrics;
        self.gaps.retain(|gap| {
            let holds = gap.holds(now);
            if !holds && !gap.filled {
                metrics.gaps_timed_out.inc();
            }
            holds
        });
        // A gap still open keeps the watermark at it. One whose timeout runs has its record
        // published again each interval, so the timeout shows without another event; the
        // others change with an event behind them or a settled fill, which publish anyway.
        let held = self.gaps.iter().map(|gap| gap.at).min();
        if self
            .gaps
            .iter()
            .any(|gap| !gap.filled && gap.behind.is_some())
        {
            self.touch();
        }
        let delivered_through =
            held.map_or(self.delivered_through, |at| self.delivered_through.min(at));
        Some(TokenProgress {
            token: self.token,
            seq,
            tail: self.history.iter().map(|(_, digest)| *digest).collect(),
            delivered_through: delivered_through.min(seq),
            chain: (self.chain_end == seq && seq > 0).then_some(self.chain),
            gaps: self
                .gaps
                .iter()
                .filter(|gap| !gap.filled)
                .map(|gap| gap.at)
                .collect(),
        })
    }

    /// Leading: the stream reconnected after the last event read; events published meanwhile
    /// may be missing, and a standby that read them can fill the gap.
    pub fn mark_gap(&mut self) {
        if self.mode != Mode::Leading || self.gaps.iter().any(|gap| gap.at == self.count) {
            return;
        }
        if self.gaps.len() >= MAX_GAPS {
            self.gaps.remove(0);
        }
        self.gaps.push(Gap {
            at: self.count,
            behind: None,
            filled: false,
            unsettled: 0,
        });
        self.shared.metrics.gaps_opened.inc();
        self.touch();
    }

    /// Leading: a standby's fill of the gap at `at` with `events` events. Only the first fill
    /// of an open gap is taken; then each of its events is routed with [`Self::hold_fill`].
    pub fn fill(&mut self, at: Seq, events: usize) -> FillDecision {
        let now = Instant::now();
        let open = self.mode == Mode::Leading && events <= MAX_GAP_EVENTS;
        let gap = self
            .gaps
            .iter_mut()
            .find(|gap| gap.at == at && !gap.filled && gap.holds(now));
        match gap {
            Some(gap) if open => {
                gap.filled = true;
                self.shared.metrics.gaps_filled.inc();
                self.touch();
                FillDecision::Accepted
            }
            _ => FillDecision::Ignored,
        }
    }

    /// Leading: an event of the accepted fill of the gap at `at` was routed to `deliveries`
    /// deliveries; the watermark stays at the gap until they settle.
    pub fn hold_fill(&mut self, at: Seq, deliveries: u32) {
        if let Some(gap) = self.gaps.iter_mut().find(|gap| gap.at == at && gap.filled) {
            gap.unsettled = gap.unsettled.saturating_add(deliveries);
            self.shared.metrics.events_filled.inc();
        }
    }

    /// The place up to which every event is settled (leading), for tests and diagnostics.
    pub fn delivered_through(&self) -> Seq {
        self.delivered_through
    }

    /// Leading or frozen: every event routed is settled, so the progress record says all
    /// this replica did and a successor repeats nothing. A standby has nothing to settle.
    pub fn is_settled(&self) -> bool {
        self.mode == Mode::Standby
            || (self.unsettled.is_empty() && self.gaps.iter().all(|gap| gap.unsettled == 0))
    }

    /// Stops routing for a rollout: the log stays at its last routed place, reads nothing more,
    /// and still counts the deliveries in flight as they settle.
    pub fn freeze(&mut self) {
        if self.mode == Mode::Leading {
            self.mode = Mode::Frozen;
        }
    }

    /// Standby: holds an event read from the stream, and retries a pending record with it.
    pub fn buffer(&mut self, event: LoggedEvent, now: Instant) {
        if self.mode != Mode::Standby {
            return;
        }
        self.count += 1;
        let local = self.count;
        let digest = event.digest;
        self.history.push_back((local, digest));
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let held = Held {
            event,
            local,
            arrived: now,
            place: None,
            gap: None,
        };
        let cost = held.cost();
        self.buffer.push_back(held);
        self.buffer_bytes += cost;
        self.shared.total_bytes.fetch_add(cost, Ordering::Relaxed);
        self.shared.metrics.buffered_events.inc();
        self.shared.metrics.buffered_bytes.inc_by(cost as i64);
        // A pending record can only match now at a run that ends with this event.
        let ends_here = self
            .pending
            .as_ref()
            .is_some_and(|record| record.tail.last() == Some(&digest));
        if ends_here {
            if let Some(record) = self.pending.take() {
                self.shared.metrics.pending_records.dec();
                if self.matches_at(&record.tail, local) {
                    self.align(local, &record);
                } else {
                    self.keep_pending(record);
                }
            }
        }
        self.enforce_bounds(now);
    }

    /// Drops the oldest events past the age, the token's bytes or every token's bytes.
    fn enforce_bounds(&mut self, now: Instant) {
        let limits = self.shared.limits;
        while let Some(oldest) = self.buffer.front() {
            let reason = if now.saturating_duration_since(oldest.arrived) > limits.age {
                "age"
            } else if self.buffer_bytes > limits.bytes {
                "bytes"
            } else if self.shared.total_bytes.load(Ordering::Relaxed) > limits.total_bytes {
                "total_bytes"
            } else {
                break;
            };
            self.pop_oldest();
            self.shared.metrics.buffer_dropped(reason);
        }
    }

    fn pop_oldest(&mut self) -> Option<Held> {
        let held = self.buffer.pop_front()?;
        self.forget_cost(&held);
        Some(held)
    }

    fn forget_cost(&mut self, held: &Held) {
        let cost = held.cost();
        self.buffer_bytes -= cost;
        self.shared.total_bytes.fetch_sub(cost, Ordering::Relaxed);
        self.shared.metrics.buffered_events.dec();
        self.shared.metrics.buffered_bytes.dec_by(cost as i64);
    }

    /// Standby: aligns with a leader's record and drops what it settled; a record whose events
    /// were not read yet waits, replacing any older one waiting.
    pub fn apply(&mut self, record: &TokenProgress, now: Instant) {
        if self.mode != Mode::Standby {
            return;
        }
        self.enforce_bounds(now);
        if record.tail.is_empty() || record.tail.len() > MAX_TAIL || record.seq == 0 {
            // Nothing read on the leader yet, or a record no leader makes: nothing to align.
            return;
        }
        for &at in &record.gaps {
            if !self.known_gaps.contains(&at) {
                if self.known_gaps.len() >= MAX_GAPS {
                    self.known_gaps.pop_front();
                }
                self.known_gaps.push_back(at);
            }
        }
        if let Some(_older) = self.pending.take() {
            self.shared.metrics.pending_records.dec();
        }
        match self.find(record) {
            Some(local) => self.align(local, record),
            None => self.keep_pending(record.clone()),
        }
    }

    fn keep_pending(&mut self, record: TokenProgress) {
        self.pending = Some(record);
        self.shared.metrics.pending_records.inc();
    }

    /// Where the record's tail ends in this replica's count: where the current alignment
    /// predicts it if it is there, else the oldest run that matches. With identical events a
    /// run can match at several places; the oldest makes the standby drop the least, so a
    /// wrong choice repeats events and never loses one. Next to a gap in the leader's stream
    /// an identical event can stand in for the one missed: the limit of matching by digests.
    fn find(&self, record: &TokenProgress) -> Option<u64> {
        let tail = &record.tail;
        if let Some(offset) = self.offset {
            let predicted = i128::from(record.seq) - i128::from(offset);
            if let Ok(predicted) = u64::try_from(predicted) {
                if self.matches_at(tail, predicted) {
                    return Some(predicted);
                }
            }
        }
        let first = self.history.front()?.0;
        (first..=self.count)
            .find(|&end| self.matches_at(tail, end))
            .or_else(|| self.find_across_gap(record))
    }

    /// Where a record whose tail spans a gap the leader names ends in this replica's count.
    /// The tail's events before the gap are not next to those after it here: the ones only
    /// this replica read lie between. So the tail's part after the gap places the record, and
    /// only where the chain since the previous alignment, less the events between, folds to
    /// the record's: a place the chain does not vouch for is never taken. Without this a gap
    /// could be placed only once the leader had read a whole tail past it, which a quiet token
    /// may not do before the gap times out.
    fn find_across_gap(&self, record: &TokenProgress) -> Option<u64> {
        let (anchor, before, after) = (self.anchor?, self.anchor_chain?, record.chain?);
        let k = record.tail.len() as u64;
        let gap = record
            .gaps
            .iter()
            .copied()
            .find(|&at| at >= anchor.1 && at < record.seq && at + k > record.seq)?;
        let behind = usize::try_from(record.seq - gap).ok()?;
        let suffix = &record.tail[record.tail.len().checked_sub(behind)?..];
        // This replica read at least as many events since the anchor as the leader did, and
        // at most a gap's worth more.
        let least = anchor.0 + (record.seq - anchor.1);
        let most = (least + MAX_GAP_EVENTS as u64).min(self.count);
        (least..=most).find(|&end| {
            self.matches_at(suffix, end)
                && self
                    .chained_since(anchor, before, (end, record.seq), after)
                    .is_some_and(|gap| gap.is_some())
        })
    }

    /// Whether the events counted `end - tail.len() + 1 ..= end` have `tail`'s digests. Where
    /// that run starts before the first event this replica read as a standby (its stream opened
    /// after the leader's had read some of them), the events it did read must match the tail's
    /// last digests: a standby started next to a busy leader aligns on its first event, not
    /// only once it has read as many events as a tail holds.
    fn matches_at(&self, tail: &[EventDigest], end: u64) -> bool {
        let Some(&(first, _)) = self.history.front() else {
            return false;
        };
        let k = tail.len() as u64;
        if k == 0 || end > self.count || end < first {
            return false;
        }
        let read = end + 1 - first;
        if read < k {
            // Only where nothing before the history was read: otherwise the events before it
            // were this replica's too, just forgotten, and a full run is needed.
            if first != self.standby_from + 1 {
                return false;
            }
            let skip = usize::try_from(k - read).unwrap_or(usize::MAX);
            return self
                .history
                .iter()
                .zip(tail.iter().skip(skip))
                .all(|((_, have), want)| have == want);
        }
        let start = usize::try_from(end + 1 - k - first).unwrap_or(usize::MAX);
        self.history
            .range(start..)
            .zip(tail)
            .all(|((_, have), want)| have == want)
    }

    /// Takes `local` as the record's `seq`: places the events the record vouches for, and
    /// drops those it says are settled.
    fn align(&mut self, local: u64, record: &TokenProgress) {
        let offset = i128::from(record.seq) - i128::from(local);
        let Ok(offset) = i64::try_from(offset) else {
            return;
        };
        let k = record.tail.len() as u64;
        // Counts that agree with the previous alignment vouch for every event since it; if
        // they disagree, one of the streams missed events in between, and only the matched
        // run is known to be the leader's. Chains settle it where both records carry one:
        // equal counts with different events do not fold alike, and a gap the leader named
        // accounts for the events only this replica read. Without chains, both streams missing
        // as many different events between the same two records would go unnoticed.
        let consistent = self
            .anchor
            .is_some_and(|(l, s)| i128::from(s) - i128::from(l) == i128::from(offset));
        let chained = match (self.anchor, self.anchor_chain, record.chain) {
            (Some(anchor), Some(before), Some(after)) if before.from == after.from => {
                Some(self.chained_since(anchor, before, (local, record.seq), after))
            }
            _ => None,
        };
        // The matched run; it may start before this replica's first event (see `matches_at`).
        let tail_from = (local + 1).saturating_sub(k);
        let (vouched_from, gap) = match (self.anchor, chained) {
            (Some((l, _)), Some(Some(gap))) => (l + 1, gap),
            (Some(_), Some(None)) => (tail_from, None),
            (Some((l, _)), None) if consistent => (l + 1, None),
            (None, _) => (self.chained_from(local, record).unwrap_or(tail_from), None),
            _ => (tail_from, None),
        };
        let before_gap = self
            .anchor
            .map_or(offset, |(l, s)| (i128::from(s) - i128::from(l)) as i64);
        let mut fill = gap.map(|(at, _, _)| (at, Vec::new()));
        for held in self.buffer.iter_mut() {
            if !(vouched_from..=local).contains(&held.local) {
                continue;
            }
            let shift = match gap {
                Some((at, first, missed)) if (first..first + missed).contains(&held.local) => {
                    held.place = Some(gap_place(at, held.local - first + 1));
                    held.gap = Some((at, false));
                    if let Some((_, events)) = fill.as_mut() {
                        events.push(held.event.json.clone());
                    }
                    continue;
                }
                Some((_, first, _)) if held.local < first => before_gap,
                _ => offset,
            };
            let place = i128::from(held.local) + i128::from(shift);
            held.place = u64::try_from(place).ok().filter(|&p| p >= 1);
        }
        if let (Some((at, events)), Some((_, _, missed))) = (fill, gap) {
            // A fill must hold every event of the gap, in order: the leader places them by it.
            if events.len() as u64 == missed {
                self.shared.fills.lock().push(GapFill {
                    token: self.token,
                    at,
                    events,
                });
            }
        }
        self.offset = Some(offset);
        self.anchor = Some((local, record.seq));
        self.anchor_chain = record.chain;
        self.known_gaps.retain(|&at| at >= record.seq);
        self.shared.metrics.alignments.inc();
        let settled = record.delivered_through.min(record.seq);
        let mut kept = VecDeque::with_capacity(self.buffer.len());
        while let Some(held) = self.buffer.pop_front() {
            // An event of a gap goes once the leader took this replica's fill and settled
            // it; a fill refused leaves it for a takeover.
            let done = match held.gap {
                Some((at, accepted)) => accepted && settled > at,
                None => held.place.is_some_and(|place| place <= settled),
            };
            if done {
                self.forget_cost(&held);
            } else {
                kept.push_back(held);
            }
        }
        self.buffer = kept;
    }

    /// Standby: whether this replica's events since the `anchor` (local count, leader's
    /// `Seq`) fold from the anchor's chain to the record's at `now`, all of them or all but
    /// the events of one gap the leader named there. `None`: they do not (or are not all in
    /// the history). `Some(None)`: they do with no event left out. `Some(Some((at, first,
    /// missed)))`: they do with the `missed` events from local count `first` left out, read
    /// in the gap at `at`.
    #[allow(clippy::type_complexity)]
    fn chained_since(
        &self,
        (l1, s1): (u64, Seq),
        before: EventChain,
        (l2, s2): (u64, Seq),
        after: EventChain,
    ) -> Option<Option<(Seq, u64, u64)>> {
        let missed = l2.checked_sub(l1)?.checked_sub(s2.checked_sub(s1)?)?;
        let mut gaps = self.known_gaps.iter().filter(|&&at| (s1..s2).contains(&at));
        // One gap takes the events only this replica read (none, if the leader missed
        // nothing: its fill is then empty). Between several, nothing says how they split.
        let gap = match (gaps.next(), gaps.next()) {
            (Some(&at), None) if missed <= MAX_GAP_EVENTS as u64 => {
                Some((at, l1 + (at - s1) + 1, missed))
            }
            _ if missed == 0 => None,
            _ => return None,
        };
        let mut expected = l1 + 1;
        let mut folded = before;
        for &(number, digest) in self.history.iter() {
            if number <= l1 || number > l2 {
                continue;
            }
            if number != expected {
                return None;
            }
            expected += 1;
            if gap.is_some_and(|(_, first, missed)| (first..first + missed).contains(&number)) {
                continue;
            }
            folded = folded.fold(digest);
        }
        (expected == l2 + 1 && folded == after).then_some(gap)
    }

    /// Standby, on a first alignment at `local`: where the run of this replica's events that
    /// the record's chain vouches for begins, if its own events fold to the same chain. Equal
    /// chains mean both streams read the same events there, so even an event each stream missed
    /// elsewhere cannot slip through, as equal counts alone would let it.
    fn chained_from(&self, local: u64, record: &TokenProgress) -> Option<u64> {
        let chain = record.chain?;
        let n = record.seq.checked_sub(chain.from)?;
        if n == 0 || n > local {
            return None;
        }
        let start = local - n + 1;
        let mut expected = start;
        let mut folded = EventChain::starting_at(chain.from);
        for &(number, digest) in self.history.iter() {
            if number < start || number > local {
                continue;
            }
            if number != expected {
                return None;
            }
            folded = folded.fold(digest);
            expected += 1;
        }
        (expected == local + 1 && folded == chain).then_some(start)
    }

    /// Standby -> leading: hands `route` each buffered event the leader did not settle, in
    /// order, with its place in the leader's numbering where this replica aligned, and numbers
    /// on from the last. `route` returns how many deliveries it made of the event.
    ///
    /// Events of a log that never aligned (no record reached this replica) get this replica's
    /// own count as place, so their ids differ from the old leader's: a receiver sees repeats,
    /// never a gap. Events read before the leader's stream began get place 0. `route` runs under the log's lock, so it must only route: the deliveries
    /// are submitted after the lock is released (a delivery settled at once takes the lock).
    /// Places only grow: an event whose place would not follow the previous one
    /// takes the next free place (its id then differs too).
    pub fn take_over(&mut self, mut route: impl FnMut(Seq, &LoggedEvent) -> u32) -> usize {
        match self.mode {
            Mode::Leading => return 0,
            // A frozen log never stopped numbering: it simply routes again.
            Mode::Frozen => {
                self.mode = Mode::Leading;
                return 0;
            }
            Mode::Standby => {}
        }
        let offset = self.offset;
        let place_of = |local: u64| -> Seq {
            let place = i128::from(local) + i128::from(offset.unwrap_or(0));
            u64::try_from(place).unwrap_or(0)
        };
        // The last event read, in the leader's numbering: live events number on from here.
        let floor = place_of(self.count);
        let held: Vec<Held> = std::iter::from_fn(|| self.pop_oldest()).collect();
        if let Some(_pending) = self.pending.take() {
            self.shared.metrics.pending_records.dec();
        }
        let mut places = Vec::with_capacity(held.len());
        let mut previous: Seq = 0;
        for event in &held {
            // An event of a gap keeps its gap place, apart from the live places' order.
            if let (Some(_), Some(place)) = (event.gap, event.place) {
                places.push(place);
                continue;
            }
            let place = event.place.unwrap_or_else(|| place_of(event.local));
            // Read before the leader's stream began: no place of the leader's is theirs.
            if place == 0 && previous == 0 {
                places.push(0);
                continue;
            }
            let place = place.max(previous + 1);
            places.push(place);
            previous = place;
        }
        self.mode = Mode::Leading;
        self.epoch += 1;
        self.offset = None;
        self.anchor = None;
        self.anchor_chain = None;
        self.known_gaps.clear();
        self.gaps.clear();
        self.history.clear();
        self.unsettled.clear();
        let base = places
            .iter()
            .find(|&&place| place > 0 && split_gap_place(place).is_none())
            .map_or(floor, |first| first - 1);
        self.count = base;
        self.delivered_through = base;
        self.chain = EventChain::starting_at(base);
        self.chain_end = base;
        for (event, place) in held.iter().zip(&places) {
            let deliveries = route(*place, &event.event);
            // Events before the leader's first are delivered but not counted: nothing after
            // this replica's lead needs to know of them.
            if *place > 0 && split_gap_place(*place).is_none() {
                self.record_at(*place, event.event.digest, deliveries);
            }
        }
        if self.count < floor {
            self.skip_to(floor);
            self.advance();
        }
        self.touch();
        held.len()
    }

    /// Leading or frozen -> standby: deliveries still out are no longer tracked, and events
    /// read from now on are buffered.
    pub fn stand_by(&mut self) {
        if self.mode == Mode::Standby {
            return;
        }
        self.mode = Mode::Standby;
        self.epoch += 1;
        // The digests kept while leading are the tail's few; buffering starts a history anew.
        self.history.clear();
        self.standby_from = self.count;
        self.gaps.clear();
        self.anchor_chain = None;
        self.unsettled.clear();
        self.delivered_through = 0;
        self.dirty = false;
        self.offset = None;
        self.anchor = None;
    }

    /// Standby: the leader answered this replica's fill of the gap at `at`. Accepted, its
    /// events go once the leader's watermark passes the gap; refused, they stay for a takeover.
    pub fn fill_answered(&mut self, at: Seq, accepted: bool) {
        if !accepted || self.mode != Mode::Standby {
            return;
        }
        for held in self.buffer.iter_mut() {
            if let Some((gap, taken)) = held.gap.as_mut() {
                if *gap == at {
                    *taken = true;
                }
            }
        }
    }

    /// Events held, for tests and diagnostics.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

impl Drop for TokenLog {
    fn drop(&mut self) {
        while self.pop_oldest().is_some() {}
        if self.pending.is_some() {
            self.shared.metrics.pending_records.dec();
        }
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
