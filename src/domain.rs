//! The identities and secrets every part of the operator passes around: which Listener, which
//! WebhookUser, which token. Knows no Kubernetes type and imports nothing of this crate, so the
//! routing index, the forwarders and the delivery engine share these without depending on
//! each other. Secrets here cannot print themselves.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// A Listener, by namespace and name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId {
    namespace: Arc<str>,
    name: Arc<str>,
}

impl ListenerId {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        ListenerId {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for ListenerId {
    /// `namespace/name`, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Debug for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ListenerId({self})")
    }
}

/// A WebhookUser, by namespace and name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerKey {
    namespace: Arc<str>,
    name: Arc<str>,
}

impl OwnerKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        OwnerKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name as shared text: the `clientId` of every delivery, without a copy per delivery.
    pub fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }
}

impl fmt::Display for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerKey({self})")
    }
}

/// An owner's client secret: sent in every delivery's body and the key of its signature,
/// with the secrets it replaced that receivers may still verify with until each expires.
/// `Debug` never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(Arc<SecretSet>);

#[derive(PartialEq, Eq)]
struct SecretSet {
    current: Box<str>,
    previous: Box<[PreviousSecret]>,
}

impl ClientSecret {
    /// A secret that replaced none still live.
    pub fn new(secret: impl Into<Box<str>>) -> Self {
        Self::with_previous(secret, Vec::new())
    }

    /// The current secret with the ones it replaced, newest first.
    pub fn with_previous(secret: impl Into<Box<str>>, previous: Vec<PreviousSecret>) -> Self {
        Self(Arc::new(SecretSet {
            current: secret.into(),
            previous: previous.into_boxed_slice(),
        }))
    }

    /// The current secret itself, for the body and the signing key.
    pub fn expose(&self) -> &str {
        &self.0.current
    }

    /// The secrets this one replaced, newest first; each also signs until it expires.
    pub fn previous(&self) -> &[PreviousSecret] {
        &self.0.previous
    }

    /// Whether two handles share one allocation: a cheap first test of equality.
    pub fn ptr_eq(&self, other: &ClientSecret) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClientSecret(<redacted>, {} previous)",
            self.0.previous.len()
        )
    }
}

/// A client secret that was replaced, and when it stops signing deliveries.
#[derive(Clone, PartialEq, Eq)]
pub struct PreviousSecret {
    secret: Box<str>,
    expires_at: DateTime<Utc>,
}

impl PreviousSecret {
    pub fn new(secret: impl Into<Box<str>>, expires_at: DateTime<Utc>) -> Self {
        Self {
            secret: secret.into(),
            expires_at,
        }
    }

    /// The secret itself, for its signing key.
    pub fn expose(&self) -> &str {
        &self.secret
    }

    /// From this moment on it signs nothing.
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }
}

impl fmt::Debug for PreviousSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PreviousSecret(<redacted>, expires {})", self.expires_at)
    }
}

/// A Crownstone OAuth token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl Token {
    pub fn new(token: impl Into<Arc<str>>) -> Self {
        Token(token.into())
    }

    /// The token itself, for the one place that sends it: the stream request.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.hash())
    }
}

/// SHA-256 of a token: the key of its forwarder, and how logs and metrics name it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// All 64 hex digits: how replicas name a token to each other.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A hash from its 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(TokenHash(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl serde::Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        TokenHash::from_hex(&text)
            .ok_or_else(|| serde::de::Error::custom("a token hash is 64 hex digits"))
    }
}

impl fmt::Display for TokenHash {
    /// The first 12 hex digits: enough to tell tokens apart in logs, useless to an attacker.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({self})")
    }
}

/// Why routing skipped a listener for an event; counted in metrics, never logged per event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    NotSubscribed,
    OwnerMissing,
    /// The owner has no usable client secret, so nothing could be signed.
    OwnerWithoutCredentials,
    OwnerDisabled,
    AllowanceUsed,
    Expired,
}

impl Skip {
    /// Every reason, for registering metrics at zero.
    pub const ALL: [Skip; 6] = [
        Skip::NotSubscribed,
        Skip::OwnerMissing,
        Skip::OwnerWithoutCredentials,
        Skip::OwnerDisabled,
        Skip::AllowanceUsed,
        Skip::Expired,
    ];

    /// The metric label.
    pub fn as_label(self) -> &'static str {
        match self {
            Skip::NotSubscribed => "not_subscribed",
            Skip::OwnerMissing => "owner_missing",
            Skip::OwnerWithoutCredentials => "owner_without_credentials",
            Skip::OwnerDisabled => "owner_disabled",
            Skip::AllowanceUsed => "allowance_used",
            Skip::Expired => "expired",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_travel_as_64_hex_digits() {
        let hash = Token::new("a-token").hash();
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<TokenHash>(&json).unwrap(), hash);
        assert!(serde_json::from_str::<TokenHash>("\"abc\"").is_err());
        assert!(serde_json::from_str::<TokenHash>(&format!("\"{}\"", "zz".repeat(32))).is_err());
    }

    #[test]
    fn formatting_never_shows_a_secret() {
        let token = Token::new("super-secret-token-value");
        let secret = ClientSecret::with_previous(
            "super-secret-client-secret",
            vec![PreviousSecret::new(
                "super-secret-previous",
                DateTime::<Utc>::UNIX_EPOCH,
            )],
        );
        for shown in [
            format!("{token:?}"),
            format!("{}", token.hash()),
            format!("{secret:?}"),
            format!("{:?}", secret.previous()),
        ] {
            assert!(!shown.contains("super-secret"), "{shown}");
        }
        assert_eq!(token.hash().to_string().len(), 12);
    }

    #[test]
    fn equal_tokens_hash_equal() {
        assert_eq!(Token::new("a").hash(), Token::new("a").hash());
        assert_ne!(Token::new("a").hash(), Token::new("b").hash());
    }

    #[test]
    fn ids_keep_namespace_and_name_apart() {
        let id = ListenerId::new("ns", "a/b");
        assert_eq!((id.namespace(), id.name()), ("ns", "a/b"));
        assert_ne!(ListenerId::new("a", "b/c"), ListenerId::new("a/b", "c"));
        assert_eq!(id.to_string(), "ns/a/b");
        assert_eq!(OwnerKey::new("ns", "acme").to_string(), "ns/acme");
    }
}
