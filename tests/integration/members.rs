//! Member Leases on a real API server: replicas that renew see each other, one that stops
//! renewing drops out after its duration, and one that releases drops out at once.

use std::time::{Duration, Instant};

use crownstone_webhooks::conventions::MANAGED_BY;
use crownstone_webhooks::handover::peer::ADDRESS_ANNOTATION;
use crownstone_webhooks::shard::members::{Member, Members, COMPONENT};
use k8s_openapi::api::coordination::v1::Lease;

use crate::support::cluster::{eventually, TestNamespace};

const DURATION: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(20);

fn member(ns: &TestNamespace, identity: &str) -> Members {
    Members::new(
        ns.client.clone(),
        &ns.name,
        "crownstone-webhooks",
        identity.to_owned(),
        DURATION,
        Some(format!("https://{identity}.example:8444")),
    )
    .expect("valid member settings")
}

fn identities(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.identity.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_each_other_until_one_stops_renewing_or_releases() {
    let ns = TestNamespace::new("members").await;
    let (a, b, c) = (
        member(&ns, "pod-a"),
        member(&ns, "pod-b"),
        member(&ns, "pod-c"),
    );
    for m in [&a, &b, &c] {
        m.renew().await.expect("first renewal creates the lease");
    }
    for m in [&a, &b, &c] {
        let live = m.live().await.expect("list");
        assert_eq!(identities(&live), ["pod-a", "pod-b", "pod-c"]);
        assert_eq!(
            live[1].address.as_deref(),
            Some("https://pod-b.example:8444")
        );
    }

    // The Lease carries what the chart's RBAC and other readers select on.
    let lease = ns.api::<Lease>().get(a.lease_name()).await.unwrap();
    let labels = lease.metadata.labels.unwrap();
    assert_eq!(
        labels.get(COMPONENT.0).map(String::as_str),
        Some(COMPONENT.1)
    );
    assert_eq!(
        labels.get(MANAGED_BY.0).map(String::as_str),
        Some(MANAGED_BY.1)
    );
    assert!(lease
        .metadata
        .annotations
        .unwrap()
        .contains_key(ADDRESS_ANNOTATION));
    assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(2));

    // pod-c renews once more, then stops; pod-a and pod-b keep renewing.
    c.renew().await.unwrap();
    let stopped = Instant::now();
    let dropped = eventually("pod-c to drop out", WAIT, || async {
        a.renew().await.unwrap();
        b.renew().await.unwrap();
        let seen_by_a = a.live().await.unwrap();
        let seen_by_b = b.live().await.unwrap();
        if identities(&seen_by_a).contains(&"pod-c") {
            return None;
        }
        assert_eq!(identities(&seen_by_a), ["pod-a", "pod-b"]);
        assert_eq!(identities(&seen_by_b), ["pod-a", "pod-b"], "both agree");
        Some(stopped.elapsed())
    })
    .await;
    // Not before a whole duration: pod-a had seen its last renewal.
    assert!(dropped >= DURATION, "dropped after {dropped:?}");

    // Renewing again brings it back.
    c.renew().await.unwrap();
    assert_eq!(
        identities(&a.live().await.unwrap()),
        ["pod-a", "pod-b", "pod-c"]
    );

    // Released: gone at once, its Lease deleted; releasing twice is no failure.
    b.release().await.expect("release");
    assert_eq!(identities(&a.live().await.unwrap()), ["pod-a", "pod-c"]);
    assert!(ns
        .api::<Lease>()
        .get_opt(b.lease_name())
        .await
        .unwrap()
        .is_none());
    b.release()
        .await
        .expect("a second release finds nothing to do");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_prefix_and_the_leader_lease_are_not_members() {
    let ns = TestNamespace::new("members-prefix").await;
    let ours = member(&ns, "pod-a");
    let theirs = Members::new(
        ns.client.clone(),
        &ns.name,
        "other-install",
        "pod-x".to_owned(),
        DURATION,
        None,
    )
    .unwrap();
    ours.renew().await.unwrap();
    theirs.renew().await.unwrap();
    // A leader Lease without the member label.
    let leader: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "crownstone-webhooks"},
        "spec": {"holderIdentity": "pod-l", "leaseDurationSeconds": 60,
                 "renewTime": "2099-01-01T00:00:00.000000Z"}
    }))
    .unwrap();
    ns.api::<Lease>()
        .create(&Default::default(), &leader)
        .await
        .unwrap();
    assert_eq!(identities(&ours.live().await.unwrap()), ["pod-a"]);
    let seen = theirs.live().await.unwrap();
    assert_eq!(
        seen,
        [Member {
            identity: "pod-x".into(),
            ..Member::default()
        }]
    );
}
