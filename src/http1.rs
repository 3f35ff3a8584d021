//! A lean HTTP/1.1 client: the event streams' transport, and the response parsing the delivery
//! client shares with it.
//!
//! An event stream is one long GET per connection, so it needs no pool, no request queue and no
//! header buffer once the request is sent: here a connection holds its socket (with its TLS
//! state over https) and one small read buffer. hyper's pooled client keeps about 25 KB per
//! connection (a dispatch channel, an 8 KB header buffer and an 8 KB read buffer), which at
//! 10,000 streams was most of the operator's memory.
//!
//! It speaks only what its callers need: a request with an optional body, a response head of
//! bounded size, and a body framed by chunked encoding, a length, or the connection's end.
//! Redirects are returned as they are (the caller does not follow them); no proxy is used
//! (a configured proxy goes through the pooled client instead).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderName, HeaderValue, Response, StatusCode, Version};
use launchdarkly_sdk_transport::{
    ByteStream, HttpTransport, Request, ResponseFuture, TransportError,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The largest response head accepted: status line and headers.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Headers a response head may have.
const MAX_HEADERS: usize = 64;
/// How much is read at a time. Events are a few hundred bytes; a longer one takes more reads.
const READ_CHUNK: usize = 2048;
/// The longest chunk-size line (hex digits and extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;

/// What can go wrong on an event stream's connection. Messages never hold the request's
/// headers (the token travels in one) nor bytes the server sent.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("the url has no host")]
    NoHost,
    #[error("unsupported url scheme {0:?}")]
    Scheme(String),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("could not connect: {0}")]
    Connect(#[source] io::Error),
    #[error("connecting took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error("the TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    #[error("could not send the request: {0}")]
    Write(#[source] io::Error),
    #[error("could not read the response: {0}")]
    Read(#[source] io::Error),
    #[error("the server closed the connection before its response was complete")]
    Incomplete,
    #[error("the response head is longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLong,
    #[error("the response head is not valid HTTP/1.1: {0}")]
    BadHead(String),
    #[error("the response body's chunked encoding is broken")]
    BadChunk,
}

/// Event stream connections, each its own.
#[derive(Clone)]
pub struct Http1Transport {
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl Http1Transport {
    /// A transport that trusts the webpki root certificates over https.
    pub fn new(connect_timeout: Duration) -> Result<Self, rustls::Error> {
        Self::with_roots(connect_timeout, webpki_roots())
    }

    fn with_roots(
        connect_timeout: Duration,
        roots: rustls::RootCertStore,
    ) -> Result<Self, rustls::Error> {
        Ok(Http1Transport {
            tls: tls_connector(roots)?,
            connect_timeout,
        })
    }
}

/// The public web's root certificates, as browsers trust them.
pub(crate) fn webpki_roots() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// TLS for HTTP/1.1 only, trusting `roots`: by ALPN a server could otherwise pick h2, which
/// this client does not speak.
pub(crate) fn tls_connector(roots: rustls::RootCertStore) -> Result<TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

impl HttpTransport for Http1Transport {
    fn request(&self, request: Request<Option<Bytes>>) -> ResponseFuture {
        let transport = self.clone();
        Box::pin(async move { transport.send(request).await.map_err(TransportError::new) })
    }
}

/// A connection, plain or over TLS.
trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}

impl Http1Transport {
    async fn send(
        &self,
        request: Request<Option<Bytes>>,
    ) -> Result<Response<ByteStream>, Http1Error> {
        let (parts, body) = request.into_parts();
        let uri = &parts.uri;
        let host = uri.host().ok_or(Http1Error::NoHost)?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(Http1Error::Scheme(other.unwrap_or_default().to_owned())),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        // An IPv6 literal comes bracketed in a url, bare in a socket address.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');

        let connect = TcpStream::connect((bare_host, port));
        let tcp = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| Http1Error::ConnectTimeout(self.connect_timeout))?
            .map_err(Http1Error::Connect)?;
        // The request is one small write; the server's frames should not wait either.
        let _ = tcp.set_nodelay(true);
        let mut io: Box<dyn Io> = if tls {
            let name = rustls::pki_types::ServerName::try_from(bare_host.to_owned())
                .map_err(|_| Http1Error::ServerName(bare_host.to_owned()))?;
            let handshake = self.tls.connect(name, tcp);
            let stream = tokio::time::timeout(self.connect_timeout, handshake)
                .await
                .map_err(|_| Http1Error::ConnectTimeout(self.connect_timeout))?
                .map_err(Http1Error::Tls)?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };

        let head = request_head(&parts, body.as_ref().map_or(0, Bytes::len))?;
        io.write_all(&head).await.map_err(Http1Error::Write)?;
        if let Some(body) = &body {
            io.write_all(body).await.map_err(Http1Error::Write)?;
        }
        io.flush().await.map_err(Http1Error::Write)?;
        drop(head);

        let mut buf = BytesMut::new();
        let (response, framing) = loop {
            if let Some(parsed) = parse_head(&mut buf)? {
                break parsed;
            }
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(Http1Error::HeadTooLong);
            }
            if read_some(&mut io, &mut buf).await? == 0 {
                return Err(Http1Error::Incomplete);
            }
        };
        let body: ByteStream = Box::pin(Body {
            io,
            buf,
            decoder: ResponseBody::new(framing),
        });
        let (parts, ()) = response.into_parts();
        Ok(Response::from_parts(parts, body))
    }
}

/// `GET /path?query HTTP/1.1` with the request's headers, a `Host` header unless it has one,
/// and a `Content-Length` when there is a body.
fn request_head(parts: &http::request::Parts, body_len: usize) -> Result<Vec<u8>, Http1Error> {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(HOST) {
        let authority = parts.uri.authority().ok_or(Http1Error::NoHost)?;
        push_header(&mut head, &HOST, authority.as_str().as_bytes());
    }
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        push_header(&mut head, name, value.as_bytes());
    }
    if body_len > 0 {
        push_header(&mut head, &CONTENT_LENGTH, body_len.to_string().as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    Ok(head)
}

fn push_header(head: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    head.extend_from_slice(name.as_str().as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// How the response body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Chunked transfer coding, in the given state.
    Chunked(ChunkState),
    /// This many bytes are left.
    Length(u64),
    /// The body runs until the connection closes.
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until a blank one.
    Trailer,
}

/// Parses a complete response head off the front of `buf`, if `buf` holds one.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
) -> Result<Option<(Response<()>, Framing)>, Http1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let length = match parsed.parse(buf) {
        // The bound is on the head, not on what one read brought in: a head over it is refused
        // however it arrived.
        Ok(httparse::Status::Complete(length)) if length > MAX_HEAD_BYTES => {
            return Err(Http1Error::HeadTooLong)
        }
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(Http1Error::BadHead(error.to_string())),
    };
    let code = parsed.code.unwrap_or_default();
    let status = StatusCode::from_u16(code)
        .map_err(|_| Http1Error::BadHead(format!("status {code} is not valid")))?;
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut response = Response::builder().status(status).version(version);
    let mut framing = Framing::UntilClose;
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| Http1Error::BadHead("a header name is not valid".into()))?;
        let value = HeaderValue::from_bytes(header.value)
            .map_err(|_| Http1Error::BadHead("a header value is not valid".into()))?;
        if name == TRANSFER_ENCODING {
            // Chunked, when present, is the last coding (RFC 9112 §6.3); it wins over a length.
            let chunked = value
                .to_str()
                .ok()
                .and_then(|codings| codings.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if chunked {
                framing = Framing::Chunked(ChunkState::Size);
            }
        } else if name == CONTENT_LENGTH && !matches!(framing, Framing::Chunked(_)) {
            let length = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| Http1Error::BadHead("Content-Length is not a number".into()))?;
            framing = Framing::Length(length);
        }
        response = response.header(name, value);
    }
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        framing = Framing::Length(0);
    }
    let response = response
        .body(())
        .map_err(|_| Http1Error::BadHead("the head cannot be represented".into()))?;
    buf.advance(length);
    Ok(Some((response, framing)))
}

/// Reads what the connection has into `buf`, growing it by at most [`READ_CHUNK`]. Returns the
/// bytes read; 0 at the connection's end.
pub(crate) async fn read_some<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut BytesMut,
) -> Result<usize, Http1Error> {
    std::future::poll_fn(|cx| poll_read_some(io, buf, cx)).await
}

fn poll_read_some<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<Result<usize, Http1Error>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf).map_err(Http1Error::Read)
}

/// Where a response body is in its framing: it takes the body's data off a read buffer, and
/// leaves whatever follows the body there.
pub(crate) struct ResponseBody {
    framing: Framing,
    done: bool,
}

impl ResponseBody {
    pub(crate) fn new(framing: Framing) -> Self {
        ResponseBody {
            framing,
            done: false,
        }
    }

    /// The body ended where its framing says it does (not merely with the connection).
    pub(crate) fn is_complete(&self) -> bool {
        self.done && self.framing != Framing::UntilClose
    }

    /// The next piece of body data, reading from `io` into `buf` as needed; `None` at the
    /// body's end.
    pub(crate) async fn next<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
    ) -> Result<Option<Bytes>, Http1Error> {
        std::future::poll_fn(|cx| self.poll_next(io, buf, cx)).await
    }

    fn poll_next<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, Http1Error>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(None));
            }
            match self.take_buffered(buf) {
                Ok(Some(data)) => return Poll::Ready(Ok(Some(data))),
                Ok(None) if self.done => return Poll::Ready(Ok(None)),
                Ok(None) => {}
                Err(error) => {
                    self.done = true;
                    return Poll::Ready(Err(error));
                }
            }
            // Between events the buffer is empty: give back what a long one made it grow to.
            if buf.is_empty() && buf.capacity() > 4 * READ_CHUNK {
                *buf = BytesMut::new();
            }
            match ready!(poll_read_some(io, buf, cx)) {
                Ok(0) => {
                    self.done = true;
                    return Poll::Ready(match self.framing {
                        Framing::UntilClose => Ok(None),
                        _ => Err(Http1Error::Incomplete),
                    });
                }
                Ok(_) => {}
                Err(error) => {
                    self.done = true;
                    return Poll::Ready(Err(error));
                }
            }
        }
    }

    /// The next piece of body data from what is buffered, advancing the framing; `None` when
    /// more bytes must be read first (or the body is complete: see `done`).
    fn take_buffered(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Http1Error> {
        loop {
            match self.framing {
                Framing::UntilClose => {
                    return Ok((!buf.is_empty()).then(|| buf.split().freeze()));
                }
                Framing::Length(0) => {
                    self.done = true;
                    return Ok(None);
                }
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    self.framing = Framing::Length(left - n as u64);
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Framing::Chunked(ChunkState::Size) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&line)?;
                    self.framing = Framing::Chunked(if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    });
                }
                Framing::Chunked(ChunkState::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - n as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    });
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Framing::Chunked(ChunkState::DataEnd) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    if !line.is_empty() {
                        return Err(Http1Error::BadChunk);
                    }
                    self.framing = Framing::Chunked(ChunkState::Size);
                }
                Framing::Chunked(ChunkState::Trailer) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        self.done = true;
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Takes one CRLF- (or LF-) terminated line off the front of `buf`, without its line end.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, Http1Error> {
    match buf.iter().position(|&b| b == b'\n') {
        // The bound is on the line, not on what one read brought in.
        Some(end) if end > MAX_CHUNK_LINE => Err(Http1Error::BadChunk),
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_CHUNK_LINE => Err(Http1Error::BadChunk),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional `;extensions`.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Http1Error> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = std::str::from_utf8(digits).map_err(|_| Http1Error::BadChunk)?;
    u64::from_str_radix(digits.trim(), 16).map_err(|_| Http1Error::BadChunk)
}

/// An event stream's body, as the chunks of data arrive.
struct Body {
    io: Box<dyn Io>,
    /// Bytes read and not yet handed out or consumed by framing.
    buf: BytesMut,
    decoder: ResponseBody,
}

impl Stream for Body {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match ready!(this.decoder.poll_next(this.io.as_mut(), &mut this.buf, cx)) {
            Ok(Some(data)) => Poll::Ready(Some(Ok(data))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(TransportError::new(error)))),
        }
    }
}

#[cfg(test)]
pub(crate) mod proptests;

/// TLS for tests: a certificate for `localhost` and a server that presents it.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    /// A self-signed certificate for `localhost`, made by `openssl` (which the test command
    /// needs anyway), and its key.
    pub(crate) fn localhost_certificate(
        dir: &std::path::Path,
    ) -> (
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        use rustls::pki_types::pem::PemObject;
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let cert = std::fs::read(dir.join("cert.pem")).unwrap();
        let key = std::fs::read(dir.join("key.pem")).unwrap();
        (
            rustls::pki_types::CertificateDer::from_pem_slice(&cert).unwrap(),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap(),
        )
    }

    /// A TLS acceptor presenting `cert`.
    pub(crate) fn tls_acceptor(
        cert: rustls::pki_types::CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{localhost_certificate, tls_acceptor};
    use super::*;
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server on loopback that reads one request head, answers `response` (written in the
    /// given pieces, a pause between them) and hands back the request it read.
    async fn serve_once(pieces: Vec<&'static [u8]>) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/sse?projectName=p",
            listener.local_addr().unwrap()
        );
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                socket.read_exact(&mut byte).await.unwrap();
                request.push(byte[0]);
            }
            for piece in pieces {
                socket.write_all(piece).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            String::from_utf8(request).unwrap()
        });
        (url, task)
    }

    fn get(url: &str) -> Request<Option<Bytes>> {
        http::Request::get(url)
            .header("access_token", "secret-token")
            .header("accept", "text/event-stream")
            .body(None)
            .unwrap()
    }

    async fn body_of(response: Response<ByteStream>) -> Result<Vec<u8>, String> {
        let mut body = response.into_body();
        let mut all = Vec::new();
        while let Some(chunk) = body.next().await {
            all.extend_from_slice(&chunk.map_err(|e| e.inner().to_string())?);
        }
        Ok(all)
    }

    fn transport() -> Http1Transport {
        Http1Transport::new(Duration::from_secs(5)).unwrap()
    }

    #[tokio::test]
    async fn a_chunked_stream_arrives_whole_however_it_is_split() {
        let (url, server) = serve_once(vec![
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"7\r\ndata: a\r\n",
            b"4;ext=1\r\n\n\nb",
            b"c\r\n0\r\n",
            b"\r\n",
        ])
        .await;
        let response = transport().request(get(&url)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        assert_eq!(body_of(response).await.unwrap(), b"data: a\n\nbc");
        let request = server.await.unwrap();
        let host = url.trim_start_matches("http://").split('/').next().unwrap();
        assert!(
            request.starts_with("GET /sse?projectName=p HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains(&format!("host: {host}\r\n")), "{request}");
        assert!(
            request.contains("access_token: secret-token\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn a_body_with_a_length_ends_there_and_one_without_at_the_close() {
        let (url, _server) = serve_once(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
            b"lo and more",
        ])
        .await;
        let response = transport().request(get(&url)).await.unwrap();
        assert_eq!(body_of(response).await.unwrap(), b"hello");

        let (url, _server) = serve_once(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil", b" the end"]).await;
        let response = transport().request(get(&url)).await.unwrap();
        assert_eq!(body_of(response).await.unwrap(), b"until the end");
    }

    #[tokio::test]
    async fn a_redirect_is_returned_as_it_is() {
        let (url, _server) = serve_once(vec![
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let response = transport().request(get(&url)).await.unwrap();
        assert_eq!(response.status(), 307);
        assert_eq!(response.headers()["location"], "http://elsewhere/");
        assert_eq!(body_of(response).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn broken_responses_are_errors_not_hangs() {
        // Closed in the middle of a chunk.
        let (url, _server) = serve_once(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",
        ])
        .await;
        let response = transport().request(get(&url)).await.unwrap();
        let error = body_of(response).await.unwrap_err();
        assert!(
            error.contains("before its response was complete"),
            "{error}"
        );

        // A chunk size that is not hex.
        let (url, _server) = serve_once(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ])
        .await;
        let response = transport().request(get(&url)).await.unwrap();
        let error = body_of(response).await.unwrap_err();
        assert!(error.contains("chunked encoding"), "{error}");

        // Not HTTP at all.
        let (url, _server) = serve_once(vec![b"SSH-2.0-OpenSSH\r\n\r\n"]).await;
        let error = transport().request(get(&url)).await.err().unwrap();
        assert!(
            error.inner().to_string().contains("not valid HTTP"),
            "{error:?}"
        );

        // A head that never ends.
        static ENDLESS: [u8; 20_000] = [b'a'; 20_000];
        let (url, _server) = serve_once(vec![b"HTTP/1.1 200 OK\r\nX: ", &ENDLESS]).await;
        let error = transport().request(get(&url)).await.err().unwrap();
        assert!(
            error.inner().to_string().contains("longer than"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_says_so_without_the_token() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/sse", listener.local_addr().unwrap());
        drop(listener);
        let error = transport().request(get(&url)).await.err().unwrap();
        let text = error.inner().to_string();
        assert!(text.starts_with("could not connect"), "{text}");
        assert!(!text.contains("secret-token"), "{text}");
    }

    /// A TLS server on loopback that answers one request with a short event stream.
    async fn serve_tls_once(
        cert: rustls::pki_types::CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> String {
        let acceptor = tls_acceptor(cert, key);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(socket).await else {
                return;
            };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                tls.read_exact(&mut byte).await.unwrap();
                request.push(byte[0]);
            }
            tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\ndata: secure\n\n")
                .await
                .unwrap();
            tls.shutdown().await.unwrap();
        });
        format!("https://localhost:{port}/sse")
    }

    #[tokio::test]
    async fn https_is_spoken_and_the_server_certificate_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = localhost_certificate(dir.path());

        // Trusted: the stream arrives over TLS.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let trusting = Http1Transport::with_roots(Duration::from_secs(5), roots).unwrap();
        let url = serve_tls_once(cert.clone(), key.clone_key()).await;
        let response = trusting.request(get(&url)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(body_of(response).await.unwrap(), b"data: secure\n\n");

        // Not signed by a root the operator trusts: refused before any request is sent.
        let url = serve_tls_once(cert, key).await;
        let error = transport().request(get(&url)).await.err().unwrap();
        let text = error.inner().to_string();
        assert!(text.starts_with("the TLS handshake failed"), "{text}");
    }

    #[test]
    fn a_head_over_the_bound_is_refused_even_when_it_arrives_in_one_read() {
        let head = |len: usize| {
            let start = b"HTTP/1.1 200 OK\r\nx: ";
            let end = b"\r\n\r\n";
            let mut head = start.to_vec();
            head.resize(len - end.len(), b'a');
            head.extend_from_slice(end);
            BytesMut::from(&head[..])
        };
        assert!(parse_head(&mut head(MAX_HEAD_BYTES)).unwrap().is_some());
        assert!(matches!(
            parse_head(&mut head(MAX_HEAD_BYTES + 1)),
            Err(Http1Error::HeadTooLong)
        ));
    }

    #[test]
    fn a_chunk_line_over_the_bound_is_refused_even_when_it_arrives_in_one_read() {
        let line = |len: usize| {
            let mut line = b"1;".to_vec();
            line.resize(len, b'a');
            line.extend_from_slice(b"\r\nx\r\n");
            BytesMut::from(&line[..])
        };
        // The line with its `\r`, before the `\n`.
        let mut within = line(MAX_CHUNK_LINE - 1);
        assert_eq!(
            take_line(&mut within).unwrap().unwrap().len(),
            MAX_CHUNK_LINE - 1
        );
        assert_eq!(&within[..], b"x\r\n");
        assert!(matches!(
            take_line(&mut line(MAX_CHUNK_LINE)),
            Err(Http1Error::BadChunk)
        ));
    }

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(parse_chunk_size(b"1f").unwrap(), 31);
        assert_eq!(parse_chunk_size(b"A;name=value").unwrap(), 10);
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"-1").is_err());
        assert!(parse_chunk_size(b"fffffffffffffffff").is_err(), "overflow");
    }

    #[test]
    fn the_request_head_carries_the_headers_and_a_length_only_with_a_body() {
        let request = http::Request::post("http://example.com:8080/a?b=c")
            .header("x-one", "1")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let head = String::from_utf8(request_head(&parts, 3).unwrap()).unwrap();
        assert_eq!(
            head,
            "POST /a?b=c HTTP/1.1\r\nhost: example.com:8080\r\nx-one: 1\r\ncontent-length: 3\r\n\r\n"
        );
        let head = String::from_utf8(request_head(&parts, 0).unwrap()).unwrap();
        assert!(!head.contains("content-length"), "{head}");
    }
}
