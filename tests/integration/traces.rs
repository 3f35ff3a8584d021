//! Traces on a real OTLP/gRPC receiver: an operator given an endpoint exports a span for
//! reading an event, one for routing it and one per delivery attempt, with no token, secret or
//! url path in them, and the delivery's `traceparent` names the attempt span. Without an
//! endpoint a delivery still carries a valid, unsampled `traceparent`.

use std::sync::Arc;

use crownstone_webhooks::clock::SystemClock;
use crownstone_webhooks::crownstone::samples;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use tokio_stream::wrappers::TcpListenerStream;

use crate::support::cluster::eventually;
use crate::support::operator::{Harness, ALLOW_LOOPBACK, WAIT};
use crate::support::receiver::{Receiver, Reply};

/// An OTLP trace receiver on 127.0.0.1 that keeps every span it is sent.
#[derive(Clone, Default)]
struct OtlpReceiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for OtlpReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.spans.lock().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpReceiver {
    /// Serves on a free port; returns the receiver and its `http://` endpoint.
    async fn start() -> (OtlpReceiver, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let receiver = OtlpReceiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        (receiver, endpoint)
    }

    fn named(&self, name: &str) -> Vec<Span> {
        self.spans
            .lock()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn receive_route_and_attempt_spans_reach_an_otlp_receiver() {
    let (otlp, endpoint) = OtlpReceiver::start().await;
    let mut flags = ALLOW_LOOPBACK.to_vec();
    flags.extend(["--otlp-endpoint", endpoint.as_str()]);
    let h = Harness::start_with("traces", Arc::new(SystemClock), &flags).await;
    // The first attempt fails and is retried: two attempt spans under one trace.
    let receiver = Receiver::scripted([Reply::status(500)], Reply::status(200)).await;
    let url = receiver.url_with_path("/hooks/private-path?key=query-secret");
    let token = h
        .ready_listener("traced", "owner", &["command"], &url)
        .await;
    let secret = h.client_secret("owner").await;
    h.admin
        .publish(&[samples::multi_switch("sphere-1")])
        .await
        .expect("the simulator publishes");
    let requests = receiver.wait_for_requests(2, WAIT).await;
    let traceparents: Vec<String> = requests
        .iter()
        .map(|r| {
            r.header("traceparent")
                .expect("every attempt carries a traceparent")
                .to_owned()
        })
        .collect();

    let attempts = eventually("both attempt spans", WAIT, || async {
        let mut attempts = otlp.named("delivery attempt");
        attempts.sort_by_key(|s| s.start_time_unix_nano);
        (attempts.len() == 2).then_some(attempts)
    })
    .await;
    let (failed, attempt) = (&attempts[0], &attempts[1]);
    let route = eventually("the route span", WAIT, || async {
        otlp.named("route").into_iter().next()
    })
    .await;
    let receive = otlp
        .named("receive")
        .into_iter()
        .find(|s| s.span_id == route.parent_span_id)
        .expect("the route span's parent is a receive span");

    // One trace: receive -> route -> attempt, and the header names the attempt.
    assert_eq!(route.trace_id, receive.trace_id);
    assert_eq!(attempt.trace_id, route.trace_id);
    assert_eq!(attempt.parent_span_id, route.span_id);
    assert_eq!(failed.trace_id, attempt.trace_id);
    assert_eq!(failed.parent_span_id, route.span_id);
    for (traceparent, span) in traceparents.iter().zip([failed, attempt]) {
        assert_eq!(
            *traceparent,
            format!("00-{}-{}-01", hex(&span.trace_id), hex(&span.span_id))
        );
    }
    assert_eq!(
        attribute(failed, "http.response.status_code"),
        Some(&AnyValue::IntValue(500))
    );
    assert_eq!(
        attribute(failed, "crownstone_webhooks.attempt.result"),
        Some(&AnyValue::StringValue("server_error".into()))
    );
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    assert_eq!(
        attribute(failed, "http.request.resend_count"),
        Some(&AnyValue::IntValue(0))
    );
    assert_eq!(
        attribute(attempt, "http.request.resend_count"),
        Some(&AnyValue::IntValue(1))
    );

    assert_eq!(
        attribute(&receive, "crownstone.event.type"),
        Some(&AnyValue::StringValue("command".into()))
    );
    assert_eq!(
        attribute(&route, "crownstone_webhooks.listeners"),
        Some(&AnyValue::IntValue(1))
    );
    assert_eq!(
        attribute(attempt, "server.address"),
        Some(&AnyValue::StringValue("127.0.0.1".into()))
    );
    assert_eq!(
        attribute(attempt, "server.port"),
        Some(&AnyValue::IntValue(i64::from(receiver.address().port())))
    );
    assert_eq!(
        attribute(attempt, "http.response.status_code"),
        Some(&AnyValue::IntValue(200))
    );
    assert_eq!(
        attribute(attempt, "crownstone_webhooks.attempt.result"),
        Some(&AnyValue::StringValue("success".into()))
    );
    assert!(matches!(
        attribute(attempt, "crownstone_webhooks.attempt.duration_ms"),
        Some(AnyValue::DoubleValue(ms)) if *ms > 0.0
    ));
    assert!(attempt.end_time_unix_nano > attempt.start_time_unix_nano);

    // No span says the token, the client secret, or the url's path or query.
    for span in otlp.spans.lock().iter() {
        let text = format!("{} {:?}", span.name, span.attributes);
        for leak in [
            token.as_str(),
            secret.as_str(),
            "private-path",
            "query-secret",
        ] {
            assert!(!text.contains(leak), "{leak:?} in span {text}");
        }
    }
}

#[tokio::test]
async fn without_an_endpoint_a_delivery_still_carries_an_unsampled_traceparent() {
    let h = Harness::start("untraced").await;
    let receiver = Receiver::start().await;
    h.ready_listener("untraced", "owner", &["command"], &receiver.url())
        .await;
    h.admin
        .publish(&[samples::multi_switch("sphere-1")])
        .await
        .expect("the simulator publishes");
    let request = receiver.wait_for_requests(1, WAIT).await.remove(0);
    let traceparent = request.header("traceparent").expect("a traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    assert_ne!(parts[1], "0".repeat(32));
    assert_ne!(parts[2], "0".repeat(16));
    assert_eq!(parts[3], "00", "not sampled: no span was recorded");
}
