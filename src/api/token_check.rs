//! Whether Crownstone accepts a token: its stream opens with `STREAM_START`. The check opens
//! the token's stream with the forwarders' own SSE client (the token in a header), reads the
//! first frame (bounded in bytes and time) and closes the stream; a token a forwarder of this
//! process already streams is trusted without a second stream. At most a set number of checks
//! run at once, so callers cannot make the facade open streams to Crownstone without limit.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Semaphore;
use url::Url;

use crate::crownstone::{StreamFrame, SystemCode};
use crate::domain::Token;
use crate::forwarder::{
    EventStreamClient, EventStreamSetupError, ForwarderRegistry, OpenError, StreamState,
};

/// The longest line, and the largest event, the check reads: the first frame is a short system
/// frame.
const MAX_FIRST_FRAME_BYTES: usize = 64 * 1024;
/// How the check names itself to the event server.
const PROJECT_NAME: &str = "crownstone-webhooks";
/// How long after `STREAM_START` the check listens for a `TOKEN_EXPIRED`, which the event
/// server sends at once when the token's lifetime has passed.
const EXPIRY_GRACE: Duration = Duration::from_millis(300);
/// The longest a check waits for one of the running checks to finish before it is answered as
/// unreachable.
const SLOT_WAIT: Duration = Duration::from_secs(1);

/// What the event server says about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenVerdict {
    /// `STREAM_START`, or a forwarder of this process streams it.
    Valid,
    /// `INVALID_ACCESS_TOKEN`, `NO_ACCESS_TOKEN` or `TOKEN_EXPIRED`, or a token that cannot
    /// travel in an HTTP header.
    Invalid,
    /// No answer in time, `NO_CONNECTION`, an answer that is not an event stream, or too many
    /// checks running: try later.
    Unreachable(String),
}

impl TokenVerdict {
    fn label(&self) -> &'static str {
        match self {
            TokenVerdict::Valid => "valid",
            TokenVerdict::Invalid => "invalid",
            TokenVerdict::Unreachable(_) => "unreachable",
        }
    }
}

/// The label of the token check counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
    /// `stream` when a stream was opened, `forwarder` when a running one was trusted, `busy`
    /// when no slot came free in time and no stream was opened.
    pub via: &'static str,
}

/// Why the checker could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenCheckSetupError {
    #[error("the events url cannot carry a path: {0}")]
    EventsUrl(Url),
    /// The error never holds the proxy url (it may hold credentials).
    #[error("could not set up the HTTP client of the token check: {0}")]
    Client(String),
    #[error("at least one token check must be allowed to run")]
    NoConcurrency,
}

/// Checks tokens against one event server.
#[derive(Clone)]
pub struct TokenChecker {
    streams: EventStreamClient,
    timeout: Duration,
    slots: Arc<Semaphore>,
    forwarders: Option<ForwarderRegistry>,
    checks: Family<OutcomeLabel, Counter>,
}

impl TokenChecker {
    /// A checker of `{events_url}/sse`, through `proxy` only when one is given (never the
    /// environment's), giving up after `timeout`, running at most `concurrency` checks at once.
    /// `forwarders`, when this process runs them, vouch for the tokens they stream.
    pub fn new(
        events_url: &Url,
        proxy: Option<&Url>,
        timeout: Duration,
        concurrency: usize,
        forwarders: Option<ForwarderRegistry>,
        checks: Family<OutcomeLabel, Counter>,
    ) -> Result<TokenChecker, TokenCheckSetupError> {
        if concurrency == 0 {
            return Err(TokenCheckSetupError::NoConcurrency);
        }
        // Every pair `check` can count, at zero, so the series exist before the first check.
        for (outcome, via) in [
            ("valid", "stream"),
            ("invalid", "stream"),
            ("unreachable", "stream"),
            ("valid", "forwarder"),
            ("unreachable", "busy"),
        ] {
            let _ = checks.get_or_create(&OutcomeLabel { outcome, via });
        }
        let streams =
            EventStreamClient::new(events_url, PROJECT_NAME, proxy, MAX_FIRST_FRAME_BYTES)
                .map_err(|error| match error {
                    EventStreamSetupError::EventsUrl => {
                        TokenCheckSetupError::EventsUrl(events_url.clone())
                    }
                    other => TokenCheckSetupError::Client(other.to_string()),
                })?;
        Ok(TokenChecker {
            streams,
            timeout,
            slots: Arc::new(Semaphore::new(concurrency)),
            forwarders,
            checks,
        })
    }

    /// Asks the event server about `token`.
    pub async fn check(&self, token: &Token) -> TokenVerdict {
        if let Some(forwarders) = &self.forwarders {
            if forwarders.state(&token.hash()) == Some(StreamState::Streaming) {
                self.count(&TokenVerdict::Valid, "forwarder");
                return TokenVerdict::Valid;
            }
        }
        // Held until the stream is closed: the bound is on open streams.
        let wait = SLOT_WAIT.min(self.timeout);
        let Ok(Ok(_slot)) = tokio::time::timeout(wait, self.slots.acquire()).await else {
            let verdict = TokenVerdict::Unreachable(
                "this service is checking too many tokens at once; try again shortly.".into(),
            );
            tracing::warn!(token = %token.hash(), "Could not check a token: every slot is taken.");
            self.count(&verdict, "busy");
            return verdict;
        };
        let verdict = match tokio::time::timeout(self.timeout, self.open(token)).await {
            Ok(verdict) => verdict,
            Err(_) => TokenVerdict::Unreachable(format!(
                "Crownstone's event server did not answer within {}.",
                humantime::format_duration(self.timeout)
            )),
        };
        if let TokenVerdict::Unreachable(why) = &verdict {
            tracing::warn!(token = %token.hash(), reason = %why, "Could not check a token.");
        }
        self.count(&verdict, "stream");
        verdict
    }

    fn count(&self, verdict: &TokenVerdict, via: &'static str) {
        self.checks
            .get_or_create(&OutcomeLabel {
                outcome: verdict.label(),
                via,
            })
            .inc();
    }

    async fn open(&self, token: &Token) -> TokenVerdict {
        let mut stream = match self.streams.open(token) {
            Ok(stream) => stream,
            // A token an HTTP header cannot carry is not one Crownstone issued.
            Err(OpenError::NotAHeaderValue) => return TokenVerdict::Invalid,
            Err(error) => {
                return TokenVerdict::Unreachable(format!(
                    "Crownstone's event server could not be asked ({error})."
                ))
            }
        };
        let first = match stream.next_data().await {
            Ok(data) => data,
            Err(ended) => {
                return TokenVerdict::Unreachable(format!(
                    "Crownstone's event server did not start the stream ({ended})."
                ))
            }
        };
        match verdict_of(&first) {
            // The event server checks expiry right after STREAM_START: a frame that follows at
            // once may still say the token is spent.
            TokenVerdict::Valid => {
                match tokio::time::timeout(EXPIRY_GRACE, stream.next_data()).await {
                    Ok(Ok(next)) if refuses(&next) => TokenVerdict::Invalid,
                    _ => TokenVerdict::Valid,
                }
            }
            other => other,
        }
    }
}

/// Whether a frame says the token cannot be used.
fn refuses(data: &str) -> bool {
    matches!(verdict_of(data), TokenVerdict::Invalid)
}

/// What the first frame's payload says about the token.
fn verdict_of(data: &str) -> TokenVerdict {
    match StreamFrame::parse(data) {
        Ok(StreamFrame::System { code, .. }) => match code {
            SystemCode::StreamStart => TokenVerdict::Valid,
            SystemCode::InvalidAccessToken
            | SystemCode::NoAccessToken
            | SystemCode::TokenExpired => TokenVerdict::Invalid,
            SystemCode::NoConnection => TokenVerdict::Unreachable(
                "Crownstone's event server has lost its connection to the cloud; try again later."
                    .into(),
            ),
            other => TokenVerdict::Unreachable(format!(
                "Crownstone's event server answered {} instead of starting the stream.",
                match other {
                    SystemCode::Other(_) => "an unknown system frame",
                    _ => other.as_str(),
                }
            )),
        },
        Ok(_) => TokenVerdict::Unreachable(
            "Crownstone's event server sent an event before starting the stream.".into(),
        ),
        Err(_) => TokenVerdict::Unreachable(
            "Crownstone's event server sent a frame that is not JSON.".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, oneshot};

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";

    fn frame(code: SystemCode) -> Vec<u8> {
        StreamFrame::system(code).to_sse_bytes().to_vec()
    }

    /// An event server on loopback: each connection's request head is sent on `requests`, then
    /// `answer` is written piece by piece (each piece its own write, a pause between them), then
    /// the connection stays open until `release` fires or the test ends.
    struct EventServer {
        url: Url,
        requests: mpsc::UnboundedReceiver<String>,
        release: Option<oneshot::Sender<()>>,
    }

    async fn event_server(answer: Vec<Vec<u8>>) -> EventServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let (seen, requests) = mpsc::unbounded_channel();
        let (release, released) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut released = Some(released);
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") {
                    if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    request.push(byte[0]);
                }
                let _ = seen.send(String::from_utf8_lossy(&request).into_owned());
                // The first connection waits for the release, if the test holds it.
                if let Some(released) = released.take() {
                    let _ = released.await;
                }
                for piece in &answer {
                    if socket.write_all(piece).await.is_err() {
                        break;
                    }
                    let _ = socket.flush().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::spawn(async move {
                    // Open, silent, until the client goes.
                    let _ = socket.read(&mut [0u8; 1]).await;
                });
            }
        });
        EventServer {
            url,
            requests,
            release: Some(release),
        }
    }

    /// A server that answers every connection at once with `answer`.
    async fn answering(answer: Vec<Vec<u8>>) -> EventServer {
        let mut server = event_server(answer).await;
        let _ = server.release.take().map(|release| release.send(()));
        server
    }

    fn checker_of(url: &Url, timeout: Duration, concurrency: usize) -> TokenChecker {
        TokenChecker::new(url, None, timeout, concurrency, None, Family::default()).unwrap()
    }

    fn unreachable_reason(verdict: TokenVerdict) -> String {
        match verdict {
            TokenVerdict::Unreachable(why) => why,
            other => panic!("expected unreachable, got {other:?}"),
        }
    }

    /// `bytes` cut at every `step`-th byte.
    fn pieces(bytes: &[u8], step: usize) -> Vec<Vec<u8>> {
        bytes.chunks(step).map(<[u8]>::to_vec).collect()
    }

    #[tokio::test]
    async fn a_first_frame_split_across_reads_decides_the_verdict() {
        // STREAM_START cut into pieces of 7 bytes, with CRLF line ends cut between \r and \n.
        let start = String::from_utf8(frame(SystemCode::StreamStart))
            .unwrap()
            .replace('\n', "\r\n");
        let mut answer = vec![HEAD.to_vec(), b": hello\r".to_vec(), b"\n".to_vec()];
        answer.extend(pieces(start.as_bytes(), 7));
        let mut server = answering(answer).await;
        let checker = checker_of(&server.url, Duration::from_secs(30), 4);
        assert_eq!(
            checker.check(&Token::new("tok-1")).await,
            TokenVerdict::Valid
        );
        // The token went in its header, not in the url.
        let request = server.requests.recv().await.unwrap();
        let request_line = request.lines().next().unwrap();
        assert_eq!(
            request_line,
            "GET /sse?projectName=crownstone-webhooks HTTP/1.1"
        );
        assert!(request.contains("access_token: tok-1\r\n"), "{request}");

        // A refusal cut byte by byte, and a STREAM_START followed by TOKEN_EXPIRED.
        let mut answer = vec![HEAD.to_vec()];
        answer.extend(pieces(&frame(SystemCode::InvalidAccessToken), 1));
        let server = answering(answer).await;
        let checker = checker_of(&server.url, Duration::from_secs(30), 4);
        assert_eq!(checker.check(&Token::new("t")).await, TokenVerdict::Invalid);
        let mut expired = frame(SystemCode::StreamStart);
        expired.extend(frame(SystemCode::TokenExpired));
        let server = answering(vec![HEAD.to_vec(), expired]).await;
        let checker = checker_of(&server.url, Duration::from_secs(30), 4);
        assert_eq!(checker.check(&Token::new("t")).await, TokenVerdict::Invalid);
    }

    #[tokio::test]
    async fn an_over_long_first_frame_is_cut_off_and_unreachable() {
        // One endless line, and many short lines that add up to an endless event: the check
        // stops at its bound, whatever the server goes on sending.
        let mut line = b"data:".to_vec();
        line.resize(MAX_FIRST_FRAME_BYTES + 10, b'x');
        let lines = b"data:1\n".repeat(MAX_FIRST_FRAME_BYTES / 7 + 1);
        for (body, expected) in [(line, "line longer than"), (lines, "event longer than")] {
            let server = answering(vec![HEAD.to_vec(), body]).await;
            let checker = checker_of(&server.url, Duration::from_secs(30), 4);
            let why = unreachable_reason(checker.check(&Token::new("t")).await);
            assert!(why.starts_with("Crownstone's event server"), "{why}");
            assert!(
                why.contains(&format!("{expected} {MAX_FIRST_FRAME_BYTES} bytes")),
                "{why}"
            );
        }
    }

    #[tokio::test]
    async fn a_stream_of_pings_only_is_unreachable() {
        let pings: Vec<Vec<u8>> = (0..5)
            .map(|n| format!("data:{{\"type\":\"ping\",\"counter\":{n}}}\n\n").into_bytes())
            .collect();
        let server = answering([vec![HEAD.to_vec()], pings].concat()).await;
        let checker = checker_of(&server.url, Duration::from_secs(30), 4);
        let why = unreachable_reason(checker.check(&Token::new("t")).await);
        assert!(why.contains("before starting the stream"), "{why}");
    }

    #[tokio::test]
    async fn no_answer_a_non_stream_answer_or_no_server_is_unreachable() {
        // The head and then silence: the check's own timeout ends it.
        let server = answering(vec![HEAD.to_vec()]).await;
        let checker = checker_of(&server.url, Duration::from_millis(300), 4);
        let why = unreachable_reason(checker.check(&Token::new("t")).await);
        assert!(why.contains("did not answer within 300ms"), "{why}");

        let server = answering(vec![
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()
        ])
        .await;
        let checker = checker_of(&server.url, Duration::from_secs(30), 4);
        let why = unreachable_reason(checker.check(&Token::new("t")).await);
        assert!(why.contains("answered HTTP 404"), "{why}");

        let server = answering(vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 13\r\n\r\n<html></html>"
                .to_vec(),
        ])
        .await;
        let checker = checker_of(&server.url, Duration::from_secs(30), 4);
        let why = unreachable_reason(checker.check(&Token::new("t")).await);
        assert!(why.contains("closed the stream"), "{why}");

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", closed.local_addr().unwrap())).unwrap();
        drop(closed);
        let why = unreachable_reason(
            checker_of(&url, Duration::from_secs(30), 4)
                .check(&Token::new("secret-token"))
                .await,
        );
        assert!(why.contains("could not connect"), "{why}");
        assert!(!why.contains("secret-token"), "{why}");
    }

    #[tokio::test]
    async fn a_token_no_header_can_carry_is_invalid_and_never_sent() {
        let mut server = answering(vec![HEAD.to_vec(), frame(SystemCode::StreamStart)]).await;
        let checker = checker_of(&server.url, Duration::from_secs(30), 4);
        assert_eq!(
            checker.check(&Token::new("two\nlines")).await,
            TokenVerdict::Invalid
        );
        assert!(server.requests.try_recv().is_err(), "nothing was sent");
    }

    #[tokio::test]
    async fn checks_beyond_the_bound_are_refused_and_the_running_one_goes_on() {
        let mut server = event_server(vec![HEAD.to_vec(), frame(SystemCode::StreamStart)]).await;
        let checks = Family::<OutcomeLabel, Counter>::default();
        let checker = TokenChecker::new(
            &server.url,
            None,
            Duration::from_secs(60),
            1,
            None,
            checks.clone(),
        )
        .unwrap();
        let first = tokio::spawn({
            let checker = checker.clone();
            async move { checker.check(&Token::new("first")).await }
        });
        // The first check's stream is open and unanswered.
        server.requests.recv().await.unwrap();
        let why = unreachable_reason(checker.check(&Token::new("second")).await);
        assert!(why.contains("too many tokens"), "{why}");
        assert!(!first.is_finished(), "the running check is not disturbed");
        assert!(
            server.requests.try_recv().is_err(),
            "the refused check opened no stream"
        );
        let _ = server.release.take().map(|release| release.send(()));
        assert_eq!(first.await.unwrap(), TokenVerdict::Valid);
        let count = |outcome, via| checks.get_or_create(&OutcomeLabel { outcome, via }).get();
        assert_eq!(count("unreachable", "busy"), 1);
        assert_eq!(count("valid", "stream"), 1);
        // Its slot is free again.
        assert_eq!(
            checker.check(&Token::new("third")).await,
            TokenVerdict::Valid
        );
        assert!(matches!(
            TokenChecker::new(&server.url, None, Duration::from_secs(1), 0, None, checks),
            Err(TokenCheckSetupError::NoConcurrency)
        ));
    }

    #[test]
    fn system_frames_decide_the_verdict() {
        let frame = |code| StreamFrame::system(code).to_json();
        assert_eq!(
            verdict_of(&frame(SystemCode::StreamStart)),
            TokenVerdict::Valid
        );
        for code in [
            SystemCode::InvalidAccessToken,
            SystemCode::NoAccessToken,
            SystemCode::TokenExpired,
        ] {
            assert_eq!(verdict_of(&frame(code)), TokenVerdict::Invalid);
        }
        for code in [SystemCode::NoConnection, SystemCode::StreamClosed] {
            assert!(matches!(
                verdict_of(&frame(code)),
                TokenVerdict::Unreachable(_)
            ));
        }
        assert!(matches!(
            verdict_of("{\"type\":\"ping\",\"counter\":0}"),
            TokenVerdict::Unreachable(_)
        ));
        assert!(matches!(
            verdict_of("not json"),
            TokenVerdict::Unreachable(_)
        ));
    }
}
