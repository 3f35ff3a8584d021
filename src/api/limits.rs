//! What one caller may take of the facade: a request rate per key (the admin key, or a
//! WebhookUser's API key) with a burst, and a bound on how long one request may run. Keys are
//! told apart by who they verify as, never by address: many clients share a proxy, and one
//! client may come from many addresses.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::middleware::NoOpMiddleware;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use super::auth::{
    presented_key, AdminKey, ADMIN_KEY_HEADERS, ADMIN_KEY_QUERY, API_KEY_HEADERS, API_KEY_QUERY,
};
use super::cache::FacadeCache;
use super::error::ApiError;

/// Who a request's rate is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// The admin key.
    Admin,
    /// A WebhookUser, by name, whose API key the request carries.
    User(String),
    /// No key, or one that is neither: all such requests share one budget, so unknown keys
    /// cannot grow the limiter's state without bound.
    Unverified,
}

/// Finds the [`RateKey`] of a request the way the routes' extractors find their caller.
#[derive(Clone)]
pub struct CallerKeyExtractor {
    cache: Arc<FacadeCache>,
    admin: AdminKey,
}

impl CallerKeyExtractor {
    pub fn new(cache: Arc<FacadeCache>, admin: AdminKey) -> Self {
        CallerKeyExtractor { cache, admin }
    }

    /// The key of a request with these headers and query.
    pub fn key_of(&self, headers: &http::HeaderMap, query: Option<&str>) -> RateKey {
        if let Some(key) = presented_key(headers, query, &ADMIN_KEY_HEADERS, ADMIN_KEY_QUERY) {
            if self.admin.matches(&key) {
                return RateKey::Admin;
            }
        }
        presented_key(headers, query, &API_KEY_HEADERS, API_KEY_QUERY)
            .filter(|key| !self.admin.matches(key))
            .and_then(|key| self.cache.user_by_api_key(&key))
            .map_or(RateKey::Unverified, RateKey::User)
    }
}

impl KeyExtractor for CallerKeyExtractor {
    type Key = RateKey;

    fn extract<T>(&self, request: &http::Request<T>) -> Result<RateKey, GovernorError> {
        Ok(self.key_of(request.headers(), request.uri().query()))
    }
}

/// Requests per second and burst per key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests a key may make per second, sustained.
    pub per_second: u32,
    /// Requests a key may make at once before the rate applies.
    pub burst: u32,
}

/// Why a rate limit cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("the rate limit needs at least one request per second and a burst of at least one")]
pub struct RateLimitError;

/// The layer that answers 429, in upstream's error shape, to a key past its rate.
pub fn rate_limit_layer(
    limit: RateLimit,
    extractor: CallerKeyExtractor,
) -> Result<GovernorLayer<CallerKeyExtractor, NoOpMiddleware, Body>, RateLimitError> {
    if limit.per_second == 0 || limit.burst == 0 {
        return Err(RateLimitError);
    }
    let config = GovernorConfigBuilder::default()
        .period(Duration::from_secs(1) / limit.per_second)
        .burst_size(limit.burst)
        .key_extractor(extractor)
        .finish()
        .ok_or(RateLimitError)?;
    Ok(GovernorLayer::new(Arc::new(config)).error_handler(too_many_requests))
}

fn too_many_requests(error: GovernorError) -> Response {
    match error {
        GovernorError::TooManyRequests { wait_time, .. } => ApiError::TooManyRequests(format!(
            "Too many requests with this key; try again in {wait_time}s."
        ))
        .into_response(),
        _ => ApiError::Unavailable("The request could not be counted; try again.".into())
            .into_response(),
    }
}

/// Answers 503 in upstream's error shape when a request runs longer than `timeout`; the
/// handler is dropped there and then.
pub async fn request_timeout(
    State(timeout): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(format!(
            "The request took longer than {}; try again.",
            humantime::format_duration(timeout)
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn requests_are_counted_against_the_key_they_verify_as() {
        let cache = Arc::new(FacadeCache::default());
        let extractor = CallerKeyExtractor::new(cache, AdminKey::fixed(Some("the-admin")));
        let with = |name: &str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            headers
        };
        assert_eq!(
            extractor.key_of(&with("admin_key", "the-admin"), None),
            RateKey::Admin
        );
        assert_eq!(
            extractor.key_of(&HeaderMap::new(), Some("admin_key=the-admin")),
            RateKey::Admin
        );
        // Unknown keys, and none, share one budget.
        assert_eq!(
            extractor.key_of(&with("api_key", "unknown"), None),
            RateKey::Unverified
        );
        assert_eq!(
            extractor.key_of(&HeaderMap::new(), None),
            RateKey::Unverified
        );
    }

    #[tokio::test]
    async fn a_request_past_the_timeout_is_answered_503_in_upstreams_shape() {
        let app = axum::Router::new()
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "too late"
                }),
            )
            .layer(axum::middleware::from_fn_with_state(
                Duration::from_millis(100),
                request_timeout,
            ));
        let (listener, addr) = crate::net::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(super::super::server::serve(
            listener,
            app,
            Duration::from_secs(5),
            stop.clone(),
        ));
        let answer = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{addr}/slow"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 503);
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["statusCode"], 503);
        assert_eq!(body["error"]["name"], "ServiceUnavailableError");
        stop.cancel();
        server.await.unwrap();
    }

    #[test]
    fn a_rate_of_zero_is_refused() {
        let extractor =
            CallerKeyExtractor::new(Arc::new(FacadeCache::default()), AdminKey::default());
        let zero = RateLimit {
            per_second: 0,
            burst: 1,
        };
        assert!(rate_limit_layer(zero, extractor.clone()).is_err());
        let ok = RateLimit {
            per_second: 5,
            burst: 10,
        };
        assert!(rate_limit_layer(ok, extractor).is_ok());
    }
}
