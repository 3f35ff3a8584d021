//! One token's events as a leader and a standby read them: streams that start at different
//! places, one of them missing events, or, where both read the same events, identical events; records that arrive late, deliveries that settle
//! in any order, and a crash of the leader at any point. Whatever the standby read is either
//! settled by the leader or delivered by the standby when it takes over; and where the standby
//! aligned, neither stream missed an event and identical events leave no doubt where a
//! record's tail is, an event both delivered carries the same place (hence the same
//! `webhook-id`) from both. A rollout (the leader stops, settles everything and publishes its
//! last record) repeats nothing where neither stream missed an event and the standby's stream
//! began no later than the leader's. The leader marks a gap wherever its stream missed events,
//! the standby fills the gaps it can place, and a filled event keeps its gap place everywhere.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;

/// What happens next.
#[derive(Clone, Debug)]
enum Step {
    /// The leader's stream reads its next event, or misses it.
    LeaderReads,
    /// The standby's stream reads its next event, or misses it.
    StandbyReads,
    /// One of the leader's outstanding deliveries settles.
    Settle { pick: usize },
    /// The leader publishes what changed.
    Publish,
    /// The standby applies the oldest record it has not applied.
    Apply,
    /// The leader stops routing for a rollout (drawn steps never hold it).
    Freeze,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::LeaderReads),
        4 => Just(Step::StandbyReads),
        3 => any::<usize>().prop_map(|pick| Step::Settle { pick }),
        1 => Just(Step::Publish),
        1 => Just(Step::Apply),
    ]
}

/// The published events: most are distinct, some repeat one of two contents exactly.
fn contents() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        1..60,
    )
}

fn logged(index: usize, kind: u8) -> LoggedEvent {
    let json = match kind {
        0 => Bytes::from(format!(r#"{{"type":"presence","n":{index}}}"#)),
        kind => Bytes::from(format!(r#"{{"type":"presence","same":{kind}}}"#)),
    };
    LoggedEvent {
        event_type: EventType::Presence,
        digest: EventDigest::of(&json),
        json,
    }
}

/// Whether a record's tail can only be found at one place: every run of `MAX_TAIL`
/// published events is unique, and so is each of the leader's first events (its first
/// records carry shorter tails).
fn unambiguous(digests: &[EventDigest], leader_start: usize) -> bool {
    let mut runs = HashSet::new();
    let runs_unique = digests
        .windows(MAX_TAIL)
        .all(|run| runs.insert(run.to_vec()));
    let first = &digests[leader_start.min(digests.len())..];
    let first = &first[..first.len().min(MAX_TAIL - 1)];
    runs_unique
        && first
            .iter()
            .all(|digest| digests.iter().filter(|d| *d == digest).count() == 1)
}

struct Outcome {
    /// Published index -> the leader's place, for every event the leader settled.
    settled: HashMap<usize, Seq>,
    /// Published index -> the standby's place, for every event it delivered on taking over.
    taken_over: HashMap<usize, Seq>,
    /// What the standby's stream read.
    standby_read: HashSet<usize>,
    /// Whether a record matched the standby's events before it took over.
    aligned: bool,
}

/// How the leader's lead ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// It crashes where the steps end.
    Crash,
    /// A rollout: it stops routing, its deliveries settle, the standby's stream reads on to
    /// the end and the standby applies every record, the final one last.
    Rollout,
}

fn run(
    kinds: &[u8],
    leader_start: usize,
    standby_start: usize,
    steps: &[Step],
    leader_misses: &[bool],
    standby_misses: &[bool],
    ending: Ending,
) -> Outcome {
    let shared = Arc::new(LogShared::new(
        BufferLimits {
            bytes: usize::MAX,
            age: Duration::from_secs(3600),
            total_bytes: usize::MAX,
        },
        ForwarderMetrics::default(),
    ));
    let token = TokenHash::of("t");
    let leader = Arc::new(Mutex::new(TokenLog::new(token, true, Arc::clone(&shared))));
    let mut standby = TokenLog::new(token, false, Arc::clone(&shared));
    let now = Instant::now();
    let events: Vec<LoggedEvent> = kinds
        .iter()
        .enumerate()
        .map(|(i, &kind)| logged(i, kind))
        .collect();
    let (mut leader_at, mut standby_at) = (leader_start, standby_start);
    // The leader's place of each event it read, and its deliveries not settled yet.
    let mut leader_places: HashMap<Seq, usize> = HashMap::new();
    let mut outstanding: Vec<Seq> = Vec::new();
    let mut settled = HashMap::new();
    let mut records: VecDeque<TokenProgress> = VecDeque::new();
    // The standby's local count -> published index.
    let mut standby_locals: HashMap<u64, usize> = HashMap::new();
    let mut standby_read = HashSet::new();
    let mut local = 0u64;
    // The leader's stream missed events since it last read one: it reconnected.
    let mut leader_blipped = false;
    let index_of: HashMap<Bytes, usize> = events
        .iter()
        .enumerate()
        .map(|(index, event)| (event.json.clone(), index))
        .collect();
    let rollout = [Step::Freeze]
        .into_iter()
        .chain(std::iter::repeat_n(
            Step::Settle { pick: 0 },
            2 * events.len(),
        ))
        .chain(std::iter::repeat_n(Step::StandbyReads, events.len()))
        .chain([Step::Publish])
        .chain(std::iter::repeat_n(Step::Apply, steps.len() + 2));
    let steps = steps.iter().cloned().chain(
        (ending == Ending::Rollout)
            .then_some(rollout)
            .into_iter()
            .flatten(),
    );
    for step in steps {
        match step {
            Step::Freeze => leader.lock().freeze(),
            Step::LeaderReads if leader_at < events.len() => {
                let index = leader_at;
                leader_at += 1;
                if leader_misses.get(index).copied().unwrap_or(false) {
                    leader_blipped = true;
                    continue;
                }
                if std::mem::take(&mut leader_blipped) {
                    leader.lock().mark_gap();
                }
                if let Some(seq) = leader.lock().record(events[index].digest, 1) {
                    leader_places.insert(seq, index);
                    outstanding.push(seq);
                }
            }
            Step::StandbyReads if standby_at < events.len() => {
                let index = standby_at;
                standby_at += 1;
                if standby_misses.get(index).copied().unwrap_or(false) {
                    continue;
                }
                local += 1;
                standby_locals.insert(local, index);
                standby_read.insert(index);
                standby.buffer(events[index].clone(), now);
            }
            Step::Settle { pick } if !outstanding.is_empty() => {
                let seq = outstanding.swap_remove(pick % outstanding.len());
                let epoch = leader.lock().epoch();
                Settle::new(Arc::clone(&leader), seq, epoch).settled();
                settled.insert(leader_places[&seq], seq);
            }
            Step::Publish => records.extend(leader.lock().progress()),
            Step::Apply => {
                if let Some(record) = records.pop_front() {
                    standby.apply(&record, now);
                }
                // The standby sends the gaps' events it found; the leader routes a fill it takes.
                for fill in shared.take_fills() {
                    let mut leader = leader.lock();
                    let accepted =
                        leader.fill(fill.at, fill.events.len()) == FillDecision::Accepted;
                    if accepted {
                        for (k, json) in (1..).zip(&fill.events) {
                            leader.hold_fill(fill.at, 1);
                            let place = gap_place(fill.at, k);
                            leader_places.insert(place, index_of[json]);
                            outstanding.push(place);
                        }
                    }
                    drop(leader);
                    standby.fill_answered(fill.at, accepted);
                }
            }
            _ => {}
        }
    }
    // The leader crashes; the standby takes over with the records it got.
    let aligned = standby.offset.is_some();
    let locals: Vec<u64> = standby.buffer.iter().map(|held| held.local).collect();
    let mut places = Vec::new();
    standby.take_over(|seq, _| {
        places.push(seq);
        1
    });
    let taken_over = locals
        .iter()
        .zip(places)
        .map(|(local, seq)| (standby_locals[local], seq))
        .collect();
    Outcome {
        settled,
        taken_over,
        standby_read,
        aligned,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn nothing_the_standby_read_is_lost_and_shared_deliveries_share_their_place(
        kinds in contents(),
        leader_start in 0usize..6,
        standby_start in 0usize..6,
        steps in prop::collection::vec(step(), 0..300),
        misses in prop::collection::vec(prop::bool::weighted(0.08), 60),
        missing in 0u8..3,
        same_start in any::<bool>(),
        rollout in any::<bool>(),
    ) {
        // One stream misses events, or none: records vouch for the events between two of them
        // when both streams counted as many, which holds unless both missed events there.
        let none = vec![false; misses.len()];
        let (leader_misses, standby_misses) = match missing {
            0 => (none.clone(), none),
            1 => (misses, none),
            _ => (none, misses),
        };
        let standby_start = if same_start { leader_start } else { standby_start };
        // Identical events only where both streams read the same events: next to a gap, or
        // before the other stream began, an identical event can stand in for one the leader
        // never read, and nothing in a record tells them apart.
        let kinds: Vec<u8> = if missing == 0 && same_start {
            kinds
        } else {
            vec![0; kinds.len()]
        };
        let outcome = run(
            &kinds,
            leader_start,
            standby_start,
            &steps,
            &leader_misses,
            &standby_misses,
            if rollout { Ending::Rollout } else { Ending::Crash },
        );
        // An event the leader delivered from a standby's fill, and the standby again on taking
        // over, has the same gap place from both.
        for (index, seq) in &outcome.taken_over {
            if let Some(leader_seq) = outcome.settled.get(index) {
                if split_gap_place(*leader_seq).is_some() {
                    prop_assert_eq!(seq, leader_seq, "filled event {} delivered by both", index);
                }
            }
        }
        for index in &outcome.standby_read {
            prop_assert!(
                outcome.settled.contains_key(index) || outcome.taken_over.contains_key(index),
                "event {index} was read by the standby and delivered by nobody"
            );
        }
        let digests: Vec<EventDigest> = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| logged(i, kind).digest)
            .collect();
        // A place is only known where a record vouched for it, or counted on from one: a
        // stream that missed events shifts the count after them (those ids then differ:
        // repeats, never losses).
        let missed = |misses: &[bool]| misses.iter().take(kinds.len()).any(|m| *m);
        let no_misses = !missed(&leader_misses) && !missed(&standby_misses);
        if outcome.aligned && no_misses && unambiguous(&digests, leader_start) {
            for (index, seq) in &outcome.taken_over {
                if let Some(leader_seq) = outcome.settled.get(index) {
                    prop_assert_eq!(seq, leader_seq, "event {} delivered by both", index);
                }
            }
        }
        // A rollout repeats nothing, a token's first events included, where neither stream
        // missed an event and the standby's stream began no later than the leader's (a standby
        // that began later and read more events than a tail holds before the first record it
        // could match cannot tell which of its first events the leader read).
        if rollout && no_misses && standby_start <= leader_start
            && unambiguous(&digests, leader_start)
        {
            for index in outcome.taken_over.keys() {
                prop_assert!(
                    !outcome.settled.contains_key(index),
                    "event {index} delivered by the leader and again on the rollout"
                );
            }
        }
    }
}
