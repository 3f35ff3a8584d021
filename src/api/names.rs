//! Names of the objects the facade creates. A Listener's name is derived from what makes it the
//! same registration (owner, Crownstone user, url, event types), so two identical requests
//! racing each other name the same object and the API server lets only one of them create it.

use std::collections::BTreeSet;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::crownstone::EventType;

/// Hex digits of the hash in a Listener's name: 80 bits, so distinct registrations never meet.
const LISTENER_HASH_HEX: usize = 20;

/// `l-` and 20 hex digits of SHA-256 over the registration's identity. A valid DNS label.
pub fn listener_name(
    owner: &str,
    user_id: &str,
    url: &str,
    event_types: &BTreeSet<EventType>,
) -> String {
    let mut hasher = Sha256::new();
    // Each field is length-prefixed, so no two different tuples hash the same input.
    let types: Vec<&str> = event_types.iter().map(|t| t.as_str()).collect();
    let types = types.join(",");
    for field in [owner, user_id, url, types.as_str()] {
        hasher.update((field.len() as u64).to_le_bytes());
        hasher.update(field.as_bytes());
    }
    let digest = hex::encode(hasher.finalize());
    format!("l-{}", &digest[..LISTENER_HASH_HEX])
}

/// A fresh name for the token Secret of Listener `listener`: its name, `-token-` and 8 random
/// hex digits, so a request that loses a race can remove its own Secret without touching the
/// winner's.
pub fn token_secret_name(listener: &str) -> String {
    format!("{listener}-token-{}", random_hex(4))
}

/// A fresh WebhookUser name: `u-` and 16 random hex digits.
pub fn user_name() -> String {
    format!("u-{}", random_hex(8))
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    hex::encode(buffer)
}

/// Whether `name` is a DNS-1123 label, as Kubernetes names of these objects must be.
#[cfg(test)]
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(list: &[EventType]) -> BTreeSet<EventType> {
        list.iter().copied().collect()
    }

    #[test]
    fn listener_names_are_stable_labels_that_depend_on_every_field() {
        let base = listener_name(
            "acme",
            "u1",
            "https://x.example/a",
            &types(&[EventType::Command]),
        );
        assert!(is_dns_label(&base), "{base}");
        assert_eq!(base.len(), 2 + LISTENER_HASH_HEX);
        assert_eq!(
            base,
            listener_name(
                "acme",
                "u1",
                "https://x.example/a",
                &types(&[EventType::Command])
            )
        );
        let variants = [
            listener_name(
                "acme2",
                "u1",
                "https://x.example/a",
                &types(&[EventType::Command]),
            ),
            listener_name(
                "acme",
                "u2",
                "https://x.example/a",
                &types(&[EventType::Command]),
            ),
            listener_name(
                "acme",
                "u1",
                "https://x.example/b",
                &types(&[EventType::Command]),
            ),
            listener_name(
                "acme",
                "u1",
                "https://x.example/a",
                &types(&[EventType::Presence]),
            ),
            listener_name(
                "acme",
                "u1",
                "https://x.example/a",
                &types(&[EventType::Command, EventType::Presence]),
            ),
            // Shifting text between fields changes the name too.
            listener_name(
                "acmeu",
                "1",
                "https://x.example/a",
                &types(&[EventType::Command]),
            ),
        ];
        for variant in variants {
            assert_ne!(variant, base);
        }
    }

    #[test]
    fn the_order_of_event_types_does_not_matter() {
        let a = types(&[EventType::Presence, EventType::Command]);
        let b = types(&[EventType::Command, EventType::Presence]);
        assert_eq!(
            listener_name("o", "u", "http://h/", &a),
            listener_name("o", "u", "http://h/", &b)
        );
    }

    #[test]
    fn generated_names_are_valid_and_fresh() {
        let listener = listener_name("o", "u", "http://h/", &types(&[EventType::Command]));
        let secret = token_secret_name(&listener);
        assert!(is_dns_label(&secret), "{secret}");
        assert!(secret.starts_with(&format!("{listener}-token-")));
        assert_ne!(secret, token_secret_name(&listener));
        let user = user_name();
        assert!(is_dns_label(&user), "{user}");
        assert!(is_dns_label(&format!("{user}-credentials")));
        assert_ne!(user, user_name());
        assert!(!is_dns_label("Upper"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(""));
    }
}
