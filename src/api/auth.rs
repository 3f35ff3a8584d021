//! Who is calling: the API key of a WebhookUser or the admin key, taken from the headers and
//! query parameters Crownstone's server reads them from. A request either reaches its handler
//! with a verified caller or is answered 401 here. An API key never passes as the admin key and
//! the admin key never as an API key; keys are compared in constant time.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::{ApiError, INVALID_API_KEY, UNAUTHORIZED};
use super::input::query_param;
use super::AppState;

/// Headers an API key is read from, in order; then query `api_key`. (`API_KEY` and `api_key`
/// are one header: names are case-insensitive.)
pub(super) const API_KEY_HEADERS: [&str; 3] = ["api_key", "access_token", "authorization"];
pub(super) const API_KEY_QUERY: &str = "api_key";
/// Headers the admin key is read from, in order; then query `admin_key`.
pub(super) const ADMIN_KEY_HEADERS: [&str; 3] = ["admin_key", "access_token", "authorization"];
pub(super) const ADMIN_KEY_QUERY: &str = "admin_key";

/// The first non-empty key among `headers` (a leading `Bearer ` stripped) and `query`.
pub fn presented_key(
    headers: &HeaderMap,
    query: Option<&str>,
    names: &[&str],
    query_name: &str,
) -> Option<String> {
    for name in names {
        for value in headers.get_all(*name) {
            let Ok(text) = value.to_str() else { continue };
            let text = strip_bearer(text);
            if !text.is_empty() {
                return Some(text.to_owned());
            }
        }
    }
    query_param(query, query_name)
        .map(|value| strip_bearer(value.trim()).to_owned())
        .filter(|value| !value.is_empty())
}

/// The key in a header value: without a leading `Bearer ` (any case) and surrounding blanks.
fn strip_bearer(value: &str) -> &str {
    let value = value.trim();
    match (value.get(..6), value.as_bytes().get(6)) {
        (Some(word), None | Some(b' ')) if word.eq_ignore_ascii_case("bearer") => value[6..].trim(),
        _ => value,
    }
}

/// The admin key's digest: the key itself is not kept once hashed.
#[derive(Clone, Copy)]
struct AdminDigest([u8; 32]);

impl AdminDigest {
    fn of(key: &str) -> AdminDigest {
        AdminDigest(Sha256::digest(key.as_bytes()).into())
    }

    /// Constant-time: comparing digests of equal length, whatever the presented key.
    fn matches(&self, presented: &str) -> bool {
        bool::from(AdminDigest::of(presented).0.ct_eq(&self.0))
    }
}

/// The configured admin key, which a watched Secret may replace at any time.
#[derive(Clone, Default)]
pub struct AdminKey(Arc<RwLock<Option<AdminDigest>>>);

impl AdminKey {
    /// An admin key of `key`; none when it is empty.
    pub fn fixed(key: Option<&str>) -> AdminKey {
        let admin = AdminKey::default();
        admin.set(key);
        admin
    }

    /// Replaces the key; an empty or missing one disables the admin routes.
    pub fn set(&self, key: Option<&str>) {
        *self.0.write() = key
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(AdminDigest::of);
    }

    pub fn is_set(&self) -> bool {
        self.0.read().is_some()
    }

    /// Whether `presented` is the admin key.
    pub fn matches(&self, presented: &str) -> bool {
        self.0
            .read()
            .is_some_and(|digest| digest.matches(presented))
    }
}

/// A caller holding a WebhookUser's API key: the user's name, its REST id.
#[derive(Debug, Clone)]
pub struct ApiClient {
    pub user: String,
}

impl FromRequestParts<AppState> for ApiClient {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_key(
            &parts.headers,
            parts.uri.query(),
            &API_KEY_HEADERS,
            API_KEY_QUERY,
        )
        .ok_or(ApiError::Unauthorized(INVALID_API_KEY))?;
        // The admin key is no API key, whatever user might have been given the same value.
        if state.admin.matches(&key) {
            return Err(ApiError::Unauthorized(INVALID_API_KEY));
        }
        if !state.cache.is_synced() {
            return Err(ApiError::not_ready());
        }
        let user = state
            .cache
            .user_by_api_key(&key)
            .ok_or(ApiError::Unauthorized(INVALID_API_KEY))?;
        Ok(ApiClient { user })
    }
}

/// A caller holding the admin key.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_key(
            &parts.headers,
            parts.uri.query(),
            &ADMIN_KEY_HEADERS,
            ADMIN_KEY_QUERY,
        )
        .ok_or(ApiError::Unauthorized(UNAUTHORIZED))?;
        if state.admin.matches(&key) {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized(UNAUTHORIZED))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in list {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn api_key(list: &[(&str, &str)], query: Option<&str>) -> Option<String> {
        presented_key(&headers(list), query, &API_KEY_HEADERS, API_KEY_QUERY)
    }

    #[test]
    fn api_keys_are_read_from_every_upstream_place_in_order() {
        assert_eq!(api_key(&[("API_KEY", "a")], None).as_deref(), Some("a"));
        assert_eq!(api_key(&[("api_key", "a")], None).as_deref(), Some("a"));
        assert_eq!(
            api_key(&[("access_token", "b")], None).as_deref(),
            Some("b")
        );
        assert_eq!(
            api_key(&[("Authorization", "Bearer c")], None).as_deref(),
            Some("c")
        );
        assert_eq!(
            api_key(&[("Authorization", "bearer c")], None).as_deref(),
            Some("c")
        );
        assert_eq!(
            api_key(&[("Authorization", "c")], None).as_deref(),
            Some("c")
        );
        assert_eq!(api_key(&[], Some("api_key=d")).as_deref(), Some("d"));
        assert_eq!(
            api_key(
                &[("authorization", "c"), ("api_key", "a")],
                Some("api_key=d")
            )
            .as_deref(),
            Some("a"),
            "the API_KEY header comes first"
        );
        assert_eq!(
            api_key(&[("api_key", "")], Some("api_key=d")).as_deref(),
            Some("d")
        );
        assert_eq!(api_key(&[("Authorization", "Bearer ")], None), None);
        assert_eq!(api_key(&[("admin_key", "x")], Some("admin_key=x")), None);
    }

    #[test]
    fn admin_keys_are_read_from_their_own_places() {
        let admin = |list: &[(&str, &str)], query| {
            presented_key(&headers(list), query, &ADMIN_KEY_HEADERS, ADMIN_KEY_QUERY)
        };
        assert_eq!(admin(&[("ADMIN_KEY", "k")], None).as_deref(), Some("k"));
        assert_eq!(
            admin(&[("Authorization", "Bearer k")], None).as_deref(),
            Some("k")
        );
        assert_eq!(admin(&[], Some("admin_key=k")).as_deref(), Some("k"));
        assert_eq!(admin(&[("api_key", "k")], Some("api_key=k")), None);
    }

    #[test]
    fn the_admin_key_matches_only_itself_and_can_be_replaced() {
        let admin = AdminKey::fixed(Some("secret-admin"));
        assert!(admin.matches("secret-admin"));
        assert!(!admin.matches("secret-admi"));
        assert!(!admin.matches(""));
        admin.set(Some("  "));
        assert!(!admin.is_set());
        assert!(!admin.matches(""), "no key configured: nothing matches");
        admin.set(Some("new"));
        assert!(admin.matches("new"));
        assert!(!AdminKey::fixed(None).matches("anything"));
    }
}
