//! How replicas prove to each other that they share the handover key: a standby's request
//! carries its identity, the time and an HMAC over both and the request line; the leader's
//! answer carries an HMAC over its exact body bytes. Pure functions of their inputs (the time
//! is passed in), so every refusal is a table-driven test.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Header of a request: the standby's identity (its name in the Lease).
pub const PEER_HEADER: &str = "x-handover-peer";
/// Header of a request: unix seconds when it was signed.
pub const TIME_HEADER: &str = "x-handover-time";
/// Header of a request: HMAC-SHA256 of the request, hex.
pub const AUTH_HEADER: &str = "x-handover-auth";
/// Header of an answer: HMAC-SHA256 of its body, hex.
pub const MAC_HEADER: &str = "x-handover-mac";

/// How far a request's time may be from the leader's clock, either way, in seconds.
pub const MAX_SKEW_SECONDS: i64 = 60;

/// The shortest key accepted, in bytes: as long as the MAC it keys.
pub const MIN_KEY_BYTES: usize = 32;

// Each MAC starts with what it is for, so a request's MAC can never pass as an answer's.
const REQUEST_DOMAIN: &[u8] = b"crownstone-webhooks handover request v1\n";
const ANSWER_DOMAIN: &[u8] = b"crownstone-webhooks handover answer v1\n";

/// The key replicas share. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct HandoverKey(Vec<u8>);

impl HandoverKey {
    /// A key of at least [`MIN_KEY_BYTES`] bytes; a shorter one is refused without showing it.
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, KeyTooShort> {
        let key = key.into();
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyTooShort { bytes: key.len() });
        }
        Ok(HandoverKey(key))
    }

    /// For clap: the key from a flag or `HANDOVER_KEY`.
    pub fn parse(text: &str) -> Result<Self, KeyTooShort> {
        HandoverKey::new(text.as_bytes())
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length.
        HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

impl fmt::Debug for HandoverKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandoverKey(<redacted>)")
    }
}

/// The handover key is shorter than [`MIN_KEY_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the handover key (HANDOVER_KEY) has {bytes} bytes; it needs at least {MIN_KEY_BYTES} \
     (make one with `head -c 48 /dev/urandom | base64`)"
)]
pub struct KeyTooShort {
    pub bytes: usize,
}

/// Why a request or an answer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a handover header is missing or not text")]
    MissingHeader,
    #[error("the request's time is not unix seconds")]
    BadTime,
    #[error("the request's time is more than {MAX_SKEW_SECONDS} s from this replica's clock")]
    Stale,
    #[error("the MAC does not match: another key, or a changed message")]
    BadMac,
}

impl AuthError {
    /// The metric label.
    pub fn as_label(self) -> &'static str {
        match self {
            AuthError::MissingHeader => "missing_header",
            AuthError::BadTime => "bad_time",
            AuthError::Stale => "stale",
            AuthError::BadMac => "bad_mac",
        }
    }
}

/// The MAC of a request: method, path and query, identity and time, each length-prefixed so no
/// two different requests sign the same bytes, then the body's exact bytes where there is one.
fn request_mac(
    key: &HandoverKey,
    method: &str,
    path_and_query: &str,
    identity: &str,
    time: &str,
    body: Option<&[u8]>,
) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(REQUEST_DOMAIN);
    for part in [method, path_and_query, identity, time] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    if let Some(body) = body {
        mac.update(&(body.len() as u64).to_be_bytes());
        mac.update(body);
    }
    mac
}

/// Checks a request's time and MAC (compared in constant time).
#[allow(clippy::too_many_arguments)]
fn verify_request_mac(
    key: &HandoverKey,
    method: &str,
    path_and_query: &str,
    identity: &str,
    time: &str,
    auth: &str,
    now: i64,
    body: Option<&[u8]>,
) -> Result<(), AuthError> {
    let sent: i64 = time.parse().map_err(|_| AuthError::BadTime)?;
    if sent.abs_diff(now) > MAX_SKEW_SECONDS.unsigned_abs() {
        return Err(AuthError::Stale);
    }
    let claimed = hex::decode(auth).map_err(|_| AuthError::BadMac)?;
    request_mac(key, method, path_and_query, identity, time, body)
        .verify_slice(&claimed)
        .map_err(|_| AuthError::BadMac)
}

/// The `x-handover-auth` value of a request with a body: HMAC of method, path and query,
/// identity, time and the body's exact bytes.
pub fn sign_request_with_body(
    key: &HandoverKey,
    method: &str,
    path_and_query: &str,
    identity: &str,
    time: i64,
    body: &[u8],
) -> String {
    let mac = request_mac(
        key,
        method,
        path_and_query,
        identity,
        &time.to_string(),
        Some(body),
    );
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a request with a body as [`verify_request`] does, the body's bytes covered too.
#[allow(clippy::too_many_arguments)]
pub fn verify_request_with_body(
    key: &HandoverKey,
    method: &str,
    path_and_query: &str,
    identity: &str,
    time: &str,
    auth: &str,
    now: i64,
    body: &[u8],
) -> Result<(), AuthError> {
    verify_request_mac(
        key,
        method,
        path_and_query,
        identity,
        time,
        auth,
        now,
        Some(body),
    )
}

/// The `x-handover-auth` value of a request: HMAC of method, path and query, identity, time.
pub fn sign_request(
    key: &HandoverKey,
    method: &str,
    path_and_query: &str,
    identity: &str,
    time: i64,
) -> String {
    let mac = request_mac(
        key,
        method,
        path_and_query,
        identity,
        &time.to_string(),
        None,
    );
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a request's headers against `key` at unix time `now`: the time within
/// [`MAX_SKEW_SECONDS`], the MAC right (compared in constant time).
pub fn verify_request(
    key: &HandoverKey,
    method: &str,
    path_and_query: &str,
    identity: &str,
    time: &str,
    auth: &str,
    now: i64,
) -> Result<(), AuthError> {
    verify_request_mac(key, method, path_and_query, identity, time, auth, now, None)
}

/// The `x-handover-mac` value of an answer: HMAC of its exact body bytes.
pub fn sign_answer(key: &HandoverKey, body: &[u8]) -> String {
    let mut mac = key.mac();
    mac.update(ANSWER_DOMAIN);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks an answer's MAC over its exact body bytes, in constant time.
pub fn verify_answer(key: &HandoverKey, body: &[u8], claimed: &str) -> Result<(), AuthError> {
    let claimed = hex::decode(claimed).map_err(|_| AuthError::BadMac)?;
    let mut mac = key.mac();
    mac.update(ANSWER_DOMAIN);
    mac.update(body);
    mac.verify_slice(&claimed).map_err(|_| AuthError::BadMac)
}

/// Unix seconds by the system clock.
pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/handover/progress?after=7";

    fn key(fill: u8) -> HandoverKey {
        HandoverKey::new(vec![fill; 32]).unwrap()
    }

    #[test]
    fn a_short_key_is_refused_without_showing_it() {
        let error = HandoverKey::parse("short-secret-key").unwrap_err();
        assert_eq!(error.bytes, 16);
        assert!(!error.to_string().contains("short-secret"), "{error}");
        assert!(error.to_string().contains("at least 32"), "{error}");
        assert!(HandoverKey::parse(&"k".repeat(31)).is_err());
        assert!(HandoverKey::parse(&"k".repeat(32)).is_ok());
        let shown = format!("{:?}", HandoverKey::parse(&"secretkey".repeat(4)).unwrap());
        assert!(!shown.contains("secretkey"), "{shown}");
    }

    #[test]
    fn a_signed_request_passes_and_every_change_to_it_fails() {
        let now = 1_800_000_000;
        let auth = sign_request(&key(1), "GET", PATH, "replica-b", now);
        let time = now.to_string();
        assert_eq!(
            verify_request(&key(1), "GET", PATH, "replica-b", &time, &auth, now),
            Ok(())
        );
        let cases = [
            // Another key.
            (
                key(2),
                "GET",
                PATH,
                "replica-b",
                time.clone(),
                auth.clone(),
                now,
            ),
            // Another identity, path or method under the same MAC.
            (
                key(1),
                "GET",
                PATH,
                "replica-c",
                time.clone(),
                auth.clone(),
                now,
            ),
            (
                key(1),
                "GET",
                "/handover/progress?after=0",
                "replica-b",
                time.clone(),
                auth.clone(),
                now,
            ),
            (
                key(1),
                "POST",
                PATH,
                "replica-b",
                time.clone(),
                auth.clone(),
                now,
            ),
            // Another time under the same MAC.
            (
                key(1),
                "GET",
                PATH,
                "replica-b",
                (now + 1).to_string(),
                auth.clone(),
                now,
            ),
            // Not hex.
            (
                key(1),
                "GET",
                PATH,
                "replica-b",
                time.clone(),
                "zz".into(),
                now,
            ),
        ];
        for (key, method, path, identity, time, auth, now) in cases {
            assert_eq!(
                verify_request(&key, method, path, identity, &time, &auth, now),
                Err(AuthError::BadMac),
                "{method} {path} {identity} {time}"
            );
        }
    }

    #[test]
    fn a_request_replayed_past_the_allowed_skew_is_refused() {
        let sent = 1_800_000_000;
        let auth = sign_request(&key(1), "GET", PATH, "replica-b", sent);
        let verify = |now| {
            verify_request(
                &key(1),
                "GET",
                PATH,
                "replica-b",
                &sent.to_string(),
                &auth,
                now,
            )
        };
        assert_eq!(verify(sent + 60), Ok(()));
        assert_eq!(verify(sent - 60), Ok(()));
        assert_eq!(verify(sent + 61), Err(AuthError::Stale));
        assert_eq!(verify(sent - 61), Err(AuthError::Stale));
        assert_eq!(
            verify_request(&key(1), "GET", PATH, "replica-b", "soon", &auth, sent),
            Err(AuthError::BadTime)
        );
    }

    #[test]
    fn an_answer_passes_only_with_its_exact_bytes_and_key() {
        let body = br#"{"leader":"replica-a","term":3,"version":9,"final":false,"records":[]}"#;
        let mac = sign_answer(&key(1), body);
        assert_eq!(verify_answer(&key(1), body, &mac), Ok(()));
        assert_eq!(verify_answer(&key(2), body, &mac), Err(AuthError::BadMac));
        let forged = br#"{"leader":"replica-a","term":3,"version":9,"final":true,"records":[]}"#;
        assert_eq!(verify_answer(&key(1), forged, &mac), Err(AuthError::BadMac));
        // A request's MAC is no answer's, even over the same bytes.
        let request_mac = sign_request(&key(1), "GET", PATH, "replica-b", 0);
        assert_eq!(
            verify_answer(&key(1), body, &request_mac),
            Err(AuthError::BadMac)
        );
        assert_eq!(verify_answer(&key(1), body, ""), Err(AuthError::BadMac));
    }
}
