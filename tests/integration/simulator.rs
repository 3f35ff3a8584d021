//! The simulator's event stream and admin API over real HTTP.

use std::time::Duration;

use crownstone_webhooks::crownstone::samples::{
    self, Ability, ChangedItemKind, DataOperation, PresenceChange,
};
use crownstone_webhooks::crownstone::{StreamFrame, SystemCode};
use crownstone_webhooks::simulator::{Scope, SimulatorConfig};
use futures::StreamExt;
use serde_json::Value;

use crate::support::sim::{self, token, RawStream, StreamEnd, DEADLINE};

/// A ping interval long enough that no ping shows up during a test.
const NO_PINGS: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn simulator_stream_has_documented_headers_and_starts_with_stream_start() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    assert_eq!(stream.status, 200);
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("connection", "keep-alive"),
        ("x-accel-buffering", "no"),
    ] {
        assert_eq!(
            stream.headers.get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "header {name}"
        );
    }
    assert_eq!(
        stream.next_payload().await.unwrap(),
        r#"{"type":"system","subType":"STREAM_START","code":200,"message":"Stream Starting."}"#
    );
}

#[tokio::test]
async fn simulator_frames_are_byte_exact() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_system(SystemCode::StreamStart).await;

    let events = [
        samples::switch_state_update("s1", 42),
        samples::presence("s1", "u1", PresenceChange::EnterLocation),
    ];
    assert_eq!(client.publish(&events).await.unwrap(), [1, 1]);
    stream.expect_data().await;
    stream.expect_data().await;
    client.revoke_token(&t).await.unwrap();
    stream.expect_final(SystemCode::TokenExpired).await;

    let mut expected = String::new();
    expected.push_str("data:{\"type\":\"system\",\"subType\":\"STREAM_START\",\"code\":200,\"message\":\"Stream Starting.\"}\n\n");
    for event in &events {
        expected.push_str(&format!(
            "data:{}\n\n",
            serde_json::to_string(event).unwrap()
        ));
    }
    expected.push_str("data:{\"type\":\"system\",\"subType\":\"TOKEN_EXPIRED\",\"code\":401,\"message\":\"Token Expired.\"}\n\n");
    assert_eq!(
        String::from_utf8(stream.received.clone()).unwrap(),
        expected
    );
}

#[tokio::test]
async fn simulator_keeps_the_key_order_of_posted_events() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_system(SystemCode::StreamStart).await;
    // Posted by hand to control the text: key order as sent, whitespace between tokens removed.
    let posted = "{ \"type\": \"switchStateUpdate\",\n \"subType\": \"stone\", \"sphere\": {\"id\": \"s1\", \"name\": \"a  b\", \"uid\": 1},\n \"crownstone\": {\"id\": \"c\", \"percentage\": 5} }";
    let answer = reqwest::Client::new()
        .post(format!("{}/admin/events", sim.base_url()))
        .body(posted)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        serde_json::json!({"delivered": [1]})
    );
    assert_eq!(
        stream.next_payload().await.unwrap(),
        r#"{"type":"switchStateUpdate","subType":"stone","sphere":{"id":"s1","name":"a  b","uid":1},"crownstone":{"id":"c","percentage":5}}"#
    );
}

/// The four token sources, in order of precedence: (header, query parameter).
fn token_source(index: usize, token: &str) -> (Vec<(&'static str, String)>, String) {
    match index {
        0 => (vec![("access_token", token.to_owned())], String::new()),
        1 => (vec![("authorization", token.to_owned())], String::new()),
        2 => (vec![], format!("access_token={token}")),
        _ => (vec![], format!("accessToken={token}")),
    }
}

async fn open_with_sources(base: &str, sources: &[(usize, &str)]) -> RawStream {
    let mut headers = Vec::new();
    let mut query = Vec::new();
    for (index, token) in sources {
        let (h, q) = token_source(*index, token);
        headers.extend(h);
        if !q.is_empty() {
            query.push(q);
        }
    }
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    RawStream::open(base, &query, &headers).await
}

#[tokio::test]
async fn simulator_accepts_the_token_from_each_source() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    for source in 0..4 {
        let mut stream = open_with_sources(&sim.base_url(), &[(source, &t)]).await;
        stream.expect_system(SystemCode::StreamStart).await;
    }
    // `Authorization` is taken as is: a `Bearer ` prefix makes it another (unknown) token.
    let bearer = format!("Bearer {t}");
    let mut stream = RawStream::open(&sim.base_url(), "", &[("authorization", &bearer)]).await;
    stream.expect_final(SystemCode::InvalidAccessToken).await;
    // The project name is optional and changes nothing.
    let mut stream = RawStream::open(
        &sim.base_url(),
        &format!("?accessToken={t}&projectName=tests"),
        &[("project_name", "tests")],
    )
    .await;
    stream.expect_system(SystemCode::StreamStart).await;
}

#[tokio::test]
async fn simulator_token_sources_follow_their_precedence() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let bogus = "not-a-token";
    for higher in 0..4 {
        for lower in higher + 1..4 {
            let mut stream =
                open_with_sources(&sim.base_url(), &[(higher, &t), (lower, bogus)]).await;
            stream.expect_system(SystemCode::StreamStart).await;
            let mut stream =
                open_with_sources(&sim.base_url(), &[(higher, bogus), (lower, &t)]).await;
            stream.expect_final(SystemCode::InvalidAccessToken).await;
        }
    }
}

#[tokio::test]
async fn simulator_answers_a_missing_token_with_no_access_token() {
    let (sim, _client) = sim::start(NO_PINGS).await;
    for (query, headers) in [
        ("", vec![]),
        ("?accessToken=&access_token=", vec![("access_token", "")]),
        ("?projectName=p", vec![]),
    ] {
        let mut stream = RawStream::open(&sim.base_url(), query, &headers).await;
        assert_eq!(stream.status, 200);
        assert_eq!(
            stream.headers.get("content-type").unwrap(),
            "text/event-stream"
        );
        stream.expect_final(SystemCode::NoAccessToken).await;
    }
}

#[tokio::test]
async fn simulator_answers_an_unknown_token_with_invalid_access_token() {
    let (sim, _client) = sim::start(NO_PINGS).await;
    let mut stream = RawStream::with_token(&sim.base_url(), "unknown").await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.headers.get("x-accel-buffering").unwrap(), "no");
    stream.expect_final(SystemCode::InvalidAccessToken).await;
    assert_eq!(
        String::from_utf8(stream.received).unwrap(),
        "data:{\"type\":\"system\",\"subType\":\"INVALID_ACCESS_TOKEN\",\"code\":401,\"message\":\"No valid accessToken provided...\"}\n\n"
    );
}

#[tokio::test]
async fn simulator_pings_count_from_zero() {
    let (sim, client) = sim::start(Duration::from_millis(100)).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_system(SystemCode::StreamStart).await;
    for counter in 0..4 {
        assert_eq!(stream.next_frame().await, StreamFrame::Ping { counter });
    }
    // Each stream counts on its own.
    let mut second = RawStream::with_token(&sim.base_url(), &t).await;
    second.expect_system(SystemCode::StreamStart).await;
    assert_eq!(second.next_frame().await, StreamFrame::Ping { counter: 0 });
}

#[tokio::test]
async fn simulator_checks_expiry_at_connect() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 0).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_system(SystemCode::StreamStart).await;
    stream.expect_final(SystemCode::TokenExpired).await;
    assert_eq!(client.stats().await.unwrap().open_streams, 0);
}

#[tokio::test]
async fn simulator_checks_expiry_at_each_ping() {
    let (sim, client) = sim::start(Duration::from_millis(100)).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 1).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_system(SystemCode::StreamStart).await;
    let mut expected_counter = 0;
    loop {
        match stream.next_frame().await {
            StreamFrame::Ping { counter } => {
                assert_eq!(counter, expected_counter);
                expected_counter += 1;
            }
            frame => {
                assert_eq!(frame, StreamFrame::system(SystemCode::TokenExpired));
                break;
            }
        }
    }
    stream.expect_clean_end().await;
    sim::wait_for_stats(&client, "the stream to close", |s| s.open_streams == 0).await;
}

#[tokio::test]
async fn simulator_checks_expiry_at_each_dispatch() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 1).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_system(SystemCode::StreamStart).await;
    let event = samples::switch_state_update("s1", 7);
    let mut saw_events = 0;
    tokio::time::timeout(DEADLINE, async {
        loop {
            let delivered = client.publish(std::slice::from_ref(&event)).await.unwrap();
            match stream.next_frame().await {
                StreamFrame::Data { .. } => {
                    assert_eq!(delivered, [1]);
                    saw_events += 1;
                }
                frame => {
                    // The dispatch that found the token expired delivered nothing.
                    assert_eq!(delivered, [0]);
                    assert_eq!(frame, StreamFrame::system(SystemCode::TokenExpired));
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the token expires");
    assert!(saw_events > 0, "events flowed before the expiry");
    stream.expect_clean_end().await;
}

#[tokio::test]
async fn simulator_routes_events_by_sphere() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let a = token(&client, "u1", &["sphere-a"], &[Scope::All], 600).await;
    let b = token(&client, "u2", &["sphere-b"], &[Scope::All], 600).await;
    let both = token(&client, "u3", &["sphere-a", "sphere-b"], &[Scope::All], 600).await;
    let mut sa = RawStream::with_token(&sim.base_url(), &a).await;
    let mut sb = RawStream::with_token(&sim.base_url(), &b).await;
    let mut sab = RawStream::with_token(&sim.base_url(), &both).await;
    for s in [&mut sa, &mut sb, &mut sab] {
        s.expect_system(SystemCode::StreamStart).await;
    }
    let mut no_sphere = samples::multi_switch("sphere-a");
    no_sphere.as_object_mut().unwrap().remove("sphere");
    let mut no_sphere_id = samples::multi_switch("sphere-a");
    no_sphere_id["sphere"].as_object_mut().unwrap().remove("id");
    let delivered = client
        .publish(&[
            samples::switch_state_update("sphere-a", 1),
            samples::switch_state_update("sphere-b", 2),
            samples::switch_state_update("sphere-c", 3),
            no_sphere,
            no_sphere_id,
            samples::switch_state_update("sphere-a", 4),
        ])
        .await
        .unwrap();
    assert_eq!(delivered, [2, 2, 0, 0, 0, 2]);
    let percentage = |e: Value| e["crownstone"]["percentage"].as_u64().unwrap();
    assert_eq!(percentage(sa.expect_data().await), 1);
    assert_eq!(percentage(sa.expect_data().await), 4);
    assert_eq!(percentage(sb.expect_data().await), 2);
    for expected in [1, 2, 4] {
        assert_eq!(percentage(sab.expect_data().await), expected);
    }
    // Nothing else is queued for the single-sphere streams: the next frame after a marker is it.
    client.revoke_token(&a).await.unwrap();
    sa.expect_final(SystemCode::TokenExpired).await;
}

/// `type/subType` (or `type/operation`) of an event, for comparing lists.
fn kind(event: &Value) -> String {
    let detail = event
        .get("subType")
        .or_else(|| event.get("operation"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    format!("{}/{}", event["type"].as_str().unwrap_or_default(), detail)
}

#[tokio::test]
async fn simulator_filters_by_scope_end_to_end() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let cases: Vec<(&[Scope], Vec<&str>)> = vec![
        (
            &[Scope::UserLocation],
            vec![
                "presence/enterSphere",
                "presence/exitSphere",
                "presence/enterLocation",
                "presence/exitLocation",
            ],
        ),
        (&[Scope::SwitchStone], vec!["command/multiSwitch"]),
        (
            &[Scope::StoneInformation],
            vec![
                "dataChange/stones",
                "dataChange/stones",
                "dataChange/stones",
                "abilityChange/dimming",
                "abilityChange/switchcraft",
                "abilityChange/tapToToggle",
                "switchStateUpdate/stone",
            ],
        ),
        (
            &[Scope::UserInformation],
            vec!["dataChange/users", "dataChange/users", "dataChange/users"],
        ),
        (
            &[Scope::LocationInformation, Scope::SwitchStone],
            vec![
                "command/multiSwitch",
                "dataChange/locations",
                "dataChange/locations",
                "dataChange/locations",
            ],
        ),
        (&[Scope::PowerConsumption, Scope::UserId], vec![]),
    ];
    for (i, (scopes, expected)) in cases.into_iter().enumerate() {
        let sphere = format!("scope-sphere-{i}");
        let t = token(&client, "owner", &[&sphere], scopes, 600).await;
        let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
        stream.expect_system(SystemCode::StreamStart).await;
        let mut events = samples::every_event(&sphere, "owner");
        // The same events about another user pass no owner-bound scope.
        events.extend(
            PresenceChange::ALL
                .into_iter()
                .map(|c| samples::presence(&sphere, "someone-else", c)),
        );
        events.push(samples::data_change(
            &sphere,
            ChangedItemKind::Users,
            DataOperation::Update,
            "someone-else",
        ));
        events.push(samples::sphere_tokens_changed(&sphere));
        let delivered: usize = client.publish(&events).await.unwrap().iter().sum();
        let mut received = Vec::new();
        for _ in 0..delivered {
            let event = stream.expect_data().await;
            if let Some(user) = event.get("user") {
                assert_eq!(user["id"], "owner");
            }
            received.push(kind(&event));
        }
        assert_eq!(received, expected, "scopes {scopes:?}");
    }

    // `all` lets everything through, other types included.
    let t = token(&client, "owner", &["everything"], &[Scope::All], 600).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_system(SystemCode::StreamStart).await;
    let mut events = samples::every_event("everything", "owner");
    events.push(samples::sphere_tokens_changed("everything"));
    events.push(samples::ability_change(
        "everything",
        Ability::Dimming,
        false,
    ));
    let delivered = client.publish(&events).await.unwrap();
    assert!(delivered.iter().all(|n| *n == 1));
    for event in &events {
        assert_eq!(kind(&stream.expect_data().await), kind(event));
    }
}

#[tokio::test]
async fn simulator_revocation_ends_streams_and_later_connects() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let revoked = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let kept = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut first = RawStream::with_token(&sim.base_url(), &revoked).await;
    let mut second = RawStream::with_token(&sim.base_url(), &revoked).await;
    let mut other = RawStream::with_token(&sim.base_url(), &kept).await;
    for s in [&mut first, &mut second, &mut other] {
        s.expect_system(SystemCode::StreamStart).await;
    }
    client.revoke_token(&revoked).await.unwrap();
    first.expect_final(SystemCode::TokenExpired).await;
    second.expect_final(SystemCode::TokenExpired).await;

    assert_eq!(
        client
            .publish(&[samples::switch_state_update("s1", 9)])
            .await
            .unwrap(),
        [1]
    );
    assert_eq!(other.expect_data().await["crownstone"]["percentage"], 9);

    let mut later = RawStream::with_token(&sim.base_url(), &revoked).await;
    later.expect_system(SystemCode::StreamStart).await;
    later.expect_final(SystemCode::TokenExpired).await;

    // Revoking twice is fine; an unknown token is a 404.
    client.revoke_token(&revoked).await.unwrap();
    let err = client.revoke_token("unknown").await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

#[tokio::test]
async fn simulator_outage_answers_new_streams_with_no_connection() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut open = RawStream::with_token(&sim.base_url(), &t).await;
    open.expect_system(SystemCode::StreamStart).await;

    client.set_outage(true).await.unwrap();
    assert!(client.stats().await.unwrap().outage);
    let mut refused = RawStream::with_token(&sim.base_url(), &t).await;
    assert_eq!(refused.status, 200);
    refused.expect_final(SystemCode::NoConnection).await;
    // Streams already open go on.
    assert_eq!(
        client
            .publish(&[samples::switch_state_update("s1", 3)])
            .await
            .unwrap(),
        [1]
    );
    open.expect_data().await;

    client.set_outage(false).await.unwrap();
    let mut back = RawStream::with_token(&sim.base_url(), &t).await;
    back.expect_system(SystemCode::StreamStart).await;
}

#[tokio::test]
async fn simulator_no_connection_flag_refuses_every_stream() {
    let (sim, client) = sim::start_with(SimulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        no_connection: true,
        ..SimulatorConfig::default()
    })
    .await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_final(SystemCode::NoConnection).await;
    assert!(client.stats().await.unwrap().outage);
}

#[tokio::test]
async fn simulator_drops_streams_without_a_frame() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut a = RawStream::with_token(&sim.base_url(), &t).await;
    let mut b = RawStream::with_token(&sim.base_url(), &t).await;
    a.expect_system(SystemCode::StreamStart).await;
    b.expect_system(SystemCode::StreamStart).await;
    assert_eq!(client.drop_streams().await.unwrap(), 2);
    assert_eq!(a.next_payload().await, Err(StreamEnd::Aborted));
    assert_eq!(b.next_payload().await, Err(StreamEnd::Aborted));
    assert_eq!(client.stats().await.unwrap().open_streams, 0);
    // The token still works: a client reconnects.
    let mut again = RawStream::with_token(&sim.base_url(), &t).await;
    again.expect_system(SystemCode::StreamStart).await;
}

#[tokio::test]
async fn simulator_reports_stats() {
    let (sim, client) = sim::start(NO_PINGS).await;
    assert_eq!(client.stats().await.unwrap().open_streams, 0);
    let t = token(&client, "u1", &["s1"], &[Scope::SwitchStone], 600).await;
    let mut a = RawStream::with_token(&sim.base_url(), &t).await;
    let mut b = RawStream::with_token(&sim.base_url(), &t).await;
    a.expect_system(SystemCode::StreamStart).await;
    b.expect_system(SystemCode::StreamStart).await;
    let delivered = client
        .publish(&[
            samples::multi_switch("s1"),
            samples::switch_state_update("s1", 1),
            samples::multi_switch("elsewhere"),
        ])
        .await
        .unwrap();
    assert_eq!(delivered, [2, 0, 0]);
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.open_streams, 2);
    assert_eq!(stats.streams_opened, 2);
    assert_eq!(stats.events_published, 3);
    assert_eq!(stats.events_dispatched, 1);
    assert_eq!(stats.frames_delivered, 2);
    assert_eq!(stats.tokens, 1);
    assert!(!stats.outage);
    drop(a);
    sim::wait_for_stats(&client, "a closed stream to be counted", |s| {
        s.open_streams == 1
    })
    .await;
}

#[tokio::test]
async fn simulator_rejects_bad_admin_input_with_json_errors() {
    let (sim, _client) = sim::start(NO_PINGS).await;
    let http = reqwest::Client::new();
    let base = sim.base_url();
    let valid_token = r#"{"userId":"u","spheres":["s"],"scopes":["all"],"ttlSeconds":60}"#;
    let cases: Vec<(reqwest::Method, &str, &str, u16)> = vec![
        (reqwest::Method::POST, "/admin/tokens", "{", 400),
        (reqwest::Method::POST, "/admin/tokens", "", 400),
        (
            reqwest::Method::POST,
            "/admin/tokens",
            r#"{"userId":"u"}"#,
            422,
        ),
        (
            reqwest::Method::POST,
            "/admin/tokens",
            r#"{"userId":"u","spheres":["s"],"scopes":["everything"],"ttlSeconds":60}"#,
            422,
        ),
        (
            reqwest::Method::POST,
            "/admin/tokens",
            r#"{"userId":"","spheres":["s"],"scopes":["all"],"ttlSeconds":60}"#,
            422,
        ),
        (
            reqwest::Method::POST,
            "/admin/tokens",
            r#"{"userId":"u","spheres":["s"],"scopes":["all"],"ttlSeconds":-1}"#,
            422,
        ),
        (
            reqwest::Method::POST,
            "/admin/tokens",
            r#"{"userId":"u","spheres":["s"],"scopes":["all"],"ttlSeconds":60,"email":"a@b.c"}"#,
            422,
        ),
        (
            reqwest::Method::POST,
            "/admin/tokens",
            r#"{"userId":"u","spheres":["s"],"scopes":["all"],"ttlSeconds":60,"extra":1}"#,
            422,
        ),
        (reqwest::Method::POST, "/admin/events", "nope", 400),
        (reqwest::Method::POST, "/admin/events", "[]", 422),
        (
            reqwest::Method::POST,
            "/admin/events",
            r#"{"events":[1]}"#,
            422,
        ),
        (
            reqwest::Method::POST,
            "/admin/events",
            r#"{"events":{"type":"x"}}"#,
            422,
        ),
        (
            reqwest::Method::PUT,
            "/admin/outage",
            r#"{"enabled":"yes"}"#,
            422,
        ),
        (reqwest::Method::PUT, "/admin/outage", "{}", 422),
        (reqwest::Method::DELETE, "/admin/tokens/unknown", "", 404),
        (reqwest::Method::POST, "/api/users/login", "{}", 422),
        (reqwest::Method::POST, "/api/users/login", "x", 400),
    ];
    for (method, path, body, status) in cases {
        let answer = http
            .request(method.clone(), format!("{base}{path}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), status, "{method} {path} {body}");
        let json: Value = answer.json().await.unwrap();
        assert_eq!(json["error"]["statusCode"], status, "{json}");
        assert!(json["error"]["message"].is_string(), "{json}");
        assert!(json["error"]["name"].is_string(), "{json}");
    }
    // A valid request still works afterwards: nothing panicked.
    let answer = http
        .post(format!("{base}/admin/tokens"))
        .body(valid_token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 201);
    let grant: Value = answer.json().await.unwrap();
    let token = grant["token"].as_str().unwrap();
    assert_eq!(token.len(), 64);
    assert!(token.chars().all(|c| c.is_ascii_alphanumeric()));
    assert!(chrono::DateTime::parse_from_rfc3339(grant["expiresAt"].as_str().unwrap()).is_ok());
}

#[tokio::test]
async fn simulator_login_issues_a_fresh_token_on_the_same_terms() {
    use sha1::Digest;
    let (sim, client) = sim::start(NO_PINGS).await;
    let mut request = sim::token_request("u7", &["s7"], &[Scope::SwitchStone], 600);
    request.email = Some("user@example.com".into());
    request.password = Some("hunter2".into());
    let original = client.create_token(&request).await.unwrap().token;
    let http = reqwest::Client::new();
    let login = |password: String| {
        let http = http.clone();
        let url = format!("{}/api/users/login", sim.base_url());
        async move {
            http.post(url)
                .json(&serde_json::json!({"email": "user@example.com", "password": password}))
                .send()
                .await
                .unwrap()
        }
    };
    let digest = hex::encode(sha1::Sha1::digest(b"hunter2"));
    let answer = login(digest).await;
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    let fresh = body["id"].as_str().unwrap().to_owned();
    assert_ne!(fresh, original);
    assert_eq!(body["userId"], "u7");
    assert_eq!(body["ttl"], 600);

    let mut stream = RawStream::with_token(&sim.base_url(), &fresh).await;
    stream.expect_system(SystemCode::StreamStart).await;
    let delivered = client
        .publish(&[
            samples::switch_state_update("s7", 1),
            samples::multi_switch("s7"),
        ])
        .await
        .unwrap();
    assert_eq!(delivered, [0, 1], "the fresh token has the same scopes");
    assert_eq!(stream.expect_data().await["type"], "command");

    for wrong in [
        hex::encode(sha1::Sha1::digest(b"wrong")),
        "hunter2".to_owned(),
    ] {
        let answer = login(wrong).await;
        assert_eq!(answer.status(), 401);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"statusCode": 401, "name": "Error", "message": "login failed", "code": "LOGIN_FAILED"}})
        );
    }
    assert_eq!(client.stats().await.unwrap().logins, 1);
}

#[tokio::test]
async fn simulator_shutdown_closes_streams_with_stream_closed() {
    let (sim, client) = sim::start(NO_PINGS).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut stream = RawStream::with_token(&sim.base_url(), &t).await;
    stream.expect_system(SystemCode::StreamStart).await;
    let shutdown = tokio::spawn(sim.shutdown());
    stream.expect_final(SystemCode::StreamClosed).await;
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown completes")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn simulator_closes_streams_that_cannot_keep_up() {
    let (sim, client) = sim::start_with(SimulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ping_interval: NO_PINGS,
        stream_buffer: 4,
        ..SimulatorConfig::default()
    })
    .await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let mut stalled = RawStream::with_token(&sim.base_url(), &t).await;
    stalled.expect_system(SystemCode::StreamStart).await;
    // Large events fill the socket buffers quickly, as the reader never reads.
    let mut big = samples::switch_state_update("s1", 1);
    big["padding"] = "x".repeat(256 * 1024).into();
    let batch = vec![big; 16];
    tokio::time::timeout(Duration::from_secs(30), async {
        while client.stats().await.unwrap().slow_streams_closed == 0 {
            client.publish(&batch).await.unwrap();
        }
    })
    .await
    .expect("the stalled stream is closed");
    assert_eq!(client.stats().await.unwrap().open_streams, 0);
    // What was buffered can still be read, then the connection is cut without a frame.
    let end = loop {
        match stalled.next_payload().await {
            Ok(payload) => assert!(payload.contains("\"padding\"")),
            Err(end) => break end,
        }
    };
    assert_eq!(end, StreamEnd::Aborted);
}

#[tokio::test]
async fn simulator_serves_eventsource_client() {
    use eventsource_client::{Client, ClientBuilder, ReconnectOptions, SSE};

    let (sim, client) = sim::start(Duration::from_millis(200)).await;
    let t = token(&client, "u1", &["s1"], &[Scope::All], 600).await;
    let transport = launchdarkly_sdk_transport::HyperTransport::builder()
        .disable_proxy()
        .build_http()
        .unwrap();
    let es = ClientBuilder::for_url(&format!("{}/sse", sim.base_url()))
        .unwrap()
        .header("access_token", &t)
        .unwrap()
        .reconnect(ReconnectOptions::reconnect(false).build())
        .build_with_transport(transport);
    let mut events = es.stream();
    let mut next_data = async || -> String {
        loop {
            match tokio::time::timeout(DEADLINE, events.next())
                .await
                .expect("an event in time")
            {
                Some(Ok(SSE::Event(event))) => {
                    assert_eq!(event.event_type, "message");
                    assert_eq!(event.id, None);
                    return event.data;
                }
                Some(Ok(_)) => continue,
                other => panic!("stream failed: {other:?}"),
            }
        }
    };
    assert_eq!(
        StreamFrame::parse(&next_data().await).unwrap(),
        StreamFrame::system(SystemCode::StreamStart)
    );
    let sent = samples::every_event("s1", "u1");
    client.publish(&sent).await.unwrap();
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let data = next_data().await;
        if let StreamFrame::Data { json, .. } = StreamFrame::parse(&data).unwrap() {
            received.push(String::from_utf8_lossy(&json).into_owned());
        }
    }
    let sent: Vec<String> = sent.iter().map(|e| e.to_string()).collect();
    assert_eq!(received, sent);
    // Pings reach the client too.
    loop {
        if let StreamFrame::Ping { counter } = StreamFrame::parse(&next_data().await).unwrap() {
            assert_eq!(counter, 0);
            break;
        }
    }
}

/// Opens many streams and publishes many events, printing what the simulator sustains. Run with
/// `cargo test --release --test integration simulator_load -- --ignored --nocapture`; set
/// `SIM_LOAD_URL` to measure a simulator running in its own process (10,000 streams need more
/// file descriptors than one process may have when both ends live in it), `SIM_LOAD_STREAMS`
/// and `SIM_LOAD_SPHERES` to change the number of streams and of spheres they are spread over
/// (each event goes to streams / spheres streams).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a test"]
async fn simulator_load_measurement() {
    use crownstone_webhooks::simulator::SimulatorClient;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let streams: usize = std::env::var("SIM_LOAD_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let spheres: usize = std::env::var("SIM_LOAD_SPHERES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let (_local, base) = match std::env::var("SIM_LOAD_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let (sim, _) = sim::start(Duration::from_secs(30)).await;
            let base = sim.base_url();
            (Some(sim), base)
        }
    };
    let client = SimulatorClient::new(&base).unwrap();
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let before = client.stats().await.unwrap();
    let mut tokens = Vec::new();
    for s in 0..spheres {
        tokens.push(token(&client, "u1", &[&format!("load-{s}")], &[Scope::All], 3600).await);
    }
    let started = std::time::Instant::now();
    let counted = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 0..streams {
        let token = tokens[i % spheres].clone();
        let counted = Arc::clone(&counted);
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(
                format!("GET /sse HTTP/1.1\r\nHost: x\r\naccess_token: {token}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let frames = buf[..n].windows(2).filter(|w| w == b"\n\n").count();
                        counted.fetch_add(frames as u64, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    sim::wait_for_stats(&client, "every stream to open", |s| {
        s.open_streams >= before.open_streams + streams
    })
    .await;
    println!("opened {streams} streams in {:?}", started.elapsed());

    let batch: Vec<Value> = (0..2000)
        .map(|i| samples::switch_state_update(&format!("load-{}", i % spheres), 50))
        .collect();
    let batches = 50;
    let started = std::time::Instant::now();
    let mut frames = 0;
    for _ in 0..batches {
        frames += client.publish(&batch).await.unwrap().iter().sum::<usize>();
    }
    let elapsed = started.elapsed();
    let events = batches * batch.len();
    println!(
        "dispatched {events} events ({frames} frames queued) in {elapsed:?}: {:.0} events/s, {:.0} frames/s",
        events as f64 / elapsed.as_secs_f64(),
        frames as f64 / elapsed.as_secs_f64()
    );
    // Frames counted by the readers: STREAM_START plus every event (pings are rare at 30 s).
    let expected = (streams + frames) as u64;
    let read_started = std::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(120), async {
        while counted.load(Ordering::Relaxed) < expected {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    println!(
        "readers got {} of {expected} frames, {:?} after the last publish",
        counted.load(Ordering::Relaxed),
        read_started.elapsed()
    );
    let stats = client.stats().await.unwrap();
    println!("stats: {stats:?}");
    drop(readers);
}
