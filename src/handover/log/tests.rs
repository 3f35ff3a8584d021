use super::*;

fn shared(limits: BufferLimits) -> Arc<LogShared> {
    Arc::new(LogShared::new(limits, ForwarderMetrics::default()))
}

fn token() -> TokenHash {
    TokenHash::of("token")
}

fn leader() -> Arc<Mutex<TokenLog>> {
    Arc::new(Mutex::new(TokenLog::new(
        token(),
        true,
        shared(BufferLimits::default()),
    )))
}

fn standby_with(limits: BufferLimits) -> TokenLog {
    TokenLog::new(token(), false, shared(limits))
}

fn standby() -> TokenLog {
    standby_with(BufferLimits::default())
}

fn event(n: u64) -> LoggedEvent {
    let json = Bytes::from(format!(r#"{{"type":"presence","n":{n}}}"#));
    LoggedEvent {
        event_type: EventType::Presence,
        digest: EventDigest::of(&json),
        json,
    }
}

fn digest(n: u64) -> EventDigest {
    event(n).digest
}

fn record(seq: Seq, tail: &[u64], delivered_through: Seq) -> TokenProgress {
    TokenProgress {
        gaps: Vec::new(),
        token: token(),
        seq,
        tail: tail.iter().map(|&n| digest(n)).collect(),
        delivered_through,
        chain: None,
    }
}

/// The chain a leader that numbered `events` (by number) after `from` sends.
fn chain(from: Seq, events: impl IntoIterator<Item = u64>) -> EventChain {
    events
        .into_iter()
        .fold(EventChain::starting_at(from), |chain, n| {
            chain.fold(digest(n))
        })
}

/// A record with the chain over `events` after `from`.
fn chained(
    seq: Seq,
    tail: &[u64],
    delivered_through: Seq,
    from: Seq,
    events: impl IntoIterator<Item = u64>,
) -> TokenProgress {
    TokenProgress {
        chain: Some(chain(from, events)),
        ..record(seq, tail, delivered_through)
    }
}

/// Takes over and returns the (place, event number) of every event handed to routing.
fn take_over(log: &mut TokenLog) -> Vec<(Seq, u64)> {
    let mut routed = Vec::new();
    log.take_over(|seq, event| {
        let text = String::from_utf8_lossy(&event.json).into_owned();
        let n = text
            .trim_end_matches('}')
            .rsplit(':')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        routed.push((seq, n));
        1
    });
    routed
}

#[test]
fn the_leader_numbers_events_and_settles_them_in_order() {
    let log = leader();
    let (first, second, third) = {
        let mut log = log.lock();
        let first = log.record(digest(1), 2);
        let second = log.record(digest(2), 0);
        let third = log.record(digest(3), 1);
        (first, second, third)
    };
    assert_eq!((first, second, third), (Some(1), Some(2), Some(3)));
    let epoch = log.lock().epoch();
    let handle = |seq| Settle::new(Arc::clone(&log), seq, epoch);
    // The third settles first: the watermark waits for the first.
    handle(3).settled();
    assert_eq!(log.lock().delivered_through(), 0);
    handle(1).settled();
    assert_eq!(
        log.lock().delivered_through(),
        0,
        "one delivery of 1 is out"
    );
    handle(1).settled();
    // 2 was routed to nobody: settled with 1, and 3 already was.
    assert_eq!(log.lock().delivered_through(), 3);
}

#[test]
fn an_abandoned_delivery_holds_the_watermark_before_it() {
    let log = leader();
    {
        let mut log = log.lock();
        log.record(digest(1), 1);
        log.record(digest(2), 1);
    }
    let epoch = log.lock().epoch();
    drop(Settle::new(Arc::clone(&log), 1, epoch));
    Settle::new(Arc::clone(&log), 2, epoch).settled();
    assert_eq!(log.lock().delivered_through(), 0);
    let record = log.lock().progress();
    assert_eq!(record.map(|r| (r.seq, r.delivered_through)), Some((2, 0)));
}

#[test]
fn a_settle_from_an_earlier_lead_is_ignored() {
    let log = leader();
    log.lock().record(digest(1), 1);
    // The place the next lead gives to event 2, from the earlier lead.
    let stale = Settle::new(Arc::clone(&log), 2, log.lock().epoch());
    {
        let mut log = log.lock();
        log.stand_by();
        log.buffer(event(2), Instant::now());
        take_over(&mut log);
        log.record(digest(3), 1);
    }
    let before = log.lock().delivered_through();
    stale.settled();
    assert_eq!(log.lock().delivered_through(), before);
}

#[test]
fn a_released_log_is_settled_once_every_delivery_of_it_is_and_its_settles_stay_current() {
    let log = leader();
    assert!(log.lock().is_settled(), "nothing routed");
    log.lock().record(digest(1), 2);
    log.lock().record(digest(2), 0);
    let epoch = log.lock().epoch();
    let (first, second) = (
        Settle::new(Arc::clone(&log), 1, epoch),
        Settle::new(Arc::clone(&log), 1, epoch),
    );
    log.lock().freeze();
    assert!(
        !log.lock().is_settled(),
        "two deliveries of event 1 are out"
    );
    assert!(
        first.is_current(),
        "a frozen log still counts its deliveries"
    );
    first.settled();
    assert!(!log.lock().is_settled());
    second.settled();
    assert!(log.lock().is_settled());
}

#[test]
fn a_delivery_of_a_log_that_stood_by_is_no_longer_current() {
    let log = leader();
    log.lock().record(digest(1), 1);
    let settle = Settle::new(Arc::clone(&log), 1, log.lock().epoch());
    assert!(settle.is_current());
    log.lock().stand_by();
    assert!(
        !settle.is_current(),
        "the token moved: its delivery must not be attempted"
    );
    assert!(log.lock().is_settled(), "a standby has nothing to settle");
}

#[test]
fn records_carry_the_last_digests_and_only_when_something_changed() {
    let log = leader();
    let mut log = log.lock();
    assert_eq!(log.progress(), None, "nothing read yet");
    for n in 1..=6 {
        log.record(digest(n), 0);
    }
    assert_eq!(log.shared.take_changed(), vec![token()], "named once");
    assert_eq!(log.progress(), Some(chained(6, &[3, 4, 5, 6], 6, 0, 1..=6)));
    assert_eq!(log.progress(), None, "nothing changed since");
    assert_eq!(log.shared.take_changed(), vec![]);
    log.record(digest(7), 1);
    assert_eq!(log.shared.take_changed(), vec![token()]);
    assert_eq!(log.progress(), Some(chained(7, &[4, 5, 6, 7], 6, 0, 1..=7)));
}

#[test]
fn a_frozen_log_routes_nothing_more_and_still_settles() {
    let log = leader();
    log.lock().record(digest(1), 1);
    let epoch = log.lock().epoch();
    log.lock().freeze();
    assert_eq!(log.lock().record(digest(2), 1), None);
    log.lock().buffer(event(2), Instant::now());
    assert_eq!(log.lock().buffered(), 0, "a frozen log buffers nothing");
    Settle::new(Arc::clone(&log), 1, epoch).settled();
    assert_eq!(log.lock().progress(), Some(chained(1, &[1], 1, 0, [1])));
}

#[test]
fn a_standby_aligns_drops_what_is_settled_and_takes_over_in_the_leaders_numbering() {
    let mut log = standby();
    let now = Instant::now();
    // The standby's stream started two events after the leader's: its events 1.. are the
    // leader's 3..
    for n in 3..=10 {
        log.buffer(event(n), now);
    }
    log.apply(&record(8, &[5, 6, 7, 8], 6), now);
    // 5 and 6 are vouched for and settled; 3 and 4 came before the first alignment: kept.
    assert_eq!(log.buffered(), 6);
    log.apply(&record(9, &[6, 7, 8, 9], 8), now);
    // Counts agree with the previous alignment: 7 and 8 are settled too.
    assert_eq!(log.buffered(), 4);
    let routed = take_over(&mut log);
    assert_eq!(routed, vec![(3, 3), (4, 4), (9, 9), (10, 10)]);
    assert_eq!(log.record(digest(11), 0), Some(11));
}

#[test]
fn a_record_ahead_of_the_standby_waits_for_its_events() {
    let mut log = standby();
    let now = Instant::now();
    log.buffer(event(1), now);
    log.apply(&record(3, &[1, 2, 3], 3), now);
    assert!(log.pending.is_some());
    log.buffer(event(2), now);
    assert!(log.pending.is_some());
    log.buffer(event(3), now);
    assert!(log.pending.is_none(), "matched once its events arrived");
    assert_eq!(log.buffered(), 0);
    // A newer record replaces a waiting one.
    log.apply(&record(5, &[3, 4, 5], 4), now);
    log.apply(&record(6, &[4, 5, 6], 5), now);
    for n in 4..=6 {
        log.buffer(event(n), now);
    }
    assert_eq!(take_over(&mut log), vec![(6, 6)]);
}

#[test]
fn events_the_leader_missed_are_kept() {
    let mut log = standby();
    let now = Instant::now();
    for n in 1..=8 {
        log.buffer(event(n), now);
    }
    log.apply(&record(3, &[1, 2, 3], 3), now);
    // The leader's stream missed 4: its 4.. are events 5..
    log.apply(&record(7, &[5, 6, 7, 8], 7), now);
    let routed = take_over(&mut log);
    // Only the missed event is left; the leader's 3 is the place before its 4.
    assert_eq!(routed, vec![(3, 4)]);
    assert_eq!(log.record(digest(9), 0), Some(8));
}

#[test]
fn identical_events_align_where_the_fewest_are_dropped() {
    let mut log = standby();
    let now = Instant::now();
    for _ in 0..6 {
        log.buffer(event(0), now);
    }
    // Runs of two identical events end at every count from 2 to 6, and the standby's first
    // event may be the leader's second (its stream began one event later): only that one is
    // taken as settled.
    log.apply(&record(2, &[0, 0], 2), now);
    assert_eq!(log.buffered(), 5);
}

#[test]
fn a_standby_whose_stream_began_after_the_leaders_aligns_on_its_first_event() {
    let mut log = standby();
    let now = Instant::now();
    // The leader numbered 1..=10; the standby's stream opened before 10 and after 9.
    log.buffer(event(10), now);
    log.apply(&record(10, &[7, 8, 9, 10], 9), now);
    assert!(log.pending.is_none(), "aligned on the one event it read");
    // A record it has not read the event of yet waits, and matches on its arrival.
    log.apply(&record(11, &[8, 9, 10, 11], 10), now);
    assert!(log.pending.is_some());
    log.buffer(event(11), now);
    assert!(log.pending.is_none());
    assert_eq!(log.buffered(), 1, "10 is settled, 11 is not");
    log.buffer(event(12), now);
    assert_eq!(take_over(&mut log), vec![(11, 11), (12, 12)]);
}

#[test]
fn a_short_run_matches_only_at_the_start_of_what_the_standby_read() {
    let mut log = standby();
    let now = Instant::now();
    for n in [5, 6, 7] {
        log.buffer(event(n), now);
    }
    // 6 and 7 were read, but not as the first events: a record whose tail ends with them
    // must match in full.
    log.apply(&record(7, &[1, 2, 6, 7], 7), now);
    assert!(log.pending.is_some());
    assert_eq!(log.buffered(), 3);
    // Nor at the start of a history that forgot older events this replica read.
    let mut log = standby_with(BufferLimits {
        bytes: usize::MAX,
        ..BufferLimits::default()
    });
    for n in 1..=(HISTORY as u64 + 6) {
        log.buffer(event(n), now);
    }
    assert_eq!(log.history.front().map(|(local, _)| *local), Some(7));
    log.apply(&record(7, &[90, 91, 92, 7], 7), now);
    assert!(log.pending.is_some());
    // After a lead, the history starts again with the first event buffered as a standby.
    let log = leader();
    let mut log = log.lock();
    for n in 1..=3 {
        log.record(digest(n), 0);
    }
    log.stand_by();
    log.buffer(event(5), now);
    log.apply(&record(5, &[2, 3, 4, 5], 5), now);
    assert_eq!(
        log.buffered(),
        0,
        "the new leader's 5 is the event it read after 3"
    );
    log.buffer(event(6), now);
    assert_eq!(take_over(&mut log), vec![(6, 6)]);
}

#[test]
fn a_standby_that_never_aligned_delivers_everything_in_its_own_numbering() {
    let mut log = standby();
    let now = Instant::now();
    for n in 1..=3 {
        log.buffer(event(n), now);
    }
    log.apply(&record(9, &[40, 41], 9), now);
    assert_eq!(take_over(&mut log), vec![(1, 1), (2, 2), (3, 3)]);
    assert_eq!(log.progress(), Some(chained(3, &[1, 2, 3], 0, 0, 1..=3)));
}

#[test]
fn buffers_drop_their_oldest_events_at_each_bound() {
    let cost = event(1).json.len() + EVENT_OVERHEAD;
    let now = Instant::now();
    let mut log = standby_with(BufferLimits {
        bytes: 3 * cost,
        ..BufferLimits::default()
    });
    for n in 1..=5 {
        log.buffer(event(n), now);
    }
    assert_eq!(take_over(&mut log), vec![(3, 3), (4, 4), (5, 5)]);

    let mut log = standby_with(BufferLimits {
        age: Duration::from_secs(10),
        ..BufferLimits::default()
    });
    log.buffer(event(1), now);
    log.buffer(event(2), now + Duration::from_secs(5));
    log.buffer(event(3), now + Duration::from_secs(11));
    assert_eq!(take_over(&mut log), vec![(2, 2), (3, 3)]);

    // Two tokens share the total: the one that adds over it drops its own oldest.
    let limits = BufferLimits {
        total_bytes: 3 * cost,
        ..BufferLimits::default()
    };
    let both = shared(limits);
    let mut a = TokenLog::new(TokenHash::of("a"), false, Arc::clone(&both));
    let mut b = TokenLog::new(TokenHash::of("b"), false, Arc::clone(&both));
    a.buffer(event(1), now);
    a.buffer(event(2), now);
    b.buffer(event(3), now);
    b.buffer(event(4), now);
    assert_eq!((a.buffered(), b.buffered()), (2, 1));
    drop(a);
    assert_eq!(both.total_bytes.load(Ordering::Relaxed), cost);
}

#[test]
fn a_leader_that_stands_by_buffers_and_can_lead_again() {
    let log = leader();
    let mut log = log.lock();
    log.record(digest(1), 0);
    log.stand_by();
    assert_eq!(log.record(digest(2), 0), None);
    log.buffer(event(2), Instant::now());
    assert_eq!(log.progress(), None, "a standby publishes nothing");
    assert_eq!(take_over(&mut log), vec![(2, 2)]);
}

#[test]
fn a_first_alignment_with_the_same_chain_vouches_for_every_earlier_event() {
    let mut log = standby();
    let now = Instant::now();
    for n in 1..=7 {
        log.buffer(event(n), now);
    }
    // The first record's tail holds 2..5 only; its chain says 1 was the leader's too.
    log.apply(&chained(5, &[2, 3, 4, 5], 5, 0, 1..=5), now);
    assert_eq!(take_over(&mut log), vec![(6, 6), (7, 7)]);
}

#[test]
fn events_before_the_leaders_first_keep_place_zero_under_a_matching_chain() {
    let mut log = standby();
    let now = Instant::now();
    // The standby's stream began two events before the leader's: its 1 and 2 are not the
    // leader's.
    for n in 1..=8 {
        log.buffer(event(n), now);
    }
    log.apply(&chained(5, &[4, 5, 6, 7], 5, 0, 3..=7), now);
    assert_eq!(take_over(&mut log), vec![(0, 1), (0, 2), (6, 8)]);
}

#[test]
fn a_chain_that_differs_vouches_only_for_the_tail() {
    let now = Instant::now();
    // Each stream missed a different event and both counted five: the leader read
    // 1 2 3 4 5 6, the standby 0 2 3 4 5 6 (0 it read, the leader did not).
    let mut log = standby();
    for n in [0, 2, 3, 4, 5, 6] {
        log.buffer(event(n), now);
    }
    log.apply(&chained(6, &[3, 4, 5, 6], 6, 0, 1..=6), now);
    // 0 and 2 stay, in the standby's own count: nothing says which of them the leader read.
    assert_eq!(take_over(&mut log), vec![(1, 0), (2, 2)]);
    // A record from a leader that makes no chain vouches for its tail alone, as before.
    let mut log = standby();
    for n in 1..=6 {
        log.buffer(event(n), now);
    }
    log.apply(&record(6, &[3, 4, 5, 6], 6), now);
    assert_eq!(take_over(&mut log), vec![(1, 1), (2, 2)]);
}

#[test]
fn a_chain_starts_again_after_a_takeover_and_after_a_skipped_place() {
    let mut log = standby();
    let now = Instant::now();
    for n in 1..=4 {
        log.buffer(event(n), now);
    }
    log.apply(&chained(12, &[3, 4], 11, 8, [1, 2, 3, 4]), now);
    assert_eq!(log.buffered(), 1, "9..11 settled, 12 not");
    take_over(&mut log);
    // Numbering continues from the leader's last settled place: the chain starts after it.
    assert_eq!(
        log.progress().and_then(|record| record.chain),
        Some(chain(11, [4]))
    );
    log.record(digest(5), 0);
    assert_eq!(
        log.progress().and_then(|record| record.chain),
        Some(chain(11, [4, 5]))
    );
    // A place skipped on takeover breaks the run: the chain starts after it.
    let mut log = standby();
    // This stream missed 3.
    for n in [1, 2, 4, 5] {
        log.buffer(event(n), now);
    }
    log.apply(&chained(2, &[1, 2], 0, 0, [1, 2]), now);
    log.apply(&chained(5, &[4, 5], 0, 0, 1..=5), now);
    assert_eq!(take_over(&mut log), vec![(1, 1), (2, 2), (4, 4), (5, 5)]);
    assert_eq!(
        log.progress().and_then(|record| record.chain),
        Some(chain(3, [4, 5]))
    );
}

#[test]
fn a_chain_needs_every_event_it_covers_in_the_history() {
    let mut log = standby();
    let now = Instant::now();
    log.buffer(event(1), now);
    // The chain covers three events; this replica read one: no more than the tail is vouched.
    log.apply(&chained(3, &[1], 3, 0, [9, 8, 1]), now);
    assert_eq!(log.offset, Some(2));
    assert_eq!(log.buffered(), 0, "the tail's event is settled");
}

#[test]
fn a_gap_holds_the_leaders_watermark_until_its_fill_settles() {
    let log = leader();
    {
        let mut log = log.lock();
        log.record(digest(1), 0);
        log.record(digest(2), 0);
        log.mark_gap();
        log.mark_gap();
        log.record(digest(5), 0);
    }
    let first = log.lock().progress().unwrap();
    // Everything read is settled, but the gap after 2 is open.
    assert_eq!(
        (first.seq, first.delivered_through, first.gaps),
        (3, 2, vec![2])
    );
    assert_eq!(log.lock().fill(2, 2), FillDecision::Accepted);
    assert_eq!(
        log.lock().fill(2, 2),
        FillDecision::Ignored,
        "only the first"
    );
    assert_eq!(log.lock().fill(7, 1), FillDecision::Ignored, "no such gap");
    log.lock().hold_fill(2, 1);
    log.lock().hold_fill(2, 1);
    let filled = log.lock().progress().unwrap();
    assert_eq!((filled.delivered_through, filled.gaps), (2, vec![]));
    let epoch = log.lock().epoch();
    Settle::new(Arc::clone(&log), gap_place(2, 2), epoch).settled();
    assert_eq!(log.lock().progress().unwrap().delivered_through, 2);
    Settle::new(Arc::clone(&log), gap_place(2, 1), epoch).settled();
    assert_eq!(log.lock().progress().unwrap().delivered_through, 3);
}

#[test]
fn a_gap_no_fill_comes_for_times_out_after_the_first_event_behind_it() {
    let log = leader();
    let mut log = log.lock();
    log.record(digest(1), 0);
    log.mark_gap();
    let later = Instant::now() + GAP_TIMEOUT * 3;
    // Nothing read behind the gap yet: it holds, however long.
    let record = log.progress_at(later).unwrap();
    assert_eq!((record.delivered_through, record.gaps), (1, vec![1]));
    log.record(digest(2), 0);
    let record = log.progress_at(Instant::now()).unwrap();
    assert_eq!((record.delivered_through, record.gaps), (1, vec![1]));
    let record = log.progress_at(later).unwrap();
    assert_eq!((record.delivered_through, record.gaps), (2, vec![]));
    assert_eq!(log.fill(1, 1), FillDecision::Ignored, "too late");
    assert_eq!(log.shared.metrics.gaps_timed_out.get(), 1);
}

/// A standby that read 1..=6 and a leader whose stream missed 3 and 4 (its 3 and 4 are 5 and
/// 6), with the records the leader sends before and after its gap.
fn standby_across_a_gap() -> TokenLog {
    let mut log = standby();
    let now = Instant::now();
    for n in 1..=6 {
        log.buffer(event(n), now);
    }
    log.apply(&chained(2, &[1, 2], 0, 0, [1, 2]), now);
    let after = TokenProgress {
        gaps: vec![2],
        ..chained(4, &[5, 6], 2, 0, [1, 2, 5, 6])
    };
    log.apply(&after, now);
    log
}

#[test]
fn a_standby_finds_the_events_of_the_leaders_gap_and_takes_over_with_their_gap_places() {
    let mut log = standby_across_a_gap();
    let fills = log.shared.take_fills();
    assert_eq!(
        fills,
        vec![GapFill {
            token: token(),
            at: 2,
            events: vec![event(3).json, event(4).json],
        }]
    );
    assert_eq!(log.shared.take_fills(), vec![], "each fill once");
    assert_eq!(
        take_over(&mut log),
        vec![(gap_place(2, 1), 3), (gap_place(2, 2), 4), (3, 5), (4, 6)]
    );
    // Live events number on from the leader's last place, not from the gap's.
    assert_eq!(log.record(digest(7), 0), Some(5));
}

#[test]
fn a_gap_is_placed_by_the_first_event_the_leader_read_behind_it() {
    // The leader read 1..=4, missed 5 and 6, and read 7 as its 5: its tail of four spans the
    // gap, and nothing in this replica's count matches it as a run.
    let mut log = standby();
    let now = Instant::now();
    for n in 1..=7 {
        log.buffer(event(n), now);
    }
    log.apply(&chained(4, &[1, 2, 3, 4], 0, 0, [1, 2, 3, 4]), now);
    let after = TokenProgress {
        gaps: vec![4],
        ..chained(5, &[2, 3, 4, 7], 4, 0, [1, 2, 3, 4, 7])
    };
    log.apply(&after, now);
    assert_eq!(
        log.shared.take_fills(),
        vec![GapFill {
            token: token(),
            at: 4,
            events: vec![event(5).json, event(6).json],
        }]
    );
    assert_eq!(
        take_over(&mut log),
        vec![(gap_place(4, 1), 5), (gap_place(4, 2), 6), (5, 7)]
    );

    // The same, but the chain says the leader read another event than 7 behind the gap: the
    // record is not placed, nothing is filled.
    let mut log = standby();
    for n in 1..=7 {
        log.buffer(event(n), now);
    }
    log.apply(&chained(4, &[1, 2, 3, 4], 0, 0, [1, 2, 3, 4]), now);
    let forged = TokenProgress {
        gaps: vec![4],
        ..chained(5, &[2, 3, 4, 7], 4, 0, [1, 2, 3, 4, 9])
    };
    log.apply(&forged, now);
    assert_eq!(log.shared.take_fills(), vec![]);
}

#[test]
fn a_standby_drops_a_gaps_events_only_once_its_own_fill_was_taken_and_settled() {
    let now = Instant::now();
    let settled = TokenProgress {
        gaps: vec![],
        ..chained(5, &[6, 7], 5, 0, [1, 2, 5, 6, 7])
    };
    // Refused (another standby's fill came first, or a forged one): kept for a takeover.
    let mut log = standby_across_a_gap();
    log.fill_answered(2, false);
    log.buffer(event(7), now);
    log.apply(&settled, now);
    assert_eq!(log.buffered(), 2);
    // Taken: gone once the watermark passed the gap.
    let mut log = standby_across_a_gap();
    log.fill_answered(2, true);
    log.buffer(event(7), now);
    log.apply(&settled, now);
    assert_eq!(log.buffered(), 0);
}

#[test]
fn a_gap_with_events_that_do_not_fold_to_the_leaders_chain_is_not_filled() {
    let mut log = standby();
    let now = Instant::now();
    for n in 1..=6 {
        log.buffer(event(n), now);
    }
    log.apply(&chained(2, &[1, 2], 0, 0, [1, 2]), now);
    // The leader says it read 9 in between: the events around the gap are not the same.
    let after = TokenProgress {
        gaps: vec![2],
        ..chained(4, &[5, 6], 2, 0, [1, 2, 9, 6])
    };
    log.apply(&after, now);
    assert_eq!(log.shared.take_fills(), vec![]);
    // Only the tail is vouched for: 3 and 4 are delivered in this replica's count, as any
    // event the leader may have missed.
    assert_eq!(take_over(&mut log), vec![(1, 3), (2, 4), (3, 5), (4, 6)]);
}

#[test]
fn gap_fills_are_taken_only_for_the_tokens_asked_for_and_the_rest_wait() {
    let shared = shared(BufferLimits::default());
    for name in ["a", "b", "a"] {
        shared.fills.lock().push(GapFill {
            token: TokenHash::of(name),
            at: 1,
            events: Vec::new(),
        });
    }
    let for_a = shared.take_fills_where(|fill| fill.token == TokenHash::of("a"));
    assert_eq!(for_a.len(), 2);
    let rest = shared.take_fills();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].token, TokenHash::of("b"));
}
