//! Starting a simulator and reading its event streams byte by byte.

use std::time::Duration;

use bytes::Bytes;
use crownstone_webhooks::crownstone::{StreamFrame, SystemCode};
use crownstone_webhooks::simulator::{
    RunningSimulator, Scope, Simulator, SimulatorClient, SimulatorConfig, TokenRequest,
};
use futures::stream::BoxStream;
use futures::StreamExt;

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A simulator on a free port of 127.0.0.1 with `ping_interval`, and its admin client.
pub async fn start(ping_interval: Duration) -> (RunningSimulator, SimulatorClient) {
    start_with(SimulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ping_interval,
        ..SimulatorConfig::default()
    })
    .await
}

/// A simulator with `config`, and its admin client.
pub async fn start_with(config: SimulatorConfig) -> (RunningSimulator, SimulatorClient) {
    let sim = Simulator::start(config).await.expect("simulator starts");
    let client = SimulatorClient::new(&sim.base_url()).expect("admin client");
    (sim, client)
}

/// A token request for `user_id` on `spheres` with `scopes`, living `ttl_seconds`.
pub fn token_request(
    user_id: &str,
    spheres: &[&str],
    scopes: &[Scope],
    ttl_seconds: u64,
) -> TokenRequest {
    TokenRequest {
        user_id: user_id.to_owned(),
        spheres: spheres.iter().map(|s| s.to_string()).collect(),
        scopes: scopes.to_vec(),
        ttl_seconds,
        email: None,
        password: None,
    }
}

/// Issues a token and returns it.
pub async fn token(
    client: &SimulatorClient,
    user_id: &str,
    spheres: &[&str],
    scopes: &[Scope],
    ttl: u64,
) -> String {
    client
        .create_token(&token_request(user_id, spheres, scopes, ttl))
        .await
        .expect("token issued")
        .token
}

/// How a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The response ended cleanly.
    Clean,
    /// The connection was cut off.
    Aborted,
}

/// One `GET /sse` response, read chunk by chunk, split into `data:` frames.
pub struct RawStream {
    /// The response status.
    pub status: reqwest::StatusCode,
    /// The response headers.
    pub headers: reqwest::header::HeaderMap,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buffer: Vec<u8>,
    /// Every byte received so far, in order.
    pub received: Vec<u8>,
    ended: Option<StreamEnd>,
}

impl RawStream {
    /// Opens `{base}/sse{query}` with `headers`.
    pub async fn open(base: &str, query: &str, headers: &[(&str, &str)]) -> RawStream {
        let http = reqwest::Client::new();
        let mut request = http.get(format!("{base}/sse{query}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(DEADLINE, request.send())
            .await
            .expect("stream answers in time")
            .expect("stream request succeeds");
        RawStream {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
            received: Vec::new(),
            ended: None,
        }
    }

    /// Opens a stream with the token in the `access_token` header.
    pub async fn with_token(base: &str, token: &str) -> RawStream {
        RawStream::open(base, "", &[("access_token", token)]).await
    }

    /// The next `data:` payload, or how the stream ended. Panics past the deadline, or on
    /// anything on the wire that is not a `data:<json>\n\n` frame.
    pub async fn next_payload(&mut self) -> Result<String, StreamEnd> {
        loop {
            if let Some(pos) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buffer.drain(..pos + 2).collect();
                let text = String::from_utf8(frame).expect("frames are UTF-8");
                let payload = text
                    .strip_prefix("data:")
                    .and_then(|t| t.strip_suffix("\n\n"))
                    .unwrap_or_else(|| panic!("not a data frame: {text:?}"));
                assert!(!payload.contains('\n'), "one line per frame: {text:?}");
                return Ok(payload.to_owned());
            }
            if let Some(end) = &self.ended {
                assert!(
                    self.buffer.is_empty(),
                    "partial frame at the end: {:?}",
                    self.buffer
                );
                return Err(match end {
                    StreamEnd::Clean => StreamEnd::Clean,
                    StreamEnd::Aborted => StreamEnd::Aborted,
                });
            }
            match tokio::time::timeout(DEADLINE, self.body.next())
                .await
                .expect("a frame or the end arrives in time")
            {
                Some(Ok(chunk)) => {
                    self.received.extend_from_slice(&chunk);
                    self.buffer.extend_from_slice(&chunk);
                }
                Some(Err(_)) => self.ended = Some(StreamEnd::Aborted),
                None => self.ended = Some(StreamEnd::Clean),
            }
        }
    }

    /// The next frame, parsed; panics if the stream ended.
    pub async fn next_frame(&mut self) -> StreamFrame {
        match self.next_payload().await {
            Ok(payload) => StreamFrame::parse(&payload).expect("frame parses"),
            Err(end) => panic!("stream ended ({end:?}) where a frame was expected"),
        }
    }

    /// The next frame that is not a ping.
    pub async fn next_non_ping(&mut self) -> StreamFrame {
        loop {
            match self.next_frame().await {
                StreamFrame::Ping { .. } => continue,
                frame => return frame,
            }
        }
    }

    /// Asserts the next frame is the system frame `code` with its standard code and message.
    pub async fn expect_system(&mut self, code: SystemCode) {
        assert_eq!(self.next_frame().await, StreamFrame::system(code));
    }

    /// Asserts the next frame is a data frame and returns its JSON.
    pub async fn expect_data(&mut self) -> serde_json::Value {
        match self.next_non_ping().await {
            StreamFrame::Data { json, .. } => serde_json::from_slice(&json).expect("event JSON"),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Asserts the stream ends next, cleanly.
    pub async fn expect_clean_end(&mut self) {
        match self.next_payload().await {
            Err(StreamEnd::Clean) => {}
            other => panic!("expected the stream to end cleanly, got {other:?}"),
        }
    }

    /// Asserts `system` then a clean end: the shape of every refused or ended stream.
    pub async fn expect_final(&mut self, code: SystemCode) {
        self.expect_system(code).await;
        self.expect_clean_end().await;
    }
}

/// Waits until `check` holds for the simulator's stats, polling.
pub async fn wait_for_stats(
    client: &SimulatorClient,
    what: &str,
    check: impl Fn(&crownstone_webhooks::simulator::SimulatorStats) -> bool,
) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let stats = client.stats().await.expect("stats");
            if check(&stats) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}
