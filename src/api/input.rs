//! What clients send, read strictly: request bodies (JSON of at most [`MAX_BODY_BYTES`], no
//! unknown fields), query parameters, and the rules every field must pass. The same constants
//! feed the OpenAPI document, so the document says exactly what is accepted.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header;
use axum::http::request::Parts;
use regex::Regex;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::ApiError;
use crate::crownstone::EventType;
use crate::domain::Token;

/// The largest request body read: 64 KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The longest listener url, as the Listener schema allows.
pub const MAX_URL_CHARS: usize = 2048;
/// The longest Crownstone user id, as the Listener schema allows.
pub const MAX_USER_ID_CHARS: usize = 256;
/// The longest token accepted; Crownstone's are 64 characters.
pub const MAX_TOKEN_CHARS: usize = 4096;
/// The longest user name, as the WebhookUser schema allows for `displayName`.
pub const MAX_NAME_CHARS: usize = 256;
/// The longest client secret an admin may set.
pub const MAX_SECRET_CHARS: usize = 256;

/// The urls a listener may post to: http or https, a DNS name or IPv4 address, an optional
/// port, and a path and query of printable ASCII with valid percent escapes. Narrower than
/// every parser on the way (ours, the API server's CEL `isURL`, the delivery client), so an url
/// that passes here is never refused further on.
pub const URL_PATTERN: &str = concat!(
    "^[Hh][Tt][Tt][Pp][Ss]?://",
    // userinfo
    "(?:[A-Za-z0-9._~!$&'()*+,;=:-]+@)?",
    "(?:",
    // IPv4
    "(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}",
    "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    "|",
    // a DNS name whose last label starts with a letter (so it is never read as an address)
    "(?:[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\\.)*[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*",
    ")",
    // port
    "(?::(?:[0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?",
    // path and query
    "(?:[/?](?:[!-$&-~]|%[0-9A-Fa-f]{2})*)?$"
);

/// A client secret an admin may set: printable ASCII without spaces, so it survives being
/// stored in a Secret and trimmed when read.
pub const SECRET_PATTERN: &str = "^[!-~]+$";

static URL_REGEX: LazyLock<Regex> = LazyLock::new(|| {
    // A constant pattern, checked by the tests below.
    Regex::new(URL_PATTERN).unwrap_or_else(|_| unreachable!("URL_PATTERN is a valid regex"))
});

static SECRET_REGEX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(SECRET_PATTERN).unwrap_or_else(|_| unreachable!("SECRET_PATTERN is a valid regex"))
});

/// A JSON request body of type `T`: at most [`MAX_BODY_BYTES`], JSON (or no content type),
/// and exactly `T`'s fields. Malformed JSON is a 400, JSON of the wrong shape a 422.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(content_type) = request.headers().get(header::CONTENT_TYPE) {
            if !is_json(content_type.to_str().unwrap_or_default()) {
                return Err(ApiError::UnsupportedMediaType);
            }
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(MAX_BODY_BYTES)
                } else {
                    ApiError::BadRequest("The request body could not be read.".into())
                }
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses a body: a syntax error is malformed JSON (400), anything else a validation failure
/// (422) whose message names the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|error| {
        ApiError::BadRequest(format!(
            "The request body is not valid JSON: {}",
            syntax_message(&error)
        ))
    })?;
    // Serde would read a struct from an array too, by position: only objects are bodies here.
    if !value.is_object() {
        return Err(ApiError::Unprocessable(
            "The request body must be a JSON object.".into(),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        ApiError::Unprocessable(if path == "." {
            format!("The request body is invalid: {inner}.")
        } else {
            format!("The request body is invalid: {path}: {inner}.")
        })
    })
}

/// serde_json's words without the position; the position of an empty body says nothing.
fn syntax_message(error: &serde_json::Error) -> String {
    if error.is_eof() && error.line() == 1 && error.column() == 0 {
        "the body is empty".into()
    } else {
        format!(
            "{} at line {} column {}",
            error_kind(error),
            error.line(),
            error.column()
        )
    }
}

fn error_kind(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

/// The `{id}` of a route's path. One that cannot be read (bad percent-encoding) names nothing
/// there is, so it is a 404 like any unknown id.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(PathId(id)),
            Err(_) => Err(ApiError::NotFound("Nothing has that id.".into())),
        }
    }
}

/// The first non-empty value of a query parameter.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, value)| key == name && !value.is_empty())
        .map(|(_, value)| value.into_owned())
}

/// A required query parameter of at most `max` characters: missing is a 400 (as upstream
/// answers), too long a 422.
pub fn required_query(query: Option<&str>, name: &str, max: usize) -> Result<String, ApiError> {
    let value = query_param(query, name)
        .ok_or_else(|| ApiError::BadRequest(format!("The query parameter {name} is required.")))?;
    if value.chars().count() > max {
        return Err(ApiError::Unprocessable(format!(
            "The query parameter {name} is longer than {max} characters."
        )));
    }
    Ok(value)
}

/// `POST /listeners`: a registration as clients send it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerRequest {
    /// The Crownstone OAuth access token of the user.
    #[schema(min_length = 1, max_length = 4096)]
    pub token: String,
    /// The user's id on the Crownstone cloud.
    #[schema(min_length = 1, max_length = 256)]
    pub user_id: String,
    /// The event types to forward.
    #[schema(schema_with = super::openapi::event_types_schema)]
    pub event_types: Vec<EventType>,
    /// Where to POST the events: an http or https url.
    #[schema(schema_with = super::openapi::url_schema)]
    pub url: String,
}

/// A registration that passed every rule.
#[derive(Debug, Clone)]
pub struct NewListener {
    pub token: Token,
    pub user_id: String,
    pub event_types: BTreeSet<EventType>,
    pub url: String,
}

impl ListenerRequest {
    /// Checks every field; the first failure names its field.
    pub fn validate(self) -> Result<NewListener, ApiError> {
        check_length("token", &self.token, MAX_TOKEN_CHARS)?;
        check_length("userId", &self.user_id, MAX_USER_ID_CHARS)?;
        if self.event_types.is_empty() {
            return Err(ApiError::Unprocessable(
                "eventTypes must name at least one event type.".into(),
            ));
        }
        let event_types: BTreeSet<EventType> = self.event_types.iter().copied().collect();
        if event_types.len() != self.event_types.len() {
            return Err(ApiError::Unprocessable(
                "eventTypes must not name a type twice.".into(),
            ));
        }
        validate_url(&self.url)?;
        Ok(NewListener {
            token: Token::new(self.token),
            user_id: self.user_id,
            event_types,
            url: self.url,
        })
    }
}

/// A url a listener may post to; see [`URL_PATTERN`].
pub fn validate_url(url: &str) -> Result<(), ApiError> {
    let refused = || {
        ApiError::Unprocessable(format!(
            "url must be an absolute http or https url of at most {MAX_URL_CHARS} characters, \
             with a DNS name or IPv4 address as its host."
        ))
    };
    if url.chars().count() > MAX_URL_CHARS || !URL_REGEX.is_match(url) {
        return Err(refused());
    }
    // The pattern is narrower than the parser; this is a second line of defence.
    match url::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => {
            Ok(())
        }
        _ => Err(refused()),
    }
}

fn check_length(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "{field} must not be empty."
        )));
    }
    if value.chars().count() > max {
        return Err(ApiError::Unprocessable(format!(
            "{field} is longer than {max} characters."
        )));
    }
    Ok(())
}

/// `POST /users`: a new client of the service.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUserRequest {
    /// A human-readable name of the client.
    #[schema(min_length = 1, max_length = 256)]
    pub name: String,
    /// A disabled user's listeners receive nothing; `true` when not given.
    #[serde(default)]
    pub enabled: Option<bool>,
}

impl NewUserRequest {
    pub fn validate(&self) -> Result<(), ApiError> {
        check_length("name", &self.name, MAX_NAME_CHARS)
    }
}

/// `PATCH /users/{id}`: the fields to change; those not given stay as they are.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatchRequest {
    /// A new human-readable name.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    pub name: Option<String>,
    /// Enables or disables the user.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// A new client secret: sent in every delivery and the key of its signature.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256, pattern = "^[!-~]+$")]
    pub secret: Option<String>,
}

impl UserPatchRequest {
    pub fn validate(&self) -> Result<(), ApiError> {
        if let Some(name) = &self.name {
            check_length("name", name, MAX_NAME_CHARS)?;
        }
        if let Some(secret) = &self.secret {
            check_length("secret", secret, MAX_SECRET_CHARS)?;
            if !SECRET_REGEX.is_match(secret) {
                return Err(ApiError::Unprocessable(
                    "secret must be printable ASCII without spaces.".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(json: serde_json::Value) -> Result<NewListener, ApiError> {
        parse_json::<ListenerRequest>(json.to_string().as_bytes())?.validate()
    }

    fn valid() -> serde_json::Value {
        serde_json::json!({
            "token": "t", "userId": "u", "eventTypes": ["command"], "url": "https://x.example/hook"
        })
    }

    fn status(result: Result<NewListener, ApiError>) -> u16 {
        match result {
            Ok(_) => 200,
            Err(error) => error.status().as_u16(),
        }
    }

    #[test]
    fn malformed_json_is_a_400_and_a_wrong_shape_a_422() {
        assert!(matches!(
            parse_json::<ListenerRequest>(b"{\"token\":"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<ListenerRequest>(b""),
            Err(ApiError::BadRequest(m)) if m.contains("empty")
        ));
        assert!(matches!(
            parse_json::<ListenerRequest>(b"[]"),
            Err(ApiError::Unprocessable(_))
        ));
    }

    #[test]
    fn each_bad_field_is_a_422_that_names_it() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                serde_json::json!({"userId": "u", "eventTypes": ["command"], "url": "http://h/"}),
                "token",
            ),
            (
                {
                    let mut v = valid();
                    v["extra"] = 1.into();
                    v
                },
                "extra",
            ),
            (
                {
                    let mut v = valid();
                    v["userId"] = 5.into();
                    v
                },
                "userId",
            ),
            (
                {
                    let mut v = valid();
                    v["eventTypes"] = serde_json::json!([]);
                    v
                },
                "eventTypes",
            ),
            (
                {
                    let mut v = valid();
                    v["eventTypes"] = serde_json::json!(["ping"]);
                    v
                },
                "eventTypes[0]",
            ),
            (
                {
                    let mut v = valid();
                    v["eventTypes"] = serde_json::json!(["command", "command"]);
                    v
                },
                "eventTypes",
            ),
            (
                {
                    let mut v = valid();
                    v["eventTypes"] = "command".into();
                    v
                },
                "eventTypes",
            ),
            (
                {
                    let mut v = valid();
                    v["url"] = "ftp://x.example/".into();
                    v
                },
                "url",
            ),
            (
                {
                    let mut v = valid();
                    v["url"] = format!("https://x.example/{}", "a".repeat(2048)).into();
                    v
                },
                "url",
            ),
            (
                {
                    let mut v = valid();
                    v["userId"] = "u".repeat(257).into();
                    v
                },
                "userId",
            ),
            (
                {
                    let mut v = valid();
                    v["userId"] = "".into();
                    v
                },
                "userId",
            ),
            (
                {
                    let mut v = valid();
                    v["token"] = "t".repeat(4097).into();
                    v
                },
                "token",
            ),
            (
                {
                    let mut v = valid();
                    v["token"] = serde_json::Value::Null;
                    v
                },
                "token",
            ),
        ];
        for (body, field) in cases {
            match listener(body.clone()) {
                Err(ApiError::Unprocessable(message)) => {
                    assert!(message.contains(field), "{body}: {message}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        assert_eq!(status(listener(valid())), 200);
    }

    #[test]
    fn event_types_become_a_set_in_wire_order() {
        let mut body = valid();
        body["eventTypes"] = serde_json::json!(["switchStateUpdate", "command"]);
        let listener = listener(body).unwrap();
        assert_eq!(
            listener.event_types.into_iter().collect::<Vec<_>>(),
            [EventType::Command, EventType::SwitchStateUpdate]
        );
    }

    #[test]
    fn urls_are_http_or_https_with_a_name_or_ipv4_host() {
        for good in [
            "http://127.0.0.1:9000/webhook",
            "https://hooks.example.com",
            "HTTPS://Hooks.Example.com:443/a/b?c=d&e=%20f#frag",
            "http://user:pass@example.com/",
            "http://localhost",
            "http://a-b.c-d.example/x?y",
            "http://1.2.3.example/",
            "http://example.com:65535/",
            "http://example.com?only=query",
        ] {
            assert!(validate_url(good).is_ok(), "{good} refused");
            assert!(url::Url::parse(good).is_ok());
        }
        for bad in [
            "ftp://example.com/",
            "example.com/hook",
            "http://",
            "http:///path",
            "http://exa mple.com/",
            "http://example.com/a b",
            "http://example.com:65536/",
            "http://1.2.3.4.5/",
            "http://256.1.1.1/",
            "http://example.123/",
            "http://[::1]/",
            "http://xn--a.example/",
            "http://example.com#frag",
            "http://example.com/%zz",
            "http://exämple.com/",
            "http://example.com/\n",
            "javascript:alert(1)",
            "",
        ] {
            assert!(validate_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn query_parameters_take_the_first_non_empty_value() {
        assert_eq!(query_param(Some("a=&a=2&b=3"), "a").as_deref(), Some("2"));
        assert_eq!(
            query_param(Some("userId=x%20y"), "userId").as_deref(),
            Some("x y")
        );
        assert_eq!(query_param(None, "a"), None);
        assert!(matches!(
            required_query(Some("other=1"), "userId", 256),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            required_query(Some(&format!("userId={}", "u".repeat(257))), "userId", 256),
            Err(ApiError::Unprocessable(_))
        ));
    }

    #[test]
    fn user_requests_are_checked() {
        assert!(parse_json::<NewUserRequest>(br#"{"name":"Acme"}"#)
            .unwrap()
            .validate()
            .is_ok());
        assert!(parse_json::<NewUserRequest>(br#"{"name":""}"#)
            .unwrap()
            .validate()
            .is_err());
        assert!(parse_json::<NewUserRequest>(br#"{"name":"a","apiKey":"x"}"#).is_err());
        assert!(
            parse_json::<NewUserRequest>(br#"["a"]"#).is_err(),
            "no struct from an array"
        );
        assert!(parse_json::<ListenerRequest>(br#"["t","u",["command"],"http://h/"]"#).is_err());
        let patch: UserPatchRequest = parse_json(br#"{"secret":"has space"}"#).unwrap();
        assert!(patch.validate().is_err());
        let patch: UserPatchRequest = parse_json(br#"{}"#).unwrap();
        assert!(patch.validate().is_ok());
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }
}
