//! Two replicas: one Lease, one leader delivering, a warm standby streaming beside it that takes
//! over, and a leader that stops leading by itself when it cannot renew.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crownstone_webhooks::clock::SystemClock;
use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::leader::Role;
use crownstone_webhooks::operator::{self, RunningOperator};
use k8s_openapi::api::coordination::v1::Lease;

use crate::support::cluster::{eventually, PrivatePlane, TestNamespace};
use crate::support::operator::{test_args, Harness, WAIT};
use crate::support::receiver::{Receiver, Reply};

const SPHERE: &str = "sphere-1";
const ELECTED: &[&str] = &[
    "--allow-private-destinations",
    "--leader-election",
    "--lease-duration",
    "3s",
    "--lease-renew-deadline",
    "2s",
    "--lease-retry-period",
    "300ms",
    "--handover-listen",
    "127.0.0.1:0",
    "--handover-key",
    "a key both test replicas share, 32 bytes or more",
];

async fn replica(h: &Harness) -> RunningOperator {
    operator::start(
        h.ns.client.clone(),
        test_args(&h.sim.base_url(), &h.ns.name, ELECTED),
        Arc::new(SystemClock),
    )
    .await
    .expect("replica starts")
}

async fn holder(h: &Harness) -> Option<String> {
    let lease =
        h.ns.api::<Lease>()
            .get_opt("crownstone-webhooks")
            .await
            .ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

/// Publishes a command whose sphere uid is `n`, to tell deliveries apart.
async fn publish(h: &Harness, n: u64) {
    let mut event = samples::multi_switch(SPHERE);
    event["sphere"]["uid"] = n.into();
    h.admin.publish(&[event]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_a_standby_takes_over_without_double_delivery() {
    let mut h = Harness::start_with("leader", Arc::new(SystemClock), ELECTED).await;
    let standby = replica(&h).await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    let first = eventually("a leader", WAIT, || holder(&h)).await;
    // A warm standby streams the token beside the leader.
    h.wait_streams(2).await;
    for n in 0..5 {
        publish(&h, n).await;
    }
    receiver.wait_for_requests(5, WAIT).await;

    // The leader stops (a rolling update, which waits until the new pod is ready): it hands
    // the lease back after draining.
    let (leader, mut survivor) = if h.operator.as_ref().unwrap().role() == Role::Leading {
        (h.operator.take().unwrap(), standby)
    } else {
        (standby, h.operator.take().unwrap())
    };
    let standby_health = survivor.health_addr();
    eventually("the standby is ready", WAIT, || async {
        let response = reqwest::get(format!("http://{standby_health}/readyz"))
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    leader.shutdown().await;
    let second = eventually("another leader", WAIT, || async {
        holder(&h).await.filter(|holder| *holder != first)
    })
    .await;
    assert_ne!(first, second);
    h.wait_streams(1).await;
    h.operator = Some(survivor);
    h.wait_ready("hook").await;
    for n in 5..10 {
        publish(&h, n).await;
    }
    // The standby keeps what it read before its first alignment with the leader (a token's
    // first events): those may come again, but only ever under the id of their first delivery.
    // So ten requests need not be ten events: wait for every event, not for a count.
    let delivered = || -> Vec<(u64, String)> {
        receiver
            .requests()
            .iter()
            .filter_map(|r| {
                let uid = r.json()["data"]["sphere"]["uid"].as_u64()?;
                Some((uid, r.header("webhook-id")?.to_owned()))
            })
            .collect()
    };
    let everything: HashSet<u64> = (0..10).collect();
    eventually("every event delivered", WAIT, || async {
        let seen: HashSet<u64> = delivered().iter().map(|(uid, _)| *uid).collect();
        (seen == everything).then_some(())
    })
    .await;
    let deliveries = delivered();
    let unique: HashSet<u64> = deliveries.iter().map(|(uid, _)| *uid).collect();
    let ids: HashSet<&String> = deliveries.iter().map(|(_, id)| id).collect();
    assert_eq!(
        ids.len(),
        unique.len(),
        "an event was delivered again under another id: {deliveries:?}"
    );
    assert_eq!(unique, everything);
    survivor = h.operator.take().unwrap();
    survivor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_leading_by_itself() {
    let plane = Arc::new(
        tokio::task::spawn_blocking(PrivatePlane::start)
            .await
            .unwrap(),
    );
    let ns = TestNamespace::on(&plane.kubeconfig(), "leader-cut").await;
    let h = Harness::start_in(ns, Arc::new(SystemClock), ELECTED).await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    h.wait_streams(1).await;

    let stopping = plane.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap();
    // Past the renew deadline (2 s) it gives up leading, before the lease (3 s) could pass on;
    // it stands by, keeping its stream open, instead of stopping.
    let operator = h.operator.as_ref().unwrap();
    let mut role = operator.role_changes();
    tokio::time::timeout(
        Duration::from_secs(20),
        role.wait_for(|role| *role == Role::Standby),
    )
    .await
    .expect("the leader noticed it cannot renew")
    .unwrap();
    assert_eq!(h.metric("crownstone_webhooks_leader").await, 0.0);
    h.wait_streams(1).await;
}

/// A leader that loses its API server while it drains on shutdown stops delivering at its renew
/// deadline, not at the end of its grace period: past the deadline another replica may lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_the_api_server_while_draining_stops_delivering_at_the_renew_deadline() {
    let plane = Arc::new(
        tokio::task::spawn_blocking(PrivatePlane::start)
            .await
            .unwrap(),
    );
    let ns = TestNamespace::on(&plane.kubeconfig(), "leader-drain-cut").await;
    // A grace period far longer than the test: only losing the Lease can end the drain early.
    let flags: Vec<&str> = ELECTED
        .iter()
        .copied()
        .chain(["--shutdown-grace", "120s", "--delivery-retry-max", "1s"])
        .collect();
    let mut h = Harness::start_in(ns, Arc::new(SystemClock), &flags).await;
    // Every attempt fails and is retried about once a second for minutes: the drain never ends
    // by itself.
    let receiver = Receiver::scripted([], Reply::status(503)).await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    let slow_retries = serde_json::json!({"spec": {"delivery": {
        "retry": 100, "backoffPolicy": "linear", "backoffDelay": "PT0.2S", "maxAge": "PT10M"
    }}});
    h.ns.api::<crownstone_webhooks::resources::Listener>()
        .patch(
            "hook",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&slow_retries),
        )
        .await
        .unwrap();
    eventually("the policy in force", WAIT, || async {
        let listener =
            h.ns.api::<crownstone_webhooks::resources::Listener>()
                .get("hook")
                .await
                .ok()?;
        let effective = listener.status?.effective_delivery?;
        (effective.retry == 100).then_some(())
    })
    .await;
    for n in 0..10 {
        publish(&h, n).await;
    }
    receiver.wait_for_requests(30, WAIT).await;

    let operator = h.operator.take().unwrap();
    let before_shutdown = receiver.request_count();
    let mut role = operator.role_changes();
    let shutdown = tokio::spawn(operator.shutdown());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !shutdown.is_finished(),
        "the drain waits for the deliveries left"
    );
    // Draining, the leader goes on retrying.
    receiver.wait_for_requests(before_shutdown + 5, WAIT).await;
    let stopping = plane.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        role.wait_for(|role| *role == Role::Standby),
    )
    .await
    .expect("the draining leader noticed it cannot renew")
    .unwrap();
    // An attempt already on the wire may still land; nothing is sent after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_loss = receiver.request_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receiver.request_count(),
        after_loss,
        "deliveries went on after the Lease was lost"
    );
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("the shutdown ends long before its grace period")
        .unwrap();
}
