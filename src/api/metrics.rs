//! The facade's metrics: requests and their latency by method, route template and status.
//! Labels never hold a key, a token, an id or a query: a route is its template
//! (`/api/listeners/{id}`), and anything that matched no route is `unmatched`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::token_check::OutcomeLabel;

/// One request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: String,
    pub status: u16,
}

/// The latency histogram's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: &'static str,
    pub route: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The facade's metric families.
#[derive(Clone)]
pub struct ApiMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: HistogramFamily,
    pub token_checks: Family<OutcomeLabel, Counter>,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s: a read answers in the first buckets, a token check in the last.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl ApiMetrics {
    /// Registers the families under `api_` in `registry`.
    pub fn register(registry: &mut Registry) -> ApiMetrics {
        let metrics = ApiMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            token_checks: Family::default(),
        };
        let registry = registry.sub_registry_with_prefix("api");
        registry.register(
            "requests",
            "REST requests by method, route template and status",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "REST request latency by method and route template",
            metrics.latency.clone(),
        );
        registry.register(
            "token_checks",
            "Token checks of POST /listeners by outcome, and whether a stream was opened",
            metrics.token_checks.clone(),
        );
        metrics
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts and times every request.
pub async fn track(
    State(metrics): State<ApiMetrics>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let method = method_label(request.method());
    let route = matched
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics
        .latency
        .get_or_create(&RouteLabels {
            method,
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}
