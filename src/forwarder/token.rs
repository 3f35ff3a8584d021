//! Crownstone OAuth tokens, and the hash that stands for a token everywhere it could be seen.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// A Crownstone OAuth token. Its `Debug` and `Display` never show it.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_token() {
        let token = Token::new("super-secret-token-value");
        for shown in [format!("{token:?}"), format!("{}", token.hash())] {
            assert!(!shown.contains("super-secret"), "{shown}");
        }
        assert_eq!(token.hash().to_string().len(), 12);
    }

    #[test]
    fn equal_tokens_hash_equal() {
        assert_eq!(Token::new("a").hash(), Token::new("a").hash());
        assert_ne!(Token::new("a").hash(), Token::new("b").hash());
    }
}
