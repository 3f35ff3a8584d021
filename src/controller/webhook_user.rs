//! The WebhookUser reconciler: credentials Secret, routing entry, status, and cleanup of the
//! user's Listeners when it is deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::conditions::{same_conditions, to_conditions, DesiredCondition};
use super::credentials::{generate_credentials, observe_credentials};
use super::{delete_if_present, Context, Error, FINALIZER};
use crate::conventions::{
    credentials_owner, credentials_secret_name, is_managed, managed_labels, secret_value, API_KEY,
    CLIENT_SECRET, RECORDED_CLIENT_SECRET, USER_ANNOTATION,
};
use crate::domain::{ClientSecret, OwnerKey};
use crate::index::{OwnerEntry, RoutingIndex};
use crate::resources::{Listener, WebhookUser};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Runs the WebhookUser controller until `shutdown` resolves. `triggers` come from the Secret
/// watch (a credentials Secret changed) and the Listener reconciler (a Listener came or went).
pub async fn run_webhook_user_controller(
    controller: Controller<WebhookUser>,
    ctx: Arc<Context>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<WebhookUser>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    controller
        .reconcile_on(UnboundedReceiverStream::new(triggers))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

async fn reconcile(user: Arc<WebhookUser>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.count_reconcile("webhookuser");
    let namespace = user.namespace().ok_or(Error::MissingNamespace)?;
    let object = format!("webhookuser/{namespace}/{}", user.name_any());
    let api: Api<WebhookUser> = Api::namespaced(ctx.client.clone(), &namespace);
    if !ctx.may_write() {
        // A standby routes as the leader does and writes nothing: no finalizer, no status, no
        // Secret; the leader runs the cleanup, the standby only forgets a user being deleted.
        let action = if user.meta().deletion_timestamp.is_some() {
            forget(&user, &namespace, &ctx);
            Action::await_change()
        } else {
            apply(&user, &namespace, &ctx).await?
        };
        ctx.reconciled(&object);
        return Ok(action);
    }
    let action = finalizer(&api, FINALIZER, user, |event| async {
        match event {
            FinalizerEvent::Apply(user) => apply(&user, &namespace, &ctx).await,
            FinalizerEvent::Cleanup(user) => cleanup(&user, &namespace, &ctx).await,
        }
    })
    .await?;
    ctx.reconciled(&object);
    Ok(action)
}

fn error_policy(user: Arc<WebhookUser>, error: &Error, ctx: Arc<Context>) -> Action {
    let object = format!(
        "{}/{}",
        user.namespace().unwrap_or_default(),
        user.name_any()
    );
    ctx.retry_after_error("webhookuser", &object, error)
}

/// What the user's credentials Secret holds, as far as delivery is concerned.
enum CredentialsState {
    Ready(ClientSecret),
    /// No delivery can be signed; the condition says why and what to do.
    Unusable {
        reason: &'static str,
        message: String,
    },
}

/// Reads the client secret from the credentials Secret, creating the Secret when missing. A
/// Secret of that name that the operator did not create is never adopted.
async fn ensure_credentials(
    user: &WebhookUser,
    namespace: &str,
    ctx: &Context,
) -> Result<CredentialsState, Error> {
    let user_name = user.name_any();
    let name = credentials_secret_name(&user_name);
    let existing = match ctx.read_secret(namespace, &name).await? {
        Some(secret) => secret,
        // The leader creates it; its watch event brings it here and reconciles the user again.
        None if !ctx.may_write() => {
            return Ok(CredentialsState::Unusable {
                reason: "CredentialsPending",
                message: format!("Secret {name} is not created yet"),
            })
        }
        None => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
            let credentials = generate_credentials();
            let secret = credentials_secret(user, &name, &credentials);
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    ctx.secrets.put(created);
                    tracing::info!(namespace, user = %user_name, secret = %name, "Created the user's credentials.");
                    return Ok(CredentialsState::Ready(ClientSecret::new(
                        credentials.client_secret,
                    )));
                }
                // Created meanwhile by someone else: judge what is stored.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    match secrets.get_opt(&name).await? {
                        Some(secret) => ctx.secrets.put(secret),
                        None => return Err(kube::Error::Api(status).into()),
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
    };
    if !is_managed(&existing.metadata) || credentials_owner(&existing.metadata) != Some(&user_name)
    {
        return Ok(CredentialsState::Unusable {
            reason: "CredentialsSecretConflict",
            message: format!(
                "Secret {name} exists but was not created by the operator for this user; \
                 delete or rename it and the operator creates the credentials"
            ),
        });
    }
    Ok(match secret_value(&existing, CLIENT_SECRET) {
        Some(secret) => CredentialsState::Ready(
            observe_credentials(&existing, &secret, &user_name, namespace, ctx)
                .await?
                .client_secret,
        ),
        None => CredentialsState::Unusable {
            reason: "CredentialsInvalid",
            message: format!(
                "Secret {name} has no {CLIENT_SECRET}; delete it to have new credentials made"
            ),
        },
    })
}

fn credentials_secret(user: &WebhookUser, name: &str, credentials: &super::Credentials) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(managed_labels()),
            annotations: Some(BTreeMap::from([(
                USER_ANNOTATION.to_owned(),
                user.name_any(),
            )])),
            owner_references: user.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                API_KEY.to_owned(),
                ByteString(credentials.api_key.clone().into_bytes()),
            ),
            (
                CLIENT_SECRET.to_owned(),
                ByteString(credentials.client_secret.clone().into_bytes()),
            ),
            (
                RECORDED_CLIENT_SECRET.to_owned(),
                ByteString(credentials.client_secret.clone().into_bytes()),
            ),
        ])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// The part of a WebhookUser's status its reconciler owns.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct UserStatusApply<'a> {
    conditions: &'a [Condition],
    credentials_secret: &'a str,
    listeners: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    observed_generation: Option<i64>,
}

/// Whether routing sees a different owner than before: then its Listeners are to be reconciled.
fn routing_changed(index: &RoutingIndex, key: &OwnerKey, entry: &OwnerEntry) -> bool {
    match index.owner(key) {
        None => true,
        Some(previous) => {
            previous.enabled != entry.enabled
                || previous.daily_allowance != entry.daily_allowance
                || previous.client_secret != entry.client_secret
        }
    }
}

async fn apply(user: &WebhookUser, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let name = user.name_any();
    let credentials = ensure_credentials(user, namespace, ctx).await?;
    let key = OwnerKey::new(namespace, name.as_str());
    let entry = OwnerEntry {
        enabled: user.spec.enabled,
        daily_allowance: user
            .spec
            .daily_allowance
            .unwrap_or(ctx.default_daily_allowance),
        client_secret: match &credentials {
            CredentialsState::Ready(secret) => Some(secret.clone()),
            CredentialsState::Unusable { .. } => None,
        },
    };
    if let Some(usage) = user.status.as_ref().and_then(|s| s.usage.as_ref()) {
        if let Some(day) = crate::clock::parse_day(&usage.day) {
            ctx.index.seed_usage(
                &key,
                crate::index::DayUsage {
                    day,
                    deliveries: usage.deliveries,
                },
            );
        }
    }
    // A new spec may change spec.maxListeners, and with it which Listeners are streamed.
    let changed = routing_changed(&ctx.index, &key, &entry)
        || user.status.as_ref().and_then(|s| s.observed_generation) != user.meta().generation;
    ctx.index.upsert_owner(key.clone(), entry);
    if changed {
        // Only what Listeners depend on wakes them: existence, spec and credentials, never
        // this user's own status.
        ctx.wake_listeners_of_owner(&key);
    }
    let listeners = u32::try_from(ctx.owned.count(&key)).unwrap_or(u32::MAX);
    let ready = match &credentials {
        CredentialsState::Unusable { reason, message } => DesiredCondition {
            type_: "Ready",
            status: "False",
            reason,
            message: message.clone(),
        },
        CredentialsState::Ready(_) if !user.spec.enabled => DesiredCondition {
            type_: "Ready",
            status: "False",
            reason: "Disabled",
            message: "The user is disabled: its listeners receive nothing".into(),
        },
        CredentialsState::Ready(_) => DesiredCondition {
            type_: "Ready",
            status: "True",
            reason: "CredentialsReady",
            message: "Credentials are in place; listeners receive events".into(),
        },
    };
    let previous = user.status.clone().unwrap_or_default();
    let conditions = to_conditions(
        &[ready],
        &previous.conditions,
        user.meta().generation,
        ctx.clock.now(),
    );
    let credentials_secret = credentials_secret_name(&name);
    let unchanged = same_conditions(&conditions, &previous.conditions)
        && previous.credentials_secret.as_deref() == Some(credentials_secret.as_str())
        && previous.listeners == listeners
        && previous.observed_generation == user.meta().generation;
    let api: Api<WebhookUser> = Api::namespaced(ctx.client.clone(), namespace);
    let status = UserStatusApply {
        conditions: &conditions,
        credentials_secret: &credentials_secret,
        listeners,
        observed_generation: user.meta().generation,
    };
    ctx.apply_status_if_changed(
        format!("webhookuser/{namespace}/{name}"),
        &api,
        user,
        unchanged,
        &status,
        ctx.may_write(),
    )
    .await?;
    // The leader prunes a previous secret soon after it expires (it signs nothing from then on).
    let prune_in = match &credentials {
        CredentialsState::Ready(secret) => secret
            .previous()
            .iter()
            .filter_map(|previous| (previous.expires_at() - ctx.clock.now()).to_std().ok())
            .min(),
        CredentialsState::Unusable { .. } => None,
    };
    let requeue = Duration::from_secs(600);
    Ok(Action::requeue(prune_in.map_or(requeue, |due| {
        requeue.min(due + Duration::from_secs(1))
    })))
}

async fn cleanup(user: &WebhookUser, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let name = user.name_any();
    forget(user, namespace, ctx);
    // Listed from the API server, not the cache: none may be missed.
    let listeners: Api<Listener> = Api::namespaced(ctx.client.clone(), namespace);
    for listener in listeners.list(&ListParams::default()).await? {
        if listener.spec.owner == name {
            delete_if_present(&listeners, &listener.name_any()).await?;
        }
    }
    // Only a credentials Secret the operator made for this user goes with it.
    let secret_name = credentials_secret_name(&name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    if let Some(secret) = secrets.get_opt(&secret_name).await? {
        if is_managed(&secret.metadata) && credentials_owner(&secret.metadata) == Some(&name) {
            ctx.secrets.forget(namespace, &secret_name);
            delete_if_present(&secrets, &secret_name).await?;
        }
    }
    tracing::info!(namespace, user = %name, "Deleted the WebhookUser with its listeners and credentials.");
    Ok(Action::await_change())
}

/// A user being deleted is gone for routing from the first moment, on every replica: no event
/// is delivered with its secret while its Listeners are being deleted.
fn forget(user: &WebhookUser, namespace: &str, ctx: &Context) {
    let name = user.name_any();
    let key = OwnerKey::new(namespace, name.as_str());
    ctx.index.remove_owner(&key);
    ctx.last_applied
        .remove(&format!("webhookuser/{namespace}/{name}"));
    ctx.wake_listeners_of_owner(&key);
}
