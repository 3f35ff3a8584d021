//! One forwarder: holds a token's event stream open, routes each data event to the delivery
//! engine, and turns the stream's system frames into state changes and notices.
//!
//! The token goes only to the configured event server: in a header (a url ends up in proxy
//! logs), never through a redirect, and never through a proxy taken from the environment.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eventsource_client::{Client, ClientBuilder, ReconnectOptions, SSE};
use futures::StreamExt;
use launchdarkly_sdk_transport::{HttpTransport, HyperTransport};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::transport::{BoundedTransport, SharedTransport, TooLong};
use super::{
    Backoff, InvalidTokenCause, Shared, StreamSettings, StreamState, Token, TokenHash, TokenNotice,
};
use crate::crownstone::{EventType, StreamFrame, SystemCode};
use crate::domain::Skip;
use crate::http1::Http1Transport;
use crate::index::Routed;

/// The longest `Reconnecting` reason, in characters: it ends up in a Listener condition, and
/// part of it can come from the event server or the network.
const MAX_REASON_CHARS: usize = 256;

/// How long opening a TCP connection to the event server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How one connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StreamEnd {
    /// `TOKEN_EXPIRED`.
    Expired,
    /// `INVALID_ACCESS_TOKEN` (or `NO_ACCESS_TOKEN`, which only a broken Secret can cause).
    InvalidToken,
    /// Anything to retry: `NO_CONNECTION`, `STREAM_CLOSED`, a dropped connection, silence.
    Retry {
        reason: String,
        /// Whether the stream had started: a connection that worked resets the backoff.
        was_streaming: bool,
    },
}

/// What one parsed frame means for the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FrameOutcome {
    /// A forwardable event: route it and submit it for delivery.
    Deliver(EventType),
    /// Nothing to do: a ping, an internal event, a system frame this code does not know.
    Ignore,
    /// `STREAM_START`: the server accepted the token and events follow.
    Started,
    /// The server ends the stream.
    End(StreamEnd),
}

/// Decides what a frame means, given whether `STREAM_START` was seen on this connection.
/// Pure, so the protocol's rules are tested without a server.
fn decide(frame: &StreamFrame, streaming: bool) -> FrameOutcome {
    match frame {
        // Only a stream the server has opened for the token carries its events: anything
        // before `STREAM_START` is not vouched for.
        StreamFrame::Data {
            event_type: Some(event_type),
            ..
        } if streaming => FrameOutcome::Deliver(*event_type),
        StreamFrame::Data { .. } | StreamFrame::Ping { .. } => FrameOutcome::Ignore,
        StreamFrame::System { code, .. } => match code {
            SystemCode::StreamStart => FrameOutcome::Started,
            SystemCode::TokenExpired => FrameOutcome::End(StreamEnd::Expired),
            SystemCode::InvalidAccessToken | SystemCode::NoAccessToken => {
                FrameOutcome::End(StreamEnd::InvalidToken)
            }
            code if code.ends_stream() => FrameOutcome::End(StreamEnd::Retry {
                reason: format!("the event server sent {}", code.as_str()),
                was_streaming: streaming,
            }),
            // A newer server's notice: the server keeps the stream open, so do we.
            _ => FrameOutcome::Ignore,
        },
    }
}

/// Runs until cancelled, or until the token turns out invalid or expired.
pub(super) async fn run(
    shared: Arc<Shared>,
    token: Token,
    state: Arc<Mutex<StreamState>>,
    cancel: CancellationToken,
) {
    let hash = token.hash();
    // A token an HTTP header cannot carry is never sent, and retrying cannot fix it.
    if http::HeaderValue::from_str(token.expose()).is_err() {
        tracing::warn!(token = %hash, "the token cannot be an HTTP header value; not sending it");
        set_state(
            &shared,
            hash,
            &state,
            StreamState::InvalidToken(InvalidTokenCause::NotAHeaderValue),
        );
        return;
    }
    let settings = &shared.settings;
    let mut backoff = Backoff::new(settings.reconnect_initial, settings.reconnect_max);
    // Once per forwarder, so reconnects reuse the transport's connection pool. Settings that
    // cannot work are reported like any failed connection; they show on the Listener.
    loop {
        let end = match &shared.endpoint {
            Ok((url, transport)) => tokio::select! {
                _ = cancel.cancelled() => return,
                end = connect_and_forward(&shared, &token, url, transport, &state) => end,
            },
            Err(reason) => StreamEnd::Retry {
                reason: reason.clone(),
                was_streaming: false,
            },
        };
        match end {
            StreamEnd::Expired => {
                tracing::info!(token = %hash, "token expired");
                set_state(&shared, hash, &state, StreamState::Expired);
                return;
            }
            StreamEnd::InvalidToken => {
                tracing::warn!(token = %hash, "event server refused the token; not retrying until it changes");
                set_state(
                    &shared,
                    hash,
                    &state,
                    StreamState::InvalidToken(InvalidTokenCause::RefusedByServer),
                );
                return;
            }
            StreamEnd::Retry {
                reason,
                was_streaming,
            } => {
                if was_streaming {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                let reason = bounded_reason(&reason);
                tracing::info!(token = %hash, %reason, ?delay, "stream ended; reconnecting");
                shared.metrics.reconnects.inc();
                set_state(&shared, hash, &state, StreamState::Reconnecting { reason });
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn set_state(shared: &Shared, hash: TokenHash, state: &Mutex<StreamState>, new: StreamState) {
    let changed = {
        let mut current = state.lock();
        let changed = *current != new;
        *current = new;
        changed
    };
    if changed {
        let _ = shared.notices.send(TokenNotice(hash));
    }
}

async fn connect_and_forward<T: HttpTransport>(
    shared: &Shared,
    token: &Token,
    url: &Url,
    transport: &T,
    state: &Mutex<StreamState>,
) -> StreamEnd {
    let hash = token.hash();
    let retry = |reason: String, was_streaming: bool| StreamEnd::Retry {
        reason,
        was_streaming,
    };
    let client = match build_client(url, token, transport.clone()) {
        Ok(client) => client,
        Err(reason) => return retry(reason, false),
    };
    let mut stream = client.stream();
    let mut streaming = false;
    let mut targets = Vec::new();
    loop {
        let item = match tokio::time::timeout(shared.settings.silence_timeout, stream.next()).await
        {
            Err(_) => {
                return retry(
                    format!(
                        "no data for {}s",
                        shared.settings.silence_timeout.as_secs_f32()
                    ),
                    streaming,
                )
            }
            Ok(None) => return retry("the event server closed the stream".into(), streaming),
            Ok(Some(Err(error))) => return retry(describe(&error), streaming),
            Ok(Some(Ok(item))) => item,
        };
        let SSE::Event(event) = item else {
            continue;
        };
        let frame = match StreamFrame::parse_owned(event.data) {
            Ok(frame) => frame,
            Err(error) => {
                shared.metrics.malformed_frames.inc();
                tracing::warn!(token = %hash, %error, "ignoring a malformed frame");
                continue;
            }
        };
        match decide(&frame, streaming) {
            FrameOutcome::Deliver(event_type) => {
                if let StreamFrame::Data { json, .. } = frame {
                    deliver(shared, hash, event_type, json, &mut targets);
                }
            }
            FrameOutcome::Ignore => {}
            FrameOutcome::Started => {
                streaming = true;
                set_state(shared, hash, state, StreamState::Streaming);
            }
            FrameOutcome::End(end) => return end,
        }
    }
}

/// Routes one event to the listeners of its token and submits a delivery to each.
fn deliver(
    shared: &Shared,
    hash: TokenHash,
    event_type: EventType,
    json: Bytes,
    targets: &mut Vec<Routed>,
) {
    shared.metrics.events.inc();
    shared.index.route(&hash, event_type, targets, |skip| {
        shared.metrics.skipped(skip);
    });
    for routed in targets.drain(..) {
        let Some(charge) = routed.allowance.take() else {
            shared.metrics.skipped(Skip::AllowanceUsed);
            continue;
        };
        // The engine gives the charge back if the delivery is never attempted.
        shared
            .engine
            .submit_charged(json.clone(), routed.target, Some(charge));
    }
}

/// `{events_url}/sse?projectName=…`.
fn stream_url(settings: &StreamSettings) -> Result<Url, String> {
    let mut url = settings.events_url.clone();
    url.path_segments_mut()
        .map_err(|_| "the events url cannot be a base".to_string())?
        .pop_if_empty()
        .push("sse");
    url.query_pairs_mut()
        .append_pair("projectName", &settings.project_name);
    Ok(url)
}

/// How the transport reaches the event server.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ProxyChoice {
    /// Straight to the event server, whatever `HTTP(S)_PROXY` says.
    Direct,
    /// Through the configured proxy only.
    Through(String),
}

/// Only a proxy configured for the operator is used: one from the environment could be
/// anyone's, and it would see the event server's name (and, over plain HTTP, the token).
fn proxy_choice(settings: &StreamSettings) -> ProxyChoice {
    match &settings.proxy {
        Some(proxy) => ProxyChoice::Through(proxy.as_str().to_owned()),
        None => ProxyChoice::Direct,
    }
}

/// The forwarder's transport: hyper with TLS, the chosen proxy, and bounded lines and events.
/// The url every stream opens and the one transport they share; `Err` says why streams cannot
/// be opened at all.
pub(super) fn endpoint(settings: &StreamSettings) -> Result<(Url, SharedTransport), String> {
    let url = stream_url(settings)?;
    let transport = build_transport(settings)?;
    Ok((url, transport))
}

/// Direct streams get a connection of their own each, from the lean HTTP/1.1 client; through a
/// proxy they go over hyper's client, which speaks to proxies.
fn build_transport(settings: &StreamSettings) -> Result<SharedTransport, String> {
    let bound = settings.max_event_bytes;
    match proxy_choice(settings) {
        ProxyChoice::Direct => {
            let transport = Http1Transport::new(CONNECT_TIMEOUT)
                .map_err(|e| format!("could not set up TLS: {e}"))?;
            Ok(SharedTransport::new(BoundedTransport::new(
                transport, bound,
            )))
        }
        ProxyChoice::Through(proxy) => {
            // The error says what failed, never the proxy url (it may hold credentials).
            let transport = HyperTransport::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .proxy_url(proxy)
                .build_https()
                .map_err(|e| format!("could not set up the HTTP client: {e}"))?;
            Ok(SharedTransport::new(BoundedTransport::new(
                transport, bound,
            )))
        }
    }
}

/// A client for one connection: the token in its header, no redirects, and no retries of its
/// own (the forwarder's loop decides, with its backoff and its reasons).
fn build_client<T: HttpTransport>(
    url: &Url,
    token: &Token,
    transport: T,
) -> Result<impl Client, String> {
    // `for_url` already asks for `text/event-stream` without caching.
    let builder = ClientBuilder::for_url(url.as_str())
        .map_err(|e| format!("invalid events url: {}", describe(&e)))?
        .header("access_token", token.expose())
        // Checked before the first connection, so this is only a second line of defence.
        .map_err(|_| "the token is not a valid header value".to_string())?
        // A redirect would take the token's header to another server.
        .redirect_limit(0)
        .reconnect(ReconnectOptions::reconnect(false).build());
    Ok(builder.build_with_transport(transport))
}

/// A short reason for a stream error. Never holds the token (it only ever travels in a
/// header), nor text the server sent: only statuses and the transport's own messages.
fn describe(error: &eventsource_client::Error) -> String {
    use eventsource_client::Error;
    match error {
        // eventsource-client follows only 301 and 307, and with a limit of 0 reports them
        // as the limit reached; every other 3xx arrives as an unexpected response.
        Error::MaxRedirectLimitReached(_) => {
            "the event server answered with a redirect (HTTP 301 or 307), which is not followed"
                .into()
        }
        Error::UnexpectedResponse(response, _) if (300..400).contains(&response.status()) => {
            format!(
                "the event server answered with a redirect (HTTP {}), which is not followed",
                response.status()
            )
        }
        Error::UnexpectedResponse(response, _) => {
            format!("the event server answered HTTP {}", response.status())
        }
        Error::MalformedLocationHeader(_) => {
            "the event server answered with a malformed redirect, which is not followed".into()
        }
        Error::TimedOut => "the connection timed out".into(),
        Error::Eof | Error::UnexpectedEof => "the event server closed the stream".into(),
        Error::InvalidLine(_) | Error::InvalidEvent => {
            "the event server sent something that is not an event stream".into()
        }
        Error::Transport(error) => match error.inner().downcast_ref::<TooLong>() {
            Some(too_long) => too_long.to_string(),
            None => format!("connection error: {}", error_chain(error.inner())),
        },
        Error::HttpStream(error) => format!("connection error: {}", error_chain(error.as_ref())),
        Error::InvalidParameter(error) => format!("invalid request: {error}"),
    }
}

/// An error and its sources, `a: b: c`: hyper's own message alone ("client error (Connect)")
/// does not say what went wrong.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        // Some errors repeat their source's message in their own.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// `reason` cut to [`MAX_REASON_CHARS`] characters, the ellipsis included.
fn bounded_reason(reason: &str) -> String {
    match reason.char_indices().nth(MAX_REASON_CHARS - 1) {
        Some((end, _)) if reason[end..].chars().nth(1).is_some() => {
            format!("{}…", &reason[..end])
        }
        _ => reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use launchdarkly_sdk_transport::{ByteStream, Request, ResponseFuture, TransportError};

    fn system(code: SystemCode) -> StreamFrame {
        StreamFrame::system(code)
    }

    fn data(json: &str) -> StreamFrame {
        StreamFrame::parse(json).unwrap()
    }

    fn retry(reason: &str, was_streaming: bool) -> FrameOutcome {
        FrameOutcome::End(StreamEnd::Retry {
            reason: reason.into(),
            was_streaming,
        })
    }

    #[test]
    fn frames_decide_what_happens_to_the_stream() {
        use FrameOutcome::*;
        let command = data(r#"{"type":"command","subType":"multiSwitch","sphere":{"id":"s"}}"#);
        let internal = data(
            r#"{"type":"sphereTokensChanged","subType":"sphereAuthorizationTokens","sphere":{"id":"s"}}"#,
        );
        let unknown = StreamFrame::System {
            code: SystemCode::Other("NEW_NOTICE".into()),
            status: 299,
            message: "m".into(),
        };
        let cases: Vec<(&str, StreamFrame, bool, FrameOutcome)> = vec![
            ("start", system(SystemCode::StreamStart), false, Started),
            (
                "start again",
                system(SystemCode::StreamStart),
                true,
                Started,
            ),
            (
                "expired",
                system(SystemCode::TokenExpired),
                true,
                End(StreamEnd::Expired),
            ),
            (
                "expired at connect",
                system(SystemCode::TokenExpired),
                false,
                End(StreamEnd::Expired),
            ),
            (
                "invalid",
                system(SystemCode::InvalidAccessToken),
                false,
                End(StreamEnd::InvalidToken),
            ),
            (
                "no token",
                system(SystemCode::NoAccessToken),
                false,
                End(StreamEnd::InvalidToken),
            ),
            (
                "no connection",
                system(SystemCode::NoConnection),
                false,
                retry("the event server sent NO_CONNECTION", false),
            ),
            (
                "closed",
                system(SystemCode::StreamClosed),
                true,
                retry("the event server sent STREAM_CLOSED", true),
            ),
            ("unknown notice", unknown.clone(), true, Ignore),
            ("unknown notice at connect", unknown, false, Ignore),
            ("ping", StreamFrame::Ping { counter: 3 }, true, Ignore),
            ("event", command.clone(), true, Deliver(EventType::Command)),
            ("event before the start", command, false, Ignore),
            ("internal event", internal, true, Ignore),
            ("unknown type", data(r#"{"type":"brandNew"}"#), true, Ignore),
        ];
        for (what, frame, streaming, expected) in cases {
            assert_eq!(decide(&frame, streaming), expected, "{what}");
        }
    }

    #[test]
    fn every_system_code_that_ends_the_stream_ends_it_here() {
        for code in [
            SystemCode::StreamStart,
            SystemCode::NoAccessToken,
            SystemCode::InvalidAccessToken,
            SystemCode::TokenExpired,
            SystemCode::NoConnection,
            SystemCode::StreamClosed,
            SystemCode::Other("X".into()),
        ] {
            let ends = matches!(decide(&system(code.clone()), true), FrameOutcome::End(_));
            assert_eq!(ends, code.ends_stream(), "{code}");
        }
    }

    fn settings(proxy: Option<&str>) -> StreamSettings {
        StreamSettings {
            events_url: Url::parse("https://events.example/base/").unwrap(),
            silence_timeout: Duration::from_secs(35),
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            project_name: "crownstone webhooks".into(),
            proxy: proxy.map(|p| Url::parse(p).unwrap()),
            max_event_bytes: 1024,
        }
    }

    #[test]
    fn only_a_configured_proxy_is_used() {
        assert_eq!(proxy_choice(&settings(None)), ProxyChoice::Direct);
        assert_eq!(
            proxy_choice(&settings(Some("http://proxy.internal:3128"))),
            ProxyChoice::Through("http://proxy.internal:3128/".into())
        );
        assert!(build_transport(&settings(None)).is_ok());
        assert!(build_transport(&settings(Some("http://proxy.internal:3128"))).is_ok());
    }

    #[test]
    fn the_stream_url_names_the_project() {
        assert_eq!(
            stream_url(&settings(None)).unwrap().as_str(),
            "https://events.example/base/sse?projectName=crownstone+webhooks"
        );
    }

    /// Answers every request with `status` (and a `Location`), recording what it was sent.
    #[derive(Clone)]
    struct Answering {
        status: u16,
        seen: Arc<Mutex<Vec<Request<Option<Bytes>>>>>,
    }

    impl HttpTransport for Answering {
        fn request(&self, request: Request<Option<Bytes>>) -> ResponseFuture {
            self.seen.lock().push(request);
            let status = self.status;
            Box::pin(async move {
                let body: ByteStream = Box::pin(futures::stream::empty());
                http::Response::builder()
                    .status(status)
                    .header("Location", "http://elsewhere.example/sse")
                    .body(body)
                    .map_err(TransportError::new)
            })
        }
    }

    /// The first error a stream answered with `status` yields, and the requests sent.
    async fn first_error(status: u16) -> (String, Vec<Request<Option<Bytes>>>) {
        let transport = Answering {
            status,
            seen: Arc::default(),
        };
        let url = stream_url(&settings(None)).unwrap();
        let token = Token::new("secret-token");
        let client = build_client(&url, &token, transport.clone()).unwrap();
        let mut stream = client.stream();
        let reason = match stream.next().await {
            Some(Err(error)) => describe(&error),
            other => panic!("HTTP {status}: expected an error, got {other:?}"),
        };
        // Nothing more: no redirect followed, no reconnect of its own.
        assert!(stream.next().await.is_none(), "HTTP {status}");
        let seen = std::mem::take(&mut *transport.seen.lock());
        (reason, seen)
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_and_says_so() {
        for status in [301, 302, 303, 307, 308] {
            let (reason, seen) = first_error(status).await;
            assert!(
                reason.contains("redirect") && reason.contains("not followed"),
                "HTTP {status}: {reason}"
            );
            assert_eq!(
                seen.len(),
                1,
                "HTTP {status}: only the configured server was asked"
            );
            assert_eq!(seen[0].uri().host(), Some("events.example"));
        }
        let (reason, _) = first_error(302).await;
        assert_eq!(
            reason,
            "the event server answered with a redirect (HTTP 302), which is not followed"
        );
    }

    #[tokio::test]
    async fn the_token_travels_in_a_header_only() {
        let (reason, seen) = first_error(500).await;
        assert_eq!(reason, "the event server answered HTTP 500");
        let request = &seen[0];
        assert_eq!(
            request.headers().get("access_token").unwrap(),
            "secret-token"
        );
        assert!(!request.uri().to_string().contains("secret-token"));
        assert_eq!(
            request.headers().get("accept").unwrap(),
            "text/event-stream"
        );
    }

    /// Answers 200 with this body.
    #[derive(Clone)]
    struct Streaming(&'static [&'static [u8]]);

    impl HttpTransport for Streaming {
        fn request(&self, _request: Request<Option<Bytes>>) -> ResponseFuture {
            let chunks: Vec<Result<Bytes, TransportError>> =
                self.0.iter().map(|c| Ok(Bytes::from_static(c))).collect();
            Box::pin(async move {
                let body: ByteStream = Box::pin(futures::stream::iter(chunks));
                http::Response::builder()
                    .status(200)
                    .body(body)
                    .map_err(TransportError::new)
            })
        }
    }

    const START: &[u8] = b"data:{\"type\":\"system\",\"subType\":\"STREAM_START\",\"code\":200,\"message\":\"Stream Starting.\"}\n\n";

    #[tokio::test]
    async fn a_line_over_the_bound_ends_the_stream_with_a_clear_reason() {
        let transport = BoundedTransport::new(Streaming(&[START, &[b'x'; 2048]]), 1024);
        let url = stream_url(&settings(None)).unwrap();
        let client = build_client(&url, &Token::new("t"), transport).unwrap();
        let mut stream = client.stream();
        let mut events = 0;
        let reason = loop {
            match stream.next().await {
                Some(Ok(SSE::Event(event))) => {
                    assert_eq!(
                        decide(&StreamFrame::parse(&event.data).unwrap(), false),
                        FrameOutcome::Started
                    );
                    events += 1;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => break describe(&error),
                None => panic!("the stream ended without an error"),
            }
        };
        assert_eq!(events, 1, "the event before the long line arrived");
        assert_eq!(
            reason,
            "the event server sent a line longer than 1024 bytes"
        );
    }

    #[test]
    fn reasons_are_bounded() {
        assert_eq!(bounded_reason("short"), "short");
        let exact = "é".repeat(MAX_REASON_CHARS);
        assert_eq!(bounded_reason(&exact), exact);
        let long = "é".repeat(MAX_REASON_CHARS + 1);
        let bounded = bounded_reason(&long);
        assert_eq!(bounded.chars().count(), MAX_REASON_CHARS);
        assert!(bounded.ends_with('…'));
        assert!(bounded_reason(&"x".repeat(100_000)).chars().count() <= MAX_REASON_CHARS);
    }

    #[test]
    fn error_chains_name_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = TransportError::new(io);
        assert_eq!(error_chain(&error), "transport error: refused");
    }
}
