//! The listener routes of one client (an API key's WebhookUser): list, register (with
//! upstream's deduplication), check and delete. A client sees and touches only Listeners whose
//! `spec.owner` it is; another client's listener answers 404 as if it did not exist.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::Json;
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::ApiClient;
use super::cache::FacadeCache;
use super::error::{ApiError, ErrorBody};
use super::input::{
    required_query, JsonBody, ListenerRequest, NewListener, PathId, MAX_TOKEN_CHARS,
    MAX_USER_ID_CHARS,
};
use super::names;
use super::token_check::TokenVerdict;
use super::{AppState, FIELD_MANAGER};
use crate::conventions::{
    describe_kube_error, is_managed_token_secret_of, managed_labels, secret_value,
    LISTENER_ANNOTATION, TOKEN_KEY,
};
use crate::crownstone::EventType;
use crate::domain::Token;
use crate::resources::{Listener, ListenerSpec, SecretKeyRef};

/// How often a registration is retried when another request changes the same Listener.
const MAX_ATTEMPTS: usize = 3;

/// A listener as upstream shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerView {
    /// The listener's id: the Listener's name.
    pub id: String,
    /// The access token the listener streams with; `null` unless it is in a token Secret the
    /// facade made for this listener.
    pub token: Option<String>,
    /// The user's id on the Crownstone cloud.
    pub user_id: String,
    /// When this registration ends, if known.
    pub expires_at: Option<DateTime<Utc>>,
    /// The event types forwarded.
    #[schema(schema_with = super::openapi::event_types_schema)]
    pub event_types: Vec<EventType>,
    /// Where events are POSTed.
    pub url: String,
    /// The id of the client that owns it.
    pub owner_id: String,
}

/// How many listeners were deleted.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Count {
    pub count: u64,
}

fn view(listener: &Listener, token: Option<String>) -> ListenerView {
    ListenerView {
        id: listener.name_any(),
        token,
        user_id: listener.spec.user_id.clone(),
        expires_at: listener.spec.expires_at,
        event_types: listener.spec.event_types.clone(),
        url: listener.spec.url.clone(),
        owner_id: listener.spec.owner.clone(),
    }
}

/// The token of a Listener, shown only from a token Secret the facade made for that very
/// Listener (`is_managed_token_secret_of`), as the cache of managed Secrets holds it. Any other
/// Secret a Listener names (one a tenant made with kubectl, or another Listener's) is never
/// read here: its value is neither shown nor compared, and the listener's token is `None`.
fn token_of(state: &AppState, listener: &Listener) -> Option<String> {
    let reference = &listener.spec.token_secret_ref;
    let secret = state.cache.secret(&reference.name)?;
    if !is_managed_token_secret_of(&secret, &listener.name_any()) {
        return None;
    }
    secret_value(&secret, &reference.key)
}

fn sorted(mut listeners: Vec<Arc<Listener>>) -> Vec<Arc<Listener>> {
    listeners.sort_by(|a, b| {
        (a.creation_timestamp(), a.name_any()).cmp(&(b.creation_timestamp(), b.name_any()))
    });
    listeners
}

#[utoipa::path(
    get, path = "/api/listeners", tag = "listeners",
    summary = "The caller's listeners",
    security(("apiKey" = []), ("apiKeyQuery" = [])),
    responses(
        (status = 200, description = "Every listener of the caller", body = Vec<ListenerView>),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 503, description = "The service cannot answer now", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    client: ApiClient,
) -> Result<Json<Vec<ListenerView>>, ApiError> {
    let mut views = Vec::new();
    for listener in sorted(state.cache.listeners_of(&client.user)) {
        let token = token_of(&state, &listener);
        views.push(view(&listener, token));
    }
    Ok(Json(views))
}

#[utoipa::path(
    get, path = "/api/listeners/active", tag = "listeners",
    summary = "Whether the caller has a listener for a Crownstone user",
    security(("apiKey" = []), ("apiKeyQuery" = [])),
    params(("userId" = String, Query, description = "The user's id on the Crownstone cloud",
            min_length = 1, max_length = 256)),
    responses(
        (status = 200, description = "`true` when a listener exists", body = bool, content_type = "application/json"),
        (status = 400, description = "No userId", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 422, description = "userId is too long", body = ErrorBody),
        (status = 503, description = "The service cannot answer now", body = ErrorBody),
    )
)]
pub async fn active(
    State(state): State<AppState>,
    client: ApiClient,
    RawQuery(query): RawQuery,
) -> Result<Json<bool>, ApiError> {
    let user_id = required_query(query.as_deref(), "userId", MAX_USER_ID_CHARS)?;
    let active = state
        .cache
        .listeners_of(&client.user)
        .iter()
        .any(|l| l.spec.user_id == user_id);
    Ok(Json(active))
}

#[utoipa::path(
    post, path = "/api/listeners", tag = "listeners",
    summary = "Register a listener",
    description = "The token is checked with Crownstone first; nothing is stored unless it is \
        valid. A listener of the caller with the same userId and url whose eventTypes include \
        every requested type is the same listener: it is returned, with the token replaced when \
        a different valid one is given.",
    security(("apiKey" = []), ("apiKeyQuery" = [])),
    request_body(content = ListenerRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The new or existing listener", body = ListenerView),
        (status = 400, description = "Malformed JSON, or a token Crownstone refused (`Invalid token.`)",
         body = ErrorBody),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid, or the caller has \
         as many listeners as it may have", body = ErrorBody),
        (status = 503, description = "Crownstone or the Kubernetes API cannot be reached now",
         body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    client: ApiClient,
    JsonBody(body): JsonBody<ListenerRequest>,
) -> Result<Json<ListenerView>, ApiError> {
    let request = body.validate()?;
    let token = request.token.expose().to_owned();
    let mut verified = false;
    for _ in 0..MAX_ATTEMPTS {
        let candidates = candidates(&state, &client.user, &request);
        match dedup(&candidates, &request) {
            Dedup::Unchanged(index) => {
                return Ok(Json(view(&candidates[index].listener, Some(token))));
            }
            Dedup::ReplaceToken(index) => {
                if !verified {
                    ensure_valid(&state, &request.token).await?;
                }
                let listener =
                    replace_token(&state, &candidates[index].listener, &request.token).await?;
                return Ok(Json(view(&listener, Some(token))));
            }
            Dedup::New => {
                ensure_room(&state, &client.user)?;
                if !verified {
                    ensure_valid(&state, &request.token).await?;
                    verified = true;
                }
                match create_new(&state, &client.user, &request).await? {
                    Created::New(listener) => return Ok(Json(view(&listener, Some(token)))),
                    Created::AlreadyExists(name) => settle_race(&state, &name).await,
                }
            }
        }
    }
    Err(ApiError::Unavailable(
        "The listener was being changed by another request; try again.".into(),
    ))
}

/// After losing a create race: waits until the winner's Listener and the token Secret it
/// stores next are visible (then dedup finds it), or, when the name belongs to a Listener on
/// its way out, until it is gone.
async fn settle_race(state: &AppState, name: &str) {
    let cache: &FacadeCache = &state.cache;
    if cache
        .wait_for(state.write_wait, |c| {
            c.listener(name)
                .filter(|l| c.secret(&l.spec.token_secret_ref.name).is_some())
        })
        .await
        .is_none()
    {
        cache
            .wait_for(state.write_wait, |c| {
                c.listener_any_state(name).is_none().then_some(())
            })
            .await;
    }
}

/// Refuses a new listener past the owner's ceiling (`spec.maxListeners`, else the operator's
/// default). Two racing registrations may both pass; the controller then leaves the newest
/// unstreamed, so the ceiling holds for routing either way.
fn ensure_room(state: &AppState, owner: &str) -> Result<(), ApiError> {
    let ceiling = state
        .cache
        .user(owner)
        .and_then(|user| user.spec.max_listeners)
        .unwrap_or(state.max_listeners_per_user);
    let count = state.cache.listeners_of(owner).len();
    if count >= ceiling as usize {
        return Err(ApiError::Unprocessable(format!(
            "You have {count} listeners, the most you may have ({ceiling}); delete one first."
        )));
    }
    Ok(())
}

async fn ensure_valid(state: &AppState, token: &Token) -> Result<(), ApiError> {
    match state.checker.check(token).await {
        TokenVerdict::Valid => Ok(()),
        TokenVerdict::Invalid => Err(ApiError::BadRequest("Invalid token.".into())),
        TokenVerdict::Unreachable(why) => Err(ApiError::Unavailable(format!(
            "The token could not be checked with Crownstone: {why}"
        ))),
    }
}

/// A listener of the caller that may be the requested one, with its current token.
pub struct Candidate {
    pub listener: Arc<Listener>,
    pub token: Option<String>,
}

fn candidates(state: &AppState, owner: &str, request: &NewListener) -> Vec<Candidate> {
    let mut found = Vec::new();
    for listener in state.cache.listeners_of(owner) {
        if covers(&listener.spec, request) {
            let token = token_of(state, &listener);
            found.push(Candidate { listener, token });
        }
    }
    found
}

/// Same Crownstone user, same url, and every requested type among its types.
fn covers(spec: &ListenerSpec, request: &NewListener) -> bool {
    spec.user_id == request.user_id
        && spec.url == request.url
        && request
            .event_types
            .iter()
            .all(|t| spec.event_types.contains(t))
}

/// What a registration does, by upstream's rules.
#[derive(Debug, PartialEq, Eq)]
pub enum Dedup {
    /// This candidate already is the listener, with this token: return it.
    Unchanged(usize),
    /// This candidate is the listener; its token is replaced.
    ReplaceToken(usize),
    /// No listener covers the request: create one.
    New,
}

/// Chooses among covering candidates: one with the same token wins; otherwise the closest (the
/// fewest types, then the name) gets the new token.
pub fn dedup(candidates: &[Candidate], request: &NewListener) -> Dedup {
    let closest = |indices: &mut dyn Iterator<Item = usize>| {
        indices.min_by_key(|&i| {
            let listener = &candidates[i].listener;
            (listener.spec.event_types.len(), listener.name_any())
        })
    };
    let token = request.token.expose();
    let mut same_token = (0..candidates.len())
        .filter(|&i| covers(&candidates[i].listener.spec, request))
        .filter(|&i| candidates[i].token.as_deref() == Some(token));
    if let Some(index) = closest(&mut same_token) {
        return Dedup::Unchanged(index);
    }
    let mut covering =
        (0..candidates.len()).filter(|&i| covers(&candidates[i].listener.spec, request));
    match closest(&mut covering) {
        Some(index) => Dedup::ReplaceToken(index),
        None => Dedup::New,
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// A managed token Secret for `listener`, owned by it: the garbage collector removes the Secret
/// with its Listener even when the operator's finalizer never runs, so no token Secret outlives
/// the Listener it was made for.
fn token_secret(name: &str, listener: &Listener, token: &Token) -> Result<Secret, ApiError> {
    let uid = listener.uid().ok_or_else(|| {
        ApiError::Unavailable("The Kubernetes API gave the new listener no uid; try again.".into())
    })?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(managed_labels()),
            annotations: Some(BTreeMap::from([(
                LISTENER_ANNOTATION.to_owned(),
                listener.name_any(),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: Listener::api_version(&()).into_owned(),
                kind: Listener::kind(&()).into_owned(),
                name: listener.name_any(),
                uid,
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(token.expose().as_bytes().to_vec()),
        )])),
        ..Secret::default()
    })
}

/// Stores `token` in a new managed Secret owned by `listener`.
async fn store_token(
    state: &AppState,
    name: &str,
    listener: &Listener,
    token: &Token,
) -> Result<(), ApiError> {
    let secrets: Api<Secret> = Api::namespaced(state.client.clone(), &state.namespace);
    match secrets
        .create(&post_params(), &token_secret(name, listener, token)?)
        .await
    {
        Ok(_) => Ok(()),
        // Never overwritten: a Secret of that name may be a tenant's.
        Err(kube::Error::Api(status)) if status.code == 409 => Err(ApiError::Conflict(format!(
            "Secret {name} already exists; the listener's token cannot be stored in it."
        ))),
        Err(error) => Err(ApiError::kube("store the listener's token", &error)),
    }
}

enum Created {
    New(Arc<Listener>),
    /// A Listener of that name exists: an identical request won a race.
    AlreadyExists(String),
}

/// Creates the Listener first and then its token Secret, owned by it: a failure before the
/// Secret leaves nothing behind, a failure after it leaves a Listener that is removed here (and
/// its Secret with it). A process that dies in between leaves a Listener without a Secret, which
/// is not streamed; repeating the registration gives it its Secret.
async fn create_new(
    state: &AppState,
    owner: &str,
    request: &NewListener,
) -> Result<Created, ApiError> {
    let name = names::listener_name(owner, &request.user_id, &request.url, &request.event_types);
    let secret_name = names::token_secret_name(&name);
    let listeners: Api<Listener> = Api::namespaced(state.client.clone(), &state.namespace);
    let mut listener = Listener::new(
        &name,
        ListenerSpec {
            owner: owner.to_owned(),
            user_id: request.user_id.clone(),
            event_types: request.event_types.iter().copied().collect(),
            url: request.url.clone(),
            token_secret_ref: SecretKeyRef {
                name: secret_name.clone(),
                key: TOKEN_KEY.into(),
            },
            expires_at: None,
            // Upstream's API has no delivery policy: the owner's, or the defaults, apply.
            delivery: None,
        },
    );
    listener.metadata.labels = Some(managed_labels());
    let created = match listeners.create(&post_params(), &listener).await {
        Ok(created) => created,
        Err(kube::Error::Api(status)) if status.code == 409 => {
            return Ok(Created::AlreadyExists(name));
        }
        Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => {
            tracing::info!(
                error = %describe_kube_error(&kube::Error::Api(status)),
                "The API server refused a listener the facade had validated."
            );
            return Err(ApiError::Unprocessable(
                "The listener was refused by the Kubernetes API's validation; check url and userId."
                    .into(),
            ));
        }
        Err(error) => return Err(ApiError::kube("create the listener", &error)),
    };
    if let Err(error) = store_token(state, &secret_name, &created, &request.token).await {
        discard::<Listener>(state, &name, "a listener whose token could not be stored").await;
        return Err(error);
    }
    tracing::info!(listener = %name, owner, "Registered a listener.");
    let visible = state
        .cache
        .wait_for(state.write_wait, |c| {
            (c.listener(&name).is_some() && c.secret(&secret_name).is_some()).then_some(())
        })
        .await;
    if visible.is_none() {
        tracing::warn!(listener = %name, "A new listener is not in the facade's cache yet.");
    }
    Ok(Created::New(Arc::new(created)))
}

/// Undoes what a registration created and could not complete: deletes `name` (already gone is
/// fine); a failure is logged for an operator to clean up by hand.
async fn discard<K>(state: &AppState, name: &str, what: &str)
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(state.client.clone(), &state.namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => {
            tracing::warn!(name, error = %describe_kube_error(&error), "Could not remove {what}; delete it by hand.");
        }
    }
}

/// Gives an existing Listener a new, checked token: rewritten in its Secret when that is one
/// the operator manages and no other Listener reads, else in a new managed Secret it is
/// pointed to.
async fn replace_token(
    state: &AppState,
    listener: &Arc<Listener>,
    token: &Token,
) -> Result<Arc<Listener>, ApiError> {
    let name = listener.name_any();
    let reference = &listener.spec.token_secret_ref;
    let rewritable = state
        .cache
        .secret(&reference.name)
        .is_some_and(|secret| is_managed_token_secret_of(&secret, &name))
        && !state.cache.secret_shared(&reference.name, &name);
    if rewritable {
        let secrets: Api<Secret> = Api::namespaced(state.client.clone(), &state.namespace);
        let data = BTreeMap::from([(
            reference.key.clone(),
            ByteString(token.expose().as_bytes().to_vec()),
        )]);
        let patch = serde_json::json!({ "data": data });
        secrets
            .patch(&reference.name, &patch_params(), &Patch::Merge(&patch))
            .await
            .map_err(|e| ApiError::kube("replace the listener's token", &e))?;
        tracing::info!(listener = %name, "Replaced a listener's token.");
        let secret_name = reference.name.clone();
        let key = reference.key.clone();
        state
            .cache
            .wait_for(state.write_wait, |c| {
                let secret = c.secret(&secret_name)?;
                (secret_value(&secret, &key).as_deref() == Some(token.expose())).then_some(())
            })
            .await;
        return Ok(listener.clone());
    }
    // The token lives in a Secret that is not ours to rewrite: the Listener gets its own.
    // Owned by the Listener from the start, so it goes with the Listener even if the process
    // dies before the Listener points to it.
    let secret_name = names::token_secret_name(&name);
    store_token(state, &secret_name, listener, token).await?;
    let listeners: Api<Listener> = Api::namespaced(state.client.clone(), &state.namespace);
    // The resourceVersion makes this a compare-and-swap with any concurrent change.
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": listener.resource_version()},
        "spec": {"tokenSecretRef": {"name": secret_name, "key": TOKEN_KEY}},
    });
    let updated = match listeners
        .patch(&name, &patch_params(), &Patch::Merge(&patch))
        .await
    {
        Ok(updated) => updated,
        Err(error) => {
            discard::<Secret>(state, &secret_name, "an unused token Secret").await;
            return Err(match &error {
                kube::Error::Api(status) if status.code == 409 => ApiError::Unavailable(
                    "The listener was being changed by another request; try again.".into(),
                ),
                kube::Error::Api(status) if status.code == 404 => {
                    ApiError::NotFound("The listener was deleted meanwhile.".into())
                }
                _ => ApiError::kube("point the listener to its new token", &error),
            });
        }
    };
    tracing::info!(listener = %name, "Moved a listener's token into a Secret of its own.");
    state
        .cache
        .wait_for(state.write_wait, |c| {
            let cached = c.listener(&name)?;
            (cached.spec.token_secret_ref.name == secret_name && c.secret(&secret_name).is_some())
                .then_some(())
        })
        .await;
    Ok(Arc::new(updated))
}

/// Deletes Listeners; returns how many this request deleted, once they are gone from the
/// cache: the operator removes its finalizer only after it stopped routing to a Listener, so
/// from then on no event reaches them. Past the delete wait the answer is 503 (the deletion
/// goes on; a repeated request finds nothing left to delete).
async fn delete_listeners(state: &AppState, names: &[String]) -> Result<u64, ApiError> {
    let api: Api<Listener> = Api::namespaced(state.client.clone(), &state.namespace);
    let mut deleted = Vec::new();
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => deleted.push(name.clone()),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(ApiError::kube("delete the listener", &error)),
        }
    }
    if !deleted.is_empty() {
        tracing::info!(count = deleted.len(), "Deleted listeners.");
        let gone = state
            .cache
            .wait_for(state.delete_wait, |c| {
                deleted
                    .iter()
                    .all(|n| c.listener_any_state(n).is_none())
                    .then_some(())
            })
            .await;
        if gone.is_none() {
            return Err(super::deletion_unconfirmed(state.delete_wait));
        }
    }
    Ok(deleted.len() as u64)
}

#[utoipa::path(
    delete, path = "/api/listeners/{id}", tag = "listeners",
    summary = "Delete one of the caller's listeners",
    security(("apiKey" = []), ("apiKeyQuery" = [])),
    params(("id" = String, Path, description = "The listener's id")),
    responses(
        (status = 200, description = "Deleted", body = Count),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 404, description = "The caller has no listener of that id", body = ErrorBody),
        (status = 503, description = "The service cannot answer now, or the operator did not \
         confirm within the delete wait that the listener stopped receiving events (it is being \
         deleted)", body = ErrorBody),
    )
)]
pub async fn delete_one(
    State(state): State<AppState>,
    client: ApiClient,
    PathId(id): PathId,
) -> Result<Json<Count>, ApiError> {
    let not_found = || ApiError::NotFound("No listener of yours has that id.".into());
    let listener = state.cache.listener(&id).ok_or_else(not_found)?;
    if listener.spec.owner != client.user {
        return Err(not_found());
    }
    match delete_listeners(&state, &[id]).await? {
        0 => Err(not_found()),
        count => Ok(Json(Count { count })),
    }
}

#[utoipa::path(
    delete, path = "/api/listeners/userId", tag = "listeners",
    summary = "Delete the caller's listeners of a Crownstone user",
    security(("apiKey" = []), ("apiKeyQuery" = [])),
    params(("userId" = String, Query, description = "The user's id on the Crownstone cloud",
            min_length = 1, max_length = 256)),
    responses(
        (status = 200, description = "How many were deleted (0 when there were none)", body = Count),
        (status = 400, description = "No userId", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 422, description = "userId is too long", body = ErrorBody),
        (status = 503, description = "The service cannot answer now, or the operator did not \
         confirm within the delete wait that the listeners stopped receiving events (they are \
         being deleted)", body = ErrorBody),
    )
)]
pub async fn delete_by_user_id(
    State(state): State<AppState>,
    client: ApiClient,
    RawQuery(query): RawQuery,
) -> Result<Json<Count>, ApiError> {
    let user_id = required_query(query.as_deref(), "userId", MAX_USER_ID_CHARS)?;
    let names: Vec<String> = state
        .cache
        .listeners_of(&client.user)
        .iter()
        .filter(|l| l.spec.user_id == user_id)
        .map(|l| l.name_any())
        .collect();
    let count = delete_listeners(&state, &names).await?;
    Ok(Json(Count { count }))
}

#[utoipa::path(
    delete, path = "/api/listeners/token", tag = "listeners",
    summary = "Delete the caller's listeners that use a token",
    security(("apiKey" = []), ("apiKeyQuery" = [])),
    params(("token" = String, Query, description = "The access token", min_length = 1,
            max_length = 4096)),
    responses(
        (status = 200, description = "How many were deleted (0 when there were none)", body = Count),
        (status = 400, description = "No token", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 422, description = "token is too long", body = ErrorBody),
        (status = 503, description = "The service cannot answer now, or the operator did not \
         confirm within the delete wait that the listeners stopped receiving events (they are \
         being deleted)", body = ErrorBody),
    )
)]
pub async fn delete_by_token(
    State(state): State<AppState>,
    client: ApiClient,
    RawQuery(query): RawQuery,
) -> Result<Json<Count>, ApiError> {
    let token = required_query(query.as_deref(), "token", MAX_TOKEN_CHARS)?;
    let mut names = Vec::new();
    for listener in state.cache.listeners_of(&client.user) {
        if token_of(&state, &listener).as_deref() == Some(token.as_str()) {
            names.push(listener.name_any());
        }
    }
    let count = delete_listeners(&state, &names).await?;
    Ok(Json(Count { count }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(name: &str, types: &[&str]) -> Arc<Listener> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "webhooks.crownstone.rocks/v1alpha1", "kind": "Listener",
                "metadata": {"name": name},
                "spec": {"owner": "acme", "userId": "u1", "eventTypes": types,
                         "url": "https://x.example/hook",
                         "tokenSecretRef": {"name": format!("{name}-token"), "key": "token"}}
            }))
            .unwrap(),
        )
    }

    fn candidate(name: &str, types: &[&str], token: &str) -> Candidate {
        Candidate {
            listener: listener(name, types),
            token: Some(token.to_owned()),
        }
    }

    fn request(types: &[EventType], token: &str) -> NewListener {
        NewListener {
            token: Token::new(token),
            user_id: "u1".into(),
            event_types: types.iter().copied().collect(),
            url: "https://x.example/hook".into(),
        }
    }

    #[test]
    fn upstreams_dedup_rules() {
        use EventType::*;
        let candidates = [
            candidate("both", &["command", "presence"], "a"),
            candidate("command", &["command"], "b"),
        ];
        // A subset of an existing listener's types with its token: that listener, unchanged.
        assert_eq!(
            dedup(&candidates, &request(&[Presence], "a")),
            Dedup::Unchanged(0)
        );
        assert_eq!(
            dedup(&candidates, &request(&[Command], "a")),
            Dedup::Unchanged(0)
        );
        assert_eq!(
            dedup(&candidates, &request(&[Command], "b")),
            Dedup::Unchanged(1)
        );
        // Another token: the closest covering listener gets it.
        assert_eq!(
            dedup(&candidates, &request(&[Command], "c")),
            Dedup::ReplaceToken(1)
        );
        assert_eq!(
            dedup(&candidates, &request(&[Command, Presence], "c")),
            Dedup::ReplaceToken(0)
        );
        // A type none of them has: a new listener.
        assert_eq!(
            dedup(&candidates, &request(&[Command, DataChange], "a")),
            Dedup::New
        );
        assert_eq!(dedup(&[], &request(&[Command], "a")), Dedup::New);
        // Another url or user: not covered.
        let mut other_url = request(&[Command], "a");
        other_url.url = "https://x.example/other".into();
        assert_eq!(dedup(&candidates, &other_url), Dedup::New);
        let mut other_user = request(&[Command], "a");
        other_user.user_id = "u2".into();
        assert_eq!(dedup(&candidates, &other_user), Dedup::New);
    }

    #[test]
    fn a_listener_without_a_readable_token_gets_the_new_one() {
        let candidates = [Candidate {
            listener: listener("l", &["command"]),
            token: None,
        }];
        assert_eq!(
            dedup(&candidates, &request(&[EventType::Command], "t")),
            Dedup::ReplaceToken(0)
        );
    }

    #[test]
    fn views_have_upstreams_shape() {
        let json =
            serde_json::to_value(view(&listener("l-1", &["command"]), Some("t".into()))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "l-1", "token": "t", "userId": "u1", "expiresAt": null,
                "eventTypes": ["command"], "url": "https://x.example/hook", "ownerId": "acme"
            })
        );
    }
}
