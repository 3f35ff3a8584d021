//! The one SSE client of a token's event stream, shared by the forwarders and the REST facade's
//! token check: the same url, transport, TLS, bounds on lines and events, and frame parsing.
//!
//! The token goes only to the configured event server: in a header (a url ends up in proxy
//! logs), never through a redirect, and never through a proxy taken from the environment.

use std::time::Duration;

use eventsource_client::{BoxStream, Client, ClientBuilder, ReconnectOptions, SSE};
use futures::StreamExt;
use launchdarkly_sdk_transport::{HttpTransport, HyperTransport};
use url::Url;

use super::transport::{BoundedTransport, SharedTransport, TooLong};
use super::Token;
use crate::http1::Http1Transport;

/// How long opening a TCP connection to the event server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no stream can be opened with these settings.
#[derive(Debug, thiserror::Error)]
pub enum EventStreamSetupError {
    #[error("the events url cannot be a base or is not valid")]
    EventsUrl,
    #[error("could not set up TLS: {0}")]
    Tls(String),
    /// Never holds the proxy url (it may hold credentials).
    #[error("could not set up the HTTP client: {0}")]
    Client(String),
}

/// Why a stream was not opened.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The token cannot be an HTTP header value, so it is never sent.
    #[error("the token is not a valid header value")]
    NotAHeaderValue,
    /// The stream url is not one the SSE client takes (checked when the client is made, so
    /// only a second line of defence).
    #[error("the events url is not valid")]
    Url,
}

/// Opens token streams at `{events_url}/sse?projectName=…` over one transport.
#[derive(Clone)]
pub struct EventStreamClient {
    url: Url,
    transport: SharedTransport,
}

impl EventStreamClient {
    /// A client of `{events_url}/sse`, naming `project_name` to the event server, through
    /// `proxy` only when one is given, cutting a stream off at a line or an event longer than
    /// `max_event_bytes`.
    pub fn new(
        events_url: &Url,
        project_name: &str,
        proxy: Option<&Url>,
        max_event_bytes: usize,
    ) -> Result<Self, EventStreamSetupError> {
        let url = stream_url(events_url, project_name)?;
        ClientBuilder::for_url(url.as_str()).map_err(|_| EventStreamSetupError::EventsUrl)?;
        let transport = build_transport(proxy_choice(proxy), max_event_bytes)?;
        Ok(EventStreamClient { url, transport })
    }

    #[cfg(test)]
    pub(crate) fn with_transport<T: HttpTransport>(url: Url, transport: T) -> Self {
        EventStreamClient {
            url,
            transport: SharedTransport::new(transport),
        }
    }

    /// The stream url (which never holds a token).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Opens `token`'s stream; nothing is sent until the first [`EventStream::next_data`].
    pub fn open(&self, token: &Token) -> Result<EventStream, OpenError> {
        // A token an HTTP header cannot carry is never sent.
        if http::HeaderValue::from_str(token.expose()).is_err() {
            return Err(OpenError::NotAHeaderValue);
        }
        let client = build_client(&self.url, token, self.transport.clone())?;
        Ok(EventStream {
            inner: client.stream(),
        })
    }
}

/// One connection's events.
pub struct EventStream {
    inner: BoxStream<eventsource_client::Result<SSE>>,
}

/// Why a stream gave no further event: a short reason that never holds the token nor text the
/// event server sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StreamEnded(pub String);

impl EventStream {
    /// The data of the next event (comments skipped), or why there is none: the stream ended,
    /// broke, was not an event stream or sent a line or an event over the bound.
    pub async fn next_data(&mut self) -> Result<String, StreamEnded> {
        loop {
            match self.inner.next().await {
                Some(Ok(SSE::Event(event))) => return Ok(event.data),
                Some(Ok(SSE::Connected(_) | SSE::Comment(_))) => {}
                Some(Err(error)) => return Err(StreamEnded(describe(&error))),
                None => return Err(StreamEnded("the event server closed the stream".into())),
            }
        }
    }
}

/// `{events_url}/sse?projectName=…`.
fn stream_url(events_url: &Url, project_name: &str) -> Result<Url, EventStreamSetupError> {
    let mut url = events_url.clone();
    url.path_segments_mut()
        .map_err(|_| EventStreamSetupError::EventsUrl)?
        .pop_if_empty()
        .push("sse");
    url.query_pairs_mut()
        .append_pair("projectName", project_name);
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
fn proxy_choice(proxy: Option<&Url>) -> ProxyChoice {
    match proxy {
        Some(proxy) => ProxyChoice::Through(proxy.as_str().to_owned()),
        None => ProxyChoice::Direct,
    }
}

/// Direct streams get a connection of their own each, from the lean HTTP/1.1 client; through a
/// proxy they go over hyper's client, which speaks to proxies. Either way lines and events are
/// bounded.
fn build_transport(
    proxy: ProxyChoice,
    max_event_bytes: usize,
) -> Result<SharedTransport, EventStreamSetupError> {
    match proxy {
        ProxyChoice::Direct => {
            let transport = Http1Transport::new(CONNECT_TIMEOUT)
                .map_err(|e| EventStreamSetupError::Tls(e.to_string()))?;
            Ok(SharedTransport::new(BoundedTransport::new(
                transport,
                max_event_bytes,
            )))
        }
        ProxyChoice::Through(proxy) => {
            // The error says what failed, never the proxy url (it may hold credentials).
            let transport = HyperTransport::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .proxy_url(proxy)
                .build_https()
                .map_err(|e| EventStreamSetupError::Client(e.to_string()))?;
            Ok(SharedTransport::new(BoundedTransport::new(
                transport,
                max_event_bytes,
            )))
        }
    }
}

/// A client for one connection: the token in its header, no redirects, and no retries of its
/// own (the caller decides, with its backoff and its reasons).
fn build_client<T: HttpTransport>(
    url: &Url,
    token: &Token,
    transport: T,
) -> Result<impl Client, OpenError> {
    // `for_url` already asks for `text/event-stream` without caching.
    let builder = ClientBuilder::for_url(url.as_str())
        .map_err(|_| OpenError::Url)?
        .header("access_token", token.expose())
        .map_err(|_| OpenError::NotAHeaderValue)?
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crownstone::{StreamFrame, SystemCode};
    use bytes::Bytes;
    use launchdarkly_sdk_transport::{ByteStream, Request, ResponseFuture, TransportError};
    use parking_lot::Mutex;
    use std::sync::Arc;

    fn events_url() -> Url {
        Url::parse("https://events.example/base/").unwrap()
    }

    #[test]
    fn only_a_configured_proxy_is_used() {
        assert_eq!(proxy_choice(None), ProxyChoice::Direct);
        let proxy = Url::parse("http://proxy.internal:3128").unwrap();
        assert_eq!(
            proxy_choice(Some(&proxy)),
            ProxyChoice::Through("http://proxy.internal:3128/".into())
        );
        assert!(EventStreamClient::new(&events_url(), "p", None, 1024).is_ok());
        assert!(EventStreamClient::new(&events_url(), "p", Some(&proxy), 1024).is_ok());
    }

    #[test]
    fn the_stream_url_names_the_project() {
        let client = EventStreamClient::new(&events_url(), "crownstone webhooks", None, 1024);
        assert_eq!(
            client.unwrap().url().as_str(),
            "https://events.example/base/sse?projectName=crownstone+webhooks"
        );
        let not_a_base = Url::parse("mailto:events@example.com").unwrap();
        assert!(matches!(
            EventStreamClient::new(&not_a_base, "p", None, 1024),
            Err(EventStreamSetupError::EventsUrl)
        ));
    }

    #[test]
    fn a_token_no_header_can_carry_is_not_opened() {
        let client = EventStreamClient::new(&events_url(), "p", None, 1024).unwrap();
        assert_eq!(
            client.open(&Token::new("line\nbreak")).err(),
            Some(OpenError::NotAHeaderValue)
        );
        assert!(client.open(&Token::new("fine")).is_ok());
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

    /// The reason a stream answered with `status` ends with, and the requests sent.
    async fn first_error(status: u16) -> (String, Vec<Request<Option<Bytes>>>) {
        let transport = Answering {
            status,
            seen: Arc::default(),
        };
        let url = stream_url(&events_url(), "p").unwrap();
        let client = EventStreamClient::with_transport(url, transport.clone());
        let mut stream = client.open(&Token::new("secret-token")).unwrap();
        let reason = match stream.next_data().await {
            Err(StreamEnded(reason)) => reason,
            Ok(data) => panic!("HTTP {status}: expected an error, got {data:?}"),
        };
        // Nothing more: no redirect followed, no reconnect of its own.
        assert!(stream.inner.next().await.is_none(), "HTTP {status}");
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
        let url = stream_url(&events_url(), "p").unwrap();
        let client = EventStreamClient::with_transport(url, transport);
        let mut stream = client.open(&Token::new("t")).unwrap();
        let first = stream.next_data().await.unwrap();
        assert!(matches!(
            StreamFrame::parse(&first),
            Ok(StreamFrame::System {
                code: SystemCode::StreamStart,
                ..
            })
        ));
        assert_eq!(
            stream.next_data().await,
            Err(StreamEnded(
                "the event server sent a line longer than 1024 bytes".into()
            ))
        );
    }

    #[tokio::test]
    async fn comments_are_skipped_and_the_end_is_a_reason() {
        let transport = Streaming(&[b": hello\n", b"data:1\n", b"\n: bye\n\n"]);
        let url = stream_url(&events_url(), "p").unwrap();
        let client = EventStreamClient::with_transport(url, transport);
        let mut stream = client.open(&Token::new("t")).unwrap();
        assert_eq!(stream.next_data().await.as_deref(), Ok("1"));
        assert_eq!(
            stream.next_data().await,
            Err(StreamEnded("the event server closed the stream".into()))
        );
    }

    #[test]
    fn error_chains_name_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = TransportError::new(io);
        assert_eq!(error_chain(&error), "transport error: refused");
    }
}
