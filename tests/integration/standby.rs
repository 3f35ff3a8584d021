//! A warm standby beside the leader: it streams and reconciles as the leader does but writes
//! nothing to the API server and delivers nothing until it holds the Lease; a leader whose Lease
//! is taken stops delivering at once and stands by again; a conflict on renew costs nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use crownstone_webhooks::clock::SystemClock;
use crownstone_webhooks::controller::FINALIZER;
use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::leader::Role;
use crownstone_webhooks::operator::RunningOperator;
use crownstone_webhooks::resources::{Listener, WebhookUser};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::cluster::{eventually, TestNamespace};
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::Receiver;

const SPHERE: &str = "sphere-1";
const LEASE: &str = "crownstone-webhooks";
const ELECTED: &[&str] = &[
    "--allow-private-destinations",
    "--leader-election",
    "--lease-duration",
    "3s",
    "--lease-renew-deadline",
    "2s",
    "--lease-retry-period",
    "300ms",
];

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Makes `holder` hold the Lease for an hour, as another replica that renewed just now.
async fn give_lease_to(ns: &TestNamespace, holder: &str) {
    let spec = json!({
        "holderIdentity": holder,
        "leaseDurationSeconds": 3600,
        "acquireTime": now(),
        "renewTime": now(),
    });
    let leases = ns.api::<Lease>();
    if leases.get_opt(LEASE).await.unwrap().is_none() {
        let lease: Lease = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE},
            "spec": spec,
        }))
        .unwrap();
        leases.create(&PostParams::default(), &lease).await.unwrap();
    } else {
        leases
            .patch(
                LEASE,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }
}

/// Empties the Lease's holder, as a leader handing it back does.
async fn free_lease(ns: &TestNamespace) {
    ns.api::<Lease>()
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": null}})),
        )
        .await
        .unwrap();
}

async fn wait_role(operator: &RunningOperator, role: Role) {
    let mut roles = operator.role_changes();
    tokio::time::timeout(WAIT, roles.wait_for(|now| *now == role))
        .await
        .unwrap_or_else(|_| panic!("the replica did not become {role:?}"))
        .unwrap();
}

async fn readyz(operator: &RunningOperator) -> Option<(u16, String)> {
    let response = reqwest::get(format!("http://{}/readyz", operator.health_addr()))
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Publishes a command whose sphere uid is `n`, to tell deliveries apart.
async fn publish(h: &Harness, n: u64) {
    let mut event = samples::multi_switch(SPHERE);
    event["sphere"]["uid"] = n.into();
    h.admin.publish(&[event]).await.unwrap();
}

fn delivered_uids(receiver: &Receiver) -> Vec<u64> {
    receiver
        .requests()
        .iter()
        .filter_map(|r| r.json()["data"]["sphere"]["uid"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_standby_streams_and_reconciles_but_writes_nothing_until_it_leads() {
    let ns = TestNamespace::new("standby-warm").await;
    give_lease_to(&ns, "another-replica").await;
    let h = Harness::start_in(ns, Arc::new(SystemClock), ELECTED).await;
    let operator = h.operator.as_ref().unwrap();
    assert_eq!(operator.role(), Role::Standby);
    let receiver = Receiver::start().await;
    create_hook(&h, &receiver).await;

    // The standby opens the stream a leader would, and is ready once it reads it.
    h.wait_streams(1).await;
    eventually("ready as a warm standby", WAIT, || async {
        (readyz(operator).await? == (200, "standby (warm)".to_owned())).then_some(())
    })
    .await;
    assert_eq!(h.metric("crownstone_webhooks_leader").await, 0.0);
    // It reconciled both objects (the stream proves it) and wrote nothing about them.
    let listener = h.ns.api::<Listener>().get("hook").await.unwrap();
    assert!(
        listener.metadata.finalizers.unwrap_or_default().is_empty(),
        "a standby added a Listener's finalizer"
    );
    assert!(
        listener
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "a standby set an ownerReference"
    );
    assert!(
        listener.status.is_none(),
        "a standby wrote a Listener's status"
    );
    let user = h.ns.api::<WebhookUser>().get("acme").await.unwrap();
    assert!(
        user.metadata.finalizers.unwrap_or_default().is_empty(),
        "a standby added a WebhookUser's finalizer"
    );
    assert!(
        user.status.is_none(),
        "a standby wrote a WebhookUser's status"
    );
    assert!(
        h.ns.api::<Secret>()
            .get_opt("acme-credentials")
            .await
            .unwrap()
            .is_none(),
        "a standby created the credentials Secret"
    );

    // The holder hands the Lease back: this replica leads, and makes every write it skipped.
    free_lease(&h.ns).await;
    wait_role(operator, Role::Leading).await;
    h.wait_ready("hook").await;
    let listener = h.ns.api::<Listener>().get("hook").await.unwrap();
    assert!(listener
        .metadata
        .finalizers
        .unwrap_or_default()
        .iter()
        .any(|f| f == FINALIZER));
    h.client_secret("acme").await;
    assert_eq!(h.metric("crownstone_webhooks_leader").await, 1.0);
    assert_eq!(readyz(operator).await, Some((200, "leading".to_owned())));
    publish(&h, 1).await;
    receiver.wait_for_requests(1, WAIT).await;
    assert_eq!(delivered_uids(&receiver), [1]);
    // The same stream goes on: no second one for the same token.
    h.wait_streams(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_is_taken_stops_delivering_at_once_and_stands_by() {
    let h = Harness::start_with("standby-fenced", Arc::new(SystemClock), ELECTED).await;
    let operator = h.operator.as_ref().unwrap();
    wait_role(operator, Role::Leading).await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    publish(&h, 1).await;
    receiver.wait_for_requests(1, WAIT).await;

    // Someone else writes itself into the Lease (the kube client, as a split brain would).
    give_lease_to(&h.ns, "thief").await;
    wait_role(operator, Role::Standby).await;
    assert_eq!(h.metric("crownstone_webhooks_leader").await, 0.0);
    let events = "crownstone_webhooks_forwarder_events_total";
    let read_before = h.metric(events).await;
    publish(&h, 2).await;
    // It still reads its stream (a warm standby); once it has read the event, it has not
    // delivered it.
    h.wait_metric(events, read_before + 1.0).await;
    assert_eq!(
        delivered_uids(&receiver),
        [1],
        "a replica without the Lease delivered"
    );
    h.wait_streams(1).await;
    eventually("ready as a warm standby again", WAIT, || async {
        (readyz(operator).await? == (200, "standby (warm)".to_owned())).then_some(())
    })
    .await;

    // The thief lets go: the same process leads again, without a restart.
    free_lease(&h.ns).await;
    wait_role(operator, Role::Leading).await;
    publish(&h, 3).await;
    eventually("the event after taking over delivered", WAIT, || async {
        delivered_uids(&receiver).contains(&3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_on_renew_does_not_cost_the_lease() {
    let h = Harness::start_with("standby-conflict", Arc::new(SystemClock), ELECTED).await;
    let operator = h.operator.as_ref().unwrap();
    wait_role(operator, Role::Leading).await;
    let mut roles = operator.role_changes();
    roles.borrow_and_update();
    // Labels written on the Lease without a pause for many renew rounds (300 ms each): the
    // renewals' writes meet 409s, which must be retried, not taken for a lost Lease.
    let leases = h.ns.api::<Lease>();
    let until = Instant::now() + Duration::from_secs(4);
    let mut edits = 0u64;
    while Instant::now() < until {
        leases
            .patch(
                LEASE,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"edit": edits.to_string()}}})),
            )
            .await
            .unwrap();
        edits += 1;
    }
    assert!(
        !roles.has_changed().unwrap(),
        "the leader stopped leading over a conflict on renew"
    );
    assert_eq!(operator.role(), Role::Leading);
    let lease = leases.get(LEASE).await.unwrap();
    let renewed = lease.spec.unwrap().renew_time.unwrap();
    // Still renewed by this replica after the edits stopped.
    eventually("a renewal after the edits", WAIT, || async {
        let lease = leases.get(LEASE).await.ok()?;
        (lease.spec?.renew_time? != renewed).then_some(())
    })
    .await;
    assert_eq!(operator.role(), Role::Leading);
}

/// The binary, with its JSON log lines as they come.
struct RunProcess {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl RunProcess {
    fn spawn(args: &[&str]) -> RunProcess {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
            .args(args)
            .args(["--log-format", "json"])
            .env(
                "KUBECONFIG",
                &crate::support::cluster::control_plane().kubeconfig,
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let (send, lines) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = send.send(line);
                }
            });
        }
        RunProcess { child, lines }
    }

    /// The `field` of the first log line with `message`.
    fn logged(&self, message: &str, field: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                if value["fields"]["message"] == message {
                    return value["fields"][field].as_str().unwrap().to_owned();
                }
            }
        }
        panic!("no log line {message:?}");
    }
}

impl Drop for RunProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_its_rest_api_up_when_its_lease_is_taken_and_stands_by() {
    let mut h = Harness::start_with("standby-run", Arc::new(SystemClock), ELECTED).await;
    // Only the process under test competes for the Lease.
    h.stop_operator().await;
    let events = h.sim.base_url();
    let admin = format!("admin-{:016x}", rand::random::<u64>());
    let mut process = RunProcess::spawn(&[
        "run",
        "--events-url",
        &events,
        "--watch-namespace",
        &h.ns.name,
        "--health-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--admin-key",
        &admin,
        "--leader-election",
        "--lease-duration",
        "3s",
        "--lease-renew-deadline",
        "2s",
        "--lease-retry-period",
        "300ms",
    ]);
    let health = process.logged("Operator started.", "health_addr");
    let api = process.logged("REST API started.", "addr");
    eventually("the process leads", WAIT, || async {
        (get(&format!("http://{health}/readyz")).await? == (200, "leading".to_owned()))
            .then_some(())
    })
    .await;

    give_lease_to(&h.ns, "thief").await;
    eventually("the process stands by", WAIT, || async {
        (get(&format!("http://{health}/readyz")).await? == (200, "standby (warm)".to_owned()))
            .then_some(())
    })
    .await;
    let metrics = get(&format!("http://{health}/metrics")).await.unwrap().1;
    assert!(
        metrics
            .lines()
            .any(|line| line == "crownstone_webhooks_leader 0"),
        "{metrics}"
    );
    // Still running, its REST API still answering.
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the process exited"
    );
    let (status, _) = get(&format!("http://{api}/readyz")).await.unwrap();
    assert_eq!(status, 200);

    // And it leads again once the Lease is free, without a restart.
    free_lease(&h.ns).await;
    eventually("the process leads again", WAIT, || async {
        (get(&format!("http://{health}/readyz")).await? == (200, "leading".to_owned()))
            .then_some(())
    })
    .await;
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the process exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_standby_streams_only_while_it_leads_and_stands_by_again_when_it_loses_the_lease() {
    let ns = TestNamespace::new("standby-cold").await;
    give_lease_to(&ns, "another-replica").await;
    let cold: Vec<&str> = ELECTED
        .iter()
        .copied()
        .chain(["--standby", "cold"])
        .collect();
    let h = Harness::start_in(ns, Arc::new(SystemClock), &cold).await;
    let operator = h.operator.as_ref().unwrap();
    eventually("ready as a cold standby", WAIT, || async {
        (readyz(operator).await? == (200, "standby (cold)".to_owned())).then_some(())
    })
    .await;
    let receiver = Receiver::start().await;
    create_hook(&h, &receiver).await;

    // Once it leads, its reconcilers start: the Listener is adopted, streamed and delivered to.
    free_lease(&h.ns).await;
    wait_role(operator, Role::Leading).await;
    h.wait_ready("hook").await;
    h.wait_streams(1).await;
    assert_eq!(readyz(operator).await, Some((200, "leading".to_owned())));
    publish(&h, 1).await;
    receiver.wait_for_requests(1, WAIT).await;
    assert_eq!(delivered_uids(&receiver), [1]);

    // Losing the Lease closes its streams (one per token between the replicas) and it stands
    // by again, without stopping.
    give_lease_to(&h.ns, "another-replica").await;
    wait_role(operator, Role::Standby).await;
    h.wait_streams(0).await;
    assert_eq!(
        readyz(operator).await,
        Some((200, "standby (cold)".to_owned()))
    );
    // Leading again reopens them.
    free_lease(&h.ns).await;
    wait_role(operator, Role::Leading).await;
    h.wait_streams(1).await;
    publish(&h, 2).await;
    receiver.wait_for_requests(2, WAIT).await;
    assert_eq!(delivered_uids(&receiver), [1, 2]);
}

/// The user `acme` and its Listener `hook` on a fresh token, posting `command` events to
/// `receiver`; not waited for, since a standby never marks it ready.
async fn create_hook(h: &Harness, receiver: &Receiver) {
    h.create_user("acme", true, None).await;
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("hook-token", &token).await;
    h.create_listener(
        "hook",
        "acme",
        "hook-token",
        &["command"],
        receiver.url().as_str(),
        None,
    )
    .await;
}
