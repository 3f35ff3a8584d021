//! Standard Webhooks signatures, so a receiver can check that a delivery came from us.
//!
//! Every delivery carries three headers, as the [Standard Webhooks] specification defines them:
//!
//! - `webhook-id`: the message id, `msg_` followed by 32 hex digits. It is unique per event and
//!   listener and stays the same on every retry, and on every replica for an event with a place
//!   (see `handover::webhook_id`), so a receiver can drop duplicates.
//! - `webhook-timestamp`: the unix time in seconds at which this attempt was sent.
//! - `webhook-signature`: `v1,` followed by the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`.
//!   While a replaced client secret is still in its overlap, the header carries one such entry
//!   per live secret, space-separated, the current one first: `v1,<new> v1,<old>`. A receiver's
//!   library accepts the delivery when any entry matches its secret.
//!
//! The HMAC key is the UTF-8 bytes of the owner's `clientSecret` (the 32-character hex string
//! that the body also carries). Standard Webhooks libraries take the key as `whsec_` followed by
//! the key's base64, so a receiver configures its library with
//! `"whsec_" + base64(clientSecret)`. In Python, with the `standardwebhooks` package:
//!
//! ```text
//! secret = "whsec_" + base64.b64encode(client_secret.encode()).decode()
//! Webhook(secret).verify(request_body, request_headers)
//! ```
//!
//! The library also refuses a timestamp more than five minutes away from its clock, which stops
//! a captured request from being replayed later.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::ClientSecret;

/// Header carrying the message id.
pub const WEBHOOK_ID: &str = "webhook-id";
/// Header carrying the unix time of the attempt, in seconds.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the `v1,` signature.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// A signing key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The HMAC implementation refused the key.
    #[error("invalid signing key length")]
    InvalidKey,
}

/// An HMAC-SHA256 key, initialised once per target and cloned for each signature.
#[derive(Clone)]
pub struct SigningKey(Hmac<Sha256>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// The key of an owner: the UTF-8 bytes of its client secret.
    pub fn from_client_secret(client_secret: &str) -> Result<Self, SignatureError> {
        Self::from_bytes(client_secret.as_bytes())
    }

    /// A key from raw bytes (what a `whsec_` secret's base64 decodes to).
    pub fn from_bytes(key: &[u8]) -> Result<Self, SignatureError> {
        Hmac::<Sha256>::new_from_slice(key)
            .map(Self)
            .map_err(|_| SignatureError::InvalidKey)
    }

    /// The `webhook-signature` value for one attempt: `v1,<base64 HMAC of "id.timestamp.body">`.
    pub fn sign(&self, message_id: &str, timestamp: i64, body: &[u8]) -> String {
        let digest = self
            .mac(message_id, timestamp, body)
            .finalize()
            .into_bytes();
        let mut out = String::with_capacity(48);
        out.push_str("v1,");
        STANDARD.encode_string(digest, &mut out);
        out
    }

    /// The HMAC of `{id}.{timestamp}.{body}`, before it is finished.
    fn mac(&self, message_id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(message_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// The keys that sign an owner's deliveries: the current client secret's, and each replaced
/// one's until it expires. Made once per change of the secrets, cloned with the target.
#[derive(Clone, Debug)]
pub struct SigningKeys {
    current: SigningKey,
    /// Newest first, each with the unix second from which it signs nothing.
    previous: Vec<(SigningKey, i64)>,
}

impl SigningKeys {
    /// The keys of an owner's current and previous secrets.
    pub fn of(secret: &ClientSecret) -> Result<Self, SignatureError> {
        Ok(Self {
            current: SigningKey::from_client_secret(secret.expose())?,
            previous: secret
                .previous()
                .iter()
                .map(|previous| {
                    SigningKey::from_client_secret(previous.expose())
                        .map(|key| (key, previous.expires_at().timestamp()))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// The `webhook-signature` value for an attempt sent at `timestamp`: one `v1,` entry per
    /// secret live then, the current one first.
    pub fn sign(&self, message_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = self.current.sign(message_id, timestamp, body);
        for (key, expires_at) in &self.previous {
            if timestamp < *expires_at {
                out.push(' ');
                out.push_str(&key.sign(message_id, timestamp, body));
            }
        }
        out
    }
}

impl From<SigningKey> for SigningKeys {
    fn from(current: SigningKey) -> Self {
        Self {
            current,
            previous: Vec::new(),
        }
    }
}

/// Whether a `webhook-signature` header (one or more space-separated `v1,<base64>` entries)
/// holds a valid signature of `{id}.{timestamp}.{body}` under `key`; compared in constant time.
pub fn verify(
    key: &SigningKey,
    message_id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> bool {
    header.split(' ').any(|entry| {
        let Some(encoded) = entry.strip_prefix("v1,") else {
            return false;
        };
        let Ok(signature) = STANDARD.decode(encoded) else {
            return false;
        };
        key.mac(message_id, timestamp, body)
            .verify_slice(&signature)
            .is_ok()
    })
}

/// The secret a receiver gives its Standard Webhooks library: `whsec_` + base64(client secret).
pub fn receiver_secret(client_secret: &str) -> String {
    format!("whsec_{}", STANDARD.encode(client_secret.as_bytes()))
}

/// A fresh message id: `msg_` and 128 random bits in hex.
pub fn new_message_id() -> String {
    let bits: u128 = rand::random();
    format!("msg_{bits:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &str) -> SigningKey {
        match SigningKey::from_client_secret(secret) {
            Ok(key) => key,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn matches_the_specification_example() {
        // The example of the Standard Webhooks specification and its reference libraries.
        let raw = match STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") {
            Ok(raw) => raw,
            Err(error) => panic!("{error}"),
        };
        let key = match SigningKey::from_bytes(&raw) {
            Ok(key) => key,
            Err(error) => panic!("{error}"),
        };
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn client_secret_is_the_key() {
        // Computed with Python's `standardwebhooks` 1.1.0 and the secret from `receiver_secret`.
        let body = br#"{"clientId":"owner-1","clientSecret":"0123456789abcdef0123456789abcdef","userId":"user-1","data":{"type":"presence"}}"#;
        assert_eq!(
            key("0123456789abcdef0123456789abcdef").sign(
                "msg_2f6c4f2e9d6b4b1e8a3c5d7f9e1a2b3c",
                1_700_000_000,
                body
            ),
            "v1,AiH4sg2cgU/Es3j34wnfN4YyXHQFVetuTEoze99BA5A="
        );
    }

    #[test]
    fn receiver_secret_is_whsec_and_base64() {
        assert_eq!(
            receiver_secret("0123456789abcdef0123456789abcdef"),
            "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
        );
    }

    #[test]
    fn any_change_changes_the_signature() {
        let key = key("0123456789abcdef0123456789abcdef");
        let base = key.sign("msg_1", 100, b"{}");
        assert_ne!(base, key.sign("msg_2", 100, b"{}"));
        assert_ne!(base, key.sign("msg_1", 101, b"{}"));
        assert_ne!(base, key.sign("msg_1", 100, b"{ }"));
        assert_ne!(
            base,
            super::SigningKey::from_client_secret("0123456789abcdef0123456789abcdee")
                .map(|other| other.sign("msg_1", 100, b"{}"))
                .unwrap_or_default()
        );
    }

    fn keys(previous: &[(&str, i64)]) -> SigningKeys {
        let secret = ClientSecret::with_previous(
            "0123456789abcdef0123456789abcdef",
            previous
                .iter()
                .map(|(secret, expires)| {
                    crate::domain::PreviousSecret::new(
                        *secret,
                        chrono::DateTime::from_timestamp(*expires, 0).unwrap(),
                    )
                })
                .collect(),
        );
        SigningKeys::of(&secret).unwrap()
    }

    #[test]
    fn each_live_secret_signs_newest_first() {
        let keys = keys(&[("old-1", 2_000), ("old-2", 1_500)]);
        let header = keys.sign("msg_1", 1_000, b"{}");
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(
            entries,
            [
                key("0123456789abcdef0123456789abcdef").sign("msg_1", 1_000, b"{}"),
                key("old-1").sign("msg_1", 1_000, b"{}"),
                key("old-2").sign("msg_1", 1_000, b"{}"),
            ]
        );
        for secret in ["0123456789abcdef0123456789abcdef", "old-1", "old-2"] {
            assert!(
                verify(&key(secret), "msg_1", 1_000, b"{}", &header),
                "{secret}"
            );
        }
        assert!(!verify(&key("old-3"), "msg_1", 1_000, b"{}", &header));
    }

    #[test]
    fn an_expired_secret_signs_nothing_from_its_expiry_on() {
        let keys = keys(&[("old-1", 2_000), ("old-2", 1_500)]);
        let before = keys.sign("msg_1", 1_499, b"{}");
        assert_eq!(before.split(' ').count(), 3);
        let at = keys.sign("msg_1", 1_500, b"{}");
        assert_eq!(at.split(' ').count(), 2);
        assert!(!verify(&key("old-2"), "msg_1", 1_500, b"{}", &at));
        assert!(verify(&key("old-1"), "msg_1", 1_500, b"{}", &at));
        let after = keys.sign("msg_1", 2_000, b"{}");
        assert_eq!(
            after,
            key("0123456789abcdef0123456789abcdef").sign("msg_1", 2_000, b"{}")
        );
    }

    #[test]
    fn one_secret_signs_as_a_single_key_does() {
        let single = SigningKeys::from(key("0123456789abcdef0123456789abcdef"));
        assert_eq!(
            single.sign("msg_1", 7, b"{}"),
            keys(&[]).sign("msg_1", 7, b"{}")
        );
        assert!(!format!("{single:?}").contains("0123"));
    }

    #[test]
    fn message_ids_are_distinct_and_header_safe() {
        let a = new_message_id();
        let b = new_message_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert!(a.starts_with("msg_"));
        assert!(a[4..].bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn verification_accepts_our_signature_and_nothing_else() {
        let key = key("0123456789abcdef0123456789abcdef");
        let signature = key.sign("msg_1", 1_700_000_000, b"{}");
        assert!(verify(&key, "msg_1", 1_700_000_000, b"{}", &signature));
        let several = format!("v1,AAAA {signature}");
        assert!(verify(&key, "msg_1", 1_700_000_000, b"{}", &several));
        assert!(!verify(&key, "msg_1", 1_700_000_000, b"{ }", &signature));
        assert!(!verify(&key, "msg_2", 1_700_000_000, b"{}", &signature));
        assert!(!verify(&key, "msg_1", 1_700_000_001, b"{}", &signature));
        let other = self::key("another secret");
        assert!(!verify(&other, "msg_1", 1_700_000_000, b"{}", &signature));
        assert!(!verify(&key, "msg_1", 1_700_000_000, b"{}", "v2,xyz"));
    }
}
