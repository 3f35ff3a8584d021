//! The admin routes: WebhookUsers as upstream's users `{id, name, apiKey, secret, enabled}`,
//! the rotation of a client secret, and the two key checks. A new user's credentials are made by the WebhookUser controller
//! (the one place that generates them); `POST /users` waits for them, bounded.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{Admin, ApiClient};
use super::cache::{credentials_user, FacadeCache};
use super::error::{ApiError, ErrorBody};
use super::input::{JsonBody, NewUserRequest, PathId, UserPatchRequest};
use super::names;
use super::{AppState, FIELD_MANAGER};
use crate::controller::generate_client_secret;
use crate::conventions::{credentials_secret_name, managed_labels, secret_value, CLIENT_SECRET};
use crate::resources::{WebhookUser, WebhookUserSpec};

/// A client of the service, as upstream shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    /// The user's id: the WebhookUser's name, `clientId` in every delivery.
    pub id: String,
    /// A human-readable name.
    pub name: String,
    /// The key the client calls the REST API with; `null` until the operator has made it.
    pub api_key: Option<String>,
    /// The client secret sent in, and signing, every delivery; `null` until made.
    pub secret: Option<String>,
    /// A disabled user's listeners receive nothing.
    pub enabled: bool,
}

fn view(user: &WebhookUser, cache: &FacadeCache) -> UserView {
    let name = user.name_any();
    let credentials = cache.credentials(&name);
    UserView {
        id: name,
        name: user.spec.display_name.clone(),
        api_key: credentials.as_ref().map(|c| c.api_key.clone()),
        secret: credentials.map(|c| c.client_secret),
        enabled: user.spec.enabled,
    }
}

#[utoipa::path(
    get, path = "/api/users/isValidApiKey", tag = "users",
    summary = "Whether the API key is valid",
    security(("apiKey" = []), ("apiKeyQuery" = [])),
    responses(
        (status = 200, description = "The key is valid", body = bool, content_type = "application/json"),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 503, description = "The service is starting", body = ErrorBody),
    )
)]
pub async fn is_valid_api_key(_client: ApiClient) -> Json<bool> {
    Json(true)
}

#[utoipa::path(
    get, path = "/api/users/isValidAdminKey", tag = "users",
    summary = "Whether the admin key is valid",
    security(("adminKey" = []), ("adminKeyQuery" = [])),
    responses(
        (status = 200, description = "The key is the admin key", body = bool, content_type = "application/json"),
        (status = 401, description = "No admin key, a wrong one, or none configured", body = ErrorBody),
    )
)]
pub async fn is_valid_admin_key(_admin: Admin) -> Json<bool> {
    Json(true)
}

#[utoipa::path(
    get, path = "/api/users", tag = "users",
    summary = "Every user",
    security(("adminKey" = []), ("adminKeyQuery" = [])),
    responses(
        (status = 200, description = "Every user", body = Vec<UserView>),
        (status = 401, description = "No admin key, a wrong one, or none configured", body = ErrorBody),
        (status = 503, description = "The service is starting", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<UserView>>, ApiError> {
    if !state.cache.is_synced() {
        return Err(ApiError::not_ready());
    }
    let mut users = state.cache.users();
    users.sort_by(|a, b| {
        (a.creation_timestamp(), a.name_any()).cmp(&(b.creation_timestamp(), b.name_any()))
    });
    Ok(Json(users.iter().map(|u| view(u, &state.cache)).collect()))
}

#[utoipa::path(
    post, path = "/api/users", tag = "users",
    summary = "Create a user",
    description = "Creates a WebhookUser; the operator generates its API key (32 random bytes, \
        hex) and secret (16 random bytes, hex). Answers once they exist, so the key works at once.",
    security(("adminKey" = []), ("adminKeyQuery" = [])),
    request_body(content = NewUserRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The new user with its credentials", body = UserView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No admin key, a wrong one, or none configured", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid", body = ErrorBody),
        (status = 503, description = "The Kubernetes API or the operator did not answer in time",
         body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    JsonBody(body): JsonBody<NewUserRequest>,
) -> Result<Json<UserView>, ApiError> {
    body.validate()?;
    let api: Api<WebhookUser> = Api::namespaced(state.client.clone(), &state.namespace);
    let name = names::user_name();
    let mut user = WebhookUser::new(
        &name,
        WebhookUserSpec {
            display_name: body.name.clone(),
            enabled: body.enabled.unwrap_or(true),
            daily_allowance: None,
            max_listeners: None,
            // Upstream's API has no delivery policy: the operator's defaults apply.
            delivery: None,
        },
    );
    user.metadata.labels = Some(managed_labels());
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    api.create(&params, &user)
        .await
        .map_err(|e| ApiError::kube("create the user", &e))?;
    tracing::info!(user = %name, "Created a user; waiting for its credentials.");
    let ready = state
        .cache
        .wait_for(state.credentials_wait, |c| {
            let user = c.user(&name)?;
            c.credentials(&name)?;
            c.user_by_api_key(&c.credentials(&name)?.api_key)?;
            Some(view(&user, c))
        })
        .await;
    match ready {
        Some(view) => Ok(Json(view)),
        None => {
            // Nothing half made stays behind: the admin retries from a clean slate.
            if let Err(error) = api.delete(&name, &DeleteParams::default()).await {
                tracing::warn!(user = %name, error = %crate::conventions::describe_kube_error(&error), "Could not remove a user whose credentials never came.");
            }
            Err(ApiError::Unavailable(format!(
                "The operator did not create the user's credentials within {}; is the controller running?",
                humantime::format_duration(state.credentials_wait)
            )))
        }
    }
}

#[utoipa::path(
    patch, path = "/api/users/{id}", tag = "users",
    summary = "Change a user's name, enabled flag or secret",
    description = "A new `secret` is in every delivery's `clientSecret` from now on; the one it \
        replaces still signs every delivery beside it for the operator's \
        `SECRET_ROTATION_OVERLAP` (24 h by default), so receivers can switch without rejecting \
        a delivery.",
    security(("adminKey" = []), ("adminKeyQuery" = [])),
    params(("id" = String, Path, description = "The user's id")),
    request_body(content = UserPatchRequest, content_type = "application/json"),
    responses(
        (status = 204, description = "Changed"),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No admin key, a wrong one, or none configured", body = ErrorBody),
        (status = 404, description = "No user has that id", body = ErrorBody),
        (status = 409, description = "The user's credentials Secret is not the operator's", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is unknown or invalid, or the Kubernetes API refused \
         the change (then nothing was changed)", body = ErrorBody),
        (status = 503, description = "The service cannot answer now", body = ErrorBody),
    )
)]
pub async fn patch(
    State(state): State<AppState>,
    _admin: Admin,
    PathId(id): PathId,
    JsonBody(body): JsonBody<UserPatchRequest>,
) -> Result<StatusCode, ApiError> {
    body.validate()?;
    if !state.cache.is_synced() {
        return Err(ApiError::not_ready());
    }
    let user = state.cache.user(&id).ok_or_else(not_found)?;
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    // Everything is checked before anything is written: a secret that cannot be stored
    // refuses the whole request.
    if body.secret.is_some() {
        check_credentials_ours(&state, &id).await?;
    }
    // The spec goes first, as the API server may refuse it; the secret, whose write is then
    // checked, follows, and a failure there puts the spec back.
    let mut spec = serde_json::Map::new();
    let mut before = serde_json::Map::new();
    if let Some(name) = &body.name {
        spec.insert("displayName".into(), name.clone().into());
        before.insert("displayName".into(), user.spec.display_name.clone().into());
    }
    if let Some(enabled) = body.enabled {
        spec.insert("enabled".into(), enabled.into());
        before.insert("enabled".into(), user.spec.enabled.into());
    }
    let users: Api<WebhookUser> = Api::namespaced(state.client.clone(), &state.namespace);
    if !spec.is_empty() {
        match users
            .patch(
                &id,
                &params,
                &Patch::Merge(&serde_json::json!({ "spec": spec })),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => return Err(not_found()),
            Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => {
                tracing::info!(
                    user = %id,
                    error = %crate::conventions::describe_kube_error(&kube::Error::Api(status)),
                    "The API server refused a user change; nothing was changed."
                );
                return Err(ApiError::Unprocessable(
                    "The change was refused by the Kubernetes API; nothing was changed.".into(),
                ));
            }
            Err(error) => return Err(ApiError::kube("change the user", &error)),
        }
    }
    if let Some(secret) = &body.secret {
        if let Err(error) = write_client_secret(&state, &id, secret).await {
            if !before.is_empty() {
                let undo = serde_json::json!({ "spec": before });
                if let Err(undo_error) = users.patch(&id, &params, &Patch::Merge(&undo)).await {
                    tracing::warn!(user = %id, error = %crate::conventions::describe_kube_error(&undo_error), "Could not undo a user change whose secret could not be stored.");
                }
            }
            return Err(error);
        }
    }
    tracing::info!(user = %id, "Changed a user.");
    // The next read of this replica shows the change.
    let shown = state
        .cache
        .wait_for(state.write_wait, |c| {
            let cached = c.user(&id)?;
            let name_ok = body
                .name
                .as_ref()
                .is_none_or(|n| &cached.spec.display_name == n);
            let enabled_ok = body.enabled.is_none_or(|e| cached.spec.enabled == e);
            let secret_ok = body
                .secret
                .as_ref()
                .is_none_or(|s| shows_client_secret(c, &id, s));
            (name_ok && enabled_ok && secret_ok).then_some(())
        })
        .await;
    if shown.is_none() {
        tracing::warn!(user = %id, "A changed user is not in the facade's cache yet.");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A user's new client secret, shown once by the rotation that made it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotatedSecret {
    /// The user's id.
    pub id: String,
    /// The new client secret: in every delivery's `clientSecret` from now on, and the first
    /// key of every signature.
    pub secret: String,
}

#[utoipa::path(
    post, path = "/api/users/{id}/rotate", tag = "users",
    summary = "Give a user a new client secret, keeping the old one for the overlap",
    description = "Generates a new client secret (16 random bytes, hex) and answers it. Every \
        delivery carries the new secret in `clientSecret` and is signed with it and, until the \
        operator's `SECRET_ROTATION_OVERLAP` (24 h by default) has passed, also with the one it \
        replaced: `webhook-signature: v1,<new> v1,<old>`. Receivers switch to the new secret \
        within the overlap without rejecting a delivery.",
    security(("adminKey" = []), ("adminKeyQuery" = [])),
    params(("id" = String, Path, description = "The user's id")),
    responses(
        (status = 200, description = "The new secret", body = RotatedSecret),
        (status = 401, description = "No admin key, a wrong one, or none configured", body = ErrorBody),
        (status = 404, description = "No user has that id", body = ErrorBody),
        (status = 409, description = "The user's credentials Secret is not the operator's", body = ErrorBody),
        (status = 503, description = "The service cannot answer now, or the user's credentials \
         are not made yet", body = ErrorBody),
    )
)]
pub async fn rotate(
    State(state): State<AppState>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<Json<RotatedSecret>, ApiError> {
    if !state.cache.is_synced() {
        return Err(ApiError::not_ready());
    }
    state.cache.user(&id).ok_or_else(not_found)?;
    check_credentials_ours(&state, &id).await?;
    let secret = generate_client_secret();
    write_client_secret(&state, &id, &secret).await?;
    tracing::info!(user = %id, "Rotated a user's client secret.");
    let shown = state
        .cache
        .wait_for(state.write_wait, |c| {
            shows_client_secret(c, &id, &secret).then_some(())
        })
        .await;
    if shown.is_none() {
        tracing::warn!(user = %id, "A rotated secret is not in the facade's cache yet.");
    }
    Ok(Json(RotatedSecret { id, secret }))
}

/// Refuses to write a user's client secret unless its credentials Secret is the operator's.
async fn check_credentials_ours(state: &AppState, id: &str) -> Result<(), ApiError> {
    let secret_name = credentials_secret_name(id);
    let ours = match state.cache.secret(&secret_name) {
        Some(stored) => credentials_user(&stored) == Some(id),
        // Only managed Secrets are cached: look whether one that is not ours holds the name.
        None => {
            let secrets: Api<Secret> = Api::namespaced(state.client.clone(), &state.namespace);
            match secrets.get_opt(&secret_name).await {
                Ok(None) => {
                    return Err(ApiError::Unavailable(
                        "The user's credentials are not made yet; try again.".into(),
                    ))
                }
                Ok(Some(_)) => false,
                Err(error) => return Err(ApiError::kube("read the user's credentials", &error)),
            }
        }
    };
    if ours {
        Ok(())
    } else {
        Err(ApiError::Conflict(format!(
            "Secret {secret_name} was not made by the operator for this user; delete or \
             rename it and the operator makes new credentials."
        )))
    }
}

/// Stores a user's new client secret. The operator sees it differ from the one it recorded and
/// keeps that one signing for the overlap, as it does for a hand edit of the Secret.
async fn write_client_secret(state: &AppState, id: &str, secret: &str) -> Result<(), ApiError> {
    let secrets: Api<Secret> = Api::namespaced(state.client.clone(), &state.namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let data = BTreeMap::from([(
        CLIENT_SECRET.to_owned(),
        ByteString(secret.as_bytes().to_vec()),
    )]);
    secrets
        .patch(
            &credentials_secret_name(id),
            &params,
            &Patch::Merge(&serde_json::json!({ "data": data })),
        )
        .await
        .map(|_| ())
        .map_err(|error| ApiError::kube("change the user's secret", &error))
}

/// Whether the facade's cache shows `secret` as the user's client secret.
fn shows_client_secret(cache: &FacadeCache, id: &str, secret: &str) -> bool {
    cache
        .secret(&credentials_secret_name(id))
        .and_then(|stored| secret_value(&stored, CLIENT_SECRET))
        .as_deref()
        == Some(secret)
}

#[utoipa::path(
    delete, path = "/api/users/{id}", tag = "users",
    summary = "Delete a user and all its listeners",
    security(("adminKey" = []), ("adminKeyQuery" = [])),
    params(("id" = String, Path, description = "The user's id")),
    responses(
        (status = 204, description = "Deleted: none of its listeners receives an event any more; \
         they are removed"),
        (status = 401, description = "No admin key, a wrong one, or none configured", body = ErrorBody),
        (status = 404, description = "No user has that id", body = ErrorBody),
        (status = 503, description = "The service cannot answer now, or the operator did not \
         confirm within the delete wait that the user's listeners stopped receiving events (it is \
         being deleted)", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<StatusCode, ApiError> {
    if !state.cache.is_synced() {
        return Err(ApiError::not_ready());
    }
    state.cache.user(&id).ok_or_else(not_found)?;
    let api: Api<WebhookUser> = Api::namespaced(state.client.clone(), &state.namespace);
    match api.delete(&id, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Err(not_found()),
        Err(error) => return Err(ApiError::kube("delete the user", &error)),
    }
    tracing::info!(user = %id, "Deleted a user; the operator removes its listeners.");
    // The operator stops routing for a user first and removes its finalizer last: once the
    // user is gone, none of its listeners receives an event.
    state
        .cache
        .wait_for(state.delete_wait, |c| {
            c.user_any_state(&id).is_none().then_some(())
        })
        .await
        .ok_or_else(|| super::deletion_unconfirmed(state.delete_wait))?;
    Ok(StatusCode::NO_CONTENT)
}

fn not_found() -> ApiError {
    ApiError::NotFound("No user has that id.".into())
}
