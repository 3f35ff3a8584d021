//! A real webhook receiver for tests: an axum server on `127.0.0.1:0` that records every request
//! (method, path, headers, body bytes) and answers from a script.
//!
//! ```ignore
//! let receiver = Receiver::scripted([Reply::status(503)], Reply::status(200)).await;
//! // … make the code under test POST to receiver.url() …
//! let requests = receiver.wait_for_requests(2, Duration::from_secs(10)).await;
//! assert_eq!(requests[1].header("webhook-id"), requests[0].header("webhook-id"));
//! ```
//!
//! A request is recorded as soon as its body has arrived, before it is answered, so a request
//! held by [`Reply::Hang`] is visible too. Dropping the receiver stops accepting connections.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use tokio::{sync::watch, task::JoinHandle};
use url::Url;

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, with an empty body.
    Status(StatusCode),
    /// This status with these headers, e.g. `Retry-After`.
    WithHeaders(StatusCode, Vec<(HeaderName, HeaderValue)>),
    /// Never answer: the request stays open until the client gives up.
    Hang,
    /// This status with this body.
    WithBody(StatusCode, &'static [u8]),
}

impl Reply {
    /// A plain status. Panics on a code outside 100..=999, which is a mistake in the test.
    pub fn status(code: u16) -> Self {
        Self::Status(status_code(code))
    }

    /// A status with `Retry-After: <seconds>`.
    pub fn retry_after(code: u16, seconds: u64) -> Self {
        Self::WithHeaders(
            status_code(code),
            vec![(axum::http::header::RETRY_AFTER, HeaderValue::from(seconds))],
        )
    }
}

fn status_code(code: u16) -> StatusCode {
    match StatusCode::from_u16(code) {
        Ok(status) => status,
        Err(_) => panic!("invalid status code {code}"),
    }
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The method.
    pub method: Method,
    /// The path and query, e.g. `/webhook?x=1`.
    pub path: String,
    /// Every header.
    pub headers: HeaderMap,
    /// The body, byte for byte.
    pub body: Bytes,
    /// When the body had arrived.
    pub received_at: std::time::Instant,
}

impl RecordedRequest {
    /// A header's value as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The body parsed as JSON; panics if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_slice(&self.body) {
            Ok(value) => value,
            Err(error) => panic!("request body is not JSON ({error}): {:?}", self.body),
        }
    }
}

struct Script {
    replies: VecDeque<Reply>,
    default: Reply,
}

struct ReceiverState {
    record_requests: bool,
    requests: Mutex<Vec<RecordedRequest>>,
    script: Mutex<Script>,
    count: watch::Sender<usize>,
}

/// A running receiver; see the module documentation.
pub struct Receiver {
    address: SocketAddr,
    state: Arc<ReceiverState>,
    server: JoinHandle<()>,
}

impl Receiver {
    /// A receiver that answers 200 to everything.
    pub async fn start() -> Self {
        Self::scripted([], Reply::status(200)).await
    }

    /// A receiver that answers with `replies` in order, then with `default`.
    pub async fn scripted(replies: impl IntoIterator<Item = Reply>, default: Reply) -> Self {
        Self::spawn(replies.into_iter().collect(), default, true).await
    }

    /// A receiver that answers `default` and only counts requests, without keeping them:
    /// for load tests. [`requests`](Self::requests) stays empty.
    pub async fn counting(default: Reply) -> Self {
        Self::spawn(VecDeque::new(), default, false).await
    }

    async fn spawn(replies: VecDeque<Reply>, default: Reply, record_requests: bool) -> Self {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(error) => panic!("cannot bind a receiver on 127.0.0.1: {error}"),
        };
        let address = match listener.local_addr() {
            Ok(address) => address,
            Err(error) => panic!("receiver has no local address: {error}"),
        };
        let (count, _) = watch::channel(0);
        let state = Arc::new(ReceiverState {
            record_requests,
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(Script { replies, default }),
            count,
        });
        let router = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                eprintln!("receiver stopped: {error}");
            }
        });
        Self {
            address,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:<port>/webhook`.
    pub fn url(&self) -> Url {
        self.url_with_path("/webhook")
    }

    /// The receiver's url with another path (and query), e.g. `"/hooks/a?x=1"`.
    pub fn url_with_path(&self, path_and_query: &str) -> Url {
        let text = format!("http://{}{}", self.address, path_and_query);
        match Url::parse(&text) {
            Ok(url) => url,
            Err(error) => panic!("invalid receiver url {text}: {error}"),
        }
    }

    /// The address the receiver listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// How many requests arrived so far.
    pub fn request_count(&self) -> usize {
        *self.state.count.borrow()
    }

    /// Waits until at least `count` requests arrived and returns them all; panics when
    /// `deadline` passes first.
    pub async fn wait_for_requests(
        &self,
        count: usize,
        deadline: Duration,
    ) -> Vec<RecordedRequest> {
        let mut seen = self.state.count.subscribe();
        let waited = tokio::time::timeout(deadline, seen.wait_for(|n| *n >= count)).await;
        if !matches!(waited, Ok(Ok(_))) {
            panic!(
                "expected {count} requests within {deadline:?}, got {}",
                self.request_count()
            );
        }
        self.requests()
    }

    /// Appends replies to the script.
    pub fn push_replies(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.state.script).replies.extend(replies);
    }

    /// Changes the reply given once the script is used up.
    pub fn set_default(&self, reply: Reply) {
        lock(&self.state.script).default = reply;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A poisoned lock only means another test thread panicked; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn handle(
    State(state): State<Arc<ReceiverState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if state.record_requests {
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| uri.path().to_owned());
        lock(&state.requests).push(RecordedRequest {
            method,
            path,
            headers,
            body,
            received_at: std::time::Instant::now(),
        });
    }
    state.count.send_modify(|count| *count += 1);
    let reply = {
        let mut script = lock(&state.script);
        let default = script.default.clone();
        script.replies.pop_front().unwrap_or(default)
    };
    match reply {
        Reply::Status(status) => status.into_response(),
        Reply::WithHeaders(status, headers) => {
            let mut response = status.into_response();
            response.headers_mut().extend(headers);
            response
        }
        Reply::Hang => std::future::pending().await,
        Reply::WithBody(status, body) => (status, body).into_response(),
    }
}
