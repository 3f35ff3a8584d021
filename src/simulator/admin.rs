//! The simulator's admin API (tokens, events, stats, outage, dropping streams) and the cloud's
//! login route that Crownstone's own client calls when its token expires.

use std::borrow::Cow;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha1::{Digest, Sha1};

use super::registry::{Ending, TokenTerms};
use super::scope::{EventFacts, Scope};
use super::AppState;

/// Longest token lifetime the admin API accepts: 100 years.
const MAX_TTL_SECONDS: u64 = 100 * 365 * 24 * 3600;

/// `POST /admin/tokens`: what the new token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// The owner's Crownstone user id.
    pub user_id: String,
    /// The spheres whose events the token receives.
    pub spheres: Vec<String>,
    /// The token's scopes (`all`, `user_location`, ...).
    pub scopes: Vec<Scope>,
    /// Lifetime in seconds from now; 0 gives a token that is already expired.
    pub ttl_seconds: u64,
    /// With `password`: an account that can log in at `POST /api/users/login` for fresh tokens
    /// on the same terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The account's password, in plain text; only its SHA-1 digest is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// The answer to `POST /admin/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenGrant {
    /// The access token.
    pub token: String,
    /// When it expires (RFC 3339).
    pub expires_at: DateTime<Utc>,
}

/// The answer to `GET /admin/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulatorStats {
    /// Streams open now.
    pub open_streams: usize,
    /// Streams that got `STREAM_START` since the server started.
    pub streams_opened: u64,
    /// Events posted to `POST /admin/events`.
    pub events_published: u64,
    /// Posted events that reached at least one stream.
    pub events_dispatched: u64,
    /// Data frames queued to streams, summed over streams.
    pub frames_delivered: u64,
    /// Streams closed because their queue was full.
    pub slow_streams_closed: u64,
    /// Tokens known (issued by the admin API or by login).
    pub tokens: usize,
    /// Successful logins.
    pub logins: u64,
    /// Whether new streams get `NO_CONNECTION`.
    pub outage: bool,
}

/// The answer to `POST /admin/events`: for each event, in order, how many streams received it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishReport {
    /// Streams that received each event.
    pub delivered: Vec<usize>,
}

/// `PUT /admin/outage` body and answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutageSwitch {
    /// Whether new streams get `NO_CONNECTION`.
    pub enabled: bool,
}

/// The answer to `POST /admin/streams/drop`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropReport {
    /// Streams that were open and are now closed.
    pub dropped: usize,
}

/// An admin or login request that cannot be served, answered in LoopBack's error shape.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The body is not JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// The body is JSON but not what the route takes.
    #[error("{0}")]
    Invalid(String),
    /// No such token.
    #[error("unknown token")]
    UnknownToken,
    /// Wrong email or password.
    #[error("login failed")]
    LoginFailed,
}

impl AdminError {
    fn from_json(err: &serde_json::Error) -> AdminError {
        match err.classify() {
            serde_json::error::Category::Data => AdminError::Invalid(err.to_string()),
            _ => AdminError::MalformedJson(err.to_string()),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            AdminError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            AdminError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::UnknownToken => StatusCode::NOT_FOUND,
            AdminError::LoginFailed => StatusCode::UNAUTHORIZED,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = self.status();
        let name = match self {
            AdminError::MalformedJson(_) => "BadRequestError",
            AdminError::Invalid(_) => "ValidationError",
            AdminError::UnknownToken => "NotFoundError",
            AdminError::LoginFailed => "Error",
        };
        let mut error = serde_json::json!({
            "statusCode": status.as_u16(),
            "name": name,
            "message": self.to_string(),
        });
        if matches!(self, AdminError::LoginFailed) {
            // Crownstone's Python client reads `error.code` of a failed login.
            error["code"] = "LOGIN_FAILED".into();
        }
        (status, Json(serde_json::json!({ "error": error }))).into_response()
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| AdminError::from_json(&e))
}

/// Validates a token request into terms and optional login credentials.
fn validate(request: TokenRequest) -> Result<(TokenTerms, Option<(String, String)>), AdminError> {
    if request.user_id.trim().is_empty() {
        return Err(AdminError::Invalid("userId must not be empty".into()));
    }
    if request.spheres.iter().any(|s| s.is_empty()) {
        return Err(AdminError::Invalid("sphere ids must not be empty".into()));
    }
    if request.ttl_seconds > MAX_TTL_SECONDS {
        return Err(AdminError::Invalid(format!(
            "ttlSeconds must be at most {MAX_TTL_SECONDS}"
        )));
    }
    let login = match (request.email, request.password) {
        (None, None) => None,
        (Some(email), Some(password)) if !email.trim().is_empty() && !password.is_empty() => {
            Some((email, hex::encode(Sha1::digest(password.as_bytes()))))
        }
        _ => {
            return Err(AdminError::Invalid(
                "email and password go together, both non-empty".into(),
            ))
        }
    };
    let terms = TokenTerms {
        user_id: request.user_id,
        spheres: request.spheres,
        scopes: request.scopes,
        ttl_seconds: request.ttl_seconds,
    };
    Ok((terms, login))
}

/// `POST /admin/tokens`
pub(super) async fn create_token(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<TokenGrant>), AdminError> {
    let (terms, login) = validate(parse(&body)?)?;
    if let Some((email, password_sha1)) = login {
        state
            .registry
            .set_account(&email, password_sha1, terms.clone());
    }
    let (token, record) = state.registry.issue_token(&terms);
    Ok((
        StatusCode::CREATED,
        Json(TokenGrant {
            token,
            expires_at: record.expires_at,
        }),
    ))
}

/// `DELETE /admin/tokens/{token}`
pub(super) async fn revoke_token(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<StatusCode, AdminError> {
    if state.registry.revoke(&token) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AdminError::UnknownToken)
    }
}

/// A body that is either one event or `{"events": [...]}`; events stay raw text.
#[derive(Deserialize)]
struct MaybeBatch<'a> {
    #[serde(borrow, default)]
    events: Option<Vec<&'a RawValue>>,
}

/// Removes the whitespace between JSON tokens, leaving strings and key order as they are, so an
/// event becomes a single-line frame in the order it was posted.
fn compact_json(text: &str) -> Cow<'_, str> {
    let mut in_string = false;
    let mut escaped = false;
    let is_compact = text.bytes().all(|b| {
        let keep = in_string || !b.is_ascii_whitespace();
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        }
        keep
    });
    if is_compact {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !c.is_ascii_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `POST /admin/events`: one event object, or `{"events": [...]}`. Every event must be an object;
/// nothing is dispatched unless all are.
pub(super) async fn publish(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<PublishReport>, AdminError> {
    // Only an object is an event or a batch; a bare array would otherwise pass as a struct.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(&body)
            .map_err(|e| AdminError::from_json(&e))?;
        return Err(AdminError::Invalid(
            "expected one event object or {\"events\": [...]}".into(),
        ));
    }
    let batch: MaybeBatch<'_> = parse(&body)?;
    let whole;
    let raws: Vec<&RawValue> = match batch.events {
        Some(events) => events,
        None => {
            whole = parse::<&RawValue>(&body)?;
            vec![whole]
        }
    };
    let mut events = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let value: serde_json::Value = parse(raw.get().as_bytes())?;
        if !value.is_object() {
            return Err(AdminError::Invalid(format!(
                "event {i} is not a JSON object"
            )));
        }
        events.push((value, raw));
    }
    let delivered = events
        .iter()
        .map(|(value, raw)| {
            let sphere = value
                .get("sphere")
                .and_then(|s| s.get("id"))
                .and_then(serde_json::Value::as_str);
            let facts = EventFacts::from_value(value);
            state
                .registry
                .dispatch(sphere, &facts, &compact_json(raw.get()))
        })
        .collect();
    Ok(Json(PublishReport { delivered }))
}

/// `GET /admin/stats`
pub(super) async fn stats(State(state): State<AppState>) -> Json<SimulatorStats> {
    Json(state.registry.snapshot())
}

/// `PUT /admin/outage`
pub(super) async fn set_outage(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<OutageSwitch>, AdminError> {
    let switch: OutageSwitch = parse(&body)?;
    state.registry.set_outage(switch.enabled);
    tracing::info!(enabled = switch.enabled, "outage switched");
    Ok(Json(switch))
}

/// `POST /admin/streams/drop`: closes every open stream abruptly, without a frame.
pub(super) async fn drop_streams(State(state): State<AppState>) -> Json<DropReport> {
    let dropped = state.registry.close_all(Ending::Abort);
    tracing::info!(dropped, "dropped every stream");
    Json(DropReport { dropped })
}

/// The body of the cloud's `POST /api/users/login`.
#[derive(Deserialize)]
struct LoginRequest {
    email: String,
    /// SHA-1 hex digest of the password.
    password: String,
}

/// The cloud's `POST /api/users/login`: a LoopBack access token whose `id` is a fresh token.
pub(super) async fn login(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, AdminError> {
    let request: LoginRequest = parse(&body)?;
    let (token, record) = state
        .registry
        .login(&request.email, &request.password)
        .ok_or(AdminError::LoginFailed)?;
    Ok(Json(serde_json::json!({
        "id": token,
        "ttl": record.ttl_seconds,
        "created": record.created_at,
        "userId": record.user_id,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_json_keeps_strings_and_order() {
        let text = "{ \"b\" : 1,\n  \"a\": \"x y\\\" z\" ,\"c\":[ 1 , 2 ]}";
        assert_eq!(
            compact_json(text),
            "{\"b\":1,\"a\":\"x y\\\" z\",\"c\":[1,2]}"
        );
        let compact = r#"{"k":"a b"}"#;
        assert!(matches!(compact_json(compact), Cow::Borrowed(_)));
    }

    fn request() -> TokenRequest {
        TokenRequest {
            user_id: "u1".into(),
            spheres: vec!["s1".into()],
            scopes: vec![Scope::All],
            ttl_seconds: 60,
            email: None,
            password: None,
        }
    }

    #[test]
    fn token_requests_are_validated() {
        assert!(validate(request()).is_ok());
        let mut r = request();
        r.user_id = " ".into();
        assert!(validate(r).is_err());
        let mut r = request();
        r.ttl_seconds = MAX_TTL_SECONDS + 1;
        assert!(validate(r).is_err());
        let mut r = request();
        r.email = Some("a@b.c".into());
        assert!(validate(r).is_err());
        let mut r = request();
        r.email = Some("a@b.c".into());
        r.password = Some("pw".into());
        let (_, login) = validate(r).unwrap();
        assert_eq!(
            login,
            Some((
                "a@b.c".to_owned(),
                "1a91d62f7ca67399625a4368a6ab5d4a3baa6073".to_owned()
            ))
        );
    }

    #[test]
    fn json_errors_are_classified() {
        assert!(matches!(
            parse::<TokenRequest>(b"{not json"),
            Err(AdminError::MalformedJson(_))
        ));
        assert!(matches!(
            parse::<TokenRequest>(
                br#"{"userId":"u","spheres":[],"scopes":["nope"],"ttlSeconds":1}"#
            ),
            Err(AdminError::Invalid(_))
        ));
    }
}
