//! The one HTTP client of all deliveries, and a single attempt made with it.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use reqwest::{redirect, Client, Method, Request};

use super::{
    retry::{parse_retry_after, AttemptResult},
    signature::{SigningKey, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP},
    url_policy::{DestinationRefused, PolicyResolver, ResolveError, UrlPolicy},
};

/// `User-Agent` of every delivery.
pub const USER_AGENT: &str = concat!("crownstone-webhooks/", env!("CARGO_PKG_VERSION"));

/// Response bytes read (and discarded) before a connection is given up instead of reused: a
/// receiver cannot make us read an endless body.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Builds the shared client: pooled keep-alive connections, no redirects, no proxy from the
/// environment (a proxy would connect on our behalf, around the address policy), and DNS answers
/// filtered by `policy`.
pub(crate) fn build_client(
    policy: Arc<UrlPolicy>,
    timeout: Duration,
    concurrency_per_destination: usize,
) -> Result<Client, reqwest::Error> {
    Client::builder()
        .user_agent(USER_AGENT)
        .redirect(redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(PolicyResolver::new(policy)))
        .timeout(timeout)
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(concurrency_per_destination.saturating_mul(2).max(32))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
}

/// Everything one attempt needs; borrowed from the delivery so a retry rebuilds nothing.
pub(crate) struct AttemptRequest<'a> {
    pub url: &'a url::Url,
    pub authorization: Option<&'a HeaderValue>,
    pub body: &'a Bytes,
    pub message_id: &'a HeaderValue,
    pub signing_key: &'a SigningKey,
    pub timestamp: DateTime<Utc>,
    pub timeout: Duration,
}

/// Sends one signed POST and reports how it ended. Never returns a string holding the url.
pub(crate) async fn attempt(client: &Client, request: AttemptRequest<'_>) -> AttemptResult {
    let unix = request.timestamp.timestamp();
    let message_id = request.message_id.to_str().unwrap_or_default();
    let signature = request.signing_key.sign(message_id, unix, request.body);
    let signature = match HeaderValue::try_from(signature) {
        Ok(value) => value,
        Err(_) => return AttemptResult::RequestFailed("could not encode the signature".into()),
    };

    let mut headers = HeaderMap::with_capacity(6);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(WEBHOOK_ID, request.message_id.clone());
    headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(unix));
    headers.insert(WEBHOOK_SIGNATURE, signature);
    if let Some(authorization) = request.authorization {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }

    let mut http_request = Request::new(Method::POST, request.url.clone());
    *http_request.headers_mut() = headers;
    *http_request.body_mut() = Some(request.body.clone().into());

    let response = match client.execute(http_request).await {
        Ok(response) => response,
        Err(error) => return describe_error(&error, request.timeout),
    };
    let status = response.status();
    let retry_after =
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, request.timestamp))
        } else {
            None
        };
    drain(response).await;
    AttemptResult::Response {
        status,
        retry_after,
    }
}

/// Reads the response to its end, up to a bound, so the connection goes back to the pool. The
/// status is already known: an error here changes nothing about the attempt.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0usize;
    while let Ok(Some(chunk)) = response.chunk().await {
        read = read.saturating_add(chunk.len());
        if read > MAX_RESPONSE_BODY {
            break;
        }
    }
}

/// Turns a client error into a short reason: what failed, never the url (reqwest's own message
/// contains it, query string and all).
fn describe_error(error: &reqwest::Error, timeout: Duration) -> AttemptResult {
    if let Some(refused) = find_source::<DestinationRefused>(error) {
        return AttemptResult::Refused(refused.clone());
    }
    if error.is_timeout() {
        return AttemptResult::TimedOut(timeout);
    }
    if let Some(resolve) = find_source::<ResolveError>(error) {
        return AttemptResult::ConnectionFailed(resolve.to_string());
    }
    if let Some(io) = find_source::<std::io::Error>(error) {
        use std::io::ErrorKind;
        let reason = match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused",
            ErrorKind::ConnectionReset => "connection reset",
            ErrorKind::ConnectionAborted => "connection aborted",
            ErrorKind::TimedOut => return AttemptResult::TimedOut(timeout),
            ErrorKind::HostUnreachable => "host unreachable",
            ErrorKind::NetworkUnreachable => "network unreachable",
            ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe => "connection closed",
            _ => "connection failed",
        };
        return AttemptResult::ConnectionFailed(reason.to_owned());
    }
    if error.is_connect() {
        return AttemptResult::ConnectionFailed(format!("connection failed: {}", innermost(error)));
    }
    if error.is_builder() {
        return AttemptResult::RequestFailed(format!("invalid request: {}", innermost(error)));
    }
    // Protocol errors, a connection closed before the answer, TLS failures after connecting.
    AttemptResult::ConnectionFailed(format!("request failed: {}", innermost(error)))
}

/// The first error of type `T` in the source chain.
fn find_source<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// The message of the deepest source, shortened: it names the cause (hyper, rustls, io) and,
/// unlike reqwest's own message, carries no url.
fn innermost(error: &reqwest::Error) -> String {
    let Some(mut deepest) = std::error::Error::source(error) else {
        return "no detail".to_owned();
    };
    while let Some(source) = deepest.source() {
        deepest = source;
    }
    let mut message = deepest.to_string();
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
