//! The client of all deliveries: HTTP/1.1 over keep-alive connections, each owned by the
//! dispatcher of its destination and carrying one request at a time.
//!
//! A delivery is one small POST and a short answer. The request goes out in one write and the
//! answer is read on the dispatcher's own task, so an attempt costs no connection task, no
//! request channel and no pool lock; over many destinations with a few requests a second each,
//! that hand-off between tasks was most of what a pooled client cost per request.
//!
//! Connections are made to addresses the [`UrlPolicy`] allows, checked on the address resolved,
//! and never through a proxy (a proxy would connect on our behalf, around the policy).

use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::stream::{FuturesUnordered, StreamExt};
use http::{header, HeaderValue, StatusCode, Version};
use tokio::io::{AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use url::{Host, Position, Url};

use super::{
    dead_letter::{ErrorHeaders, MAX_ERROR_DATA},
    retry::{parse_retry_after, AttemptResult},
    signature::{SigningKeys, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP},
    url_policy::{DestinationRefused, ResolveError, UrlPolicy},
};
use crate::http1::{self, Http1Error, ResponseBody};

/// `User-Agent` of every delivery.
pub const USER_AGENT: &str = concat!("crownstone-webhooks/", env!("CARGO_PKG_VERSION"));

/// The W3C Trace Context header every delivery carries.
const TRACEPARENT: &str = "traceparent";

/// Response bytes read (and discarded) before a connection is given up instead of reused: a
/// receiver cannot make us read an endless body.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// An idle connection older than this is closed rather than reused: receivers close theirs
/// after a while, and a request on a connection closing under it would fail.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Interim (1xx) answers accepted before the final one: a receiver cannot keep an attempt busy
/// with them until its timeout.
const MAX_INTERIM_ANSWERS: usize = 8;

/// How long a connection attempt runs alone before the next address is tried beside it.
const CONNECT_FALLBACK: Duration = Duration::from_millis(250);

/// Makes the connections of every destination: resolution under the policy, TCP, TLS.
pub(crate) struct Connector {
    policy: Arc<UrlPolicy>,
    tls: TlsConnector,
}

impl Connector {
    /// A connector that trusts the webpki root certificates over https.
    pub(crate) fn new(policy: Arc<UrlPolicy>) -> Result<Self, rustls::Error> {
        Self::with_roots(policy, http1::webpki_roots())
    }

    pub(crate) fn with_roots(
        policy: Arc<UrlPolicy>,
        roots: rustls::RootCertStore,
    ) -> Result<Self, rustls::Error> {
        Ok(Connector {
            policy,
            tls: http1::tls_connector(roots)?,
        })
    }

    /// A new connection to `url`'s host, on the first allowed address that accepts it.
    async fn connect(&self, url: &Url) -> Result<Connection, ConnectError> {
        let https = url.scheme() == "https";
        let port = url.port_or_known_default().ok_or(ConnectError::NoHost)?;
        let host = url.host().ok_or(ConnectError::NoHost)?;
        let addresses = match &host {
            Host::Ipv4(ip) => vec![self.allowed(IpAddr::V4(*ip), port)?],
            Host::Ipv6(ip) => vec![self.allowed(IpAddr::V6(*ip), port)?],
            Host::Domain(name) => self
                .policy
                .resolve(name, port)
                .await
                .map_err(ConnectError::Resolve)?,
        };
        let tcp = connect_any(addresses)
            .await
            .map_err(ConnectError::Connect)?;
        // Every request is one small write: it must not wait for the previous one's ACK.
        tcp.set_nodelay(true).map_err(ConnectError::Connect)?;
        let io = if https {
            let name = match host {
                Host::Domain(name) => rustls::pki_types::ServerName::try_from(name.to_owned())
                    .map_err(|_| ConnectError::ServerName)?,
                Host::Ipv4(ip) => rustls::pki_types::ServerName::IpAddress(IpAddr::V4(ip).into()),
                Host::Ipv6(ip) => rustls::pki_types::ServerName::IpAddress(IpAddr::V6(ip).into()),
            };
            let stream = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(ConnectError::Tls)?;
            Either::Right(Box::new(stream))
        } else {
            Either::Left(tcp)
        };
        Ok(Connection {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            idle_since: Instant::now(),
        })
    }

    fn allowed(&self, ip: IpAddr, port: u16) -> Result<SocketAddr, ConnectError> {
        self.policy.check(ip).map_err(ConnectError::Refused)?;
        Ok(SocketAddr::new(ip, port))
    }
}

/// Connects to the first of `addresses` that answers. The next address is tried when one fails,
/// or when one has not answered within [`CONNECT_FALLBACK`] (the first still runs), so an
/// address family that drops packets costs a fraction of a second, not the attempt's timeout.
async fn connect_any(addresses: Vec<SocketAddr>) -> io::Result<TcpStream> {
    let mut untried = addresses.into_iter();
    let mut connecting = FuturesUnordered::new();
    let mut last_error = None;
    loop {
        if connecting.is_empty() {
            match untried.next() {
                Some(address) => connecting.push(TcpStream::connect(address)),
                None => {
                    return Err(last_error.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "no address to connect to")
                    }))
                }
            }
        }
        tokio::select! {
            Some(result) = connecting.next() => match result {
                Ok(tcp) => return Ok(tcp),
                Err(error) => last_error = Some(error),
            },
            () = tokio::time::sleep(CONNECT_FALLBACK), if untried.len() > 0 => {
                if let Some(address) = untried.next() {
                    connecting.push(TcpStream::connect(address));
                }
            }
        }
    }
}

/// Why no connection was made.
#[derive(Debug)]
enum ConnectError {
    NoHost,
    Refused(DestinationRefused),
    Resolve(ResolveError),
    Connect(io::Error),
    ServerName,
    Tls(io::Error),
}

/// One keep-alive connection to a destination, with its buffers.
pub(crate) struct Connection {
    io: Either<TcpStream, Box<TlsStream<TcpStream>>>,
    /// What was read and not yet parsed; empty between requests.
    read: BytesMut,
    /// The request being written; kept for the next one.
    write: Vec<u8>,
    idle_since: Instant,
}

impl Connection {
    /// Whether an idle connection can carry the next request: not idle too long, and not closed
    /// by the receiver. Over plain HTTP, bytes nobody asked for also rule it out (only a broken
    /// receiver sends them); over TLS they can be a record such as a session ticket, which the
    /// next read takes in its stride.
    pub(crate) fn is_reusable(&self, now: Instant) -> bool {
        if now.saturating_duration_since(self.idle_since) >= IDLE_TIMEOUT {
            return false;
        }
        let (tcp, tls) = match &self.io {
            Either::Left(tcp) => (tcp, false),
            Either::Right(stream) => (stream.get_ref().0, true),
        };
        // A look without waiting or taking anything: the socket's state as last reported.
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match tcp.poll_peek(&mut cx, &mut probe) {
            Poll::Pending => true,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(_)) => tls,
        }
    }
}

/// Everything one attempt needs; borrowed from the delivery so a retry rebuilds nothing.
pub(crate) struct AttemptRequest<'a> {
    pub url: &'a Url,
    pub authorization: Option<&'a HeaderValue>,
    pub body: &'a Bytes,
    pub message_id: &'a HeaderValue,
    pub signing_key: &'a SigningKeys,
    pub timestamp: DateTime<Utc>,
    pub timeout: Duration,
    /// The W3C `traceparent` value, so the receiver's trace joins ours.
    pub traceparent: &'a [u8],
    /// A dead letter's `crownstone-error-*` headers; `None` for a delivery.
    pub error_headers: Option<&'a ErrorHeaders>,
}

/// How an attempt ended, and the connection when it can carry another request.
pub(crate) struct Attempt {
    pub result: AttemptResult,
    pub connection: Option<Connection>,
    /// The first [`MAX_ERROR_DATA`] bytes of the body of an answer that is not a 2xx, for a
    /// dead letter's `crownstone-error-data`.
    pub excerpt: Bytes,
}

/// Sends one signed POST on `idle` (or a new connection) and reports how it ended, all within
/// the request's timeout. Never returns a string holding the url.
pub(crate) async fn attempt(
    connector: &Connector,
    idle: Option<Connection>,
    request: AttemptRequest<'_>,
) -> Attempt {
    let timeout = request.timeout;
    match tokio::time::timeout(timeout, exchange(connector, idle, &request)).await {
        Ok((result, connection, excerpt)) => Attempt {
            result,
            connection,
            excerpt,
        },
        Err(_) => Attempt {
            result: AttemptResult::TimedOut(timeout),
            connection: None,
            excerpt: Bytes::new(),
        },
    }
}

async fn exchange(
    connector: &Connector,
    idle: Option<Connection>,
    request: &AttemptRequest<'_>,
) -> (AttemptResult, Option<Connection>, Bytes) {
    let unix = request.timestamp.timestamp();
    let message_id = request.message_id.to_str().unwrap_or_default();
    let signature = request.signing_key.sign(message_id, unix, request.body);

    let mut idle = idle;
    loop {
        let reused = idle.is_some();
        let mut connection = match idle.take() {
            Some(connection) => connection,
            None => match connector.connect(request.url).await {
                Ok(connection) => connection,
                Err(error) => return (describe_connect(error), None, Bytes::new()),
            },
        };
        connection.write_request(request, unix, &signature);
        match connection.round_trip().await {
            Ok(answer) => return connection.conclude(answer, request.timestamp).await,
            // The receiver closed the idle connection as we sent on it: nothing was answered,
            // so the request goes once more, on a new connection.
            Err(RoundTripError::ClosedUnanswered) if reused => {}
            Err(RoundTripError::ClosedUnanswered) => {
                return (describe_http1(&Http1Error::Incomplete), None, Bytes::new())
            }
            Err(RoundTripError::Failed(error)) => {
                return (describe_http1(&error), None, Bytes::new())
            }
        }
    }
}

/// A response head, and how its body is framed.
struct Answer {
    head: http::Response<()>,
    body: ResponseBody,
}

enum RoundTripError {
    /// The connection ended before a single byte of the answer.
    ClosedUnanswered,
    Failed(Http1Error),
}

impl Connection {
    /// The request, head and body, in the write buffer.
    fn write_request(&mut self, request: &AttemptRequest<'_>, unix: i64, signature: &str) {
        let url = request.url;
        let out = &mut self.write;
        out.clear();
        out.extend_from_slice(b"POST ");
        out.extend_from_slice(url[Position::BeforePath..Position::AfterQuery].as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(url.host_str().unwrap_or_default().as_bytes());
        if let Some(port) = url.port() {
            // Writing to a Vec cannot fail.
            let _ = write!(out, ":{port}");
        }
        out.extend_from_slice(b"\r\nuser-agent: ");
        out.extend_from_slice(USER_AGENT.as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\naccept: application/json");
        push_header(out, WEBHOOK_ID, request.message_id.as_bytes());
        push_header(out, WEBHOOK_TIMESTAMP, b"");
        let _ = write!(out, "{unix}");
        push_header(out, WEBHOOK_SIGNATURE, signature.as_bytes());
        push_header(out, TRACEPARENT, request.traceparent);
        for (name, value) in request.error_headers.iter().flat_map(|h| h.pairs()) {
            push_header(out, name, value.as_bytes());
        }
        if let Some(authorization) = request.authorization {
            push_header(
                out,
                header::AUTHORIZATION.as_str(),
                authorization.as_bytes(),
            );
        }
        push_header(out, header::CONTENT_LENGTH.as_str(), b"");
        let _ = write!(out, "{}", request.body.len());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(request.body);
    }

    /// Writes the request and reads the answer's head (skipping interim 1xx answers).
    async fn round_trip(&mut self) -> Result<Answer, RoundTripError> {
        self.io
            .write_all(&self.write)
            .await
            .map_err(|error| match error.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    RoundTripError::ClosedUnanswered
                }
                _ => RoundTripError::Failed(Http1Error::Write(error)),
            })?;
        self.io
            .flush()
            .await
            .map_err(|error| RoundTripError::Failed(Http1Error::Write(error)))?;
        let mut answered = false;
        let mut interim = 0;
        loop {
            if let Some((head, framing)) =
                http1::parse_head(&mut self.read).map_err(RoundTripError::Failed)?
            {
                let status = head.status();
                if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                    interim += 1;
                    if interim > MAX_INTERIM_ANSWERS {
                        return Err(RoundTripError::Failed(Http1Error::BadHead(
                            "too many interim answers".into(),
                        )));
                    }
                    continue;
                }
                return Ok(Answer {
                    head,
                    body: ResponseBody::new(framing),
                });
            }
            if self.read.len() >= http1::MAX_HEAD_BYTES {
                return Err(RoundTripError::Failed(Http1Error::HeadTooLong));
            }
            match http1::read_some(&mut self.io, &mut self.read).await {
                Ok(0) if !answered => return Err(RoundTripError::ClosedUnanswered),
                Ok(0) => return Err(RoundTripError::Failed(Http1Error::Incomplete)),
                Ok(_) => answered = true,
                Err(Http1Error::Read(error))
                    if !answered && error.kind() == io::ErrorKind::ConnectionReset =>
                {
                    return Err(RoundTripError::ClosedUnanswered)
                }
                Err(error) => return Err(RoundTripError::Failed(error)),
            }
        }
    }

    /// The attempt's result from the answer's head; the body is read to its end, up to a
    /// bound, and the connection kept if it can carry another request. The status is known
    /// already: nothing about the body changes the result.
    async fn conclude(
        mut self,
        answer: Answer,
        timestamp: DateTime<Utc>,
    ) -> (AttemptResult, Option<Connection>, Bytes) {
        let Answer { head, mut body } = answer;
        let status = head.status();
        let retry_after = if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::SERVICE_UNAVAILABLE
        {
            head.headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, timestamp))
        } else {
            None
        };
        let result = AttemptResult::Response {
            status,
            retry_after,
        };
        let keep_alive = head.version() == Version::HTTP_11
            && status != StatusCode::SWITCHING_PROTOCOLS
            && !head
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .any(|value| has_token(value, "close"));
        let mut read = 0usize;
        // Kept only from a failure's answer, for a dead letter; a success's body is not needed.
        let mut excerpt = BytesMut::new();
        let keep = if status.is_success() {
            0
        } else {
            MAX_ERROR_DATA
        };
        let complete = loop {
            match body.next(&mut self.io, &mut self.read).await {
                Ok(Some(data)) => {
                    let room = keep.saturating_sub(excerpt.len());
                    excerpt.extend_from_slice(&data[..data.len().min(room)]);
                    read = read.saturating_add(data.len());
                    if read > MAX_RESPONSE_BODY {
                        break false;
                    }
                }
                Ok(None) => break body.is_complete(),
                Err(_) => break false,
            }
        };
        if keep_alive && complete && self.read.is_empty() {
            self.idle_since = Instant::now();
            (result, Some(self), excerpt.freeze())
        } else {
            (result, None, excerpt.freeze())
        }
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
}

/// Whether a comma-separated header value holds `token`, in any case.
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// A short reason for a connection that could not be made: what failed, never the url.
fn describe_connect(error: ConnectError) -> AttemptResult {
    match error {
        ConnectError::NoHost => AttemptResult::RequestFailed("the url has no host".into()),
        ConnectError::Refused(refused) => AttemptResult::Refused(refused),
        ConnectError::Resolve(ResolveError::Refused(refused)) => AttemptResult::Refused(refused),
        ConnectError::Resolve(resolve) => AttemptResult::ConnectionFailed(resolve.to_string()),
        ConnectError::Connect(error) => AttemptResult::ConnectionFailed(io_reason(&error).into()),
        ConnectError::ServerName => {
            AttemptResult::ConnectionFailed("the host is not a valid TLS server name".into())
        }
        ConnectError::Tls(error) => AttemptResult::ConnectionFailed(shorten(format!(
            "TLS handshake failed: {}",
            innermost(&error)
        ))),
    }
}

/// A short reason for a request that broke after connecting.
fn describe_http1(error: &Http1Error) -> AttemptResult {
    match error {
        Http1Error::Write(error) | Http1Error::Read(error) => {
            AttemptResult::ConnectionFailed(io_reason(error).into())
        }
        Http1Error::Incomplete => AttemptResult::ConnectionFailed("connection closed".into()),
        other => AttemptResult::ConnectionFailed(shorten(format!("invalid response: {other}"))),
    }
}

fn io_reason(error: &io::Error) -> &'static str {
    use io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => "connection refused",
        ErrorKind::ConnectionReset => "connection reset",
        ErrorKind::ConnectionAborted => "connection aborted",
        ErrorKind::TimedOut => "connection timed out",
        ErrorKind::HostUnreachable => "host unreachable",
        ErrorKind::NetworkUnreachable => "network unreachable",
        ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe => "connection closed",
        _ => "connection failed",
    }
}

/// The message of the deepest source: it names the cause (rustls, io).
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = error;
    while let Some(source) = deepest.source() {
        deepest = source;
    }
    deepest.to_string()
}

/// At most 120 bytes of a reason.
fn shorten(mut message: String) -> String {
    if message.len() > 120 {
        let mut end = 120;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::signature::SigningKey;
    use crate::http1::testing::{localhost_certificate, tls_acceptor};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
    use tokio::net::TcpListener;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// What a test receiver answers to each request on a connection, in turn; past the list's
    /// end it closes the connection.
    type Script = Vec<&'static [u8]>;

    struct TestReceiver {
        url: Url,
        accepted: Arc<AtomicUsize>,
        requests: Arc<parking_lot::Mutex<Vec<Vec<u8>>>>,
    }

    /// Reads one request (head and a body of its content-length) off `io`.
    pub(super) async fn read_request<S: AsyncRead + Unpin>(io: &mut S) -> Option<Vec<u8>> {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            if io.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            request.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&request).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        io.read_exact(&mut body).await.ok()?;
        request.extend_from_slice(&body);
        Some(request)
    }

    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        mut io: S,
        script: Script,
        requests: Arc<parking_lot::Mutex<Vec<Vec<u8>>>>,
    ) {
        for reply in script {
            let Some(request) = read_request(&mut io).await else {
                return;
            };
            requests.lock().push(request);
            if io.write_all(reply).await.is_err() {
                return;
            }
        }
    }

    /// A receiver on loopback answering every connection with `script`, over TLS when given a
    /// certificate.
    async fn receiver(script: Script, tls: Option<tokio_rustls::TlsAcceptor>) -> TestReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = if tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let url = Url::parse(&format!("{scheme}://{host}:{port}/hook?key=abc")).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (count, seen) = (Arc::clone(&accepted), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (script, seen, tls) = (script.clone(), Arc::clone(&seen), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(socket).await {
                                answer(stream, script, seen).await;
                            }
                        }
                        None => answer(socket, script, seen).await,
                    }
                });
            }
        });
        TestReceiver {
            url,
            accepted,
            requests,
        }
    }

    fn permissive() -> Connector {
        Connector::new(Arc::new(UrlPolicy {
            allow_private_destinations: true,
            denied_networks: Vec::new(),
        }))
        .unwrap()
    }

    struct Sender {
        key: SigningKeys,
        body: Bytes,
        message_id: HeaderValue,
        authorization: HeaderValue,
    }

    impl Sender {
        fn new() -> Self {
            Sender {
                key: SigningKey::from_client_secret(SECRET).unwrap().into(),
                body: Bytes::from_static(br#"{"data":{"type":"command"}}"#),
                message_id: HeaderValue::from_static("msg_1"),
                authorization: HeaderValue::from_static("Basic dTpw"),
            }
        }

        async fn send(
            &self,
            connector: &Connector,
            url: &Url,
            idle: Option<Connection>,
            timeout: Duration,
        ) -> Attempt {
            let request = AttemptRequest {
                url,
                authorization: Some(&self.authorization),
                body: &self.body,
                message_id: &self.message_id,
                signing_key: &self.key,
                timestamp: Utc::now(),
                timeout,
                traceparent: b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                error_headers: None,
            };
            attempt(connector, idle, request).await
        }
    }

    fn status(attempt: &Attempt) -> Option<u16> {
        match &attempt.result {
            AttemptResult::Response { status, .. } => Some(status.as_u16()),
            _ => None,
        }
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn one_connection_carries_request_after_request() {
        let receiver = receiver(vec![OK, OK, OK], None).await;
        let connector = permissive();
        let sender = Sender::new();
        let mut idle = None;
        for _ in 0..3 {
            let attempt = sender.send(&connector, &receiver.url, idle, SECOND).await;
            assert_eq!(status(&attempt), Some(200));
            idle = attempt.connection;
            assert!(idle.is_some(), "a complete answer keeps the connection");
        }
        assert_eq!(receiver.accepted.load(Ordering::SeqCst), 1);
        let requests = receiver.requests.lock().clone();
        assert_eq!(requests.len(), 3);
        let text = String::from_utf8(requests[0].clone()).unwrap();
        let port = receiver.url.port().unwrap();
        let signature = sender.key.sign("msg_1", 0, &sender.body);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("POST /hook?key=abc HTTP/1.1"));
        let headers: Vec<&str> = lines.collect();
        assert!(
            headers.contains(&format!("host: 127.0.0.1:{port}").as_str()),
            "{head}"
        );
        for expected in [
            "content-type: application/json",
            "accept: application/json",
            "webhook-id: msg_1",
            "authorization: Basic dTpw",
            "content-length: 27",
            &format!("user-agent: {USER_AGENT}"),
        ] {
            assert!(headers.contains(&expected), "{expected} missing: {head}");
        }
        let timestamp = headers
            .iter()
            .find_map(|h| h.strip_prefix("webhook-timestamp: "))
            .unwrap();
        let signed = headers
            .iter()
            .find_map(|h| h.strip_prefix("webhook-signature: "))
            .unwrap();
        let expected = sender
            .key
            .sign("msg_1", timestamp.parse().unwrap(), &sender.body);
        assert_eq!(signed, expected);
        assert_ne!(signed, signature, "signed with the request's own time");
        assert_eq!(body, r#"{"data":{"type":"command"}}"#);
    }

    #[tokio::test]
    async fn answers_that_end_the_connection_are_not_reused() {
        let endless_length = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n";
        let cases: [(&str, &'static [u8]); 4] = [
            (
                "close",
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            ),
            ("HTTP/1.0", b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"),
            ("until close", b"HTTP/1.1 200 OK\r\n\r\nbody"),
            ("longer than read", endless_length),
        ];
        let connector = permissive();
        let sender = Sender::new();
        for (name, reply) in cases {
            let receiver = receiver(vec![reply], None).await;
            let attempt = sender.send(&connector, &receiver.url, None, SECOND).await;
            assert_eq!(status(&attempt), Some(200), "{name}");
            assert!(attempt.connection.is_none(), "{name}: kept");
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_retry_after_read() {
        let receiver = receiver(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 2\r\n\r\nno",
            ],
            None,
        )
        .await;
        let connector = permissive();
        let sender = Sender::new();
        let first = sender.send(&connector, &receiver.url, None, SECOND).await;
        assert_eq!(status(&first), Some(201));
        let second = sender
            .send(&connector, &receiver.url, first.connection, SECOND)
            .await;
        match second.result {
            AttemptResult::Response {
                status,
                retry_after,
            } => {
                assert_eq!(status, 429);
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
            }
            other => panic!("{other:?}"),
        }
        assert!(second.connection.is_some());
        assert_eq!(receiver.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn endless_interim_answers_end_the_attempt() {
        const INTERIM: &[u8] = b"HTTP/1.1 102 Processing\r\n\r\n";
        let endless: &'static [u8] = INTERIM.repeat(MAX_INTERIM_ANSWERS + 1).leak();
        let receiver = receiver(vec![endless], None).await;
        let sender = Sender::new();
        let attempt = sender
            .send(&permissive(), &receiver.url, None, Duration::from_secs(5))
            .await;
        match attempt.result {
            AttemptResult::ConnectionFailed(reason) => {
                assert!(reason.contains("too many interim answers"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(attempt.connection.is_none());
    }

    #[tokio::test]
    async fn a_connection_the_receiver_closed_is_replaced() {
        // One answer per connection, then the receiver closes it.
        let receiver = receiver(vec![OK], None).await;
        let connector = permissive();
        let sender = Sender::new();
        let first = sender.send(&connector, &receiver.url, None, SECOND).await;
        let idle = first.connection.unwrap();
        // Sent on at once, before its close is seen: answered on a new connection.
        let second = sender
            .send(&connector, &receiver.url, Some(idle), SECOND)
            .await;
        assert_eq!(status(&second), Some(200));
        assert_eq!(receiver.accepted.load(Ordering::SeqCst), 2);
        // Once its close has arrived, an idle connection says it cannot be reused.
        let idle = second.connection.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!idle.is_reusable(Instant::now()));
    }

    #[tokio::test]
    async fn silence_times_out_and_refused_addresses_are_never_connected() {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", silent.local_addr().unwrap())).unwrap();
        let sender = Sender::new();
        let timeout = Duration::from_millis(200);
        let attempt = sender.send(&permissive(), &url, None, timeout).await;
        assert!(matches!(attempt.result, AttemptResult::TimedOut(t) if t == timeout));
        assert!(attempt.connection.is_none());

        let strict = Connector::new(Arc::new(UrlPolicy::default())).unwrap();
        for url in [url.clone(), Url::parse("http://localhost:9/").unwrap()] {
            let attempt = sender.send(&strict, &url, None, SECOND).await;
            assert!(
                matches!(&attempt.result, AttemptResult::Refused(r) if r.address.is_loopback()),
                "{url}: {:?}",
                attempt.result
            );
        }

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", closed.local_addr().unwrap())).unwrap();
        drop(closed);
        let attempt = sender.send(&permissive(), &url, None, SECOND).await;
        match attempt.result {
            AttemptResult::ConnectionFailed(reason) => assert_eq!(reason, "connection refused"),
            other => panic!("{other:?}"),
        }
    }

    /// An address whose connection attempts hang: a listener that never accepts, with its
    /// backlog full, so the kernel drops further handshakes.
    async fn silent_address() -> (TcpListener, Vec<TcpStream>, SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let address = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..16 {
            let attempt = TcpStream::connect(address);
            match tokio::time::timeout(Duration::from_millis(200), attempt).await {
                Ok(Ok(stream)) => held.push(stream),
                _ => return (listener, held, address),
            }
        }
        panic!("the backlog never filled");
    }

    #[tokio::test]
    async fn the_next_address_is_tried_when_one_fails_or_does_not_answer() {
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_address = good.local_addr().unwrap();
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_address = closed.local_addr().unwrap();
        drop(closed);
        let (_listener, _held, silent) = silent_address().await;
        let started = Instant::now();
        let connected = tokio::time::timeout(
            Duration::from_secs(3),
            connect_any(vec![silent, closed_address, good_address]),
        )
        .await
        .expect("an answering address is reached without waiting for the silent one")
        .unwrap();
        assert_eq!(connected.peer_addr().unwrap(), good_address);
        assert!(started.elapsed() < Duration::from_secs(2));

        let error = connect_any(vec![closed_address]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn https_is_spoken_and_the_certificate_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = localhost_certificate(dir.path());
        let receiver = receiver(vec![OK, OK], Some(tls_acceptor(cert.clone(), key))).await;
        let policy = Arc::new(UrlPolicy {
            allow_private_destinations: true,
            denied_networks: Vec::new(),
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let trusting = Connector::with_roots(Arc::clone(&policy), roots).unwrap();
        let sender = Sender::new();
        let first = sender.send(&trusting, &receiver.url, None, SECOND).await;
        assert_eq!(status(&first), Some(200));
        let second = sender
            .send(&trusting, &receiver.url, first.connection, SECOND)
            .await;
        assert_eq!(status(&second), Some(200));
        assert_eq!(receiver.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(receiver.requests.lock().len(), 2);

        // Not signed by a root the operator trusts: refused before any request is sent.
        let untrusting = Connector::new(policy).unwrap();
        let attempt = sender.send(&untrusting, &receiver.url, None, SECOND).await;
        match attempt.result {
            AttemptResult::ConnectionFailed(reason) => {
                assert!(reason.starts_with("TLS handshake failed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(receiver.requests.lock().len(), 2);
    }
}
