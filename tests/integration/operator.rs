//! The operator end to end: a real API server, the simulator, real receivers, and the operator
//! reconciling WebhookUsers and Listeners, streaming, routing and delivering.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use crownstone_webhooks::clock::{ManualClock, SystemClock};
use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::resources::{Listener, WebhookUser};
use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use serde_json::Value;

use crate::support::cluster::{eventually, PrivatePlane, TestNamespace};
use crate::support::operator::{Harness, OperatorProcess, ALLOW_LOOPBACK, WAIT};
use crate::support::receiver::{Receiver, Reply};
use crate::support::sim;

const SPHERE: &str = "sphere-1";
const SKIPPED_OWNER_DISABLED: &str =
    r#"crownstone_webhooks_forwarder_skipped_total{reason="owner_disabled"}"#;
const SKIPPED_ALLOWANCE_USED: &str =
    r#"crownstone_webhooks_forwarder_skipped_total{reason="allowance_used"}"#;

/// User `acme` with Listener `hook` on a fresh token, streaming to `receiver`; returns the token.
async fn one_listener(h: &Harness, receiver: &Receiver, types: &[&str]) -> String {
    h.ready_listener("hook", "acme", types, &receiver.url())
        .await
}

#[tokio::test]
async fn a_listener_gets_matching_events_with_the_exact_body() {
    let h = Harness::start("op-body").await;
    let receiver = Receiver::start().await;
    one_listener(&h, &receiver, &["command", "presence"]).await;
    let secret = h.client_secret("acme").await;

    let command = samples::multi_switch(SPHERE);
    // Not subscribed to, and not a webhook event at all: neither is delivered.
    let unsubscribed = samples::switch_state_update(SPHERE, 50);
    let internal = samples::sphere_tokens_changed(SPHERE);
    assert_eq!(
        h.admin
            .publish(&[unsubscribed, internal, command.clone()])
            .await
            .unwrap(),
        [1, 1, 1]
    );

    let requests = receiver.wait_for_requests(1, WAIT).await;
    let expected = format!(
        r#"{{"clientId":"acme","clientSecret":"{secret}","userId":"user-1","data":{}}}"#,
        serde_json::to_string(&command).unwrap()
    );
    assert_eq!(String::from_utf8_lossy(&requests[0].body), expected);
    assert_eq!(requests[0].header("content-type"), Some("application/json"));
    assert!(requests[0].header("webhook-signature").is_some());

    // Recorded on the status, and counted against the owner's allowance.
    let listeners = h.ns.api::<Listener>();
    eventually("delivered=1 on the Listener", WAIT, || async {
        let status = listeners.get("hook").await.ok()?.status?;
        (status.delivered == 1 && status.last_delivery_time.is_some()).then_some(())
    })
    .await;
    let users = h.ns.api::<WebhookUser>();
    eventually("usage=1 and listeners=1 on the user", WAIT, || async {
        let status = users.get("acme").await.ok()?.status?;
        (status.usage?.deliveries == 1 && status.listeners == 1).then_some(())
    })
    .await;
    // Published before the command on the same stream, so routed (and skipped) before it.
    assert_eq!(receiver.request_count(), 1);
}

#[tokio::test]
async fn listeners_on_one_token_share_one_stream() {
    let h = Harness::start("op-share").await;
    let (a, b) = (Receiver::start().await, Receiver::start().await);
    h.create_user("acme", true, None).await;
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("token-a", &token).await;
    h.create_token_secret("token-b", &token).await;
    h.create_listener("a", "acme", "token-a", &["command"], a.url().as_str(), None)
        .await;
    h.create_listener("b", "acme", "token-b", &["command"], b.url().as_str(), None)
        .await;
    h.wait_ready("a").await;
    h.wait_ready("b").await;
    h.wait_streams(1).await;

    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    a.wait_for_requests(1, WAIT).await;
    b.wait_for_requests(1, WAIT).await;

    // Deleting one keeps the stream for the other.
    let listeners = h.ns.api::<Listener>();
    listeners
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("a").await;
    h.wait_streams(1).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    b.wait_for_requests(2, WAIT).await;
    assert_eq!(a.request_count(), 1);

    // Deleting the last one closes it.
    listeners
        .delete("b", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("b").await;
    h.wait_streams(0).await;
}

#[tokio::test]
async fn revoking_the_token_deletes_its_listeners_and_only_managed_token_secrets() {
    let h = Harness::start("op-revoke").await;
    let receiver = Receiver::start().await;
    h.create_user("acme", true, None).await;
    let token = h.token("user-1", SPHERE).await;
    h.create_managed_token_secret("managed", &token).await;
    h.create_token_secret("users-own", &token).await;
    let url = receiver.url();
    h.create_listener("a", "acme", "managed", &["command"], url.as_str(), None)
        .await;
    h.create_listener("b", "acme", "users-own", &["command"], url.as_str(), None)
        .await;
    h.wait_ready("a").await;
    h.wait_ready("b").await;

    h.admin.revoke_token(&token).await.unwrap();
    h.wait_gone("a").await;
    h.wait_gone("b").await;
    h.wait_streams(0).await;
    h.wait_secret_gone("managed").await;
    // A Secret the user made is read, never deleted.
    let kept = h.ns.api::<Secret>().get_opt("users-own").await.unwrap();
    assert!(kept.is_some(), "the user's own token Secret was deleted");
}

#[tokio::test]
async fn a_passed_expiry_deletes_only_its_own_listener() {
    let h = Harness::start("op-expiry").await;
    let receiver = Receiver::start().await;
    let token = h
        .ready_listener("live", "acme", &["command"], &receiver.url())
        .await;
    // Expires in a moment, on the same token: the timer deletes it, and only it.
    h.create_token_secret("t2", &token).await;
    let soon = (Utc::now() + chrono::Duration::seconds(3)).to_rfc3339();
    h.create_listener(
        "expiring",
        "acme",
        "t2",
        &["command"],
        receiver.url().as_str(),
        Some(&soon),
    )
    .await;
    h.wait_gone("expiring").await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(1, WAIT).await;
    h.wait_ready("live").await;

    // Already in the past at creation.
    let token = h.token("user-2", SPHERE).await;
    h.create_token_secret("t3", &token).await;
    h.create_listener(
        "past",
        "acme",
        "t3",
        &["command"],
        receiver.url().as_str(),
        Some("2020-01-01T00:00:00Z"),
    )
    .await;
    h.wait_gone("past").await;
    assert!(h
        .ns
        .api::<Listener>()
        .get_opt("live")
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn an_invalid_token_is_reported_and_not_retried() {
    let h = Harness::start("op-invalid").await;
    let receiver = Receiver::start().await;
    h.create_user("acme", true, None).await;
    h.create_token_secret("bad-token", "not-a-token-the-server-knows")
        .await;
    h.create_listener(
        "hook",
        "acme",
        "bad-token",
        &["command"],
        receiver.url().as_str(),
        None,
    )
    .await;
    h.wait_condition("hook", "TokenValid", "False", "InvalidToken")
        .await;
    h.wait_condition("hook", "Ready", "False", "InvalidToken")
        .await;
    // Not retried: after the refusal no stream is open, and none is opened again. A working
    // Listener's stream, dropped, reconnects meanwhile: the only stream opened after that.
    h.wait_streams(0).await;
    h.ready_listener("good", "acme", &["command"], &receiver.url())
        .await;
    let opened = h.admin.stats().await.unwrap().streams_opened;
    h.admin.drop_streams().await.unwrap();
    h.wait_metric("crownstone_webhooks_forwarder_reconnects_total", 1.0)
        .await;
    h.wait_streams(1).await;
    assert_eq!(h.admin.stats().await.unwrap().streams_opened, opened + 1);

    // A valid token in the Secret brings it to life.
    let token = h.token("user-1", SPHERE).await;
    let secrets = h.ns.api::<Secret>();
    secrets
        .delete("bad-token", &DeleteParams::default())
        .await
        .unwrap();
    h.create_token_secret("bad-token", &token).await;
    h.wait_ready("hook").await;
}

#[tokio::test]
async fn a_missing_owner_or_token_secret_is_reported() {
    let h = Harness::start("op-missing").await;
    let receiver = Receiver::start().await;
    h.create_listener(
        "orphan",
        "nobody",
        "no-secret",
        &["command"],
        receiver.url().as_str(),
        None,
    )
    .await;
    h.wait_condition("orphan", "Ready", "False", "OwnerNotFound")
        .await;
    h.wait_condition("orphan", "TokenValid", "Unknown", "TokenSecretMissing")
        .await;
    // The owner appears: the Listener is adopted and only the Secret is missing.
    h.create_user("nobody", true, None).await;
    h.wait_condition("orphan", "Ready", "False", "TokenSecretMissing")
        .await;
    let listener = h.ns.api::<Listener>().get("orphan").await.unwrap();
    let owners = listener.metadata.owner_references.unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].kind, "WebhookUser");
    assert_eq!(owners[0].name, "nobody");
}

#[tokio::test]
async fn a_disabled_owner_gets_nothing_while_another_owner_on_the_token_does() {
    let h = Harness::start("op-disabled").await;
    let (on, off) = (Receiver::start().await, Receiver::start().await);
    h.create_user("on", true, None).await;
    h.create_user("off", true, None).await;
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("t-on", &token).await;
    h.create_token_secret("t-off", &token).await;
    h.create_listener("l-on", "on", "t-on", &["command"], on.url().as_str(), None)
        .await;
    h.create_listener(
        "l-off",
        "off",
        "t-off",
        &["command"],
        off.url().as_str(),
        None,
    )
    .await;
    h.wait_ready("l-on").await;
    h.wait_ready("l-off").await;

    let users = h.ns.api::<WebhookUser>();
    let patch = serde_json::json!({"spec": {"enabled": false}});
    users
        .patch("off", &Default::default(), &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
    h.wait_condition("l-off", "Ready", "False", "OwnerDisabled")
        .await;
    h.wait_streams(1).await;

    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    on.wait_for_requests(1, WAIT).await;
    // Routing skipped the disabled owner's Listener in the same pass.
    h.wait_metric(SKIPPED_OWNER_DISABLED, 1.0).await;
    assert_eq!(off.request_count(), 0);
}

#[tokio::test]
async fn an_owner_past_its_allowance_gets_nothing_until_the_next_utc_day() {
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 23, 30, 0).unwrap());
    let h = Harness::start_with("op-allowance", Arc::new(clock.clone()), ALLOW_LOOPBACK).await;
    let receiver = Receiver::start().await;
    h.create_user("acme", true, Some(2)).await;
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("acme-token", &token).await;
    h.create_listener(
        "hook",
        "acme",
        "acme-token",
        &["command"],
        receiver.url().as_str(),
        None,
    )
    .await;
    h.wait_ready("hook").await;

    let events: Vec<Value> = (0..3).map(|_| samples::multi_switch(SPHERE)).collect();
    h.admin.publish(&events).await.unwrap();
    receiver.wait_for_requests(2, WAIT).await;
    let users = h.ns.api::<WebhookUser>();
    eventually("usage 2 of 2 recorded", WAIT, || async {
        let usage = users.get("acme").await.ok()?.status?.usage?;
        (usage.day == "2026-11-23" && usage.deliveries == 2).then_some(())
    })
    .await;
    let skipped = h.metric(SKIPPED_ALLOWANCE_USED).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    h.wait_metric(SKIPPED_ALLOWANCE_USED, skipped + 1.0).await;
    assert_eq!(receiver.request_count(), 2, "the allowance is used up");

    clock.advance(chrono::Duration::hours(1));
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(3, WAIT).await;
    eventually("usage of the new day", WAIT, || async {
        let usage = users.get("acme").await.ok()?.status?.usage?;
        (usage.day == "2026-11-24" && usage.deliveries == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn deleting_a_webhook_user_removes_its_listeners() {
    let h = Harness::start("op-user-delete").await;
    let receiver = Receiver::start().await;
    one_listener(&h, &receiver, &["command"]).await;
    let users = h.ns.api::<WebhookUser>();
    users
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("hook").await;
    eventually("user deleted", WAIT, || async {
        users.get_opt("acme").await.ok()?.is_none().then_some(())
    })
    .await;
    h.wait_secret_gone("acme-credentials").await;
    h.wait_streams(0).await;
    // The token Secret was the user's own: read, never deleted.
    let kept = h.ns.api::<Secret>().get_opt("hook-token").await.unwrap();
    assert!(kept.is_some(), "the user's own token Secret was deleted");
}

#[tokio::test]
async fn failed_deliveries_are_recorded_on_the_listener() {
    let h = Harness::start("op-failure").await;
    let receiver = Receiver::counting(Reply::status(400)).await;
    one_listener(&h, &receiver, &["command"]).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    let listeners = h.ns.api::<Listener>();
    let status = eventually("failed=1 on the Listener", WAIT, || async {
        let status = listeners.get("hook").await.ok()?.status?;
        (status.failed == 1).then_some(status)
    })
    .await;
    assert_eq!(receiver.request_count(), 1, "a 400 is not retried");
    let error = status.last_error.unwrap();
    assert!(error.contains("400"), "{error}");
    // And raised as a Kubernetes Event on the Listener.
    let events = h.ns.api::<k8s_openapi::api::events::v1::Event>();
    eventually("a DeliveryFailed event", WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("DeliveryFailed"))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn failure_events_keep_within_the_status_write_budget() {
    // Five writes a second over 200 ms flushes: one write or Event per flush.
    let extra = [
        "--allow-private-destinations",
        "--status-writes-per-second",
        "5",
    ];
    let h = Harness::start_with("op-event-budget", Arc::new(SystemClock), &extra).await;
    let receiver = Receiver::counting(Reply::status(400)).await;
    let names = ["hook-a", "hook-b", "hook-c", "hook-d"];
    for name in names {
        h.ready_listener(name, "acme", &["command"], &receiver.url())
            .await;
    }
    // Every Listener's stream gets the event, and every delivery fails at once.
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    let events = h.ns.api::<k8s_openapi::api::events::v1::Event>();
    let raised = eventually("a DeliveryFailed event per Listener", WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        let raised: Vec<_> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("DeliveryFailed"))
            .collect();
        (raised.len() == names.len()).then_some(raised)
    })
    .await;
    let mut regarding: Vec<_> = raised
        .iter()
        .filter_map(|e| e.regarding.as_ref()?.name.clone())
        .collect();
    regarding.sort();
    assert_eq!(regarding, names);
    // One a flush: four Events span at least three flushes. Unpaced, all four go out in one.
    let times: Vec<_> = raised
        .iter()
        .filter_map(|e| Some(e.event_time.as_ref()?.0))
        .collect();
    assert_eq!(times.len(), names.len(), "every Event has its time");
    let span = times
        .iter()
        .max()
        .unwrap()
        .duration_since(*times.iter().min().unwrap());
    assert!(
        span >= k8s_openapi::jiff::SignedDuration::from_millis(450),
        "four Events within {span:?}: not paced"
    );
    for name in names {
        let status =
            h.ns.api::<Listener>()
                .get(name)
                .await
                .unwrap()
                .status
                .unwrap();
        assert_eq!(status.failed, 1, "{name}");
    }
}

#[tokio::test]
async fn a_gone_receiver_makes_the_listener_not_ready_until_its_spec_changes() {
    let h = Harness::start("op-gone").await;
    let receiver = Receiver::counting(Reply::status(410)).await;
    one_listener(&h, &receiver, &["command"]).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    h.wait_condition("hook", "Ready", "False", "EndpointGone")
        .await;

    receiver.set_default(Reply::status(200));
    let listeners = h.ns.api::<Listener>();
    let patch = serde_json::json!({"spec": {"eventTypes": ["command", "presence"]}});
    listeners
        .patch(
            "hook",
            &Default::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    h.wait_ready("hook").await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(2, WAIT).await;
}

#[tokio::test]
async fn streams_come_back_after_drops_and_outages() {
    let h = Harness::start("op-recover").await;
    let receiver = Receiver::start().await;
    one_listener(&h, &receiver, &["command"]).await;

    // All streams dropped abruptly.
    h.admin.drop_streams().await.unwrap();
    h.wait_ready("hook").await;
    h.wait_streams(1).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(1, WAIT).await;

    // The event server loses its upstream for a while.
    h.admin.set_outage(true).await.unwrap();
    h.admin.drop_streams().await.unwrap();
    h.wait_condition("hook", "Streaming", "False", "Reconnecting")
        .await;
    h.admin.set_outage(false).await.unwrap();
    h.wait_ready("hook").await;
    h.wait_streams(1).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(2, WAIT).await;
}

#[tokio::test]
async fn listeners_resume_after_an_operator_restart() {
    let mut h = Harness::start("op-restart").await;
    let receiver = Receiver::start().await;
    one_listener(&h, &receiver, &["command"]).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(1, WAIT).await;

    h.stop_operator().await;
    h.wait_streams(0).await;
    // The counters were flushed on the way down.
    let listeners = h.ns.api::<Listener>();
    assert_eq!(
        listeners
            .get("hook")
            .await
            .unwrap()
            .status
            .unwrap()
            .delivered,
        1
    );

    h.restart_operator().await;
    h.wait_streams(1).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(2, WAIT).await;
    eventually("delivered=2 after the restart", WAIT, || async {
        (listeners.get("hook").await.ok()?.status?.delivered == 2).then_some(())
    })
    .await;
}

/// On the way down every Listener's counters are written, even where the pacing had them wait:
/// the last flush of a term writes them side by side, not within the pacing.
#[tokio::test]
async fn the_last_flush_writes_every_listeners_counters_past_the_pacing() {
    const LISTENERS: usize = 30;
    let extra = [
        "--allow-private-destinations",
        "--status-writes-per-second",
        "1",
    ];
    let mut h = Harness::start_with("op-last-flush", Arc::new(SystemClock), &extra).await;
    let receiver = Receiver::start().await;
    let names: Vec<String> = (0..LISTENERS).map(|n| format!("hook-{n}")).collect();
    for name in &names {
        h.ready_listener(name, "acme", &["command"], &receiver.url())
            .await;
    }
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(LISTENERS, WAIT).await;
    let listeners = h.ns.api::<Listener>();
    let delivered = |list: &[Listener]| {
        list.iter()
            .filter(|l| l.status.as_ref().is_some_and(|s| s.delivered == 1))
            .count()
    };
    let before = delivered(&listeners.list(&Default::default()).await.unwrap().items);
    // One write a second: most counters still wait when the operator stops.
    assert!(before < LISTENERS / 2, "{before} written already");

    h.stop_operator().await;
    let after = listeners.list(&Default::default()).await.unwrap().items;
    assert_eq!(
        delivered(&after),
        LISTENERS,
        "every counter written on the way down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_recover_after_the_api_server_restarts() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("kube_runtime=debug,crownstone_webhooks=info")
        .with_test_writer()
        .try_init();
    let plane = Arc::new(
        tokio::task::spawn_blocking(PrivatePlane::start)
            .await
            .unwrap(),
    );
    let ns = TestNamespace::on(&plane.kubeconfig(), "op-apiserver").await;
    let h = Harness::start_in(ns, Arc::new(SystemClock), ALLOW_LOOPBACK).await;
    let receiver = Receiver::start().await;
    let token = one_listener(&h, &receiver, &["command"]).await;
    let health = h.operator.as_ref().unwrap().health_addr();
    let readyz = format!("http://{health}/readyz");
    let ready = || async {
        let response = reqwest::get(&readyz).await.ok()?;
        response.status().is_success().then_some(())
    };
    eventually("/readyz answers 200 before the restart", WAIT, ready).await;

    let restarting = plane.clone();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap();

    // Streams do not depend on the API server: events flow on.
    h.wait_streams(1).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(1, WAIT).await;
    // The watches come back, after their backoff (up to 30 s): a Listener created after the
    // restart is reconciled.
    h.create_token_secret("second-token", &token).await;
    h.create_listener(
        "second",
        "acme",
        "second-token",
        &["command"],
        receiver.url().as_str(),
        None,
    )
    .await;
    h.wait_condition_within("second", "Ready", "True", "Forwarding", WAIT * 3)
        .await;
    // Readiness follows the watches: back once they deliver again or stop failing.
    eventually("/readyz answers 200 after the restart", WAIT * 2, ready).await;
}

#[tokio::test]
async fn no_token_or_secret_reaches_the_logs_status_or_events() {
    let ns = TestNamespace::new("op-logs").await;
    let (sim, admin) = sim::start(Duration::from_millis(500)).await;
    let operator = OperatorProcess::spawn(&sim.base_url(), &ns.name, "json", "debug", &[]);
    let h = Harness {
        ns,
        sim: Arc::new(sim),
        admin,
        operator: None,
    };
    let ok = Receiver::start().await;
    let failing = Receiver::counting(Reply::status(500)).await;
    h.create_user("acme", true, None).await;
    let good = h.token("user-1", SPHERE).await;
    let bad = "an-invalid-token-that-must-not-be-logged";
    h.create_token_secret("good", &good).await;
    h.create_token_secret("bad", bad).await;
    h.create_listener("ok", "acme", "good", &["command"], ok.url().as_str(), None)
        .await;
    h.create_listener(
        "failing",
        "acme",
        "good",
        &["command"],
        failing.url().as_str(),
        None,
    )
    .await;
    h.create_listener(
        "invalid",
        "acme",
        "bad",
        &["command"],
        ok.url().as_str(),
        None,
    )
    .await;
    h.wait_ready("ok").await;
    h.wait_condition("invalid", "TokenValid", "False", "InvalidToken")
        .await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    ok.wait_for_requests(1, WAIT).await;
    let listeners = h.ns.api::<Listener>();
    eventually("the failure recorded", WAIT, || async {
        (listeners.get("failing").await.ok()?.status?.failed == 1).then_some(())
    })
    .await;
    h.admin.revoke_token(&good).await.unwrap();
    h.wait_gone("ok").await;

    let secret = h.client_secret("acme").await;
    let credentials = h.ns.api::<Secret>().get("acme-credentials").await.unwrap();
    let api_key = String::from_utf8(credentials.data.unwrap()["apiKey"].0.clone()).unwrap();

    let logs = operator.stop().await;
    assert!(
        logs.contains("forwarder started"),
        "the operator logged its work:\n{logs}"
    );
    let statuses =
        serde_json::to_string(&listeners.list(&Default::default()).await.unwrap().items).unwrap();
    let events = h.ns.api::<k8s_openapi::api::events::v1::Event>();
    let events =
        serde_json::to_string(&events.list(&Default::default()).await.unwrap().items).unwrap();
    for (what, value) in [
        ("token", good.as_str()),
        ("invalid token", bad),
        ("client secret", &secret),
        ("API key", &api_key),
    ] {
        assert!(
            !logs.contains(value),
            "the {what} is in the operator's logs"
        );
        assert!(!statuses.contains(value), "the {what} is in a Listener");
        assert!(!events.contains(value), "the {what} is in an Event");
    }
}

#[tokio::test]
async fn a_loopback_url_is_refused_by_default_and_recorded_as_failed() {
    let h = Harness::start_with("op-url-policy", Arc::new(SystemClock), &[]).await;
    let receiver = Receiver::start().await;
    one_listener(&h, &receiver, &["command"]).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    let listeners = h.ns.api::<Listener>();
    let status = eventually("failed=1 on the Listener", WAIT, || async {
        let status = listeners.get("hook").await.ok()?.status?;
        (status.failed == 1).then_some(status)
    })
    .await;
    let error = status.last_error.unwrap();
    assert!(error.contains("not allowed"), "{error}");
    assert_eq!(receiver.request_count(), 0, "nothing reached the receiver");
}

#[tokio::test]
async fn many_listeners_at_once_log_no_warnings_no_dumps_and_no_colour() {
    let ns = TestNamespace::new("op-quiet").await;
    let (sim, admin) = sim::start(Duration::from_millis(500)).await;
    let operator = OperatorProcess::spawn(&sim.base_url(), &ns.name, "text", "info", &[]);
    let h = Harness {
        ns,
        sim: Arc::new(sim),
        admin,
        operator: None,
    };
    let receiver = Receiver::start().await;
    h.create_user("acme", true, None).await;
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("t", &token).await;
    // Created all at once: finalizer adds, adoptions and status writes race one another.
    let names: Vec<String> = (0..60).map(|i| format!("hook-{i}")).collect();
    let url = receiver.url();
    futures::future::join_all(
        names
            .iter()
            .map(|name| h.create_listener(name, "acme", "t", &["command"], url.as_str(), None)),
    )
    .await;
    for name in &names {
        h.wait_ready(name).await;
    }
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(names.len(), WAIT).await;
    let logs = operator.stop().await;
    assert!(
        logs.contains("forwarder started"),
        "it logged its work:\n{logs}"
    );
    for line in logs.lines() {
        assert!(
            !line.contains(" WARN "),
            "an expected race was logged as a warning: {line}"
        );
        assert!(!line.contains(" ERROR "), "{line}");
        assert!(
            !line.contains('\u{1b}'),
            "a colour code in a log file: {line}"
        );
        assert!(!line.contains("Status {"), "a struct dump: {line}");
    }
}

#[tokio::test]
async fn usage_rolls_over_at_utc_midnight_without_a_delivery() {
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 23, 50, 0).unwrap());
    let h = Harness::start_with("op-rollover", Arc::new(clock.clone()), ALLOW_LOOPBACK).await;
    let receiver = Receiver::start().await;
    one_listener(&h, &receiver, &["command"]).await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    receiver.wait_for_requests(1, WAIT).await;
    let users = h.ns.api::<WebhookUser>();
    eventually("usage 1 on the 23rd", WAIT, || async {
        let usage = users.get("acme").await.ok()?.status?.usage?;
        (usage.day == "2026-11-23" && usage.deliveries == 1).then_some(())
    })
    .await;
    // Midnight passes with no event at all.
    clock.advance(chrono::Duration::minutes(20));
    eventually("usage 0 on the 24th", WAIT, || async {
        let usage = users.get("acme").await.ok()?.status?.usage?;
        (usage.day == "2026-11-24" && usage.deliveries == 0).then_some(())
    })
    .await;
    assert_eq!(receiver.request_count(), 1);
}
