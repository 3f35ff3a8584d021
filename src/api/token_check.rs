//! Whether Crownstone accepts a token: its stream opens with `STREAM_START`. The check opens
//! `GET {events}/sse` with the token in a header, reads the first frame (bounded in bytes and
//! time) and closes the stream; a token a forwarder of this process already streams is trusted
//! without a second stream.

use std::collections::VecDeque;
use std::time::Duration;

use axum::http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use url::Url;

use crate::crownstone::{StreamFrame, SystemCode};
use crate::domain::Token;
use crate::forwarder::{ForwarderRegistry, StreamState};

/// The most the check reads before the first frame must have arrived.
const MAX_FIRST_FRAME_BYTES: usize = 64 * 1024;
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after `STREAM_START` the check listens for a `TOKEN_EXPIRED`, which the event
/// server sends at once when the token's lifetime has passed.
const EXPIRY_GRACE: Duration = Duration::from_millis(300);

/// What the event server says about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenVerdict {
    /// `STREAM_START`, or a forwarder of this process streams it.
    Valid,
    /// `INVALID_ACCESS_TOKEN`, `NO_ACCESS_TOKEN` or `TOKEN_EXPIRED`, or a token that cannot
    /// travel in an HTTP header.
    Invalid,
    /// No answer in time, `NO_CONNECTION`, or an answer that is not an event stream: try later.
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
    /// `stream` when a stream was opened, `forwarder` when a running one was trusted.
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
}

/// Checks tokens against one event server.
#[derive(Clone)]
pub struct TokenChecker {
    http: reqwest::Client,
    stream_url: Url,
    timeout: Duration,
    forwarders: Option<ForwarderRegistry>,
    checks: Family<OutcomeLabel, Counter>,
}

impl TokenChecker {
    /// A checker of `{events_url}/sse`, through `proxy` only when one is given (never the
    /// environment's), giving up after `timeout`. `forwarders`, when this process runs them,
    /// vouch for the tokens they stream.
    pub fn new(
        events_url: &Url,
        proxy: Option<&Url>,
        timeout: Duration,
        forwarders: Option<ForwarderRegistry>,
        checks: Family<OutcomeLabel, Counter>,
    ) -> Result<TokenChecker, TokenCheckSetupError> {
        let mut stream_url = events_url.clone();
        stream_url
            .path_segments_mut()
            .map_err(|_| TokenCheckSetupError::EventsUrl(events_url.clone()))?
            .pop_if_empty()
            .push("sse");
        stream_url
            .query_pairs_mut()
            .append_pair("projectName", "crownstone-webhooks");
        let builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect would take the token's header to another server.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("crownstone-webhooks/", env!("CARGO_PKG_VERSION")));
        let builder = match proxy {
            Some(proxy) => builder
                .proxy(reqwest::Proxy::all(proxy.as_str()).map_err(|_| {
                    TokenCheckSetupError::Client("the proxy url is invalid".into())
                })?),
            None => builder.no_proxy(),
        };
        let http = builder
            .build()
            .map_err(|e| TokenCheckSetupError::Client(e.to_string()))?;
        Ok(TokenChecker {
            http,
            stream_url,
            timeout,
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
        // A token an HTTP header cannot carry is not one Crownstone issued.
        let Ok(mut value) = HeaderValue::from_str(token.expose()) else {
            return TokenVerdict::Invalid;
        };
        value.set_sensitive(true);
        let request = self
            .http
            .get(self.stream_url.clone())
            .header("access_token", value)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .header(reqwest::header::CACHE_CONTROL, "no-cache");
        let response = match request.send().await {
            Ok(response) => response,
            // The transport's words, without the url: it holds no token, but say less.
            Err(error) => {
                return TokenVerdict::Unreachable(format!(
                    "Crownstone's event server could not be reached ({}).",
                    transport_reason(&error)
                ))
            }
        };
        if response.status() != reqwest::StatusCode::OK {
            return TokenVerdict::Unreachable(format!(
                "Crownstone's event server answered HTTP {}.",
                response.status().as_u16()
            ));
        }
        let mut stream = EventStream {
            response,
            reader: EventReader::default(),
        };
        let first = match stream.next_event().await {
            Ok(data) => data,
            Err(why) => return TokenVerdict::Unreachable(why),
        };
        match verdict_of(&first) {
            // The event server checks expiry right after STREAM_START: a frame that follows at
            // once may still say the token is spent.
            TokenVerdict::Valid => {
                match tokio::time::timeout(EXPIRY_GRACE, stream.next_event()).await {
                    Ok(Ok(next)) if refuses(&next) => TokenVerdict::Invalid,
                    _ => TokenVerdict::Valid,
                }
            }
            other => other,
        }
    }
}

/// The data of the events of one response.
struct EventStream {
    response: reqwest::Response,
    reader: EventReader,
}

impl EventStream {
    async fn next_event(&mut self) -> Result<String, String> {
        loop {
            if let Some(data) = self.reader.next_event() {
                return Ok(data);
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.reader.feed(&chunk)?,
                Ok(None) => {
                    return Err("Crownstone's event server ended the stream without a word.".into())
                }
                Err(error) => {
                    return Err(format!(
                        "Crownstone's event server broke off the stream ({}).",
                        transport_reason(&error)
                    ))
                }
            }
        }
    }
}

/// Whether a frame says the token cannot be used.
fn refuses(data: &str) -> bool {
    matches!(verdict_of(data), TokenVerdict::Invalid)
}

fn transport_reason(error: &reqwest::Error) -> &'static str {
    if error.is_connect() {
        "connection refused or failed"
    } else if error.is_timeout() {
        "timed out"
    } else {
        "transport error"
    }
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

/// Splits an event stream into the data of its events, reading at most
/// [`MAX_FIRST_FRAME_BYTES`] in all: lines end at `\n`, `\r` or `\r\n`, as SSE defines them.
#[derive(Default)]
struct EventReader {
    line: Vec<u8>,
    data: Option<String>,
    after_cr: bool,
    read: usize,
    events: VecDeque<String>,
}

impl EventReader {
    /// Adds a chunk; complete events are then available from [`EventReader::next_event`].
    fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.read += chunk.len();
        if self.read > MAX_FIRST_FRAME_BYTES {
            return Err("Crownstone's event server sent more than a token check reads.".into());
        }
        for &byte in chunk {
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                continue;
            }
            if byte == b'\r' || byte == b'\n' {
                self.after_cr = byte == b'\r';
                let line = std::mem::take(&mut self.line);
                self.end_line(&line);
                continue;
            }
            self.line.push(byte);
        }
        Ok(())
    }

    fn next_event(&mut self) -> Option<String> {
        self.events.pop_front()
    }

    fn end_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                self.events.push_back(data);
            }
            return;
        }
        if line.starts_with(b":") {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        if field == "data" {
            let data = self.data.get_or_insert_with(String::new);
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(chunks: &[&str]) -> Result<Option<String>, String> {
        let mut reader = EventReader::default();
        for chunk in chunks {
            reader.feed(chunk.as_bytes())?;
            if let Some(data) = reader.next_event() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    #[test]
    fn events_after_the_first_in_one_chunk_are_kept() {
        let mut reader = EventReader::default();
        reader.feed(b"data:1\n\ndata:2\n\ndata:3").unwrap();
        assert_eq!(reader.next_event().as_deref(), Some("1"));
        assert_eq!(reader.next_event().as_deref(), Some("2"));
        assert_eq!(reader.next_event(), None);
        reader.feed(b"\n\n").unwrap();
        assert_eq!(reader.next_event().as_deref(), Some("3"));
    }

    #[test]
    fn the_first_event_is_read_across_chunks_and_line_ends() {
        let start =
            r#"{"type":"system","subType":"STREAM_START","code":200,"message":"Stream Starting."}"#;
        assert_eq!(
            first(&[&format!("data:{start}\n\n")]).unwrap().as_deref(),
            Some(start)
        );
        assert_eq!(
            first(&["da", "ta: {\"a\"", ":1}\r\n", "\r\n"])
                .unwrap()
                .as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(
            first(&[": comment\n", "event: x\n", "data:1\n\n"])
                .unwrap()
                .as_deref(),
            Some("1")
        );
        assert_eq!(
            first(&["data:1\n"]).unwrap(),
            None,
            "not complete without a blank line"
        );
        assert!(first(&[&"x".repeat(MAX_FIRST_FRAME_BYTES + 1)]).is_err());
        assert!(first(&["data:", &"x".repeat(MAX_FIRST_FRAME_BYTES + 1), "\n"]).is_err());
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
