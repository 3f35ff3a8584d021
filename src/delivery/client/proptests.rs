//! Properties of the delivery client's reading of an answer, from a real receiver on loopback
//! that writes its answer in arbitrary pieces: any bytes end the attempt with the same result
//! however they are cut, and a well-formed answer gives its status, its `Retry-After` and a
//! connection kept exactly when the answer allows it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http::{HeaderValue, StatusCode};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use url::Url;

use super::{attempt, AttemptRequest, Connector, MAX_INTERIM_ANSWERS, MAX_RESPONSE_BODY};
use crate::delivery::retry::AttemptResult;
use crate::delivery::signature::{SigningKey, SigningKeys};
use crate::delivery::url_policy::UrlPolicy;
use crate::http1::proptests::cut;

/// How one attempt against a receiver answering `pieces` ended: its result, and whether the
/// connection was kept for another request.
fn attempt_answered(pieces: Vec<Vec<u8>>) -> (AttemptResult, bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let url = Url::parse(&format!(
            "http://{}/hook",
            listener.local_addr().expect("bound")
        ))
        .expect("a url");
        let receiver = tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            // The whole request, head and body, so closing sends no reset.
            if super::tests::read_request(&mut socket).await.is_none() {
                return;
            }
            for piece in pieces {
                if socket.write_all(&piece).await.is_err() {
                    return;
                }
                let _ = socket.flush().await;
                // A pause, so the pieces arrive as pieces.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let connector = Connector::new(Arc::new(UrlPolicy {
            allow_private_destinations: true,
            denied_networks: Vec::new(),
        }))
        .expect("a connector");
        let key: SigningKeys = SigningKey::from_client_secret("0123456789abcdef0123456789abcdef")
            .expect("a key")
            .into();
        let body = Bytes::from_static(br#"{"data":{}}"#);
        let message_id = HeaderValue::from_static("msg_1");
        let request = AttemptRequest {
            url: &url,
            authorization: None,
            body: &body,
            message_id: &message_id,
            signing_key: &key,
            timestamp: Utc::now(),
            // Only a safety net: the receiver closes the connection after its answer.
            timeout: Duration::from_secs(30),
            traceparent: b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            error_headers: None,
        };
        let done = attempt(&connector, None, request).await;
        let _ = receiver.await;
        (done.result, done.connection.is_some())
    })
}

/// Bytes that look like an answer often enough to reach past the head: interim answers, a
/// valid head or the start of one, then anything.
fn any_answer() -> impl Strategy<Value = Vec<u8>> {
    let head = prop_oneof![
        Just(Vec::new()),
        Just(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()),
        Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
        Just(b"HTTP/1.1 503 No\r\nretry-after: 7\r\ncontent-length: 2\r\n\r\n".to_vec()),
        Just(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()),
    ];
    let tail = proptest::collection::vec(
        prop_oneof![
            Just(b'\r'),
            Just(b'\n'),
            Just(b'1'),
            Just(b' '),
            Just(b':'),
            any::<u8>(),
        ],
        0..160,
    );
    (head, tail).prop_map(|(mut head, tail)| {
        head.extend(tail);
        head
    })
}

/// An answer the test makes, and what the attempt must make of it.
#[derive(Clone, Debug)]
struct Answer {
    bytes: Vec<u8>,
    status: u16,
    retry_after: Option<u64>,
    keeps_connection: bool,
}

prop_compose! {
    fn well_formed()(
        interim in 0..=MAX_INTERIM_ANSWERS,
        status in prop_oneof![Just(200u16), Just(204), Just(404), Just(429), Just(500), Just(503)],
        retry_after in proptest::option::of(0u64..100_000),
        http_10 in any::<bool>(),
        close in any::<bool>(),
        chunked in any::<bool>(),
        until_close in prop::bool::weighted(0.2),
        length in prop_oneof![
            8 => 0usize..300,
            1 => MAX_RESPONSE_BODY - 8..MAX_RESPONSE_BODY + 8,
        ],
    ) -> Answer {
        let mut bytes = b"HTTP/1.1 102 Processing\r\n\r\n".repeat(interim);
        let version = if http_10 { "1.0" } else { "1.1" };
        let mut head = format!("HTTP/{version} {status} Whatever\r\n");
        if let Some(seconds) = retry_after {
            head.push_str(&format!("Retry-After: {seconds}\r\n"));
        }
        if close {
            head.push_str("Connection: keep-alive, close\r\n");
        }
        // A 204 has no body, whatever its head says.
        let length = if status == 204 { 0 } else { length };
        let data = vec![b'x'; length];
        let framed = status != 204 && !until_close;
        if status == 204 || until_close {
            head.push_str("\r\n");
        } else if chunked {
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        } else {
            head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
        }
        bytes.extend_from_slice(head.as_bytes());
        if status != 204 {
            if chunked && !until_close {
                for chunk in data.chunks(4096) {
                    bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    bytes.extend_from_slice(chunk);
                    bytes.extend_from_slice(b"\r\n");
                }
                bytes.extend_from_slice(b"0\r\n\r\n");
            } else {
                bytes.extend_from_slice(&data);
            }
        }
        let asks_retry = status == 429 || status == 503;
        Answer {
            bytes,
            status,
            retry_after: retry_after.filter(|_| asks_retry),
            keeps_connection: !http_10
                && !close
                && (framed || status == 204)
                && length <= MAX_RESPONSE_BODY,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Each case is a real connection; the splits vary more than the answers need to.
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_answer_ends_the_attempt_the_same_however_it_is_cut(
        bytes in any_answer(),
        points in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let (whole, _) = attempt_answered(vec![bytes.clone()]);
        let (cut, _) = attempt_answered(cut(&bytes, &points));
        prop_assert!(!matches!(whole, AttemptResult::TimedOut(_)), "{:?}", whole);
        prop_assert_eq!(whole, cut);
    }

    #[test]
    fn a_well_formed_answer_gives_its_status_and_keeps_the_connection_only_when_it_may(
        answer in well_formed(),
        points in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let (result, kept) = attempt_answered(cut(&answer.bytes, &points));
        let status = StatusCode::from_u16(answer.status).expect("a status");
        prop_assert_eq!(
            result,
            AttemptResult::Response {
                status,
                retry_after: answer.retry_after.map(Duration::from_secs),
            }
        );
        prop_assert_eq!(kept, answer.keeps_connection);
    }
}
