//! Fair sharing of one destination between owners, and of the operator's memory between
//! destinations: each owner gets a lane of its own at a destination, bounded by the bytes it
//! holds, and the lanes with work are served round robin, one delivery per turn, so an owner that
//! floods a destination overflows only its own lane and waits its turn like everyone else. Every
//! lane of every destination draws its bytes from one [`MemoryBudget`].
//!
//! The lanes are pure bookkeeping, no locks and no time: the destination queue holds them behind
//! its mutex. The budget is shared by all queues and counted with atomics only.

use std::{
    collections::VecDeque,
    hash::Hash,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

/// A lane's place in [`Lanes`]; valid while the lane holds something.
pub(crate) type LaneId = usize;

/// A lane that went idle keeps at most this much of its buffer for the next owner.
const KEPT_BUFFER: usize = 64;

/// Why an item was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The owner's lane holds its bound of bytes (or of items) already.
    LaneFull,
    /// The operator's memory budget is spent, or the owner holds its share of a contended one.
    Budget,
}

/// The bytes all queued deliveries of the operator may hold together, shared by every lane of
/// every destination.
///
/// The rule that keeps it fair: while less than half of it is spent, any lane takes what it
/// needs; past half, a lane may hold at most `total / (lanes holding something + 1)`, so one
/// owner never takes the whole budget and a newcomer always finds room.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    total: usize,
    used: AtomicUsize,
    /// Lanes holding something, over every destination.
    lanes: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `total` bytes, nothing spent.
    pub(crate) fn new(total: usize) -> Self {
        Self {
            total,
            used: AtomicUsize::new(0),
            lanes: AtomicUsize::new(0),
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` for a lane that holds `lane_bytes` already, or says why not.
    fn reserve(&self, bytes: usize, lane_bytes: usize) -> Result<(), Refusal> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let after = used.checked_add(bytes).ok_or(Refusal::Budget)?;
            if after > self.total {
                return Err(Refusal::Budget);
            }
            if after > self.total / 2 {
                let share = self.total / (self.lanes.load(Ordering::Relaxed) + 1);
                if lane_bytes.saturating_add(bytes) > share {
                    return Err(Refusal::Budget);
                }
            }
            match self
                .used
                .compare_exchange_weak(used, after, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// How much one lane may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaneBounds {
    /// Bytes one owner may hold at a destination.
    pub(crate) bytes: usize,
    /// Items one owner may hold at a destination (the deprecated count bound; usually unbounded).
    pub(crate) items: usize,
}

/// One owner's part of a destination.
struct Lane<K, T> {
    /// `None` while the slot is free.
    owner: Option<K>,
    waiting: VecDeque<T>,
    /// Admitted and not yet released: waiting here, in flight, or waiting to retry.
    held: usize,
    /// The bytes of the held items, also taken from the budget.
    bytes: usize,
    /// Listed in `turns`: has something waiting.
    in_turn: bool,
}

/// The lanes of one destination, served round robin.
///
/// Lane slots are reused, so an owner coming and going costs no allocation once the destination
/// has seen as many owners at once; a lane is given up as soon as it holds nothing.
pub(crate) struct Lanes<K, T> {
    bounds: LaneBounds,
    budget: Arc<MemoryBudget>,
    slots: Vec<Lane<K, T>>,
    free: Vec<LaneId>,
    by_owner: foldhash::HashMap<K, LaneId>,
    /// Lanes with something waiting, in the order they are served.
    turns: VecDeque<LaneId>,
    held: usize,
}

impl<K: Hash + Eq + Clone, T> Lanes<K, T> {
    /// Lanes within `bounds` each, drawing their bytes from `budget`.
    pub(crate) fn new(bounds: LaneBounds, budget: Arc<MemoryBudget>) -> Self {
        Self {
            bounds,
            budget,
            slots: Vec::new(),
            free: Vec::new(),
            by_owner: foldhash::HashMap::default(),
            turns: VecDeque::new(),
            held: 0,
        }
    }

    /// Items held over every lane.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Owners holding something.
    #[cfg(test)]
    pub(crate) fn owners(&self) -> usize {
        self.by_owner.len()
    }

    /// Queues `item`, which holds `bytes`, at the back of `owner`'s lane, telling it its lane
    /// through `stamp`; hands it back with the reason when the lane or the budget has no room.
    pub(crate) fn admit(
        &mut self,
        owner: &K,
        mut item: T,
        bytes: usize,
        stamp: impl FnOnce(&mut T, LaneId),
    ) -> Result<(), (T, Refusal)> {
        let id = match self.by_owner.get(owner) {
            Some(id) => *id,
            None => self.open(owner),
        };
        let Some(lane) = self.slots.get_mut(id) else {
            return Err((item, Refusal::LaneFull));
        };
        let refusal = if lane.held >= self.bounds.items
            || lane.bytes.saturating_add(bytes) > self.bounds.bytes
        {
            Some(Refusal::LaneFull)
        } else {
            self.budget.reserve(bytes, lane.bytes).err()
        };
        if let Some(refusal) = refusal {
            if lane.held == 0 {
                self.give_up(id);
            }
            return Err((item, refusal));
        }
        stamp(&mut item, id);
        lane.held += 1;
        lane.bytes += bytes;
        lane.waiting.push_back(item);
        self.held += 1;
        if !lane.in_turn {
            lane.in_turn = true;
            self.turns.push_back(id);
        }
        Ok(())
    }

    /// Puts an item its lane already holds (a retry now due) back at the front of that lane: it
    /// goes before the owner's newer items, in the owner's own turns.
    pub(crate) fn requeue(&mut self, id: LaneId, item: T) {
        let Some(lane) = self.slots.get_mut(id) else {
            return;
        };
        lane.waiting.push_front(item);
        if !lane.in_turn {
            lane.in_turn = true;
            self.turns.push_back(id);
        }
    }

    /// Moves up to `max` waiting items into `out`, one per lane per turn; returns how many.
    pub(crate) fn pop_into(&mut self, max: usize, out: &mut Vec<T>) -> usize {
        let mut moved = 0;
        while moved < max {
            let Some(id) = self.turns.pop_front() else {
                break;
            };
            let Some(lane) = self.slots.get_mut(id) else {
                continue;
            };
            if let Some(item) = lane.waiting.pop_front() {
                out.push(item);
                moved += 1;
            }
            if lane.waiting.is_empty() {
                lane.in_turn = false;
            } else {
                self.turns.push_back(id);
            }
        }
        moved
    }

    /// One item of lane `id`, admitted with `bytes`, is settled: its bytes go back to the
    /// budget, and a lane that holds nothing more is given up.
    pub(crate) fn release(&mut self, id: LaneId, bytes: usize) {
        let Some(lane) = self.slots.get_mut(id) else {
            return;
        };
        if lane.held == 0 {
            return;
        }
        let bytes = bytes.min(lane.bytes);
        lane.held -= 1;
        lane.bytes -= bytes;
        self.held -= 1;
        self.budget.give_back(bytes);
        if lane.held > 0 {
            return;
        }
        // Nothing held means nothing waiting either: every waiting item is held.
        self.give_up(id);
    }

    /// Takes every waiting item, in turn order; they stay held until released.
    pub(crate) fn take_waiting(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.slots.iter().map(|l| l.waiting.len()).sum());
        self.pop_into(usize::MAX, &mut out);
        out
    }

    fn open(&mut self, owner: &K) -> LaneId {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(Lane {
                    owner: None,
                    waiting: VecDeque::new(),
                    held: 0,
                    bytes: 0,
                    in_turn: false,
                });
                self.slots.len() - 1
            }
        };
        if let Some(lane) = self.slots.get_mut(id) {
            lane.owner = Some(owner.clone());
        }
        self.by_owner.insert(owner.clone(), id);
        self.budget.lanes.fetch_add(1, Ordering::AcqRel);
        id
    }

    /// Frees the slot of a lane that holds nothing.
    fn give_up(&mut self, id: LaneId) {
        let Some(lane) = self.slots.get_mut(id) else {
            return;
        };
        if let Some(owner) = lane.owner.take() {
            self.by_owner.remove(&owner);
            self.budget.lanes.fetch_sub(1, Ordering::AcqRel);
        }
        // A lane holding nothing holds no bytes either; whatever it still counts goes back.
        self.budget.give_back(std::mem::take(&mut lane.bytes));
        lane.waiting.shrink_to(KEPT_BUFFER);
        self.free.push(id);
    }
}

impl<K, T> Drop for Lanes<K, T> {
    fn drop(&mut self) {
        // A queue dropped with deliveries still held (shutdown) gives their bytes back.
        let (bytes, lanes) = self
            .slots
            .iter()
            .filter(|lane| lane.owner.is_some())
            .fold((0, 0), |(bytes, lanes), lane| {
                (bytes + lane.bytes, lanes + 1)
            });
        self.budget.give_back(bytes);
        self.budget.lanes.fetch_sub(lanes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An item: its owner and its number, plus the lane it was admitted to.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Item {
        owner: &'static str,
        n: u32,
        lane: LaneId,
    }

    fn item(owner: &'static str, n: u32) -> Item {
        Item { owner, n, lane: 0 }
    }

    /// Bytes every test item holds.
    const ITEM_BYTES: usize = 100;

    /// Lanes of at most `items` items each, under a budget they never reach.
    fn counted(items: usize) -> Lanes<&'static str, Item> {
        Lanes::new(
            LaneBounds {
                bytes: usize::MAX,
                items,
            },
            Arc::new(MemoryBudget::new(usize::MAX)),
        )
    }

    /// Lanes of at most `lane_bytes` bytes each, under `budget`.
    fn bounded(lane_bytes: usize, budget: &Arc<MemoryBudget>) -> Lanes<&'static str, Item> {
        Lanes::new(
            LaneBounds {
                bytes: lane_bytes,
                items: usize::MAX,
            },
            Arc::clone(budget),
        )
    }

    fn try_admit(
        lanes: &mut Lanes<&'static str, Item>,
        owner: &'static str,
        n: u32,
    ) -> Result<(), Refusal> {
        lanes
            .admit(&owner, item(owner, n), ITEM_BYTES, |item, lane| {
                item.lane = lane
            })
            .map_err(|(_, refusal)| refusal)
    }

    fn admit(lanes: &mut Lanes<&'static str, Item>, owner: &'static str, n: u32) -> bool {
        try_admit(lanes, owner, n).is_ok()
    }

    fn release(lanes: &mut Lanes<&'static str, Item>, item: &Item) {
        lanes.release(item.lane, ITEM_BYTES);
    }

    fn pop(lanes: &mut Lanes<&'static str, Item>, max: usize) -> Vec<Item> {
        let mut out = Vec::new();
        lanes.pop_into(max, &mut out);
        out
    }

    fn names(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .map(|i| format!("{}{}", i.owner, i.n))
            .collect()
    }

    #[test]
    fn owners_with_work_are_served_in_turn() {
        /// Items admitted, in this order, as (owner, how many).
        type Admitted = &'static [(&'static str, u32)];
        // (case, admitted, served order)
        let table: &[(&str, Admitted, &[&str])] = &[
            (
                "one owner keeps its order",
                &[("a", 3)],
                &["a0", "a1", "a2"],
            ),
            (
                "a flood does not go first",
                &[("a", 4), ("b", 1)],
                &["a0", "b0", "a1", "a2", "a3"],
            ),
            (
                "three owners alternate",
                &[("a", 2), ("b", 2), ("c", 2)],
                &["a0", "b0", "c0", "a1", "b1", "c1"],
            ),
            (
                "an owner joining late waits one turn at most per owner",
                &[("a", 3), ("b", 3), ("c", 1)],
                &["a0", "b0", "c0", "a1", "b1", "a2", "b2"],
            ),
        ];
        for (case, admitted, expected) in table {
            let mut lanes = counted(100);
            for (owner, count) in *admitted {
                for n in 0..*count {
                    assert!(admit(&mut lanes, owner, n), "{case}");
                }
            }
            assert_eq!(names(&pop(&mut lanes, usize::MAX)), *expected, "{case}");
        }
    }

    #[test]
    fn a_lane_full_of_items_refuses_only_its_owner() {
        let mut lanes = counted(2);
        assert!(admit(&mut lanes, "flood", 0));
        assert!(admit(&mut lanes, "flood", 1));
        assert!(!admit(&mut lanes, "flood", 2), "the flooder's lane is full");
        assert!(admit(&mut lanes, "quiet", 0), "another owner still gets in");
        assert!(admit(&mut lanes, "quiet", 1));
        assert!(!admit(&mut lanes, "quiet", 2));
        assert_eq!(lanes.held(), 4);

        // Items in flight still count against their owner until released.
        let served = pop(&mut lanes, 2);
        assert_eq!(names(&served), ["flood0", "quiet0"]);
        assert!(!admit(&mut lanes, "flood", 3), "in flight is still held");
        release(&mut lanes, &served[0]);
        assert!(
            admit(&mut lanes, "flood", 3),
            "a released slot is free again"
        );
    }

    #[test]
    fn a_slow_consumer_shares_its_slots_between_owners() {
        // One slot at a time, as a destination with concurrency 1: a flood of 50 beside 5 quiet
        // items gets the quiet ones out within their first 10 turns.
        let mut lanes = counted(1000);
        for n in 0..50 {
            admit(&mut lanes, "flood", n);
        }
        for n in 0..5 {
            admit(&mut lanes, "quiet", n);
        }
        let mut order = Vec::new();
        while let Some(served) = pop(&mut lanes, 1).pop() {
            order.push(served);
            release(&mut lanes, &served);
        }
        let quiet_turns: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, i)| i.owner == "quiet")
            .map(|(turn, _)| turn)
            .collect();
        assert_eq!(quiet_turns, [1, 3, 5, 7, 9]);
        assert_eq!(order.len(), 55);
        assert_eq!((lanes.held(), lanes.owners()), (0, 0));
    }

    #[test]
    fn a_retry_goes_first_in_its_owners_lane_not_before_other_owners() {
        let mut lanes = counted(10);
        for n in 0..3 {
            admit(&mut lanes, "a", n);
            admit(&mut lanes, "b", n);
        }
        let first = pop(&mut lanes, 2);
        assert_eq!(names(&first), ["a0", "b0"]);
        // a0 failed and is due again: it keeps its lane slot and goes before a1, in a's turn.
        lanes.requeue(first[0].lane, first[0]);
        release(&mut lanes, &first[1]);
        assert_eq!(names(&pop(&mut lanes, 4)), ["a0", "b1", "a1", "b2"]);
        assert_eq!(lanes.held(), 5, "a0 was never released");
    }

    #[test]
    fn an_idle_owner_leaves_nothing_behind_and_its_slot_is_reused() {
        let mut lanes = counted(10);
        admit(&mut lanes, "a", 0);
        admit(&mut lanes, "b", 0);
        let served = pop(&mut lanes, 10);
        assert_eq!(lanes.owners(), 2);
        for item in &served {
            release(&mut lanes, item);
        }
        assert_eq!((lanes.held(), lanes.owners()), (0, 0));
        assert!(lanes.turns.is_empty());
        // A new owner takes a freed slot instead of growing the slots.
        admit(&mut lanes, "c", 0);
        assert_eq!(lanes.slots.len(), 2);
        assert_eq!(names(&pop(&mut lanes, 10)), ["c0"]);
        // A release too many is ignored.
        release(&mut lanes, &served[0]);
        assert_eq!(lanes.held(), 1);
    }

    #[test]
    fn taking_the_waiting_items_keeps_them_held() {
        let mut lanes = counted(10);
        admit(&mut lanes, "a", 0);
        admit(&mut lanes, "a", 1);
        admit(&mut lanes, "b", 0);
        let taken = lanes.take_waiting();
        assert_eq!(names(&taken), ["a0", "b0", "a1"]);
        assert_eq!(lanes.held(), 3);
        for item in &taken {
            release(&mut lanes, item);
        }
        assert_eq!((lanes.held(), lanes.owners()), (0, 0));
    }

    #[test]
    fn a_lane_is_bounded_by_the_bytes_it_holds() {
        let budget = Arc::new(MemoryBudget::new(usize::MAX));
        let mut lanes = bounded(3 * ITEM_BYTES, &budget);
        for n in 0..3 {
            assert_eq!(try_admit(&mut lanes, "a", n), Ok(()));
        }
        assert_eq!(try_admit(&mut lanes, "a", 3), Err(Refusal::LaneFull));
        assert_eq!(
            try_admit(&mut lanes, "b", 0),
            Ok(()),
            "another owner gets in"
        );
        // A bigger item is refused where a small one still fits.
        let big = lanes.admit(&"b", item("b", 1), 3 * ITEM_BYTES, |_, _| {});
        assert_eq!(
            big.err().map(|(_, refusal)| refusal),
            Some(Refusal::LaneFull)
        );
        assert_eq!(try_admit(&mut lanes, "b", 1), Ok(()));
        assert_eq!(budget.used(), 5 * ITEM_BYTES);
    }

    #[test]
    fn the_budget_is_shared_by_every_destination_and_given_back() {
        // Ten items' worth, drawn on by two destinations without lane bounds of their own.
        let budget = Arc::new(MemoryBudget::new(10 * ITEM_BYTES));
        let mut one = bounded(usize::MAX, &budget);
        let mut two = bounded(usize::MAX, &budget);
        let fill = |lanes: &mut Lanes<&'static str, Item>, owner| {
            let mut n = 0;
            while admit(lanes, owner, n) {
                n += 1;
            }
            n
        };
        assert_eq!(fill(&mut one, "a"), 5, "alone, half the budget");
        assert_eq!(
            fill(&mut two, "b"),
            3,
            "beside a, its share of what one left"
        );
        assert_eq!(fill(&mut one, "c"), 2, "the last of the budget");
        assert_eq!(budget.used(), 10 * ITEM_BYTES);
        assert_eq!(try_admit(&mut two, "d", 0), Err(Refusal::Budget));
        assert_eq!(
            (one.owners(), two.owners()),
            (2, 1),
            "a refused newcomer keeps no lane"
        );

        // Settled items give their bytes back, in either destination, down to nothing.
        let served = pop(&mut one, usize::MAX);
        release(&mut one, &served[0]);
        assert_eq!(try_admit(&mut two, "d", 0), Ok(()), "room again");
        for item in served.iter().skip(1) {
            release(&mut one, item);
        }
        for item in pop(&mut two, usize::MAX) {
            release(&mut two, &item);
        }
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.lanes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_contended_budget_keeps_room_for_every_owner() {
        // Past half the budget a lane holds at most budget / (lanes + 1): a lone flooder stops at
        // half, so a newcomer finds room, and with two owners each stops at a third.
        let budget = Arc::new(MemoryBudget::new(12 * ITEM_BYTES));
        let mut lanes = bounded(usize::MAX, &budget);
        let mut n = 0;
        while admit(&mut lanes, "flood", n) {
            n += 1;
        }
        assert_eq!(n, 6, "a lone owner takes half the budget");
        assert_eq!(try_admit(&mut lanes, "flood", n), Err(Refusal::Budget));
        assert_eq!(try_admit(&mut lanes, "quiet", 0), Ok(()));
        assert_eq!(
            try_admit(&mut lanes, "flood", n),
            Err(Refusal::Budget),
            "the flooder is over its share of two"
        );
        let mut quiet = 1;
        while admit(&mut lanes, "quiet", quiet) {
            quiet += 1;
        }
        assert_eq!(quiet, 4, "the newcomer gets its third");
        assert_eq!(budget.used(), 10 * ITEM_BYTES, "never all of it");
        // A third owner still gets in.
        assert_eq!(try_admit(&mut lanes, "third", 0), Ok(()));
    }

    #[test]
    fn an_uncontended_budget_is_not_shared_out() {
        // Under half the budget, no owner is held to a share, however many there are.
        let budget = Arc::new(MemoryBudget::new(100 * ITEM_BYTES));
        let mut lanes = bounded(usize::MAX, &budget);
        for owner in ["a", "b", "c", "d"] {
            assert_eq!(try_admit(&mut lanes, owner, 0), Ok(()));
        }
        for n in 1..40 {
            assert_eq!(try_admit(&mut lanes, "a", n), Ok(()), "item {n}");
        }
    }
}
