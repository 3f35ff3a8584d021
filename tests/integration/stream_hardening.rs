//! The forwarder against event servers that misbehave: a redirect, a proxy in the environment,
//! a token no header can carry, an endless line, and data events with unexpected field types;
//! and the facade's token checks against an event server that does not answer. Every server
//! here is a real one on 127.0.0.1.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use crownstone_webhooks::api::{self, AdminKeySource};
use crownstone_webhooks::clock::SystemClock;
use crownstone_webhooks::crownstone::{StreamFrame, SystemCode};
use crownstone_webhooks::operator;
use crownstone_webhooks::resources::Listener;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use url::Url;

use crate::support::api::{registration, test_settings, Facade, Key};
use crate::support::cluster::{control_plane, eventually, TestNamespace};
use crate::support::operator::{test_args, Harness, ALLOW_LOOPBACK, WAIT};
use crate::support::receiver::{Receiver, Reply};
use crate::support::sim;

const SPHERE: &str = "sphere-1";

/// A harness whose operator streams from `events_url` instead of its simulator (which is
/// still there, for tokens and the helpers).
async fn harness_on(prefix: &str, events_url: &str, extra: &[&str]) -> Harness {
    let ns = TestNamespace::new(prefix).await;
    let (sim, admin) = sim::start(Duration::from_millis(500)).await;
    let operator = operator::start(
        ns.client.clone(),
        test_args(events_url, &ns.name, extra),
        Arc::new(SystemClock),
    )
    .await
    .expect("operator starts");
    Harness {
        ns,
        sim: Arc::new(sim),
        admin,
        operator: Some(operator),
    }
}

/// Waits until the Listener's `Streaming` condition is `False`/`Reconnecting` with a message
/// containing `needle`, and returns the message.
async fn wait_reconnecting_with(h: &Harness, listener: &str, needle: &str) -> String {
    let api = h.ns.api::<Listener>();
    eventually(
        &format!("{listener}: Streaming=False (Reconnecting) mentioning {needle:?}"),
        WAIT,
        || async {
            let l = api.get(listener).await.ok()?;
            let c = l.condition("Streaming")?;
            (c.status == "False" && c.reason == "Reconnecting" && c.message.contains(needle))
                .then(|| c.message.clone())
        },
    )
    .await
}

/// A user `acme`, a Secret holding `token`, and a Listener `name` on it for commands.
async fn listener_on(h: &Harness, name: &str, token: &str, receiver: &Receiver) {
    let secret = format!("{name}-token");
    h.create_token_secret(&secret, token).await;
    h.create_listener(
        name,
        "acme",
        &secret,
        &["command"],
        receiver.url().as_str(),
        None,
    )
    .await;
}

#[tokio::test]
async fn a_redirecting_event_server_never_gets_the_token_to_its_target() {
    let target = Receiver::start().await;
    let location = HeaderValue::from_str(target.url_with_path("/sse").as_str()).unwrap();
    let redirect =
        |status: StatusCode| Reply::WithHeaders(status, vec![(header::LOCATION, location.clone())]);
    // 301 and 307 are the ones eventsource-client would follow by itself; 302 the common one.
    let server = Receiver::scripted(
        [
            redirect(StatusCode::TEMPORARY_REDIRECT),
            redirect(StatusCode::MOVED_PERMANENTLY),
            redirect(StatusCode::FOUND),
        ],
        redirect(StatusCode::TEMPORARY_REDIRECT),
    )
    .await;
    let events_url = format!("http://{}", server.address());
    let h = harness_on("sh-redirect", &events_url, ALLOW_LOOPBACK).await;
    let token = "a-token-only-the-event-server-may-see";
    h.create_user("acme", true, None).await;
    let receiver = Receiver::start().await;
    listener_on(&h, "hook", token, &receiver).await;

    // Every kind of redirect answered, and reconnects after them.
    let asked = server.wait_for_requests(4, WAIT).await;
    let message = wait_reconnecting_with(&h, "hook", "redirect").await;
    assert!(message.contains("not followed"), "{message}");
    assert_eq!(asked[0].header("access_token"), Some(token));
    assert!(asked.iter().all(|r| r.path.starts_with("/sse")));

    // Only paths in the message: the requests' headers would hold the token.
    let paths: Vec<String> = target.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        target.request_count(),
        0,
        "the redirect target was asked: {paths:?}"
    );
}

/// The operator binary in a process of its own, killed when dropped.
struct OperatorProcess {
    child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl OperatorProcess {
    fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_proxy_from_the_environment_is_not_used() {
    let ns = TestNamespace::new("sh-env-proxy").await;
    let (sim, admin) = sim::start(Duration::from_millis(500)).await;
    // Records anything sent to it, as a proxy would see it.
    let proxy = Receiver::start().await;
    let proxy_url = format!("http://{}", proxy.address());
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = log.reopen().unwrap();
    // Its own process: the environment is process-wide, and other tests run in this one.
    // HTTPS_PROXY stays unset: the Kubernetes client would use it for the API server. The
    // event server is plain HTTP here, so HTTP_PROXY is what a transport would take.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
        .args([
            "controller",
            "--events-url",
            &sim.base_url(),
            "--watch-namespace",
            &ns.name,
            "--health-listen",
            "127.0.0.1:0",
            "--status-interval",
            "200ms",
            "--counters-interval",
            "200ms",
            "--reconnect-initial",
            "100ms",
            "--reconnect-max",
            "500ms",
            "--allow-private-destinations",
        ])
        .env("KUBECONFIG", &control_plane().kubeconfig)
        .env("RUST_LOG", "info")
        .env("HTTP_PROXY", &proxy_url)
        .env("http_proxy", &proxy_url)
        .env("ALL_PROXY", &proxy_url)
        .env("all_proxy", &proxy_url)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("operator binary starts");
    let process = OperatorProcess { child, log };
    let h = Harness {
        ns,
        sim: Arc::new(sim),
        admin,
        operator: None,
    };

    h.create_user("acme", true, None).await;
    let token = h.token("user-1", SPHERE).await;
    let receiver = Receiver::start().await;
    listener_on(&h, "hook", &token, &receiver).await;
    let ready = tokio::spawn({
        let api = h.ns.api::<Listener>();
        async move {
            eventually("hook: Ready=True (Forwarding)", WAIT, || async {
                let l = api.get("hook").await.ok()?;
                let c = l.condition("Ready")?;
                (c.status == "True" && c.reason == "Forwarding").then_some(())
            })
            .await
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "the Listener never became ready; operator logs:\n{}",
        process.logs()
    );
    // Events flow on the direct stream.
    let event = crownstone_webhooks::crownstone::samples::multi_switch(SPHERE);
    h.admin.publish(&[event]).await.unwrap();
    receiver.wait_for_requests(1, WAIT).await;

    let paths: Vec<String> = proxy.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        proxy.request_count(),
        0,
        "the proxy from the environment was used: {paths:?}"
    );
}

/// A forwarding HTTP proxy for plain-HTTP targets: takes absolute-form requests, sends them on,
/// streams the answers back, and remembers the urls it was asked for.
struct ForwardingProxy {
    address: std::net::SocketAddr,
    asked: Arc<std::sync::Mutex<Vec<String>>>,
    server: JoinHandle<()>,
}

impl ForwardingProxy {
    async fn start() -> ForwardingProxy {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("HTTP client");
        let state = (asked.clone(), http);
        let router = Router::new()
            .fallback(
                |State((asked, http)): State<(
                    Arc<std::sync::Mutex<Vec<String>>>,
                    reqwest::Client,
                )>,
                 request: axum::extract::Request| async move {
                    let url = request.uri().to_string();
                    asked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(url.clone());
                    let mut forwarded = http.request(request.method().clone(), &url);
                    for (name, value) in request.headers() {
                        if name != header::HOST {
                            forwarded = forwarded.header(name, value);
                        }
                    }
                    match forwarded.send().await {
                        Ok(answer) => {
                            let mut response = Response::builder().status(answer.status());
                            for (name, value) in answer.headers() {
                                response = response.header(name, value);
                            }
                            response
                                .body(Body::from_stream(answer.bytes_stream()))
                                .unwrap()
                        }
                        Err(_) => Response::builder()
                            .status(StatusCode::BAD_GATEWAY)
                            .body(Body::empty())
                            .unwrap(),
                    }
                },
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        ForwardingProxy {
            address,
            asked,
            server,
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for ForwardingProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test]
async fn a_configured_proxy_is_used() {
    let proxy = ForwardingProxy::start().await;
    let proxy_url = format!("http://{}", proxy.address);
    let h = Harness::start_with(
        "sh-events-proxy",
        Arc::new(SystemClock),
        &["--allow-private-destinations", "--events-proxy", &proxy_url],
    )
    .await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    let event = crownstone_webhooks::crownstone::samples::multi_switch(SPHERE);
    h.admin.publish(std::slice::from_ref(&event)).await.unwrap();
    let requests = receiver.wait_for_requests(1, WAIT).await;
    assert_eq!(requests[0].json()["data"], event);

    let stream = format!("{}/sse?projectName=", h.sim.base_url());
    let asked = proxy.asked();
    assert!(
        !asked.is_empty() && asked.iter().all(|url| url.starts_with(&stream)),
        "the proxy was asked for {asked:?}, not only {stream}…"
    );
}

#[tokio::test]
async fn a_token_no_header_can_carry_is_never_sent() {
    let h = Harness::start("sh-header").await;
    let receiver = Receiver::start().await;
    h.create_user("acme", true, None).await;
    // The Secret's value is trimmed; a line break inside it stays.
    listener_on(&h, "hook", "first-line\nsecond-line", &receiver).await;
    h.wait_condition("hook", "TokenValid", "False", "InvalidToken")
        .await;
    let listener = h.ns.api::<Listener>().get("hook").await.unwrap();
    let message = &listener.condition("TokenValid").unwrap().message;
    assert!(message.contains("header"), "{message}");
    assert_eq!(h.admin.stats().await.unwrap().streams_opened, 0);
}

/// An event server of the test's own: `GET /sse` answers 200 with the body `respond` makes
/// for the request's `access_token`, and connections are counted.
struct EventServer {
    address: std::net::SocketAddr,
    connections: watch::Receiver<usize>,
    server: JoinHandle<()>,
}

type BodyFor = Arc<dyn Fn(&str) -> Body + Send + Sync>;

impl EventServer {
    async fn start(respond: impl Fn(&str) -> Body + Send + Sync + 'static) -> EventServer {
        let (count, connections) = watch::channel(0);
        let respond: BodyFor = Arc::new(respond);
        let state = (Arc::new(count), respond);
        let router = Router::new()
            .route(
                "/sse",
                get(
                    |State((count, respond)): State<(Arc<watch::Sender<usize>>, BodyFor)>,
                     headers: HeaderMap| async move {
                        count.send_modify(|n| *n += 1);
                        let token = headers
                            .get("access_token")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default();
                        Response::builder()
                            .header(header::CONTENT_TYPE, "text/event-stream")
                            .header(header::CACHE_CONTROL, "no-cache")
                            .body(respond(token))
                            .unwrap()
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        EventServer {
            address,
            connections,
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn wait_for_connections(&self, n: usize) {
        let mut seen = self.connections.clone();
        let waited = tokio::time::timeout(WAIT, seen.wait_for(|c| *c >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "expected {n} connections, got {}",
            *self.connections.borrow()
        );
    }
}

impl Drop for EventServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn chunks(parts: Vec<Bytes>) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    futures::stream::iter(parts.into_iter().map(Ok))
}

#[tokio::test]
async fn an_endless_line_ends_the_connection_and_the_operator_goes_on() {
    const FRIENDLY: &str = "friendly-token";
    let event = crownstone_webhooks::crownstone::samples::multi_switch(SPHERE);
    let event_frame = crownstone_webhooks::crownstone::sse_frame(&event.to_string());
    let server = EventServer::start(move |token| {
        let start = StreamFrame::system(SystemCode::StreamStart).to_sse_bytes();
        if token == FRIENDLY {
            // A well-behaved stream: started, one event, then open.
            Body::from_stream(
                chunks(vec![start, event_frame.clone()]).chain(futures::stream::pending()),
            )
        } else {
            // Started, then one line of 8 MiB in 64 KiB pieces.
            let piece = Bytes::from(vec![b'x'; 64 * 1024]);
            let mut parts = vec![start];
            parts.extend(std::iter::repeat_n(piece, 128));
            Body::from_stream(chunks(parts))
        }
    })
    .await;
    let h = harness_on(
        "sh-endless",
        &server.url(),
        &[
            "--allow-private-destinations",
            "--stream-max-event-bytes",
            "1024",
        ],
    )
    .await;
    h.create_user("acme", true, None).await;
    let (hostile_receiver, friendly_receiver) = (Receiver::start().await, Receiver::start().await);
    listener_on(&h, "hostile", "hostile-token", &hostile_receiver).await;

    let message = wait_reconnecting_with(&h, "hostile", "line longer than 1024 bytes").await;
    assert!(message.contains("event server"), "{message}");
    // Reconnected after the cut, and still the same way.
    server.wait_for_connections(2).await;

    // The operator goes on: another stream on it delivers.
    listener_on(&h, "friendly", FRIENDLY, &friendly_receiver).await;
    h.wait_ready("friendly").await;
    let requests = friendly_receiver.wait_for_requests(1, WAIT).await;
    assert_eq!(requests[0].json()["data"], event);
    wait_reconnecting_with(&h, "hostile", "line longer than 1024 bytes").await;
    assert_eq!(hostile_receiver.request_count(), 0);
}

#[tokio::test]
async fn a_data_event_with_odd_field_types_arrives_unchanged() {
    let h = Harness::start("sh-odd-fields").await;
    let receiver = Receiver::start().await;
    h.ready_listener("hook", "acme", &["command"], &receiver.url())
        .await;
    let secret = h.client_secret("acme").await;

    // `code`, `counter` and `message` mean something on system and ping frames only.
    let event = json!({
        "type": "command",
        "subType": "multiSwitch",
        "code": "not-a-number",
        "counter": {"nested": [1, 2]},
        "message": 42,
        "sphere": {"id": SPHERE, "name": "Home", "uid": 1},
    });
    assert_eq!(
        h.admin.publish(std::slice::from_ref(&event)).await.unwrap(),
        [1]
    );

    let requests = receiver.wait_for_requests(1, WAIT).await;
    let expected = format!(
        r#"{{"clientId":"acme","clientSecret":"{secret}","userId":"user-1","data":{}}}"#,
        serde_json::to_string(&event).unwrap()
    );
    assert_eq!(String::from_utf8_lossy(&requests[0].body), expected);
    let body: Value = requests[0].json();
    assert_eq!(body["data"], event);
}

#[tokio::test]
async fn token_checks_beyond_the_bound_are_refused_and_the_running_one_goes_on() {
    // Every stream is answered 200 and then nothing, until the test lets STREAM_START through.
    let (release, released) = watch::channel(false);
    let server = EventServer::start(move |_token| {
        let mut released = released.clone();
        let start = StreamFrame::system(SystemCode::StreamStart).to_sse_bytes();
        let first = futures::stream::once(async move {
            let _ = released.wait_for(|r| *r).await;
            Ok::<_, Infallible>(start)
        });
        Body::from_stream(first.chain(futures::stream::pending()))
    })
    .await;
    let f = Arc::new(Facade::start("sh-check-bound").await);
    let acme = f.new_user("Acme").await;
    // A second facade on the same namespace, checking tokens one at a time with that server.
    let mut settings = test_settings(&f.h, AdminKeySource::None);
    settings.events_url = Url::parse(&server.url()).unwrap();
    settings.token_check_concurrency = 1;
    settings.token_check_timeout = WAIT;
    let bounded = api::start(f.h.ns.client.clone(), settings, None)
        .await
        .expect("the facade starts");
    assert!(bounded.wait_ready(WAIT).await, "the facade's caches sync");
    let base = format!("http://{}", bounded.addr());
    let receiver = Receiver::start().await;
    let register = |user_id: &str| {
        let (f, base, key) = (f.clone(), base.clone(), acme.api_key.clone());
        let body = registration("some-token", user_id, &["command"], receiver.url().as_str());
        async move {
            f.call_at(
                &base,
                reqwest::Method::POST,
                "/api/listeners",
                Key::Header("API_KEY", &key),
                Some(body.to_string().into_bytes()),
                Some("application/json"),
            )
            .await
        }
    };

    let first = tokio::spawn(register("user-1"));
    server.wait_for_connections(1).await;
    // The bound is taken: refused without a stream of its own, the first left as it was.
    let second = register("user-2").await;
    second.expect(503);
    assert!(
        second.message().contains("too many tokens"),
        "{}",
        second.text
    );
    assert!(!first.is_finished(), "the running check goes on");
    assert_eq!(
        *server.connections.borrow(),
        1,
        "the refused check opened no stream"
    );

    release.send(true).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.expect(200).json["userId"], "user-1");
    let metrics_base = format!(
        "http://{}",
        bounded.metrics_addr().expect("its own metrics server")
    );
    let metrics = f
        .call_at(
            &metrics_base,
            reqwest::Method::GET,
            "/metrics",
            Key::None,
            None,
            None,
        )
        .await
        .text;
    for series in [
        r#"crownstone_webhooks_api_token_checks_total{outcome="unreachable",via="busy"} 1"#,
        r#"crownstone_webhooks_api_token_checks_total{outcome="valid",via="stream"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == series),
            "{series} in:\n{metrics}"
        );
    }
    bounded.shutdown().await;
}
