//! The Listener reconciler: token Secret, routing entry, forwarder, expiry, conditions, and the
//! cleanup that detaches a deleted Listener and removes its token Secret.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use url::Url;

use super::conditions::{
    listener_conditions, same_conditions, to_conditions, ListenerObservation, OwnerState,
    TokenState,
};
use super::webhook_user::secret_value;
use super::{delete_if_present, Context, Error, FINALIZER};
use crate::delivery::ListenerId;
use crate::forwarder::{StreamState, Token, TokenHash, TokenNotice};
use crate::index::{ListenerEntry, OwnerKey};
use crate::resources::{Listener, WebhookUser, FIELD_MANAGER};

/// How the routing index and the delivery engine name a Listener.
pub fn listener_id(namespace: &str, name: &str) -> ListenerId {
    ListenerId::new(format!("{namespace}/{name}"))
}

fn object_ref(id: &ListenerId) -> Option<ObjectRef<Listener>> {
    let (namespace, name) = id.as_str().split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}

/// Runs the Listener controller until `shutdown` resolves. `notices` come from the forwarders;
/// `triggers` from anything else that needs a Listener reconciled (the status writer).
#[allow(clippy::too_many_arguments)]
pub async fn run_listener_controller(
    controller: Controller<Listener>,
    secrets: Api<PartialObjectMeta<Secret>>,
    users: Api<WebhookUser>,
    ctx: Arc<Context>,
    notices: mpsc::UnboundedReceiver<TokenNotice>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<Listener>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let store = ctx.listeners.clone();
    let secret_store = store.clone();
    let secret_cache = ctx.clone();
    let secret_cache = move |event: &watcher::Event<PartialObjectMeta<Secret>>| {
        secret_cache.secrets.observe(event)
    };
    let user_store = store.clone();
    let (notice_refs, notice_triggers) = mpsc::unbounded_channel();
    tokio::spawn(handle_notices(ctx.clone(), notices, notice_refs));
    controller
        // Token Secrets: only their metadata is watched; a change re-reads the token.
        .watches_stream(
            watcher(secrets, watcher::Config::default().any_semantic())
                .default_backoff()
                .inspect_ok(secret_cache)
                .touched_objects(),
            move |secret| {
                let namespace = secret.namespace();
                let name = secret.name_any();
                secret_store
                    .state()
                    .iter()
                    .filter(|l| l.namespace() == namespace && l.spec.token_secret_ref.name == name)
                    .map(|l| ObjectRef::from_obj(l.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        // Owners: enabling, disabling, creating or deleting one changes its Listeners' status.
        .watches(
            users,
            watcher::Config::default().any_semantic(),
            move |user| {
                let namespace = user.namespace();
                let name = user.name_any();
                user_store
                    .state()
                    .iter()
                    .filter(|l| l.namespace() == namespace && l.spec.owner == name)
                    .map(|l| ObjectRef::from_obj(l.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_on(UnboundedReceiverStream::new(notice_triggers))
        .reconcile_on(UnboundedReceiverStream::new(triggers))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

/// Turns forwarder notices into reconciles (state changes) and deletions (expired tokens).
async fn handle_notices(
    ctx: Arc<Context>,
    mut notices: mpsc::UnboundedReceiver<TokenNotice>,
    triggers: mpsc::UnboundedSender<ObjectRef<Listener>>,
) {
    while let Some(notice) = notices.recv().await {
        match notice {
            TokenNotice::StateChanged(hash) => {
                for id in ctx.index.listeners_of_token(&hash) {
                    if let Some(reference) = object_ref(&id) {
                        let _ = triggers.send(reference);
                    }
                }
            }
            TokenNotice::Expired(hash) => {
                if let Err(error) = delete_listeners_of_token(&ctx, hash, None).await {
                    tracing::warn!(token = %hash, %error, "could not delete the listeners of an expired token");
                }
            }
        }
    }
}

/// Deletes every Listener on a token (and `also`, which may not be in the index yet).
async fn delete_listeners_of_token(
    ctx: &Context,
    hash: TokenHash,
    also: Option<ListenerId>,
) -> Result<(), Error> {
    let mut ids = ctx.index.listeners_of_token(&hash);
    ids.extend(also);
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    ids.dedup_by(|a, b| a.as_str() == b.as_str());
    for id in ids {
        let Some((namespace, name)) = id.as_str().split_once('/') else {
            continue;
        };
        let api: Api<Listener> = Api::namespaced(ctx.client.clone(), namespace);
        if delete_if_present(&api, name).await? {
            tracing::info!(listener = %id, token = %hash, "deleted: token expired");
        }
    }
    Ok(())
}

async fn reconcile(listener: Arc<Listener>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.count_reconcile("listener");
    let namespace = listener.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<Listener> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, listener, |event| async {
        match event {
            FinalizerEvent::Apply(listener) => apply(&listener, &namespace, &api, &ctx).await,
            FinalizerEvent::Cleanup(listener) => cleanup(&listener, &namespace, &ctx).await,
        }
    })
    .await
    .map_err(Error::from)
}

fn error_policy(listener: Arc<Listener>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_error("listener", &listener.name_any(), error)
}

/// Reads the token from the Secret the Listener names; `Err` says, without the value, why not.
async fn read_token(
    listener: &Listener,
    namespace: &str,
    ctx: &Context,
) -> Result<Result<Token, String>, Error> {
    let reference = &listener.spec.token_secret_ref;
    let Some(secret) = ctx.read_secret(namespace, &reference.name).await? else {
        return Ok(Err(format!("Secret {} not found", reference.name)));
    };
    Ok(secret_value(&secret, &reference.key)
        .map(Token::new)
        .ok_or_else(|| {
            format!(
                "Secret {} has no non-empty key {}",
                reference.name, reference.key
            )
        }))
}

/// `host[:port]` of a url, for display.
fn url_host(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        _ => String::new(),
    }
}

async fn apply(
    listener: &Listener,
    namespace: &str,
    api: &Api<Listener>,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = listener.name_any();
    let id = listener_id(namespace, &name);
    let generation = listener.meta().generation.unwrap_or(0);
    let now = ctx.clock.now();
    let token = read_token(listener, namespace, ctx).await?;

    if listener.spec.expires_at.is_some_and(|at| at <= now) {
        match &token {
            Ok(token) => delete_listeners_of_token(ctx, token.hash(), Some(id)).await?,
            Err(_) => {
                delete_if_present(api, &name).await?;
            }
        }
        return Ok(Action::await_change());
    }

    let owner = ctx
        .users
        .get(&ObjectRef::new(&listener.spec.owner).within(namespace));
    if let Some(owner) = &owner {
        adopt(listener, owner, api).await?;
    }
    let owner_state = match &owner {
        None => OwnerState::Missing,
        Some(user) if !user.spec.enabled => OwnerState::Disabled,
        Some(_) => OwnerState::Enabled,
    };

    let url = Url::parse(&listener.spec.url)
        .map_err(|e| Error::InvalidSpec(format!("spec.url is not a url: {e}")))?;
    let token_state = match token {
        Err(why) => {
            if let Some(previous) = ctx.index.remove_listener(&id) {
                ctx.forwarders.release_if_unused(previous);
            }
            TokenState::SecretMissing(why)
        }
        Ok(token) => {
            let hash = token.hash();
            let moved_from = ctx.index.upsert_listener(ListenerEntry {
                id: id.clone(),
                owner: OwnerKey {
                    namespace: namespace.to_owned(),
                    name: listener.spec.owner.clone(),
                },
                token: hash,
                generation,
                event_types: listener.spec.event_types.iter().copied().collect(),
                url: Arc::new(url.clone()),
                user_id: Arc::from(listener.spec.user_id.as_str()),
                expires_at: listener.spec.expires_at,
            });
            if let Some(previous) = moved_from {
                ctx.forwarders.release_if_unused(previous);
            }
            ctx.forwarders.ensure(&token);
            TokenState::Stream(
                ctx.forwarders
                    .state(&hash)
                    .unwrap_or(StreamState::Connecting),
            )
        }
    };

    let previous = listener.status.clone().unwrap_or_default();
    let observation = ListenerObservation {
        owner: owner_state,
        token: token_state,
        suspension: ctx.engine.suspension(&id, generation),
        token_was_valid: listener
            .condition("TokenValid")
            .is_some_and(|c| c.status == "True"),
    };
    let conditions = to_conditions(
        &listener_conditions(&observation),
        &previous.conditions,
        Some(generation),
        now,
    );
    let host = Some(url_host(&url));
    let unchanged = same_conditions(&conditions, &previous.conditions)
        && previous.expires_at == listener.spec.expires_at
        && previous.url_host == host
        && previous.observed_generation == Some(generation);
    if !unchanged {
        let patch = json!({
            "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
            "kind": "Listener",
            "status": {
                "conditions": conditions,
                "expiresAt": listener.spec.expires_at,
                "urlHost": host,
                "observedGeneration": generation,
            }
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }

    // Wake up when the token expires, so expiry needs no event; otherwise resync now and then.
    let resync = Duration::from_secs(600);
    let next = match listener.spec.expires_at {
        Some(at) => (at - now).to_std().unwrap_or(Duration::ZERO).min(resync),
        None => resync,
    };
    Ok(Action::requeue(next))
}

/// Makes the owner the Listener's owner in Kubernetes terms too, for garbage collection.
async fn adopt(listener: &Listener, owner: &WebhookUser, api: &Api<Listener>) -> Result<(), Error> {
    let Some(uid) = owner.uid() else {
        return Ok(());
    };
    let mut references: Vec<OwnerReference> = listener.owner_references().to_vec();
    if references.iter().any(|r| r.uid == uid) {
        return Ok(());
    }
    // An owner of the same name but another uid was deleted and recreated: replace it.
    references.retain(|r| !(r.kind == "WebhookUser" && r.name == owner.name_any()));
    references.push(OwnerReference {
        api_version: WebhookUser::api_version(&()).into_owned(),
        kind: WebhookUser::kind(&()).into_owned(),
        name: owner.name_any(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    });
    let patch = json!({"metadata": {
        "ownerReferences": references,
        "resourceVersion": listener.resource_version(),
    }});
    api.patch(
        &listener.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn cleanup(listener: &Listener, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let name = listener.name_any();
    let id = listener_id(namespace, &name);
    if let Some(hash) = ctx.index.remove_listener(&id) {
        ctx.forwarders.release_if_unused(hash);
    }
    ctx.engine.forget_listener(&id);

    // The token Secret goes with the Listener, unless another Listener still uses it.
    let secret = &listener.spec.token_secret_ref.name;
    let shared = ctx.listeners.state().iter().any(|other| {
        other.namespace().as_deref() == Some(namespace)
            && other.name_any() != name
            && other.meta().deletion_timestamp.is_none()
            && &other.spec.token_secret_ref.name == secret
    });
    if !shared {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
        ctx.secrets.forget(namespace, secret);
        delete_if_present(&secrets, secret).await?;
    }
    tracing::info!(listener = %id, "Listener removed");
    Ok(Action::await_change())
}
