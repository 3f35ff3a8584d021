//! The OpenAPI 3.1 document of the facade, derived from the handlers' annotations and the
//! request and response types (`utoipa`), with the two kinds of key as security schemes. The
//! schemas of event types and urls come from the code's own lists and patterns.

use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::input::{MAX_URL_CHARS, URL_PATTERN};
use crate::crownstone::EventType;

/// Adds the answer every `/api` route may give a key past its request rate: 429 in LoopBack's
/// shape. Added here, not on each route, because the rate limit is a layer in front of them all.
pub fn add_rate_limit_answers(document: &mut utoipa::openapi::OpenApi) {
    let answer = ResponseBuilder::new()
        .description("Too many requests with this key; try again later")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for item in document.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            operation
                .responses
                .responses
                .entry("429".to_owned())
                .or_insert_with(|| answer.clone().into());
        }
    }
}

/// The document's frame: title, tags, security schemes; the routes add their paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "crownstone-webhooks",
        description = "Crownstone's webhook REST API, served from Kubernetes resources. Client \
            routes take a WebhookUser's API key (header `API_KEY`, `access_token` or \
            `Authorization`, with or without `Bearer `, or query `api_key`); admin routes take \
            the admin key (header `admin_key`, `access_token` or `Authorization`, or query \
            `admin_key`). Errors have LoopBack's shape `{\"error\": {statusCode, name, message}}`."
    ),
    tags(
        (name = "listeners", description = "A client's webhook registrations (API key)"),
        (name = "users", description = "Clients of the service (admin key), and the key checks"),
    ),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let schemes = [
            (
                "apiKey",
                ApiKey::Header(ApiKeyValue::with_description(
                    "API_KEY",
                    "A WebhookUser's API key (also read from `access_token` or \
                     `Authorization: Bearer <key>`)",
                )),
            ),
            (
                "apiKeyQuery",
                ApiKey::Query(ApiKeyValue::with_description(
                    "api_key",
                    "A WebhookUser's API key",
                )),
            ),
            (
                "adminKey",
                ApiKey::Header(ApiKeyValue::with_description(
                    "admin_key",
                    "The admin key, CROWNSTONE_USER_ADMIN_KEY (also read from `access_token` \
                     or `Authorization: Bearer <key>`)",
                )),
            ),
            (
                "adminKeyQuery",
                ApiKey::Query(ApiKeyValue::with_description("admin_key", "The admin key")),
            ),
        ];
        for (name, scheme) in schemes {
            components.add_security_scheme(name, SecurityScheme::ApiKey(scheme));
        }
    }
}

/// `eventTypes`: a non-empty set of the six forwardable types.
pub fn event_types_schema() -> utoipa::openapi::schema::Array {
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(EventType::ALL.iter().map(|t| t.as_str()))),
        )
        .min_items(Some(1))
        .max_items(Some(EventType::ALL.len()))
        .unique_items(true)
        .description(Some("The event types to forward"))
        .build()
}

/// `url` of a registration: see [`URL_PATTERN`].
pub fn url_schema() -> utoipa::openapi::schema::Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(MAX_URL_CHARS))
        .pattern(Some(URL_PATTERN))
        .description(Some(
            "Where to POST the events: an absolute http or https url with a DNS name or IPv4 \
             address as its host, of printable ASCII",
        ))
        .build()
}

#[cfg(test)]
mod tests {
    use super::super::router_parts;

    fn document() -> serde_json::Value {
        serde_json::to_value(router_parts().1).unwrap()
    }

    #[test]
    fn every_route_is_in_the_document_with_its_security() {
        let doc = document();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let expected = [
            ("/api/users/isValidApiKey", "get", "apiKey"),
            ("/api/users/isValidAdminKey", "get", "adminKey"),
            ("/api/users", "get", "adminKey"),
            ("/api/users", "post", "adminKey"),
            ("/api/users/{id}", "patch", "adminKey"),
            ("/api/users/{id}", "delete", "adminKey"),
            ("/api/users/{id}/rotate", "post", "adminKey"),
            ("/api/listeners", "get", "apiKey"),
            ("/api/listeners", "post", "apiKey"),
            ("/api/listeners/active", "get", "apiKey"),
            ("/api/listeners/{id}", "delete", "apiKey"),
            ("/api/listeners/userId", "delete", "apiKey"),
            ("/api/listeners/token", "delete", "apiKey"),
        ];
        let mut count = 0;
        for (path, operations) in doc["paths"].as_object().unwrap() {
            count += operations.as_object().unwrap().len();
            let _ = path;
        }
        assert_eq!(count, expected.len(), "no route more, none less");
        for (path, method, scheme) in expected {
            let operation = &doc["paths"][path][method];
            assert!(operation.is_object(), "{method} {path} missing");
            assert_eq!(
                operation["security"][0][scheme],
                serde_json::json!([]),
                "{method} {path}"
            );
            assert!(
                operation["responses"]["401"].is_object(),
                "{method} {path}: 401"
            );
        }
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["apiKey"]["name"], "API_KEY");
        assert_eq!(schemes["apiKey"]["in"], "header");
        assert_eq!(schemes["adminKey"]["name"], "admin_key");
        assert_eq!(schemes["apiKeyQuery"]["in"], "query");
    }

    #[test]
    fn request_schemas_say_what_validation_accepts() {
        let doc = document();
        let schema = &doc["components"]["schemas"]["ListenerRequest"];
        assert_eq!(schema["additionalProperties"], false);
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(required, ["eventTypes", "token", "url", "userId"]);
        let properties = &schema["properties"];
        assert_eq!(properties["url"]["pattern"], super::URL_PATTERN);
        assert_eq!(properties["url"]["maxLength"], 2048);
        assert_eq!(properties["userId"]["maxLength"], 256);
        assert_eq!(properties["token"]["maxLength"], 4096);
        assert_eq!(properties["eventTypes"]["minItems"], 1);
        assert_eq!(properties["eventTypes"]["uniqueItems"], true);
        assert_eq!(
            properties["eventTypes"]["items"]["enum"]
                .as_array()
                .unwrap()
                .len(),
            6
        );
        let rotated = &doc["components"]["schemas"]["RotatedSecret"];
        assert_eq!(rotated["required"], serde_json::json!(["id", "secret"]));
        let patch = &doc["components"]["schemas"]["UserPatchRequest"];
        assert_eq!(
            patch["properties"]["secret"]["pattern"],
            super::super::input::SECRET_PATTERN
        );
    }
}
