//! A burst far above what one destination takes at once, on the real control plane: queues are
//! bounded by bytes, age and the operator's memory budget, not by a count, so the receiver gets
//! every delivery as fast as it takes them.

use std::collections::HashSet;
use std::time::Duration;

use crownstone_webhooks::crownstone::samples;

use crate::support::cluster::eventually;
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::Receiver;

const SPHERE: &str = "sphere-1";
/// Listeners of one owner on one token, all posting to one url.
const LISTENERS: usize = 100;
/// Events published at once on that token: each goes to every Listener.
const EVENTS: usize = 100;
const DELIVERIES: usize = LISTENERS * EVENTS;
/// Ample for 10,000 deliveries over loopback on a busy machine.
const DRAIN: Duration = Duration::from_secs(120);

fn series(name: &str, label: &str) -> String {
    format!("crownstone_webhooks_webhook_{name}{{{label}}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_thousand_deliveries_to_one_receiver_arrives_whole() {
    let h = Harness::start("burst").await;
    let receiver = Receiver::start().await;
    // An allowance above the burst: the default (1,000 a day) would skip the rest.
    h.create_user("platform", true, Some(1_000_000)).await;
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("platform-token", &token).await;
    let url = receiver.url();
    for n in 0..LISTENERS {
        h.create_listener(
            &format!("hook-{n:03}"),
            "platform",
            "platform-token",
            &["command"],
            url.as_str(),
            None,
        )
        .await;
    }
    for n in 0..LISTENERS {
        h.wait_ready(&format!("hook-{n:03}")).await;
    }
    h.wait_streams(1).await;

    // Every event at once: ten times what a destination held before queues were bounded by bytes.
    let events: Vec<_> = (0..EVENTS).map(|_| samples::multi_switch(SPHERE)).collect();
    h.admin.publish(&events).await.expect("publish the burst");
    let requests = receiver.wait_for_requests(DELIVERIES, DRAIN).await;

    let ids: HashSet<&str> = requests
        .iter()
        .filter_map(|request| request.header("webhook-id"))
        .collect();
    assert_eq!(ids.len(), DELIVERIES, "one delivery per event and Listener");
    h.wait_metric(
        &series("deliveries_total", r#"outcome="delivered""#),
        DELIVERIES as f64,
    )
    .await;
    for reason in ["queue_full", "budget", "expired"] {
        assert_eq!(
            h.metric(&series(
                "delivery_drops_total",
                &format!(r#"reason="{reason}""#)
            ))
            .await,
            0.0,
            "nothing dropped as {reason}"
        );
    }
    // Settled deliveries give their bytes back to the budget.
    eventually("the queues hold no bytes", WAIT, || async {
        let held = h
            .metric("crownstone_webhooks_webhook_delivery_queue_bytes")
            .await;
        (held == 0.0).then_some(())
    })
    .await;
}
