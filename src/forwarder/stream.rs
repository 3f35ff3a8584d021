//! One forwarder: holds a token's event stream open, routes each data event to the delivery
//! engine, and turns the stream's system frames into state changes and notices.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::events::{EventStreamClient, StreamEnded};
use super::{Backoff, InvalidTokenCause, Shared, StreamState, Token, TokenHash, TokenNotice};
use crate::crownstone::{EventType, StreamFrame, SystemCode};
use crate::delivery::{DeadLetterReason, DeliveryTarget};
use crate::domain::Skip;
use crate::handover::{
    gap_place, EventDigest, EventPlace, FillDecision, LoggedEvent, Seq, Settle, TokenLog,
};
use crate::index::{Allowance, Routed};
use crate::telemetry::{EventTrace, RouteTrace};

/// The longest `Reconnecting` reason, in characters: it ends up in a Listener condition, and
/// part of it can come from the event server or the network.
const MAX_REASON_CHARS: usize = 256;

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
    log: Arc<Mutex<TokenLog>>,
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
    // Whether a connection of this forwarder streamed: every later one may have missed events.
    let mut streamed = false;
    // Once per forwarder, so reconnects reuse the transport's connection pool. Settings that
    // cannot work are reported like any failed connection; they show on the Listener.
    loop {
        let end = match &shared.endpoint {
            Ok(client) => tokio::select! {
                _ = cancel.cancelled() => return,
                end = connect_and_forward(&shared, &token, client, &state, &log, &mut streamed) => end,
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

async fn connect_and_forward(
    shared: &Shared,
    token: &Token,
    client: &EventStreamClient,
    state: &Mutex<StreamState>,
    log: &Arc<Mutex<TokenLog>>,
    streamed: &mut bool,
) -> StreamEnd {
    let hash = token.hash();
    let retry = |reason: String, was_streaming: bool| StreamEnd::Retry {
        reason,
        was_streaming,
    };
    // The token was checked before the first connection, so a failure here is only a second
    // line of defence, reported like any failed connection.
    let mut stream = match client.open(token) {
        Ok(stream) => stream,
        Err(error) => return retry(error.to_string(), false),
    };
    let mut streaming = false;
    let mut scratch = Scratch::default();
    loop {
        let data =
            match tokio::time::timeout(shared.settings.silence_timeout, stream.next_data()).await {
                Err(_) => {
                    return retry(
                        format!(
                            "no data for {}s",
                            shared.settings.silence_timeout.as_secs_f32()
                        ),
                        streaming,
                    )
                }
                Ok(Err(StreamEnded(reason))) => return retry(reason, streaming),
                Ok(Ok(data)) => data,
            };
        let frame = match StreamFrame::parse_owned(data) {
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
                    deliver(shared, hash, log, event_type, json, &mut scratch);
                }
            }
            FrameOutcome::Ignore => {}
            FrameOutcome::Started => {
                if *streamed && !streaming {
                    // Events published while this stream was down may be missing; a standby
                    // that read them can fill the gap.
                    log.lock().mark_gap();
                }
                *streamed = true;
                streaming = true;
                set_state(shared, hash, state, StreamState::Streaming);
            }
            FrameOutcome::End(end) => return end,
        }
    }
}

/// Reused across events: the listeners an event is routed to, and the deliveries to submit.
#[derive(Default)]
pub(super) struct Scratch {
    routed: Vec<Routed>,
    /// The allowance is taken only when the delivery is submitted: a delivery refused at once
    /// (a suspended listener) gives its charge back before the next one takes its own.
    ready: Vec<(DeliveryTarget, Allowance)>,
}

/// One event as the log decides: leading, routed to the listeners of its token with its place
/// and a delivery submitted to each; standing by, buffered; stopped, dropped.
pub(super) fn deliver(
    shared: &Shared,
    hash: TokenHash,
    log: &Arc<Mutex<TokenLog>>,
    event_type: EventType,
    json: Bytes,
    scratch: &mut Scratch,
) {
    shared.metrics.events.inc();
    // Spans only with traces on; ended when dropped, the route span first.
    let received = shared
        .engine
        .tracing()
        .receive(hash, event_type.as_str(), json.len());
    let routing;
    let digest = EventDigest::of(&json);
    let (seq, epoch) = {
        let mut log = log.lock();
        if log.is_standby() {
            if let Some(received) = &received {
                received.buffered();
            }
            log.buffer(
                LoggedEvent {
                    event_type,
                    json,
                    digest,
                },
                tokio::time::Instant::now(),
            );
            return;
        }
        if !log.is_leading() {
            return;
        }
        // Routed under the log's lock, so a freeze or a change of role falls between events.
        routing = received.as_ref().map(EventTrace::route);
        let deliveries = route(shared, hash, event_type, scratch);
        if let Some(routing) = &routing {
            routing.routed(deliveries);
        }
        match log.record(digest, deliveries) {
            Some(seq) => (seq, log.epoch()),
            None => {
                scratch.ready.clear();
                return;
            }
        }
    };
    // Submitted without the lock: a delivery settled at once takes it. Under the route span,
    // so each delivery's trace hangs below it.
    let _current = routing.as_ref().map(RouteTrace::attach);
    let event = PlacedEvent {
        log,
        hash,
        seq,
        epoch,
        digest,
        json,
    };
    submit_all(shared, &event, scratch.ready.drain(..));
}

/// Leading: delivers a standby's events of the gap after `at` in this replica's stream, if the
/// gap is open and nobody filled it yet. Each event is parsed and routed as if read from the
/// stream, with the place the standby gives it too; bytes that are no event of this token's
/// types are skipped (and keep their number, so the places still match).
pub(super) fn fill_gap(
    shared: &Shared,
    hash: TokenHash,
    log: &Arc<Mutex<TokenLog>>,
    at: Seq,
    events: Vec<Bytes>,
) -> FillDecision {
    let mut scratch = Scratch::default();
    let mut placed: Vec<(Seq, EventDigest, Bytes, usize)> = Vec::new();
    let epoch = {
        let mut log = log.lock();
        let decision = log.fill(at, events.len());
        if decision != FillDecision::Accepted {
            return decision;
        }
        for (k, bytes) in (1u64..).zip(events) {
            let frame = String::from_utf8(bytes.to_vec())
                .ok()
                .and_then(|text| StreamFrame::parse_owned(text).ok());
            let Some(frame) = frame else {
                shared.metrics.malformed_frames.inc();
                continue;
            };
            let FrameOutcome::Deliver(event_type) = decide(&frame, true) else {
                continue;
            };
            let StreamFrame::Data { json, .. } = frame else {
                continue;
            };
            let deliveries = route(shared, hash, event_type, &mut scratch);
            log.hold_fill(at, deliveries);
            placed.push((
                gap_place(at, k),
                EventDigest::of(&json),
                json,
                scratch.ready.len(),
            ));
        }
        log.epoch()
    };
    submit_routed(shared, hash, log, epoch, placed, &mut scratch);
    FillDecision::Accepted
}

/// Routes an event into `scratch.ready`, each with the allowance it takes; returns how many.
fn route(shared: &Shared, hash: TokenHash, event_type: EventType, scratch: &mut Scratch) -> u32 {
    shared
        .index
        .route(&hash, event_type, &mut scratch.routed, |skip| {
            shared.metrics.skipped(skip);
        });
    let before = scratch.ready.len();
    scratch
        .ready
        .extend(scratch.routed.drain(..).map(|r| (r.target, r.allowance)));
    u32::try_from(scratch.ready.len() - before).unwrap_or(u32::MAX)
}

/// An event read while leading, with its place in its token's log.
struct PlacedEvent<'a> {
    log: &'a Arc<Mutex<TokenLog>>,
    hash: TokenHash,
    seq: Seq,
    epoch: u64,
    digest: EventDigest,
    json: Bytes,
}

/// Submits the event's deliveries, each taking its allowance first; the engine gives a charge
/// back if its delivery is never attempted, and settles the event in its log.
fn submit_all(
    shared: &Shared,
    event: &PlacedEvent<'_>,
    deliveries: impl Iterator<Item = (DeliveryTarget, Allowance)>,
) {
    for (target, allowance) in deliveries {
        let settle = Settle::new(Arc::clone(event.log), event.seq, event.epoch);
        let place = EventPlace {
            token: event.hash,
            seq: event.seq,
            digest: event.digest,
            settle,
        };
        let Some(charge) = allowance.take() else {
            shared.metrics.skipped(Skip::AllowanceUsed);
            // To the Listener's dead-letter sink, if it has one; the engine settles the place.
            shared.engine.dead_letter_unsent(
                event.json.clone(),
                target,
                DeadLetterReason::AllowanceExhausted,
                place,
            );
            continue;
        };
        shared
            .engine
            .submit_placed(event.json.clone(), target, Some(charge), place);
    }
}

/// Standby -> leading for one token: routes the buffered events the leader did not settle,
/// with their places, then the log routes live events. Returns how many events it routed.
pub(super) fn take_over(shared: &Shared, hash: TokenHash, log: &Arc<Mutex<TokenLog>>) -> usize {
    let mut scratch = Scratch::default();
    let mut events: Vec<(Seq, EventDigest, Bytes, usize)> = Vec::new();
    let (count, epoch) = {
        let mut log = log.lock();
        let count = log.take_over(|seq, event| {
            let deliveries = route(shared, hash, event.event_type, &mut scratch);
            events.push((seq, event.digest, event.json.clone(), scratch.ready.len()));
            deliveries
        });
        (count, log.epoch())
    };
    submit_routed(shared, hash, log, epoch, events, &mut scratch);
    count
}

/// Submits the deliveries of events routed under the log's lock, after it is released: each
/// event with its place, and the deliveries in `scratch.ready` up to its end mark.
fn submit_routed(
    shared: &Shared,
    hash: TokenHash,
    log: &Arc<Mutex<TokenLog>>,
    epoch: u64,
    routed: Vec<(Seq, EventDigest, Bytes, usize)>,
    scratch: &mut Scratch,
) {
    let mut ready = scratch.ready.drain(..);
    let mut taken = 0;
    for (seq, digest, json, end) in routed {
        let event = PlacedEvent {
            log,
            hash,
            seq,
            epoch,
            digest,
            json,
        };
        submit_all(shared, &event, ready.by_ref().take(end - taken));
        taken = end;
    }
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
}
