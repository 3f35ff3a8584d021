//! The facade's one error type: every failure a route can answer with, rendered in LoopBack's
//! shape `{"error": {"statusCode", "name", "message"}}` as Crownstone's server does. Messages
//! never hold a key, a token or a client secret, and never what the API server said.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::conventions::describe_kube_error;

/// Why a request was not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a missing query parameter, or a token the event server refused.
    #[error("{0}")]
    BadRequest(String),
    /// No key, or not the right one; the text is upstream's exact message.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// No such route, or no such object of the caller's.
    #[error("{0}")]
    NotFound(String),
    /// A known route with a method it does not have.
    #[error("Method not allowed.")]
    MethodNotAllowed,
    /// The object was changed meanwhile, or is not in a state the request can change.
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than the facade reads.
    #[error("The request body is larger than {0} bytes.")]
    PayloadTooLarge(usize),
    /// A body that is not JSON.
    #[error("The request body must be JSON (Content-Type: application/json).")]
    UnsupportedMediaType,
    /// Well-formed JSON that fails validation.
    #[error("{0}")]
    Unprocessable(String),
    /// The caller is past a limit: its request rate, or its number of listeners.
    #[error("{0}")]
    TooManyRequests(String),
    /// The Kubernetes API, the caches or Crownstone's event server cannot answer now.
    #[error("{0}")]
    Unavailable(String),
}

/// Upstream's message for a missing or unknown API key.
pub const INVALID_API_KEY: &str = "Invalid ApiKey.";
/// Upstream's message for a missing or wrong admin key.
pub const UNAUTHORIZED: &str = "Unauthorized.";

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// LoopBack's error name for the status (http-errors' class names).
    pub fn name(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BadRequestError",
            ApiError::Unauthorized(_) => "UnauthorizedError",
            ApiError::NotFound(_) => "NotFoundError",
            ApiError::MethodNotAllowed => "MethodNotAllowedError",
            ApiError::Conflict(_) => "ConflictError",
            ApiError::PayloadTooLarge(_) => "PayloadTooLargeError",
            ApiError::UnsupportedMediaType => "UnsupportedMediaTypeError",
            ApiError::Unprocessable(_) => "UnprocessableEntityError",
            ApiError::TooManyRequests(_) => "TooManyRequestsError",
            ApiError::Unavailable(_) => "ServiceUnavailableError",
        }
    }

    /// The answer when the Kubernetes API failed while doing `what`: logged in full here, told
    /// to the client as a 503 without the API server's words (they could name a Secret's data).
    pub fn kube(what: &str, error: &kube::Error) -> ApiError {
        tracing::warn!(error = %describe_kube_error(error), "Could not {what}.");
        ApiError::Unavailable(format!(
            "Could not {what}: the Kubernetes API did not answer as expected. Try again later."
        ))
    }

    /// The caches have not seen their first full list yet.
    pub fn not_ready() -> ApiError {
        ApiError::Unavailable("The service is starting; try again in a moment.".into())
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                status_code: self.status().as_u16(),
                name: self.name().to_owned(),
                message: self.to_string(),
            },
        }
    }
}

/// LoopBack's error body.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// The HTTP status, repeated.
    #[schema(example = 422)]
    pub status_code: u16,
    /// The kind of error, e.g. `UnprocessableEntityError`.
    #[schema(example = "UnprocessableEntityError")]
    pub name: String,
    /// What to change, in a sentence.
    #[schema(example = "url must be an http or https url")]
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 9110: a 401 names how to authenticate.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("ApiKey realm=\"crownstone-webhooks\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_loopbacks_shape() {
        let body = serde_json::to_value(ApiError::Unauthorized(INVALID_API_KEY).body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "statusCode": 401, "name": "UnauthorizedError", "message": "Invalid ApiKey."
            }})
        );
        let body = serde_json::to_value(
            ApiError::Unprocessable("eventTypes must not be empty".into()).body(),
        )
        .unwrap();
        assert_eq!(body["error"]["statusCode"], 422);
        assert_eq!(body["error"]["name"], "UnprocessableEntityError");
    }

    #[test]
    fn every_kind_has_a_client_or_unavailable_status() {
        let all = [
            ApiError::BadRequest(String::new()),
            ApiError::Unauthorized(UNAUTHORIZED),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::Conflict(String::new()),
            ApiError::PayloadTooLarge(1),
            ApiError::UnsupportedMediaType,
            ApiError::Unprocessable(String::new()),
            ApiError::TooManyRequests(String::new()),
            ApiError::Unavailable(String::new()),
        ];
        for error in all {
            let status = error.status();
            assert!(
                status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE,
                "{error:?} answers {status}"
            );
        }
    }
}
