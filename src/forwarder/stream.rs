//! One forwarder: holds a token's event stream open, routes each data event to the delivery
//! engine, and turns the stream's system frames into state changes and notices.

use std::sync::Arc;

use eventsource_client::{Client, ClientBuilder, ReconnectOptions, SSE};
use futures::StreamExt;
use launchdarkly_sdk_transport::HyperTransport;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Backoff, InvalidTokenCause, Shared, StreamState, Token, TokenHash, TokenNotice};
use crate::crownstone::{StreamFrame, SystemCode};

/// How one connection ended.
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

/// Runs until cancelled, or until the token turns out invalid or expired.
pub(super) async fn run(
    shared: Arc<Shared>,
    token: Token,
    state: Arc<Mutex<StreamState>>,
    cancel: CancellationToken,
) {
    let hash = token.hash();
    let settings = &shared.settings;
    let mut backoff = Backoff::new(settings.reconnect_initial, settings.reconnect_max);
    loop {
        let end = tokio::select! {
            _ = cancel.cancelled() => return,
            end = connect_and_forward(&shared, &token, &state) => end,
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

async fn connect_and_forward(
    shared: &Shared,
    token: &Token,
    state: &Mutex<StreamState>,
) -> StreamEnd {
    let hash = token.hash();
    let retry = |reason: String, was_streaming: bool| StreamEnd::Retry {
        reason,
        was_streaming,
    };
    let client = match build_client(shared, token) {
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
        match frame {
            StreamFrame::Data {
                event_type: Some(event_type),
                json,
                ..
            } => {
                shared.metrics.events.inc();
                shared.index.route(&hash, event_type, &mut targets, |skip| {
                    shared.metrics.skipped(skip);
                });
                for routed in targets.drain(..) {
                    // A delivery never attempted does not use the owner's allowance.
                    if !shared
                        .engine
                        .submit(json.clone(), routed.target)
                        .is_queued()
                    {
                        routed.charge.refund();
                    }
                }
            }
            StreamFrame::Data {
                event_type: None, ..
            }
            | StreamFrame::Ping { .. } => {}
            StreamFrame::System { code, .. } => match code {
                SystemCode::StreamStart => {
                    streaming = true;
                    set_state(shared, hash, state, StreamState::Streaming);
                }
                SystemCode::TokenExpired => return StreamEnd::Expired,
                SystemCode::InvalidAccessToken | SystemCode::NoAccessToken => {
                    return StreamEnd::InvalidToken
                }
                other => {
                    return retry(
                        format!("the event server sent {}", other.as_str()),
                        streaming,
                    )
                }
            },
        }
    }
}

fn build_client(shared: &Shared, token: &Token) -> Result<impl Client, String> {
    let mut url = shared.settings.events_url.clone();
    url.path_segments_mut()
        .map_err(|_| "the events url cannot be a base".to_string())?
        .pop_if_empty()
        .push("sse");
    url.query_pairs_mut()
        .append_pair("projectName", &shared.settings.project_name);
    let transport = HyperTransport::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build_https()
        .map_err(|e| format!("could not set up TLS: {e}"))?;
    // The token goes in a header: a url ends up in proxy logs.
    let builder = ClientBuilder::for_url(url.as_str())
        .map_err(|e| format!("invalid events url: {}", describe(&e)))?
        .header("access_token", token.expose())
        .map_err(|_| "the token is not a valid header value".to_string())?
        .header("Accept", "text/event-stream")
        .map_err(|e| describe(&e))?
        .reconnect(ReconnectOptions::reconnect(false).build());
    Ok(builder.build_with_transport(transport))
}

/// A short reason for a stream error; never contains the token (it is only ever in a header).
fn describe(error: &eventsource_client::Error) -> String {
    use eventsource_client::Error;
    match error {
        Error::UnexpectedResponse(response, _) => {
            format!("the event server answered HTTP {}", response.status())
        }
        Error::TimedOut => "the connection timed out".into(),
        Error::Eof | Error::UnexpectedEof => "the event server closed the stream".into(),
        other => format!("stream error: {other}"),
    }
}
