//! Tokens sharded over replicas, measured from outside: three to five operator processes with
//! `--sharding`, one Listener per token posting to one receiver, a publisher that numbers every
//! event, a sampler that asks every replica which tokens it delivers, and an audit of what the
//! receiver got.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crownstone_webhooks::resources::Listener;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::support::cluster::{control_plane, eventually};
use crate::support::handover::{Audit, Publisher, Replica, Rig, Signal};
use crate::support::operator::WAIT;
use crate::support::proxy::Proxy;

const SHARD_FLAGS: &[&str] = &["--sharding", "--shard-warm-timeout", "3s"];

/// How long the audit waits for a delivery before it calls the rest lost.
const QUIET: Duration = Duration::from_secs(15);

fn start(rig: &mut Rig, index: usize) {
    rig.replicas.push(Replica::start_args(
        &format!("shard-{index}"),
        &rig.harness.sim.base_url(),
        &rig.harness.ns.name,
        true,
        SHARD_FLAGS,
    ));
}

/// What a replica's `/shards` says, or `None` when it does not answer at once (stopped,
/// frozen, not started yet).
async fn report(health: SocketAddr) -> Option<Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{health}/shards"))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

fn hashes(report: &Value, key: &str) -> Vec<String> {
    report[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every token hash led at one moment, with the replicas that lead it: the replicas are asked
/// side by side, so a sample spans a few milliseconds.
async fn leaders(healths: &[SocketAddr]) -> BTreeMap<String, usize> {
    let reports = futures::future::join_all(healths.iter().map(|h| report(*h))).await;
    let mut leaders = BTreeMap::new();
    for report in reports.into_iter().flatten() {
        for hash in hashes(&report, "leading") {
            *leaders.entry(hash).or_insert(0) += 1;
        }
    }
    leaders
}

/// Waits until the replicas at `live` all serve the same confirmed view of `live.len()`
/// members and every token is led by exactly one of them.
async fn wait_balanced(rig: &Rig, live: &[usize]) {
    let healths: Vec<SocketAddr> = live.iter().map(|i| rig.replicas[*i].health).collect();
    let what = format!("{} tokens led over {} replicas", rig.tokens, live.len());
    let settled = tokio::time::timeout(WAIT, async {
        loop {
            let reports: Vec<Option<Value>> =
                futures::future::join_all(healths.iter().map(|h| report(*h))).await;
            let agreed = reports.iter().all(|r| {
                r.as_ref().is_some_and(|r| {
                    r["serving"].as_array().map(Vec::len) == Some(live.len())
                        && r["servingId"] == r["confirmedId"]
                })
            });
            let led = leaders(&healths).await;
            if agreed && led.len() == rig.tokens && led.values().all(|n| *n == 1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "{what} in time:\n{}", rig.logs());
}

/// Samples every replica's leading tokens until stopped; remembers every token it ever saw led
/// by two replicas in one sample.
struct Sampler {
    healths: Arc<Mutex<Vec<SocketAddr>>>,
    doubles: Arc<Mutex<Vec<(String, usize)>>>,
    samples: Arc<Mutex<usize>>,
    task: JoinHandle<()>,
}

impl Sampler {
    fn start(healths: Vec<SocketAddr>) -> Sampler {
        let healths = Arc::new(Mutex::new(healths));
        let doubles = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0));
        let task = {
            let (healths, doubles, samples) = (healths.clone(), doubles.clone(), samples.clone());
            tokio::spawn(async move {
                loop {
                    let now = healths.lock().clone();
                    for (hash, count) in leaders(&now).await {
                        if count > 1 {
                            doubles.lock().push((hash, count));
                        }
                    }
                    *samples.lock() += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        Sampler {
            healths,
            doubles,
            samples,
            task,
        }
    }

    fn watch(&self, health: SocketAddr) {
        self.healths.lock().push(health);
    }

    fn forget(&self, health: SocketAddr) {
        self.healths.lock().retain(|h| *h != health);
    }

    /// Stops and returns (samples taken, tokens seen with two leaders).
    fn stop(self) -> (usize, Vec<(String, usize)>) {
        self.task.abort();
        let samples = *self.samples.lock();
        let doubles = self.doubles.lock().clone();
        (samples, doubles)
    }
}

/// Waits until every Listener's `status.streamedBy` names one of the replicas at `live`.
async fn wait_streamed_by(rig: &Rig, live: &[usize]) {
    let names: Vec<String> = live.iter().map(|i| rig.replicas[*i].name.clone()).collect();
    let api = rig.harness.ns.api::<Listener>();
    for index in 0..rig.tokens {
        let name = format!("hook-{index}");
        eventually(
            &format!("{name} streamed by a live replica"),
            WAIT,
            || async {
                let listener = api.get(&name).await.ok()?;
                let by = listener.status?.streamed_by?;
                names
                    .iter()
                    .any(|n| by.starts_with(&format!("{n}-")))
                    .then_some(())
            },
        )
        .await;
    }
}

/// Waits until each Listener's `status.delivered` counts every event of its token the receiver
/// got: the counters moved with the tokens, written by each owner before it handed on and
/// counted on by the next.
async fn wait_counted(rig: &Rig, audit: &Audit) {
    let api = rig.harness.ns.api::<Listener>();
    for index in 0..rig.tokens {
        let expected = audit
            .deliveries
            .iter()
            .filter(|(seq, _)| **seq % rig.tokens as u64 == index as u64)
            .map(|(_, deliveries)| deliveries.len() as u64)
            .sum::<u64>();
        let name = format!("hook-{index}");
        let counted = tokio::time::timeout(WAIT, async {
            loop {
                let delivered = api
                    .get(&name)
                    .await
                    .ok()
                    .and_then(|l| l.status)
                    .map(|s| s.delivered);
                if delivered == Some(expected) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        let status = api.get(&name).await.ok().and_then(|l| l.status);
        assert!(
            counted.is_ok(),
            "{name} counts {expected} deliveries; its status says {:?}",
            status.map(|s| s.delivered)
        );
    }
}

/// Three replicas in a balanced view, a sampler watching them, and events published at
/// 20 a second for 2 s already.
async fn three_under_load(prefix: &str, tokens: usize) -> (Rig, Sampler, Publisher) {
    let mut rig = Rig::without_replicas(prefix, tokens).await;
    for index in 0..3 {
        start(&mut rig, index);
    }
    loaded(rig).await
}

/// A sampler watching `rig`'s three replicas once balanced, and events published at 20 a
/// second for 2 s already.
async fn loaded(rig: Rig) -> (Rig, Sampler, Publisher) {
    wait_balanced(&rig, &[0, 1, 2]).await;
    let sampler = Sampler::start(rig.replicas.iter().map(|r| r.health).collect());
    let publisher = rig.publish(20.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    (rig, sampler, publisher)
}

/// What a change may repeat.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeats {
    /// Nothing: a planned move.
    Never,
    /// Only under the same `webhook-id`: a crash or an outage.
    UnderTheSameId,
}

/// Asserts what `change` cost: every event read by some stream and delivered, and repeated
/// only as `repeats` allows.
fn assert_cost(change: &str, audit: &Audit, rig: &Rig, repeats: Repeats) {
    assert_eq!(audit.unread, 0, "{}\n{}", audit.summary(), rig.logs());
    assert!(
        audit.lost.is_empty(),
        "{change} loses nothing: {}\n{}",
        audit.summary(),
        rig.logs()
    );
    let (repeated, allowed) = match repeats {
        Repeats::Never => (&audit.repeated, "nothing"),
        Repeats::UnderTheSameId => (
            &audit.repeated_with_new_id,
            "only under the same webhook-id",
        ),
    };
    assert!(
        repeated.is_empty(),
        "{change} repeats {allowed}: {}\n{}",
        audit.summary(),
        rig.logs()
    );
}

fn assert_no_double_leaders(sampler: Sampler, rig: &Rig) {
    let (samples, doubles) = sampler.stop();
    assert!(samples > 20, "the sampler ran ({samples} samples)");
    assert!(
        doubles.is_empty(),
        "tokens led by two replicas at once in {} of {samples} samples: {:?}\n{}",
        doubles.len(),
        &doubles[..doubles.len().min(5)],
        rig.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_3_to_5_to_2_moves_tokens_without_losing_or_repeating_an_event() {
    let mut rig = Rig::without_replicas("shard-scale", 12).await;
    for index in 0..3 {
        start(&mut rig, index);
    }
    wait_balanced(&rig, &[0, 1, 2]).await;
    for index in 0..rig.tokens {
        rig.harness.wait_ready(&format!("hook-{index}")).await;
    }
    wait_streamed_by(&rig, &[0, 1, 2]).await;
    // Each token streamed twice over the installation (owner and standby), not once per replica.
    eventually("two streams per token", WAIT, || async {
        (rig.open_streams().await == 2 * rig.tokens).then_some(())
    })
    .await;

    let sampler = Sampler::start(rig.replicas.iter().map(|r| r.health).collect());
    let publisher = rig.publish(20.0);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Scale up: two more replicas take their share.
    for index in 3..5 {
        start(&mut rig, index);
        sampler.watch(rig.replicas[index].health);
    }
    wait_balanced(&rig, &[0, 1, 2, 3, 4]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Scale down to two at once, as a Deployment terminates three pods side by side.
    for index in [0, 2, 4] {
        rig.replicas[index].signal(Signal::Term);
    }
    for index in [0, 2, 4] {
        rig.replicas[index].wait_exit(Duration::from_secs(30)).await;
        sampler.forget(rig.replicas[index].health);
    }
    wait_balanced(&rig, &[1, 3]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    println!("scale 3 -> 5 -> 2: {}", audit.summary());
    assert_no_double_leaders(sampler, &rig);
    assert_cost("scaling", &audit, &rig, Repeats::Never);
    wait_streamed_by(&rig, &[1, 3]).await;
    wait_counted(&rig, &audit).await;
    for index in [0, 2, 4] {
        assert!(
            rig.replicas[index].log().contains("Left the shards"),
            "{} handed its tokens on before it stopped:\n{}",
            rig.replicas[index].name,
            rig.replicas[index].log()
        );
    }
}

/// Changes that come faster than a view settles: replicas join and leave while the previous
/// change is still under way, one of them leaving before it was ever confirmed. The views chain
/// up, and still no token is delivered by two replicas, none is lost and none repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rapid_scale_changes_never_deliver_a_token_twice_nor_lose_an_event() {
    let (mut rig, sampler, publisher) = three_under_load("shard-rapid", 24).await;

    start(&mut rig, 3);
    sampler.watch(rig.replicas[3].health);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.replicas[0].signal(Signal::Term);
    tokio::time::sleep(Duration::from_millis(700)).await;
    start(&mut rig, 4);
    sampler.watch(rig.replicas[4].health);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The replica that joined a moment ago leaves again, its first view maybe not confirmed.
    rig.replicas[3].signal(Signal::Term);
    for index in [0, 3] {
        rig.replicas[index].wait_exit(Duration::from_secs(30)).await;
        sampler.forget(rig.replicas[index].health);
    }
    wait_balanced(&rig, &[1, 2, 4]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    println!("rapid changes 3 -> 4 -> 3 -> 4 -> 3: {}", audit.summary());
    assert_no_double_leaders(sampler, &rig);
    // A release that outlasts the renew deadline must not make its replica think it was cut
    // off: it would drop the tokens it keeps.
    for replica in &rig.replicas {
        assert!(
            !replica.log().contains("Stopped delivering every token"),
            "{} kept its member lease through every change:\n{}",
            replica.name,
            replica.log()
        );
    }
    assert_cost("rapid scaling", &audit, &rig, Repeats::Never);
}

/// A replica that joins a crowded installation must know every token before it is counted on:
/// it lists and reconciles every Listener first, and says it is warm only once every token the
/// new view gives it streams, so the tokens it takes over lose nothing in the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_joining_many_tokens_takes_its_share_without_losing_or_repeating_an_event() {
    let mut rig = Rig::without_replicas("shard-crowd", 150).await;
    start(&mut rig, 0);
    wait_balanced(&rig, &[0]).await;
    let sampler = Sampler::start(vec![rig.replicas[0].health]);
    let publisher = rig.publish(50.0);
    tokio::time::sleep(Duration::from_secs(2)).await;

    start(&mut rig, 1);
    sampler.watch(rig.replicas[1].health);
    wait_balanced(&rig, &[0, 1]).await;
    let taken = hashes(
        &report(rig.replicas[1].health)
            .await
            .expect("the new replica answers"),
        "leading",
    );
    assert!(
        taken.len() > rig.tokens / 4,
        "the new replica took about half the tokens, not {}",
        taken.len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    println!("scale 1 -> 2 at {} tokens: {}", rig.tokens, audit.summary());
    assert_no_double_leaders(sampler, &rig);
    assert_cost("a join", &audit, &rig, Repeats::Never);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replicas_tokens_move_to_their_standbys_and_nothing_is_lost() {
    let (rig, sampler, publisher) = three_under_load("shard-kill", 24).await;
    let victim = 1;
    let led_by_victim = hashes(
        &report(rig.replicas[victim].health)
            .await
            .expect("the victim answers"),
        "leading",
    );
    assert!(!led_by_victim.is_empty(), "the victim leads some tokens");
    sampler.forget(rig.replicas[victim].health);
    rig.replicas[victim].signal(Signal::Kill);
    wait_balanced(&rig, &[0, 2]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let published = publisher.stop().await;
    let audit: Audit = rig.settle(&published, QUIET).await;
    println!("kill -9 of one of three: {}", audit.summary());
    assert_no_double_leaders(sampler, &rig);
    assert_cost("a crash", &audit, &rig, Repeats::UnderTheSameId);
}

/// Publishes while replica `victim` of three is cut off by `cut` for `outage` and then comes
/// back by `restore`: its tokens move to the others when its Lease expires, it delivers nothing
/// once its renew deadline has passed, and it rejoins with nothing and takes its share back.
async fn outage(
    rig: Rig,
    victim: usize,
    outage: Duration,
    cut: impl FnOnce(&Rig),
    restore: impl FnOnce(&Rig),
) -> Rig {
    let (mut rig, sampler, publisher) = loaded(rig).await;
    let led = hashes(
        &report(rig.replicas[victim].health)
            .await
            .expect("the victim answers"),
        "leading",
    );
    assert!(!led.is_empty(), "the victim leads some tokens");
    cut(&rig);
    let others: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    wait_balanced(&rig, &others).await;
    tokio::time::sleep(outage).await;
    restore(&rig);
    wait_balanced(&rig, &[0, 1, 2]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    println!("outage of one of three: {}", audit.summary());
    assert_no_double_leaders(sampler, &rig);
    assert_cost("an outage", &audit, &rig, Repeats::UnderTheSameId);
    let log = rig.replicas[victim].log();
    assert!(
        log.contains("Stopped delivering every token"),
        "the victim dropped its tokens when it found its lease lapsed:\n{log}"
    );
    rig.replicas.truncate(3);
    rig
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_replica_loses_its_tokens_and_never_delivers_them_beside_their_new_owner() {
    let mut rig = Rig::without_replicas("shard-stop", 24).await;
    for index in 0..3 {
        start(&mut rig, index);
    }
    // Frozen for twice the lease duration: long past its renew deadline.
    outage(
        rig,
        1,
        Duration::from_secs(3),
        |rig| rig.replicas[1].signal(Signal::Stop),
        |rig| rig.replicas[1].signal(Signal::Cont),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_from_the_api_server_stops_delivering_and_rejoins_when_it_is_back() {
    let mut rig = Rig::without_replicas("shard-cut", 24).await;
    let plane = control_plane();
    let config = std::fs::read_to_string(&plane.kubeconfig).expect("the kubeconfig reads");
    let server = config
        .lines()
        .find_map(|line| line.trim().strip_prefix("server: https://"))
        .expect("the kubeconfig names its server")
        .to_owned();
    let upstream: SocketAddr = server.parse().expect("the server is host:port");
    let proxy = Proxy::start(upstream).await;
    let through = tempfile::NamedTempFile::new().expect("kubeconfig file");
    std::fs::write(
        through.path(),
        config.replace(&server, &proxy.addr().to_string()),
    )
    .expect("the proxied kubeconfig writes");
    for index in 0..3 {
        let kubeconfig = match index {
            1 => through.path().to_owned(),
            _ => plane.kubeconfig.clone(),
        };
        rig.replicas.push(Replica::start_through(
            &format!("shard-{index}"),
            &rig.harness.sim.base_url(),
            &rig.harness.ns.name,
            true,
            SHARD_FLAGS,
            &kubeconfig,
        ));
    }
    let rig = outage(
        rig,
        1,
        Duration::from_secs(3),
        |_| proxy.cut(),
        |_| proxy.restore(),
    )
    .await;
    let log = rig.replicas[1].log();
    assert!(
        log.contains("Could not renew this replica's member lease")
            || log.contains("Renewing this replica's member lease timed out"),
        "the cut replica could not renew:\n{log}"
    );
}

/// A blip in one owner's streams is covered by its tokens' standbys: they send the events of
/// the gap to the replica that owns the token, which delivers them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_missed_by_an_owners_stream_are_filled_in_by_the_tokens_standbys() {
    let mut rig = Rig::without_replicas("shard-blip", 24).await;
    let upstream: SocketAddr = rig
        .harness
        .sim
        .base_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("the simulator listens on an address");
    let proxy = Proxy::start(upstream).await;
    for index in 0..3 {
        let events_url = match index {
            0 => proxy.url(),
            _ => rig.harness.sim.base_url(),
        };
        rig.replicas.push(Replica::start_args(
            &format!("shard-{index}"),
            &events_url,
            &rig.harness.ns.name,
            true,
            SHARD_FLAGS,
        ));
    }
    wait_balanced(&rig, &[0, 1, 2]).await;
    let led = hashes(
        &report(rig.replicas[0].health).await.expect("it answers"),
        "leading",
    );
    assert!(
        !led.is_empty(),
        "the replica behind the proxy leads some tokens"
    );
    let publisher = rig.publish(20.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let published = publisher.stop().await;
    let audit = rig.settle(&published, QUIET).await;
    println!("a blip in one owner's streams: {}", audit.summary());
    // The standbys filled the owner's gap: every event once.
    assert_cost("a blip in an owner's streams", &audit, &rig, Repeats::Never);
}
