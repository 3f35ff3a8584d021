//! `crownstone-webhooks receive`: a webhook receiver for client developers. It checks each
//! delivery's Standard Webhooks signature and timestamp with the WebhookUser's client secret,
//! prints the verified body, and refuses anything else, so a developer sees exactly what their
//! own endpoint will get and that it can be trusted.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::serve::ListenerExt;
use axum::Router;
use base64::Engine as _;
use parking_lot::Mutex;

use crate::delivery::{verify, SigningKey, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};

/// Settings of `receive`.
#[derive(clap::Args, Clone, Debug)]
pub struct ReceiveArgs {
    /// The WebhookUser's client secret (`clientSecret` of its credentials Secret), or its
    /// Standard Webhooks form `whsec_<base64>`.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: String,

    /// Where to listen.
    #[arg(long, env = "RECEIVE_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,

    /// How far a delivery's timestamp may be from this machine's clock; older ones are replays.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub tolerance: Duration,
}

/// Why the receiver could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the secret is neither a client secret nor a whsec_ key with valid base64")]
    InvalidSecret,
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a delivery was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MissingHeaders,
    BadTimestamp,
    TooOld,
    BadSignature,
}

impl Refusal {
    fn describe(self) -> &'static str {
        match self {
            Refusal::MissingHeaders => {
                "no webhook-id, webhook-timestamp or webhook-signature header"
            }
            Refusal::BadTimestamp => "webhook-timestamp is not a unix time",
            Refusal::TooOld => "webhook-timestamp is too far from now (a replay?)",
            Refusal::BadSignature => "the signature does not match the secret",
        }
    }
}

/// The signing key for a secret as `receive` takes it.
pub fn key_of(secret: &str) -> Result<SigningKey, ReceiveError> {
    let bytes = match secret.strip_prefix("whsec_") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| ReceiveError::InvalidSecret)?,
        None => secret.as_bytes().to_vec(),
    };
    SigningKey::from_bytes(&bytes).map_err(|_| ReceiveError::InvalidSecret)
}

/// Checks one delivery: headers present, timestamp within `tolerance` of `now`, signature valid.
pub fn check(
    key: &SigningKey,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<String, Refusal> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signature)) = (
        header(WEBHOOK_ID),
        header(WEBHOOK_TIMESTAMP),
        header(WEBHOOK_SIGNATURE),
    ) else {
        return Err(Refusal::MissingHeaders);
    };
    let timestamp: i64 = timestamp.parse().map_err(|_| Refusal::BadTimestamp)?;
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(timestamp) > tolerance.unsigned_abs() {
        return Err(Refusal::TooOld);
    }
    if !verify(key, id, timestamp, body, signature) {
        return Err(Refusal::BadSignature);
    }
    Ok(id.to_owned())
}

struct Receiving {
    key: SigningKey,
    tolerance: Duration,
    out: Mutex<Box<dyn Write + Send>>,
}

/// Serves until the process ends: `204` and a printed line for each verified delivery, `401`
/// and a printed refusal for anything else. The first line printed is the address listened on.
pub async fn run(args: ReceiveArgs, out: Box<dyn Write + Send>) -> Result<(), ReceiveError> {
    let key = key_of(&args.secret)?;
    let (listener, addr) =
        crate::net::bind(args.listen)
            .await
            .map_err(|source| ReceiveError::Listen {
                addr: args.listen,
                source,
            })?;
    let state = Arc::new(Receiving {
        key,
        tolerance: args.tolerance,
        out: Mutex::new(out),
    });
    state.print(&format!("listening on http://{addr}"));
    let app = Router::new().fallback(receive).with_state(state);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .await
        .map_err(|source| ReceiveError::Listen { addr, source })
}

impl Receiving {
    fn print(&self, line: &str) {
        let mut out = self.out.lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

async fn receive(
    State(state): State<Arc<Receiving>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = chrono::Utc::now().timestamp();
    match check(&state.key, &headers, &body, now, state.tolerance) {
        Ok(id) => {
            state.print(&format!(
                "verified {id} to {}: {}",
                uri.path(),
                shown(&body)
            ));
            StatusCode::NO_CONTENT
        }
        Err(refusal) => {
            state.print(&format!(
                "refused a request to {}: {}",
                uri.path(),
                refusal.describe()
            ));
            StatusCode::UNAUTHORIZED
        }
    }
}

/// The body as printed: the client secret it carries is the receiver's own, yet it stays out of
/// terminals and log files.
fn shown(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut fields)) if fields.contains_key("clientSecret") => {
            fields.insert("clientSecret".into(), "<redacted>".into());
            serde_json::Value::Object(fields).to_string()
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn signed(key: &SigningKey, body: &[u8], timestamp: i64) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(WEBHOOK_ID, HeaderValue::from_static("msg_1"));
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
        let signature = key.sign("msg_1", timestamp, body);
        headers.insert(
            WEBHOOK_SIGNATURE,
            HeaderValue::from_str(&signature).unwrap(),
        );
        headers
    }

    #[test]
    fn both_secret_forms_give_the_same_key() {
        let plain = key_of(SECRET).unwrap();
        let whsec = key_of(&crate::delivery::receiver_secret(SECRET)).unwrap();
        assert_eq!(plain.sign("m", 1, b"x"), whsec.sign("m", 1, b"x"));
        assert!(matches!(
            key_of("whsec_!!"),
            Err(ReceiveError::InvalidSecret)
        ));
    }

    #[test]
    fn deliveries_are_checked_for_headers_time_and_signature() {
        let key = key_of(SECRET).unwrap();
        let minute = Duration::from_secs(60);
        let now = 1_700_000_000;
        let body = br#"{"clientId":"acme"}"#;
        assert_eq!(
            check(&key, &signed(&key, body, now), body, now, minute),
            Ok("msg_1".into())
        );
        assert_eq!(
            check(&key, &signed(&key, body, now), b"{}", now, minute),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(&key, &signed(&key, body, now - 600), body, now, minute),
            Err(Refusal::TooOld)
        );
        assert_eq!(
            check(&key, &HeaderMap::new(), body, now, minute),
            Err(Refusal::MissingHeaders)
        );
        let other = key_of("another").unwrap();
        assert_eq!(
            check(&other, &signed(&key, body, now), body, now, minute),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn the_printed_body_hides_the_client_secret() {
        let printed = shown(br#"{"clientId":"acme","clientSecret":"s3cret","data":{"a":1}}"#);
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains(r#""data":{"a":1}"#), "{printed}");
        assert_eq!(shown(b"not json"), "not json");
    }
}
