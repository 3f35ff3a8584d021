//! The `webhook-id` of an event's delivery to one Listener, the same on every replica: a
//! replica that takes over and numbers events as the leader did sends, for an event the old
//! leader delivered too, the id the old leader sent, so a receiver drops the repeat.

use sha2::{Digest, Sha256};

use super::{EventDigest, Seq};
use crate::domain::{ListenerId, TokenHash};

/// Keeps these hashes apart from every other SHA-256 of the same fields.
const DOMAIN: &[u8] = b"crownstone-webhooks/webhook-id/v1";

/// `msg_` and the first 16 bytes, in hex, of the SHA-256 of the listener, the token's hash, the
/// event's place and its digest. Each variable-length field is preceded by its length, so no
/// two different inputs hash the same bytes.
pub fn webhook_id(
    listener: &ListenerId,
    token: &TokenHash,
    seq: Seq,
    digest: EventDigest,
) -> String {
    let mut hash = Sha256::new();
    hash.update(DOMAIN);
    for part in [listener.namespace(), listener.name()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.update(token.as_bytes());
    hash.update(seq.to_be_bytes());
    hash.update(digest.0.to_be_bytes());
    let hash = hash.finalize();
    let mut id = String::with_capacity(36);
    id.push_str("msg_");
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in &hash[..16] {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(namespace: &str, name: &str, token: &str, seq: Seq, digest: u64) -> String {
        webhook_id(
            &ListenerId::new(namespace, name),
            &TokenHash::of(token),
            seq,
            EventDigest(digest),
        )
    }

    #[test]
    fn the_same_inputs_give_the_same_id() {
        assert_eq!(id("ns", "l", "t", 7, 42), id("ns", "l", "t", 7, 42));
    }

    #[test]
    fn any_input_changes_the_id() {
        let base = id("ns", "l", "t", 7, 42);
        for other in [
            id("ns2", "l", "t", 7, 42),
            id("ns", "l2", "t", 7, 42),
            id("ns", "l", "t2", 7, 42),
            id("ns", "l", "t", 8, 42),
            id("ns", "l", "t", 7, 43),
            // The same characters split differently between namespace and name.
            id("nsl", "", "t", 7, 42),
            id("n", "sl", "t", 7, 42),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn ids_are_msg_and_32_hex_digits() {
        let id = id("ns", "l", "t", 1, 0);
        assert_eq!(id.len(), 36);
        assert!(id.starts_with("msg_"));
        assert!(id[4..]
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert!(http::HeaderValue::try_from(id).is_ok());
    }
}
