//! `GET /sse`: the event stream, from token lookup to the last frame.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::registry::{token_ref, Ending, Registry, StreamHandle};
use super::AppState;
use crate::crownstone::{StreamFrame, SystemCode};

/// Where the token was found, in order of precedence.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Credentials {
    pub token: Option<String>,
    pub project_name: Option<String>,
}

/// Reads the token (header `access_token`, header `Authorization` as is, query `access_token`,
/// query `accessToken`; the first non-empty one wins) and the optional project name.
pub(super) fn credentials(headers: &HeaderMap, query: Option<&str>) -> Credentials {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let pairs: Vec<(String, String)> = query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let param = |name: &str| {
        pairs
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    Credentials {
        token: header("access_token")
            .or_else(|| header(header::AUTHORIZATION.as_str()))
            .or_else(|| param("access_token"))
            .or_else(|| param("accessToken")),
        project_name: param("projectName")
            .or_else(|| param("project_name"))
            .or_else(|| header("projectName"))
            .or_else(|| header("project_name")),
    }
}

/// The response head every stream gets, whatever follows.
fn stream_response(body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A stream whose only frame is `code`, then its end.
fn single_frame(code: SystemCode) -> Response {
    let frame = StreamFrame::system(code).to_sse_bytes();
    stream_response(Body::from_stream(stream::once(async move {
        Ok::<_, std::io::Error>(frame)
    })))
}

/// Handles `GET /sse`.
pub(super) async fn sse(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let registry = &state.registry;
    let credentials = credentials(&headers, query.as_deref());
    let project = credentials.project_name.as_deref().unwrap_or("-");
    // The order of checks is the event server's: token present, upstream, token valid, expiry.
    let Some(token) = credentials.token else {
        tracing::debug!(project, "stream without a token");
        return single_frame(SystemCode::NoAccessToken);
    };
    if registry.stopping() {
        return single_frame(SystemCode::StreamClosed);
    }
    if registry.outage() {
        tracing::debug!(project, "stream refused: simulated outage");
        return single_frame(SystemCode::NoConnection);
    }
    let Some(record) = registry.token(&token) else {
        tracing::debug!(project, token = %token_ref(&token), "stream with an unknown token");
        return single_frame(SystemCode::InvalidAccessToken);
    };
    let start = StreamFrame::system(SystemCode::StreamStart).to_sse_bytes();
    if record.is_expired(chrono::Utc::now()) {
        let expired = StreamFrame::system(SystemCode::TokenExpired).to_sse_bytes();
        return stream_response(Body::from_stream(stream::iter([
            Ok::<_, std::io::Error>(start),
            Ok(expired),
        ])));
    }
    tracing::debug!(project, token = %token_ref(&token), "stream opened");
    let subscription = registry.open_stream(&token, record);
    let driver = StreamDriver {
        guard: Registration {
            registry: Arc::clone(registry),
            handle: Arc::clone(&subscription.handle),
        },
        queue: subscription.queue,
        ping: ping_timer(state.ping_interval),
        counter: 0,
        last: None,
        finished: false,
    };
    let body = stream::once(async move { Ok(start) }).chain(driver.into_stream());
    stream_response(Body::from_stream(body))
}

fn ping_timer(period: Duration) -> Interval {
    // The first ping comes one full interval after connect.
    let mut timer = tokio::time::interval_at(Instant::now() + period, period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
}

/// Removes the stream from the registry when its body is dropped (client gone, stream ended).
struct Registration {
    registry: Arc<Registry>,
    handle: Arc<StreamHandle>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove_stream(&self.handle);
    }
}

/// Produces one stream's frames: queued events, pings, and its last frame.
struct StreamDriver {
    guard: Registration,
    queue: tokio::sync::mpsc::Receiver<Bytes>,
    ping: Interval,
    counter: u64,
    /// The final frame, sent once the queue is drained.
    last: Option<Bytes>,
    finished: bool,
}

/// A closed connection: hyper aborts the response instead of ending it cleanly.
fn aborted() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "stream dropped")
}

impl StreamDriver {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
        stream::unfold(self, |mut driver| async move {
            let item = driver.next_frame().await?;
            Some((item, driver))
        })
    }

    async fn next_frame(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(last) = &self.last {
                // Frames queued before the end still go out, in order.
                if let Ok(frame) = self.queue.try_recv() {
                    return Some(Ok(frame));
                }
                self.finished = true;
                return Some(Ok(last.clone()));
            }
            match self.guard.handle.take_ending() {
                Some(Ending::Abort) => {
                    self.finished = true;
                    return Some(Err(aborted()));
                }
                Some(Ending::Frame(frame)) => {
                    self.last = Some(frame);
                    continue;
                }
                None => {}
            }
            tokio::select! {
                biased;
                () = self.guard.handle.wake.notified() => continue,
                _ = self.ping.tick() => {
                    if self.guard.handle.token.is_expired(chrono::Utc::now()) {
                        self.guard.registry.remove_stream(&self.guard.handle);
                        self.last = Some(StreamFrame::system(SystemCode::TokenExpired).to_sse_bytes());
                        continue;
                    }
                    let ping = StreamFrame::Ping { counter: self.counter }.to_sse_bytes();
                    self.counter += 1;
                    return Some(Ok(ping));
                }
                frame = self.queue.recv() => match frame {
                    Some(frame) => return Some(Ok(frame)),
                    // The registry never drops the sender of a live stream; end cleanly.
                    None => {
                        self.finished = true;
                        return None;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn token_sources_in_order_of_precedence() {
        let all = headers(&[("access_token", "h1"), ("authorization", "h2")]);
        let q = Some("access_token=q1&accessToken=q2");
        assert_eq!(credentials(&all, q).token.as_deref(), Some("h1"));
        let auth = headers(&[("authorization", "Bearer h2")]);
        assert_eq!(credentials(&auth, q).token.as_deref(), Some("Bearer h2"));
        assert_eq!(
            credentials(&HeaderMap::new(), q).token.as_deref(),
            Some("q1")
        );
        assert_eq!(
            credentials(&HeaderMap::new(), Some("accessToken=q2"))
                .token
                .as_deref(),
            Some("q2")
        );
        assert_eq!(credentials(&HeaderMap::new(), None).token, None);
    }

    #[test]
    fn empty_values_fall_through() {
        let empty = headers(&[("access_token", "")]);
        assert_eq!(
            credentials(&empty, Some("access_token=&accessToken=q2"))
                .token
                .as_deref(),
            Some("q2")
        );
        assert_eq!(credentials(&empty, Some("accessToken=")).token, None);
    }

    #[test]
    fn project_name_from_query_or_header() {
        assert_eq!(
            credentials(&HeaderMap::new(), Some("project_name=a%20b"))
                .project_name
                .as_deref(),
            Some("a b")
        );
        assert_eq!(
            credentials(&headers(&[("projectname", "p")]), None)
                .project_name
                .as_deref(),
            Some("p")
        );
    }
}
