//! Leader changes under load lose no event: replicas of the binary as processes of their own,
//! 20 tokens with a Listener each, 100 events a second, and the receiver's audit of every event
//! by number. A rollout (SIGTERM) neither loses nor repeats; a crash (SIGKILL) loses nothing and
//! repeats only under the same `webhook-id`; a leader frozen past its lease (SIGSTOP) delivers
//! nothing once it wakes.

use std::time::{Duration, Instant};

use crate::support::handover::{Audit, Published, Rig, Signal, LEASE_DURATION};
use crate::support::receiver::Receiver;

const TOKENS: usize = 20;
const RATE: f64 = 100.0;
/// Load before a leader change: long enough for the standby to be in step with the leader.
const WARM_UP: Duration = Duration::from_secs(4);
/// Load after the new leader took over.
const AFTER: Duration = Duration::from_secs(4);
/// How long the receiver may stay quiet before the audit gives up waiting for more.
const QUIET: Duration = Duration::from_secs(5);

fn report(test: &str, audit: &Audit) {
    eprintln!("{test}: {}", audit.summary());
}

fn assert_nothing_lost(rig: &Rig, audit: &Audit) {
    assert_eq!(audit.unknown, 0, "{}", audit.summary());
    assert!(
        audit.lost.is_empty(),
        "events lost: {}\n{}",
        audit.summary(),
        rig.logs()
    );
}

/// A rollout's targets: the standbys fetched the old leader's final progress, and nothing was
/// lost or delivered twice.
fn assert_a_clean_rollout(rig: &Rig, old: usize, audit: &Audit) {
    assert!(
        rig.replicas[old]
            .log()
            .contains("The standbys fetched the final progress."),
        "{}",
        rig.logs()
    );
    assert_nothing_lost(rig, audit);
    assert!(
        audit.repeated.is_empty(),
        "events delivered twice: {}\n{}",
        audit.summary(),
        rig.logs()
    );
}

fn assert_repeats_keep_their_id(rig: &Rig, audit: &Audit) {
    assert!(
        audit.repeated_with_new_id.is_empty(),
        "events delivered again under another webhook-id: {}\n{}",
        audit.summary(),
        rig.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_change_every_event_arrives_once() {
    let rig = Rig::start("handover-control", 2, TOKENS).await;
    let publisher = rig.publish(RATE);
    tokio::time::sleep(WARM_UP + AFTER).await;
    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    report("control", &audit);

    assert!(audit.published as f64 >= RATE * 4.0, "{}", audit.summary());
    assert_nothing_lost(&rig, &audit);
    assert!(audit.repeated.is_empty(), "{}", audit.summary());
    assert_eq!(audit.delivered_events, audit.published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_of_the_leader_loses_and_repeats_nothing() {
    let mut rig = Rig::start("handover-term", 2, TOKENS).await;
    let publisher = rig.publish(RATE);
    tokio::time::sleep(WARM_UP).await;

    let old = rig.leader().await;
    rig.replicas[old].signal(Signal::Term);
    rig.next_leader(old).await;
    rig.replicas[old].wait_exit(Duration::from_secs(15)).await;
    tokio::time::sleep(AFTER).await;
    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    report("rollout", &audit);

    assert_a_clean_rollout(&rig, old, &audit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_the_leader_loses_nothing_and_repeats_under_the_same_id() {
    let rig = Rig::start("handover-kill", 2, TOKENS).await;
    let publisher = rig.publish(RATE);
    tokio::time::sleep(WARM_UP).await;

    let old = rig.leader().await;
    rig.replicas[old].signal(Signal::Kill);
    rig.next_leader(old).await;
    tokio::time::sleep(AFTER).await;
    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    report("crash", &audit);

    assert_nothing_lost(&rig, &audit);
    assert_repeats_keep_their_id(&rig, &audit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_delivers_nothing_when_it_wakes() {
    let rig = Rig::start("handover-stop", 2, TOKENS).await;
    let publisher = rig.publish(RATE);
    tokio::time::sleep(WARM_UP).await;

    let old = rig.leader().await;
    rig.replicas[old].signal(Signal::Stop);
    rig.next_leader(old).await;
    let took_over = Instant::now();
    // The new leader has long delivered what it held back when the old one wakes.
    tokio::time::sleep(LEASE_DURATION).await;
    rig.replicas[old].signal(Signal::Cont);
    let woke = Instant::now();
    tokio::time::sleep(AFTER).await;
    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    report("freeze", &audit);

    assert_nothing_lost(&rig, &audit);
    assert_repeats_keep_their_id(&rig, &audit);
    // After the wake-up only the new leader delivers, and it delivers each event once, live:
    // an event published before the takeover, or delivered before, arriving now came from the
    // old leader.
    let published_at: std::collections::BTreeMap<u64, Instant> =
        published.iter().map(|p| (p.seq, p.at)).collect();
    let late: Vec<u64> = audit
        .deliveries
        .iter()
        .filter(|(seq, deliveries)| {
            deliveries.iter().enumerate().any(|(n, d)| {
                d.at > woke && (n > 0 || published_at.get(seq).is_some_and(|at| *at < took_over))
            })
        })
        .map(|(seq, _)| *seq)
        .collect();
    assert!(
        late.is_empty(),
        "{} events delivered after the old leader woke that it, not the new leader, sent \
         (e.g. {:?}): {}\n{}",
        late.len(),
        &late[..late.len().min(10)],
        audit.summary(),
        rig.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_then_a_crash_among_three_replicas_loses_nothing() {
    let mut rig = Rig::start("handover-three", 3, TOKENS).await;
    let publisher = rig.publish(RATE);
    tokio::time::sleep(WARM_UP).await;

    let first = rig.leader().await;
    rig.replicas[first].signal(Signal::Term);
    let second = rig.next_leader(first).await;
    rig.replicas[first].wait_exit(Duration::from_secs(15)).await;
    // The third replica catches up with the second leader before that one crashes.
    tokio::time::sleep(WARM_UP).await;
    rig.replicas[second].signal(Signal::Kill);
    rig.next_leader(second).await;
    tokio::time::sleep(AFTER).await;
    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    report("rollout then crash", &audit);

    assert_nothing_lost(&rig, &audit);
    assert_repeats_keep_their_id(&rig, &audit);
}

/// A rollout onto a replica started moments before, as a Deployment with one replica and a
/// surge pod rolls: its streams opened long after the leader's, and most tokens, each with an
/// event every few seconds, had one event or none on it when the leader stopped. Every event
/// it read must still line up with the leader's places, so nothing is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_onto_a_replica_started_just_before_repeats_nothing() {
    const SPARSE_TOKENS: usize = 40;
    const SPARSE_RATE: f64 = 20.0;
    let mut rig = Rig::start("handover-surge", 1, SPARSE_TOKENS).await;
    let publisher = rig.publish(SPARSE_RATE);
    tokio::time::sleep(WARM_UP).await;

    let new = rig.add_replica().await;
    // Long enough for a few records to reach it, short enough that no token has had as many
    // events on its stream as a record's tail holds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.replicas[0].signal(Signal::Term);
    assert_eq!(rig.next_leader(0).await, new);
    rig.replicas[0].wait_exit(Duration::from_secs(15)).await;
    tokio::time::sleep(AFTER).await;
    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    report("rollout onto a new replica", &audit);

    // Ready meant caught up: the new replica fetched the old leader's final progress in time.
    assert_a_clean_rollout(&rig, 0, &audit);
}

/// The audit itself, on deliveries posted straight to a receiver: a gap, a repeat under the same
/// id and a repeat under another id are each told apart, so the tests above count right.
#[tokio::test]
async fn the_audit_tells_lost_from_repeated_from_repeated_under_another_id() {
    let receiver = Receiver::start().await;
    let http = reqwest::Client::new();
    for (seq, id) in [
        (0, "msg_a"),
        (1, "msg_b"),
        (1, "msg_b"),
        (3, "msg_d"),
        (3, "msg_e"),
    ] {
        http.post(receiver.url())
            .header("webhook-id", id)
            .json(&serde_json::json!({"data": {"sphere": {"uid": seq}}}))
            .send()
            .await
            .expect("the receiver answers");
    }
    let published: Vec<Published> = (0..4)
        .map(|seq| Published {
            seq,
            at: Instant::now(),
            streams: 1,
        })
        .collect();

    let audit = Audit::of(&published, &receiver);
    assert_eq!(audit.lost, [2]);
    assert_eq!(audit.repeated, [1, 3]);
    assert_eq!(audit.repeated_with_new_id, [3]);
    assert_eq!(audit.delivered_events, 3);
    assert_eq!(audit.unknown, 0);
}
