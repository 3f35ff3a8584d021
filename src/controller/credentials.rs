//! The one place that generates a WebhookUser's credentials.

use rand::RngCore;

/// A WebhookUser's credentials: the API key it calls the REST API with, and the secret sent in
/// (and signing) every delivery.
pub struct Credentials {
    pub api_key: String,
    pub client_secret: String,
}

/// Fresh credentials: 32 random bytes for the API key, 16 for the client secret, both hex, as
/// Crownstone's service issues them.
pub fn generate_credentials() -> Credentials {
    Credentials {
        api_key: random_hex(32),
        client_secret: random_hex(16),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    hex::encode(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_have_the_upstream_shape_and_differ() {
        let a = generate_credentials();
        let b = generate_credentials();
        assert_eq!(a.api_key.len(), 64);
        assert_eq!(a.client_secret.len(), 32);
        assert!(a.api_key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.api_key, b.api_key);
        assert_ne!(a.client_secret, b.client_secret);
    }
}
