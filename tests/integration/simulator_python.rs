//! Crownstone's official Python client (`crownstone-sse`) against the simulator: it receives
//! events, and logs in again with its email and password when its token is revoked.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crownstone_webhooks::crownstone::samples::{self, Ability, PresenceChange};
use crownstone_webhooks::simulator::Scope;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::support::sim::{self, DEADLINE};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The interpreter of the project's Python environment, created on first use.
async fn python() -> PathBuf {
    let output = Command::new("bash")
        .arg(repo_root().join("hack/python-env.sh"))
        .current_dir(repo_root())
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("hack/python-env.sh runs");
    assert!(output.status.success(), "hack/python-env.sh failed");
    PathBuf::from(String::from_utf8(output.stdout).expect("a path").trim())
}

/// Reads the client's JSON lines until a line satisfies `wanted`, returning the lines read.
async fn read_until(
    lines: &mut Lines<BufReader<ChildStdout>>,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {seen:?}"))
            .expect("reading the client's output")
            .unwrap_or_else(|| panic!("the client exited before {what}; saw {seen:?}"));
        let event: Value = serde_json::from_str(&line).expect("one JSON event per line");
        let done = wanted(&event);
        seen.push(event);
        if done {
            return seen;
        }
    }
}

fn is_system(event: &Value, sub_type: &str) -> bool {
    event["type"] == "system" && event["subType"] == sub_type
}

#[tokio::test]
async fn simulator_works_with_crownstone_python_client() {
    let python = python().await;
    let (sim, client) = sim::start(Duration::from_secs(30)).await;
    let mut request = sim::token_request("py-user", &["py-sphere"], &[Scope::All], 3600);
    request.email = Some("python@example.com".into());
    request.password = Some("correct horse".into());
    let first_token = client.create_token(&request).await.unwrap().token;

    let before = vec![
        samples::switch_state_update("py-sphere", 30),
        samples::presence("py-sphere", "py-user", PresenceChange::EnterLocation),
        samples::ability_change("py-sphere", Ability::Switchcraft, true),
    ];
    let after = vec![
        samples::multi_switch("py-sphere"),
        samples::switch_state_update("py-sphere", 60),
    ];

    let mut child = Command::new(&python)
        .arg(repo_root().join("tests/integration/python/crownstone_client.py"))
        .arg(sim.base_url())
        .arg("python@example.com")
        .arg("correct horse")
        .arg(&first_token)
        .arg((before.len() + after.len()).to_string())
        .arg("60")
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the Python client starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();

    read_until(&mut lines, "STREAM_START", |e| is_system(e, "STREAM_START")).await;
    assert_eq!(client.publish(&before).await.unwrap(), [1, 1, 1]);
    let mut received = Vec::new();
    for _ in &before {
        let event = read_until(&mut lines, "an event", |e| e["type"] != "ping")
            .await
            .pop()
            .unwrap();
        received.push(event);
    }
    assert_eq!(received, before);

    // Revoked: the client sees TOKEN_EXPIRED, logs in at /api/users/login and reconnects.
    client.revoke_token(&first_token).await.unwrap();
    read_until(&mut lines, "the second STREAM_START", |e| {
        is_system(e, "STREAM_START")
    })
    .await;
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.logins, 1);
    assert_eq!(stats.open_streams, 1);

    // Only the new token's stream is open, so these reach the client through it.
    assert_eq!(client.publish(&after).await.unwrap(), [1, 1]);
    let mut received = Vec::new();
    for _ in &after {
        let event = read_until(&mut lines, "an event after the login", |e| {
            e["type"] != "ping"
        })
        .await
        .pop()
        .unwrap();
        received.push(event);
    }
    assert_eq!(received, after);

    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the client exits by itself")
        .expect("the client's status");
    assert!(status.success(), "the client exited with {status}");
}
