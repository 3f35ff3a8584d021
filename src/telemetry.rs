//! Traces: OpenTelemetry spans for an event's receipt, its routing and each delivery attempt,
//! exported over OTLP/gRPC only when an endpoint is configured, and the W3C `traceparent`
//! header every delivery carries. When traces are off no span is built: each hook is one
//! branch on an `Option`.

use std::io::Write as _;
use std::time::Duration;

use clap::Args;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, ContextGuard, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use url::Url;

use crate::delivery::AttemptResult;
use crate::domain::TokenHash;

/// The service name our spans carry.
const SERVICE_NAME: &str = "crownstone-webhooks";

/// Where spans go.
#[derive(Args, Clone, Debug, Default)]
pub struct TelemetryArgs {
    /// OTLP/gRPC endpoint spans are exported to, e.g. `http://otel-collector:4317`; unset: no
    /// spans are made. Sampling follows `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<Url>,
}

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter could not be built, e.g. from a malformed endpoint.
    #[error("could not build the OTLP span exporter: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// Not inside a Tokio runtime, which the gRPC client needs.
    #[error("traces must be set up inside a Tokio runtime")]
    NoRuntime,
}

/// The spans of this process, or none. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Tracing {
    tracer: Option<SdkTracer>,
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// No spans, no export: only the `traceparent` header, with its sampled flag off.
    pub const fn disabled() -> Self {
        Self {
            tracer: None,
            provider: None,
        }
    }

    /// Exports spans to `args.otlp_endpoint` when it is set; otherwise [`disabled`](Self::disabled).
    /// Must be called inside a Tokio runtime, whose tasks carry the gRPC connection.
    pub fn start(args: &TelemetryArgs) -> Result<Self, TelemetryError> {
        let Some(endpoint) = &args.otlp_endpoint else {
            return Ok(Self::disabled());
        };
        tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.as_str())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(TelemetryError::Exporter)?;
        // The sampler comes from the environment (`OTEL_TRACES_SAMPLER`), as the standard says.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(SERVICE_NAME).build())
            .build();
        Ok(Self {
            tracer: Some(provider.tracer(SERVICE_NAME)),
            provider: Some(provider),
        })
    }

    /// Whether spans are made.
    pub fn is_enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// Exports the spans still buffered and stops the exporter; blocks for at most `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        if let Some(provider) = &self.provider {
            if let Err(error) = provider.shutdown_with_timeout(timeout) {
                tracing::warn!(%error, "could not export the last spans");
            }
        }
    }

    /// The span of an event read from a token's stream, ended when the returned value drops.
    /// The token appears only as its hash.
    pub(crate) fn receive(
        &self,
        token: TokenHash,
        event_type: &'static str,
        bytes: usize,
    ) -> Option<EventTrace> {
        let tracer = self.tracer.as_ref()?;
        let span = tracer
            .span_builder("receive")
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", "crownstone"),
                KeyValue::new("messaging.operation.type", "receive"),
                KeyValue::new("crownstone.event.type", event_type),
                KeyValue::new("crownstone.token.hash", token.to_string()),
                KeyValue::new(
                    "messaging.message.body.size",
                    i64::try_from(bytes).unwrap_or(i64::MAX),
                ),
            ])
            .start_with_context(tracer, &Context::new());
        Some(EventTrace {
            tracer: tracer.clone(),
            cx: Context::new().with_span(span),
        })
    }

    /// How a delivery is traced, from the context current when it is submitted: a child of the
    /// route span when there is one, else of a `deliver` span of its own. With traces off, a
    /// trace of its own that is not sampled, so the receiver still gets a valid `traceparent`.
    pub(crate) fn delivery(&self) -> DeliveryTrace {
        let Some(tracer) = &self.tracer else {
            return DeliveryTrace {
                trace_id: random_trace_id(),
                parent: SpanId::INVALID,
                sampled: false,
            };
        };
        let mut parent = Context::map_current(|cx| cx.span().span_context().clone());
        if !parent.is_valid() {
            let mut span = tracer
                .span_builder("deliver")
                .with_kind(SpanKind::Producer)
                .start_with_context(tracer, &Context::new());
            parent = span.span_context().clone();
            span.end();
        }
        DeliveryTrace {
            trace_id: parent.trace_id(),
            parent: parent.span_id(),
            sampled: parent.is_sampled(),
        }
    }

    /// The span of one delivery attempt to `url` (only its host and port are recorded), and
    /// the `traceparent` the request carries: the attempt span's, or with traces off a fresh
    /// span id under the delivery's trace.
    pub(crate) fn attempt(&self, trace: &DeliveryTrace, url: &Url, attempt: u32) -> AttemptTrace {
        let span = match &self.tracer {
            Some(tracer) if trace.sampled => {
                let parent = Context::new().with_remote_span_context(SpanContext::new(
                    trace.trace_id,
                    trace.parent,
                    TraceFlags::SAMPLED,
                    false,
                    TraceState::default(),
                ));
                let port = url.port_or_known_default().map_or(0, i64::from);
                Some(
                    tracer
                        .span_builder("delivery attempt")
                        .with_kind(SpanKind::Client)
                        .with_attributes([
                            KeyValue::new("http.request.method", "POST"),
                            KeyValue::new(
                                "server.address",
                                url.host_str().unwrap_or_default().to_owned(),
                            ),
                            KeyValue::new("server.port", port),
                            KeyValue::new("url.scheme", url.scheme().to_owned()),
                            KeyValue::new("http.request.resend_count", i64::from(attempt) - 1),
                        ])
                        .start_with_context(tracer, &parent),
                )
            }
            _ => None,
        };
        let (span_id, sampled) = match &span {
            Some(span) => (span.span_context().span_id(), true),
            None => (SpanId::from_bytes(rand::random::<[u8; 8]>()), false),
        };
        AttemptTrace {
            span,
            traceparent: traceparent(trace.trace_id, span_id, sampled),
        }
    }
}

fn random_trace_id() -> TraceId {
    // An all-zero id is invalid; the chance of drawing it is nil, but it costs one branch.
    let mut bytes = rand::random::<[u8; 16]>();
    if bytes == [0; 16] {
        bytes[15] = 1;
    }
    TraceId::from_bytes(bytes)
}

/// A W3C `traceparent` value: `00-<trace-id>-<span-id>-<flags>`, 55 bytes.
pub(crate) type Traceparent = [u8; 55];

fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> Traceparent {
    let mut out = [0u8; 55];
    let flags = if sampled { "01" } else { "00" };
    // 55 bytes exactly fit: 2 + 1 + 32 + 1 + 16 + 1 + 2.
    let _ = write!(
        &mut out[..],
        "00-{:032x}-{:016x}-{flags}",
        u128::from_be_bytes(trace_id.to_bytes()),
        u64::from_be_bytes(span_id.to_bytes()),
    );
    out
}

/// An event's receive span; the route span hangs below it. Ends when dropped.
pub(crate) struct EventTrace {
    tracer: SdkTracer,
    cx: Context,
}

impl EventTrace {
    /// Notes that a standby buffered the event instead of routing it.
    pub(crate) fn buffered(&self) {
        self.cx
            .span()
            .set_attribute(KeyValue::new("crownstone_webhooks.buffered", true));
    }

    /// Starts the span of routing the event to its Listeners.
    pub(crate) fn route(&self) -> RouteTrace {
        let span = self
            .tracer
            .span_builder("route")
            .with_kind(SpanKind::Internal)
            .start_with_context(&self.tracer, &self.cx);
        RouteTrace {
            cx: self.cx.with_span(span),
        }
    }
}

impl Drop for EventTrace {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// The route span of an event. Ends when dropped.
pub(crate) struct RouteTrace {
    cx: Context,
}

impl RouteTrace {
    /// Records how many Listeners the event was routed to.
    pub(crate) fn routed(&self, listeners: u32) {
        self.cx.span().set_attribute(KeyValue::new(
            "crownstone_webhooks.listeners",
            i64::from(listeners),
        ));
    }

    /// Makes the route span current on this thread while the guard lives, so the deliveries
    /// submitted meanwhile become its children.
    pub(crate) fn attach(&self) -> ContextGuard {
        self.cx.clone().attach()
    }
}

impl Drop for RouteTrace {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// The trace a delivery belongs to, kept for its retries: every attempt is a child of the same
/// parent, so a receiver sees each retry under the same trace id.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeliveryTrace {
    trace_id: TraceId,
    /// The route or `deliver` span; invalid with traces off.
    parent: SpanId,
    sampled: bool,
}

impl DeliveryTrace {
    /// Before submission sets it; never sent.
    pub(crate) const UNTRACED: Self = Self {
        trace_id: TraceId::INVALID,
        parent: SpanId::INVALID,
        sampled: false,
    };
}

/// One attempt's span (with traces on) and the `traceparent` it sends.
pub(crate) struct AttemptTrace {
    span: Option<opentelemetry_sdk::trace::Span>,
    traceparent: Traceparent,
}

impl AttemptTrace {
    /// The header value: ASCII by construction.
    pub(crate) fn traceparent(&self) -> &[u8] {
        &self.traceparent
    }

    /// Records how the attempt ended and ends its span.
    pub(crate) fn finish(mut self, result: &AttemptResult, elapsed: Duration) {
        let Some(span) = self.span.as_mut() else {
            return;
        };
        if let AttemptResult::Response { status, .. } = result {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
        }
        span.set_attribute(KeyValue::new(
            "crownstone_webhooks.attempt.result",
            result.label().as_str(),
        ));
        span.set_attribute(KeyValue::new(
            "crownstone_webhooks.attempt.duration_ms",
            elapsed.as_secs_f64() * 1000.0,
        ));
        if !matches!(result, AttemptResult::Response { status, .. } if status.is_success()) {
            // The label, not the reason: a reason may quote the receiver's answer.
            span.set_status(Status::error(result.label().as_str()));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(header: &[u8]) -> &str {
        std::str::from_utf8(header).unwrap()
    }

    #[test]
    fn traceparent_is_w3c_shaped() {
        let header = traceparent(
            TraceId::from_bytes([0xab; 16]),
            SpanId::from_bytes([0x01, 0, 0, 0, 0, 0, 0, 0x02]),
            true,
        );
        assert_eq!(
            text(&header),
            "00-abababababababababababababababab-0100000000000002-01"
        );
        let header = traceparent(TraceId::from_bytes([0; 16]), SpanId::INVALID, false);
        assert!(text(&header).ends_with("-0000000000000000-00"));
    }

    #[test]
    fn with_traces_off_each_attempt_names_the_deliverys_trace_unsampled() {
        let tracing = Tracing::disabled();
        let delivery = tracing.delivery();
        let url = Url::parse("https://example.com/hook?key=secret").unwrap();
        let first = tracing.attempt(&delivery, &url, 1);
        let second = tracing.attempt(&delivery, &url, 2);
        let (first, second) = (text(first.traceparent()), text(second.traceparent()));
        assert_eq!(first.len(), 55);
        assert!(
            first.starts_with("00-") && first.ends_with("-00"),
            "{first}"
        );
        // The same trace across retries, a new span id per attempt.
        assert_eq!(first[3..35], second[3..35]);
        assert_ne!(first[36..52], second[36..52]);
        assert_ne!(&first[3..35], "0".repeat(32));
        // Another delivery, another trace.
        let other = tracing.attempt(&tracing.delivery(), &url, 1);
        assert_ne!(first[3..35], text(other.traceparent())[3..35]);
    }
}
