//! The WebhookUser reconciler: credentials Secret, routing entry, status, and cleanup of the
//! user's Listeners when it is deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::conditions::{same_conditions, to_conditions, DesiredCondition};
use super::credentials::{generate_credentials, API_KEY, CLIENT_SECRET};
use super::{delete_if_present, Context, Error, FINALIZER, MANAGED_BY};
use crate::delivery::ClientSecret;
use crate::index::{OwnerEntry, OwnerKey};
use crate::resources::{Listener, WebhookUser, WebhookUserStatus, FIELD_MANAGER};

/// Label on a credentials Secret naming its WebhookUser.
pub const USER_LABEL: &str = "webhooks.crownstone.rocks/webhookuser";

/// The name of a WebhookUser's credentials Secret.
pub fn credentials_secret_name(user: &str) -> String {
    format!("{user}-credentials")
}

/// Runs the WebhookUser controller until `shutdown` resolves.
pub async fn run_webhook_user_controller(
    controller: Controller<WebhookUser>,
    listeners: Api<Listener>,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    controller
        // A Listener coming or going changes its owner's listener count.
        .watches(
            listeners,
            watcher::Config::default().any_semantic(),
            |listener| {
                let namespace = listener.namespace()?;
                Some(ObjectRef::new(&listener.spec.owner).within(&namespace))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

async fn reconcile(user: Arc<WebhookUser>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.count_reconcile("webhookuser");
    let namespace = user.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<WebhookUser> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, user, |event| async {
        match event {
            FinalizerEvent::Apply(user) => apply(&user, &namespace, &ctx).await,
            FinalizerEvent::Cleanup(user) => cleanup(&user, &namespace, &ctx).await,
        }
    })
    .await
    .map_err(Error::from)
}

fn error_policy(user: Arc<WebhookUser>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_error("webhookuser", &user.name_any(), error)
}

/// Reads the client secret from the credentials Secret, creating the Secret when missing.
/// `Ok(None)` when the Secret exists without a usable client secret.
async fn ensure_credentials(
    user: &WebhookUser,
    namespace: &str,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let name = credentials_secret_name(&user.name_any());
    if let Some(secret) = ctx.read_secret(namespace, &name).await? {
        return Ok(secret_value(&secret, CLIENT_SECRET));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let credentials = generate_credentials();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                (USER_LABEL.to_owned(), user.name_any()),
            ])),
            owner_references: user.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                API_KEY.to_owned(),
                ByteString(credentials.api_key.into_bytes()),
            ),
            (
                CLIENT_SECRET.to_owned(),
                ByteString(credentials.client_secret.clone().into_bytes()),
            ),
        ])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(user = %user.name_any(), secret = %name, "created credentials");
            Ok(Some(credentials.client_secret))
        }
        // Created meanwhile by an earlier reconcile: use what is stored.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(secrets
            .get_opt(&name)
            .await?
            .and_then(|s| secret_value(&s, CLIENT_SECRET))),
        Err(error) => Err(error.into()),
    }
}

/// A non-empty UTF-8 value of a Secret key.
pub(super) fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    let value = std::str::from_utf8(&bytes.0).ok()?.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

async fn apply(user: &WebhookUser, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let name = user.name_any();
    let client_secret = ensure_credentials(user, namespace, ctx).await?;
    let key = OwnerKey {
        namespace: namespace.to_owned(),
        name: name.clone(),
    };
    ctx.index.upsert_owner(
        key.clone(),
        OwnerEntry {
            enabled: user.spec.enabled,
            daily_allowance: user
                .spec
                .daily_allowance
                .unwrap_or(ctx.default_daily_allowance),
            client_secret: client_secret.as_deref().map(ClientSecret::new),
        },
    );
    if let Some(usage) = user.status.as_ref().and_then(|s| s.usage.as_ref()) {
        ctx.index.seed_usage(&key, usage);
    }

    let listeners = ctx
        .listeners
        .state()
        .iter()
        .filter(|l| l.namespace().as_deref() == Some(namespace) && l.spec.owner == name)
        .count() as u32;
    let ready = if client_secret.is_none() {
        DesiredCondition {
            type_: "Ready",
            status: "False",
            reason: "CredentialsInvalid",
            message: format!(
                "Secret {} has no {CLIENT_SECRET}; delete it to have new credentials made",
                credentials_secret_name(&name)
            ),
        }
    } else if !user.spec.enabled {
        DesiredCondition {
            type_: "Ready",
            status: "False",
            reason: "Disabled",
            message: "The user is disabled: its listeners receive nothing".into(),
        }
    } else {
        DesiredCondition {
            type_: "Ready",
            status: "True",
            reason: "CredentialsReady",
            message: "Credentials are in place; listeners receive events".into(),
        }
    };
    let previous = user.status.clone().unwrap_or_default();
    let status = WebhookUserStatus {
        conditions: to_conditions(
            &[ready],
            &previous.conditions,
            user.meta().generation,
            ctx.clock.now(),
        ),
        credentials_secret: Some(credentials_secret_name(&name)),
        listeners,
        usage: None,
        observed_generation: user.meta().generation,
    };
    let unchanged = same_conditions(&status.conditions, &previous.conditions)
        && status.credentials_secret == previous.credentials_secret
        && status.listeners == previous.listeners
        && status.observed_generation == previous.observed_generation;
    if !unchanged {
        let api: Api<WebhookUser> = Api::namespaced(ctx.client.clone(), namespace);
        let patch = json!({
            "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
            "kind": "WebhookUser",
            "status": {
                "conditions": status.conditions,
                "credentialsSecret": status.credentials_secret,
                "listeners": status.listeners,
                "observedGeneration": status.observed_generation,
            }
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(Action::requeue(Duration::from_secs(600)))
}

async fn cleanup(user: &WebhookUser, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let name = user.name_any();
    // Listed from the API server, not the cache: none may be missed.
    let listeners: Api<Listener> = Api::namespaced(ctx.client.clone(), namespace);
    for listener in listeners.list(&ListParams::default()).await? {
        if listener.spec.owner == name {
            delete_if_present(&listeners, &listener.name_any()).await?;
        }
    }
    ctx.index.remove_owner(&OwnerKey {
        namespace: namespace.to_owned(),
        name: name.clone(),
    });
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    delete_if_present(&secrets, &credentials_secret_name(&name)).await?;
    tracing::info!(user = %name, "WebhookUser deleted with its listeners and credentials");
    Ok(Action::await_change())
}
