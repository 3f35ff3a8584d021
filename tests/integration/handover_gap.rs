//! A blip in the leader's own stream, covered by the standby's: the leader reads the event
//! server through a loopback TCP proxy that the test cuts and restores, the standby reads it
//! directly. Events published while the leader's stream is down reach the receiver once, from
//! the leader, out of the standby's buffer; without the transport between replicas they are
//! lost, which shows the test would fail.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::cluster::eventually;
use crate::support::handover::{Audit, Published, Replica, Rig};
use crate::support::operator::WAIT;
use crate::support::proxy::Proxy;

const TOKENS: usize = 4;
const RATE: f64 = 40.0;
const BEFORE: Duration = Duration::from_secs(3);
/// How long the leader's stream stays cut.
const CUT: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_secs(5);

/// Two replicas, the leader behind `proxy`; publishes before, during and after a cut of the
/// leader's stream. Returns the audit and the events published while it was cut.
async fn blip(prefix: &str, handover: bool) -> (Rig, Audit, Vec<u64>) {
    let mut rig = Rig::without_replicas(prefix, TOKENS).await;
    let upstream: SocketAddr = rig
        .harness
        .sim
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .expect("the simulator listens on an address");
    let proxy = Proxy::start(upstream).await;
    let namespace = rig.harness.ns.name.clone();
    rig.replicas.push(Replica::start_with(
        &format!("{prefix}-0"),
        &proxy.url(),
        &namespace,
        handover,
    ));
    let first = rig.replicas[0].name.clone();
    eventually("the proxied replica leads", WAIT, || async {
        rig.leader_name().await.filter(|name| *name == first)
    })
    .await;
    rig.replicas.push(Replica::start_with(
        &format!("{prefix}-1"),
        &rig.harness.sim.base_url(),
        &namespace,
        handover,
    ));
    rig.wait_streaming().await;
    assert_eq!(rig.open_streams().await, 2 * TOKENS, "{}", rig.logs());

    let publisher = rig.publish(RATE);
    tokio::time::sleep(BEFORE).await;
    proxy.cut();
    let cut_at = Instant::now();
    tokio::time::sleep(CUT).await;
    let restored_at = Instant::now();
    proxy.restore();
    tokio::time::sleep(AFTER).await;
    let published = publisher.stop().await;
    let during = during(&published, cut_at, restored_at);
    let audit = rig.settle(&published, QUIET).await;
    eprintln!("{prefix}: {}", audit.summary());
    (rig, audit, during)
}

/// The events published while the leader's stream was cut, a little inside the window so the
/// cut and the reconnect have taken effect.
fn during(published: &[Published], from: Instant, to: Instant) -> Vec<u64> {
    let margin = Duration::from_millis(300);
    published
        .iter()
        .filter(|p| p.at > from + margin && p.at + margin < to)
        .map(|p| p.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_while_the_leaders_stream_is_cut_arrive_once_from_the_standbys_buffer() {
    let (rig, audit, during) = blip("handover-blip", true).await;
    assert!(!during.is_empty(), "events were published during the cut");
    assert_eq!(audit.unknown, 0, "{}", audit.summary());
    for seq in &during {
        assert!(
            audit.deliveries.contains_key(seq),
            "event {seq} published during the cut was lost: {}\n{}",
            audit.summary(),
            rig.logs()
        );
    }
    assert!(audit.lost.is_empty(), "{}\n{}", audit.summary(), rig.logs());
    assert!(
        audit.repeated.is_empty(),
        "every event exactly once: {}\n{}",
        audit.summary(),
        rig.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_transport_between_replicas_the_events_of_the_cut_are_lost() {
    let (rig, audit, during) = blip("handover-blip-control", false).await;
    assert!(!during.is_empty(), "events were published during the cut");
    let lost: Vec<&u64> = during
        .iter()
        .filter(|seq| !audit.deliveries.contains_key(seq))
        .collect();
    assert!(
        !lost.is_empty(),
        "with no standby to fill the gap, the leader cannot have read them: {}\n{}",
        audit.summary(),
        rig.logs()
    );
}
