//! Fair sharing of one destination between owners: each owner gets a bounded lane of its own,
//! and the lanes with work are served round robin, one delivery per turn, so an owner that floods
//! a destination fills and overflows only its own lane and waits its turn like everyone else.
//!
//! Pure bookkeeping, no locks and no time: the destination queue holds it behind its mutex.

use std::{collections::VecDeque, hash::Hash};

/// A lane's place in [`Lanes`]; valid while the lane holds something.
pub(crate) type LaneId = usize;

/// A lane that went idle keeps at most this much of its buffer for the next owner.
const KEPT_BUFFER: usize = 64;

/// One owner's part of a destination.
struct Lane<K, T> {
    /// `None` while the slot is free.
    owner: Option<K>,
    waiting: VecDeque<T>,
    /// Admitted and not yet released: waiting here, in flight, or waiting to retry.
    held: usize,
    /// Listed in `turns`: has something waiting.
    in_turn: bool,
}

/// The lanes of one destination, served round robin.
///
/// Lane slots are reused, so an owner coming and going costs no allocation once the destination
/// has seen as many owners at once; a lane is given up as soon as it holds nothing.
pub(crate) struct Lanes<K, T> {
    /// Deliveries one owner may hold at once.
    capacity: usize,
    slots: Vec<Lane<K, T>>,
    free: Vec<LaneId>,
    by_owner: foldhash::HashMap<K, LaneId>,
    /// Lanes with something waiting, in the order they are served.
    turns: VecDeque<LaneId>,
    held: usize,
}

impl<K: Hash + Eq + Clone, T> Lanes<K, T> {
    /// Lanes that hold at most `capacity` items per owner.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
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

    /// Queues `item` at the back of `owner`'s lane, telling it its lane through `stamp`; hands
    /// it back when the owner holds `capacity` items already.
    pub(crate) fn admit(
        &mut self,
        owner: &K,
        mut item: T,
        stamp: impl FnOnce(&mut T, LaneId),
    ) -> Result<(), T> {
        let id = match self.by_owner.get(owner) {
            Some(id) => *id,
            None => self.open(owner),
        };
        let Some(lane) = self.slots.get_mut(id) else {
            return Err(item);
        };
        if lane.held >= self.capacity {
            return Err(item);
        }
        stamp(&mut item, id);
        lane.held += 1;
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

    /// One item of lane `id` is settled; a lane that holds nothing more is given up.
    pub(crate) fn release(&mut self, id: LaneId) {
        let Some(lane) = self.slots.get_mut(id) else {
            return;
        };
        if lane.held == 0 {
            return;
        }
        lane.held -= 1;
        self.held -= 1;
        if lane.held > 0 {
            return;
        }
        // Nothing held means nothing waiting either: every waiting item is held.
        if let Some(owner) = lane.owner.take() {
            self.by_owner.remove(&owner);
        }
        lane.waiting.shrink_to(KEPT_BUFFER);
        self.free.push(id);
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
                    in_turn: false,
                });
                self.slots.len() - 1
            }
        };
        if let Some(lane) = self.slots.get_mut(id) {
            lane.owner = Some(owner.clone());
        }
        self.by_owner.insert(owner.clone(), id);
        id
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

    fn admit(lanes: &mut Lanes<&'static str, Item>, owner: &'static str, n: u32) -> bool {
        lanes
            .admit(&owner, item(owner, n), |item, lane| item.lane = lane)
            .is_ok()
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
            let mut lanes = Lanes::new(100);
            for (owner, count) in *admitted {
                for n in 0..*count {
                    assert!(admit(&mut lanes, owner, n), "{case}");
                }
            }
            assert_eq!(names(&pop(&mut lanes, usize::MAX)), *expected, "{case}");
        }
    }

    #[test]
    fn a_full_lane_refuses_only_its_owner() {
        let mut lanes = Lanes::new(2);
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
        lanes.release(served[0].lane);
        assert!(
            admit(&mut lanes, "flood", 3),
            "a released slot is free again"
        );
    }

    #[test]
    fn a_slow_consumer_shares_its_slots_between_owners() {
        // One slot at a time, as a destination with concurrency 1: a flood of 50 beside 5 quiet
        // items gets the quiet ones out within their first 10 turns.
        let mut lanes = Lanes::new(1000);
        for n in 0..50 {
            admit(&mut lanes, "flood", n);
        }
        for n in 0..5 {
            admit(&mut lanes, "quiet", n);
        }
        let mut order = Vec::new();
        while let Some(served) = pop(&mut lanes, 1).pop() {
            order.push(served);
            lanes.release(served.lane);
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
        let mut lanes = Lanes::new(10);
        for n in 0..3 {
            admit(&mut lanes, "a", n);
            admit(&mut lanes, "b", n);
        }
        let first = pop(&mut lanes, 2);
        assert_eq!(names(&first), ["a0", "b0"]);
        // a0 failed and is due again: it keeps its lane slot and goes before a1, in a's turn.
        lanes.requeue(first[0].lane, first[0]);
        lanes.release(first[1].lane);
        assert_eq!(names(&pop(&mut lanes, 4)), ["a0", "b1", "a1", "b2"]);
        assert_eq!(lanes.held(), 5, "a0 was never released");
    }

    #[test]
    fn an_idle_owner_leaves_nothing_behind_and_its_slot_is_reused() {
        let mut lanes = Lanes::new(10);
        admit(&mut lanes, "a", 0);
        admit(&mut lanes, "b", 0);
        let served = pop(&mut lanes, 10);
        assert_eq!(lanes.owners(), 2);
        for item in &served {
            lanes.release(item.lane);
        }
        assert_eq!((lanes.held(), lanes.owners()), (0, 0));
        assert!(lanes.turns.is_empty());
        // A new owner takes a freed slot instead of growing the slots.
        admit(&mut lanes, "c", 0);
        assert_eq!(lanes.slots.len(), 2);
        assert_eq!(names(&pop(&mut lanes, 10)), ["c0"]);
        // A release too many is ignored.
        lanes.release(served[0].lane);
        assert_eq!(lanes.held(), 1);
    }

    #[test]
    fn taking_the_waiting_items_keeps_them_held() {
        let mut lanes = Lanes::new(10);
        admit(&mut lanes, "a", 0);
        admit(&mut lanes, "a", 1);
        admit(&mut lanes, "b", 0);
        let taken = lanes.take_waiting();
        assert_eq!(names(&taken), ["a0", "b0", "a1"]);
        assert_eq!(lanes.held(), 3);
        for item in &taken {
            lanes.release(item.lane);
        }
        assert_eq!((lanes.held(), lanes.owners()), (0, 0));
    }
}
