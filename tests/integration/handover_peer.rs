//! The transport between replicas through a real Lease: the holder writes where it serves its
//! progress into the Lease, the other replica reads it there, polls, and verifies the answers
//! against the Lease's holder and term; when the Lease changes hands, so does the direction.

use std::sync::Arc;
use std::time::Duration;

use crownstone_webhooks::domain::TokenHash;
use crownstone_webhooks::handover::peer::{
    read_holder, watch_lease_holder, CatchUp, FinishOutcome, HandoverKey, HandoverMetrics,
    ProgressClient, ProgressServer, ServerSettings, ADDRESS_ANNOTATION,
};
use crownstone_webhooks::handover::{EventDigest, ProgressSink, ProgressSource, TokenProgress};
use crownstone_webhooks::leader::{LeaderArgs, LeaseLock};
use k8s_openapi::api::coordination::v1::Lease;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::support::cluster::{eventually, TestNamespace};
use crate::support::operator::WAIT;

const LEASE: &str = "handover";

#[derive(Default)]
struct Forwarders {
    changed: Mutex<Vec<TokenProgress>>,
    applied: Mutex<Vec<TokenProgress>>,
}

impl ProgressSource for Forwarders {
    fn changed_progress(&self) -> Vec<TokenProgress> {
        std::mem::take(&mut *self.changed.lock())
    }
}

impl ProgressSink for Forwarders {
    fn apply_progress(&self, records: &[TokenProgress]) {
        self.applied.lock().extend_from_slice(records);
    }
}

fn record(token: &str, seq: u64) -> TokenProgress {
    TokenProgress {
        token: TokenHash::of(token),
        seq,
        tail: vec![EventDigest(seq)],
        delivered_through: seq,
        chain: None,
        gaps: Vec::new(),
    }
}

struct Replica {
    lock: Arc<LeaseLock>,
    server: ProgressServer,
    forwarders: Arc<Forwarders>,
    leading: watch::Sender<Option<i32>>,
}

async fn replica(ns: &TestNamespace, name: &str, stop: &CancellationToken) -> Replica {
    let args = LeaderArgs {
        leader_election: true,
        leader_election_namespace: Some(ns.name.clone()),
        leader_election_lease: LEASE.into(),
        lease_duration: Duration::from_secs(3),
        lease_renew_deadline: Duration::from_secs(2),
        lease_retry_period: Duration::from_millis(300),
        standby: crownstone_webhooks::leader::StandbyMode::Warm,
    };
    let lock = Arc::new(LeaseLock::new(ns.client.clone(), &args, &ns.name, name.into()).unwrap());
    let key = HandoverKey::new(b"a key both replicas share, 32 bytes or more".to_vec()).unwrap();
    let forwarders = Arc::new(Forwarders::default());
    let (leading, leading_rx) = watch::channel(None);
    let metrics = HandoverMetrics::default();
    let server = ProgressServer::start(
        ServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            key: key.clone(),
            identity: name.into(),
            interval: Duration::from_millis(50),
        },
        forwarders.clone(),
        leading_rx,
        metrics.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    lock.set_annotation(ADDRESS_ANNOTATION, server.local_addr().to_string());
    let holder = watch_lease_holder(
        ns.api::<Lease>(),
        LEASE.into(),
        Duration::from_millis(100),
        stop.clone(),
    );
    ProgressClient::spawn(
        key,
        name.into(),
        holder,
        forwarders.clone(),
        metrics,
        CatchUp::default(),
        stop.clone(),
    )
    .unwrap();
    Replica {
        lock,
        server,
        forwarders,
        leading,
    }
}

/// Takes the Lease and starts serving in its term.
async fn lead(
    ns: &TestNamespace,
    replica: &Replica,
    stop: &CancellationToken,
) -> CancellationToken {
    assert!(replica.lock.acquire(stop).await);
    let lease = ns.api::<Lease>().get(LEASE).await.unwrap();
    let holder = read_holder(&lease).unwrap();
    assert_eq!(holder.identity, replica.lock.identity());
    assert_eq!(
        holder.address,
        Some(replica.server.local_addr().to_string()),
        "the holder's address is in the Lease"
    );
    replica.leading.send_replace(Some(holder.term));
    let renew = CancellationToken::new();
    let lock = replica.lock.clone();
    let renewing = renew.clone();
    tokio::spawn(async move { lock.hold(&renewing).await });
    renew
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_serves_its_progress_at_the_address_in_the_lease_and_hands_over() {
    let ns = TestNamespace::new("handover").await;
    let stop = CancellationToken::new();
    let a = replica(&ns, "replica-a", &stop).await;
    let b = replica(&ns, "replica-b", &stop).await;

    let renewing = lead(&ns, &a, &stop).await;
    a.forwarders.changed.lock().push(record("t1", 4));
    eventually("the standby gets the leader's record", WAIT, || async {
        (*b.forwarders.applied.lock() == vec![record("t1", 4)]).then_some(())
    })
    .await;
    // The leader never polls itself.
    assert!(a.forwarders.applied.lock().is_empty());

    // A rollout: the last word, then the Lease handed back.
    a.forwarders.changed.lock().push(record("t1", 6));
    assert_eq!(
        a.server.finish(Duration::from_secs(2)).await,
        FinishOutcome::AllFetched
    );
    assert_eq!(b.forwarders.applied.lock().last(), Some(&record("t1", 6)));
    renewing.cancel();
    a.leading.send_replace(None);
    a.lock.release().await;

    // The other replica leads in the next term; the first follows it from its version 0.
    let _renewing = lead(&ns, &b, &stop).await;
    b.forwarders.changed.lock().push(record("t2", 1));
    eventually(
        "the new standby gets the new leader's record",
        WAIT,
        || async { (*a.forwarders.applied.lock() == vec![record("t2", 1)]).then_some(()) },
    )
    .await;
    stop.cancel();
}
