//! The Listener reconciler: token Secret, routing entry, forwarder, expiry, conditions, and the
//! cleanup that detaches a deleted Listener and removes its token Secret when the operator
//! manages it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use url::Url;

use super::conditions::{
    listener_conditions, same_conditions, to_conditions, DesiredCondition, ListenerObservation,
    OwnerState, TokenState,
};
use super::{delete_if_present, Context, Error, FINALIZER};
use crate::conventions::{credentials_owner, is_managed, secret_value, token_secret_listener};
use crate::delivery::Suspension;
use crate::domain::{ListenerId, OwnerKey, Token};
use crate::forwarder::{StreamState, TokenNotice};
use crate::index::ListenerEntry;
use crate::resources::{resource_overrides, EffectiveDelivery, Listener, WebhookUser};

/// How the routing index and the delivery engine name a Listener.
pub fn listener_id(listener: &Listener) -> Option<ListenerId> {
    Some(ListenerId::new(listener.namespace()?, listener.name_any()))
}

fn object_ref(id: &ListenerId) -> ObjectRef<Listener> {
    ObjectRef::new(id.name()).within(id.namespace())
}

/// Runs the Listener controller until `shutdown` resolves. `notices` come from the forwarders;
/// `triggers` from anything else that needs a Listener reconciled (the Secret watch, the
/// WebhookUser reconciler, the status writer).
pub async fn run_listener_controller(
    controller: Controller<Listener>,
    ctx: Arc<Context>,
    notices: mpsc::UnboundedReceiver<TokenNotice>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<Listener>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (notice_refs, notice_triggers) = mpsc::unbounded_channel();
    tokio::spawn(handle_notices(ctx.clone(), notices, notice_refs));
    controller
        .reconcile_on(UnboundedReceiverStream::new(notice_triggers))
        .reconcile_on(UnboundedReceiverStream::new(triggers))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

/// Turns forwarder notices into reconciles of the token's listeners, which then report the
/// stream's state, or delete themselves when the token expired.
async fn handle_notices(
    ctx: Arc<Context>,
    mut notices: mpsc::UnboundedReceiver<TokenNotice>,
    triggers: mpsc::UnboundedSender<ObjectRef<Listener>>,
) {
    while let Some(TokenNotice(hash)) = notices.recv().await {
        for id in ctx.index.listeners_of_token(&hash) {
            let _ = triggers.send(object_ref(&id));
        }
    }
}

async fn reconcile(listener: Arc<Listener>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.count_reconcile("listener");
    let id = listener_id(&listener).ok_or(Error::MissingNamespace)?;
    let api: Api<Listener> = Api::namespaced(ctx.client.clone(), id.namespace());
    if !ctx.may_write() {
        let result = reconcile_standing_by(&listener, &id, &api, &ctx).await;
        if listener.meta().deletion_timestamp.is_none() {
            ctx.reconciled_once.insert(id, ());
        }
        return result;
    }
    if adopt_new(&listener, &id, &api, &ctx).await? == Adoption::Pending {
        // The watch brings the patched object, and with it the next reconcile.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let deleting = listener.meta().deletion_timestamp.is_some();
    let result = finalizer(&api, FINALIZER, listener, |event| async {
        match event {
            FinalizerEvent::Apply(listener) => apply(&listener, &id, &api, &ctx).await,
            FinalizerEvent::Cleanup(listener) => cleanup(&listener, &id, &ctx).await,
        }
    })
    .await;
    // Whatever came of it, its token is known now if it could be.
    if !deleting {
        ctx.reconciled_once.insert(id.clone(), ());
    }
    let action = result?;
    ctx.reconciled(&format!("listener/{id}"));
    Ok(action)
}

/// A standby reconciles as the leader does, so it streams every token the leader streams, but
/// writes nothing: the leader adopts new Listeners and runs their cleanup; a standby only
/// forgets a Listener being deleted. It streams a new Listener's token without waiting for the
/// adoption, so it reads at least every event the leader reads.
async fn reconcile_standing_by(
    listener: &Listener,
    id: &ListenerId,
    api: &Api<Listener>,
    ctx: &Context,
) -> Result<Action, Error> {
    if listener.meta().deletion_timestamp.is_some() {
        forget(listener, id, ctx);
        return Ok(Action::await_change());
    }
    let action = apply(listener, id, api, ctx).await?;
    ctx.reconciled(&format!("listener/{id}"));
    Ok(action)
}

fn error_policy(listener: Arc<Listener>, error: &Error, ctx: Arc<Context>) -> Action {
    let object = format!(
        "{}/{}",
        listener.namespace().unwrap_or_default(),
        listener.name_any()
    );
    ctx.retry_after_error("listener", &object, error)
}

/// Reads the token from the Secret the Listener names, in the Listener's own namespace; `Err`
/// says, without the value, why not. A Secret the operator made for something else (a
/// WebhookUser's credentials, another Listener's token) is refused: naming it would let anyone
/// who may create a Listener stream with another tenant's token or send a client secret to the
/// event server.
async fn read_token(
    listener: &Listener,
    id: &ListenerId,
    ctx: &Context,
) -> Result<Result<Token, TokenState>, Error> {
    let reference = &listener.spec.token_secret_ref;
    let Some(secret) = ctx.read_secret(id.namespace(), &reference.name).await? else {
        return Ok(Err(TokenState::SecretMissing(format!(
            "Secret {} not found",
            reference.name
        ))));
    };
    if !may_stream_with(&secret, id.name()) {
        return Ok(Err(TokenState::SecretNotAllowed(format!(
            "Secret {} belongs to the operator and was not made for this Listener",
            reference.name
        ))));
    }
    Ok(secret_value(&secret, &reference.key)
        .map(Token::new)
        .ok_or_else(|| {
            TokenState::SecretMissing(format!(
                "Secret {} has no non-empty key {}",
                reference.name, reference.key
            ))
        }))
}

/// Whether Listener `listener` may stream with the token in `secret`: any Secret of its
/// namespace except one the operator made for something else. A tenant's own Secret, labelled
/// managed or not, is fine; the facade's token Secret only for the Listener it was made for.
fn may_stream_with(secret: &Secret, listener: &str) -> bool {
    if !is_managed(&secret.metadata) {
        return true;
    }
    if credentials_owner(&secret.metadata).is_some() {
        return false;
    }
    token_secret_listener(&secret.metadata).is_none_or(|made_for| made_for == listener)
}

/// `host[:port]` of a url, for display.
fn url_host(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        _ => String::new(),
    }
}

/// The part of a Listener's status its reconciler owns.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ListenerStatusApply<'a> {
    conditions: &'a [Condition],
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url_host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    effective_delivery: Option<&'a EffectiveDelivery>,
    observed_generation: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    streamed_by: Option<&'a str>,
}

/// The suspension and failure window this generation's status recorded, to carry them over a
/// restart of the operator.
fn recorded_suspension(
    listener: &Listener,
    generation: i64,
) -> (Option<Suspension>, Option<DateTime<Utc>>) {
    let suspension = listener
        .condition("Ready")
        .filter(|c| c.status == "False" && c.observed_generation == Some(generation))
        .and_then(|c| match c.reason.as_str() {
            "EndpointGone" => Some(Suspension::EndpointGone),
            "EndpointFailing" => Some(Suspension::EndpointFailing),
            _ => None,
        });
    let failing_since = listener
        .status
        .as_ref()
        .and_then(|s| s.failure_window.as_ref())
        .filter(|w| w.generation == generation)
        .map(|w| w.since);
    (suspension, failing_since)
}

async fn apply(
    listener: &Listener,
    id: &ListenerId,
    api: &Api<Listener>,
    ctx: &Context,
) -> Result<Action, Error> {
    let generation = listener.meta().generation.unwrap_or(0);
    let now = ctx.clock.now();
    if !ctx.engine.knows(id) {
        let (suspension, failing_since) = recorded_suspension(listener, generation);
        if suspension.is_some() || failing_since.is_some() {
            ctx.engine
                .restore(id, generation, suspension, failing_since);
        }
    }

    // The client's own statement that this registration is over: only this Listener goes.
    if listener.spec.expires_at.is_some_and(|at| at <= now) {
        if ctx.may_write() && delete_if_present(api, id.name()).await? {
            tracing::info!(listener = %id, "Deleted the Listener: its spec.expiresAt has passed.");
        }
        return Ok(Action::await_change());
    }

    ctx.secret_refs
        .set(id, &listener.spec.token_secret_ref.name);
    let owner_key = OwnerKey::new(id.namespace(), listener.spec.owner.as_str());
    if let Some(previous) = ctx.owned.set(id, &owner_key) {
        ctx.wake_user(previous.namespace(), previous.name());
    }
    let token = read_token(listener, id, ctx).await?;

    let owner = ctx
        .users
        .get(&ObjectRef::new(&listener.spec.owner).within(id.namespace()));
    set_owner_reference(listener, owner.as_deref(), api, ctx).await?;
    let ceiling = owner
        .as_deref()
        .and_then(|user| user.spec.max_listeners)
        .unwrap_or(ctx.default_max_listeners);
    if !within_ceiling(listener, id, &owner_key, ceiling, ctx) {
        return hold_back(listener, id, api, ctx, ceiling).await;
    }
    let owner_live = owner
        .as_deref()
        .is_some_and(|user| user.meta().deletion_timestamp.is_none());
    if owner_live && ctx.index.owner(&owner_key).is_none() {
        // The owner exists but this process has not reconciled it yet (just after a start):
        // streaming now would read events that routing skips for want of the owner's
        // credentials. The owner's reconcile wakes this Listener; the requeue is a fallback.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let owner_state = match &owner {
        None => OwnerState::Missing,
        Some(user) if !user.spec.enabled => OwnerState::Disabled,
        Some(_) => match ctx.index.owner(&owner_key) {
            Some(entry) if entry.client_secret.is_some() => OwnerState::Enabled,
            _ => OwnerState::WithoutCredentials,
        },
    };
    // Queued deliveries and retries of an owner that cannot take them stop.
    ctx.engine
        .set_paused(id, owner_state != OwnerState::Enabled);

    let url = Url::parse(&listener.spec.url);
    let delivery = resource_overrides(
        listener.spec.delivery.as_ref(),
        owner
            .as_deref()
            .and_then(|user| user.spec.delivery.as_ref()),
        id.namespace(),
    )
    .map_err(|error| error.to_string())
    .and_then(|overrides| {
        // The sink is checked where a Listener's url is, and refused like a spec error: nothing
        // is streamed, so nothing is sent there.
        match overrides
            .dead_letter_sink
            .as_deref()
            .map(|sink| ctx.engine.check_url(sink))
        {
            Some(Err(refused)) => Err(format!("spec.delivery.deadLetterSink: {refused}")),
            _ => Ok(overrides),
        }
    });
    let token_state = match (&token, &url, &delivery) {
        (Ok(token), Ok(url), Ok(delivery)) => {
            let hash = token.hash();
            ctx.forwarders.attach(
                ListenerEntry {
                    id: id.clone(),
                    owner: owner_key,
                    token: hash,
                    generation,
                    event_types: listener.spec.event_types.iter().copied().collect(),
                    url: Arc::new(url.clone()),
                    user_id: Arc::from(listener.spec.user_id.as_str()),
                    expires_at: listener.spec.expires_at,
                    delivery: Arc::new(delivery.clone()),
                },
                token,
            );
            let state = ctx
                .forwarders
                .state(&hash)
                .unwrap_or(StreamState::Connecting);
            if state == StreamState::Expired {
                // The event server said TOKEN_EXPIRED: every Listener on the token goes. A failed
                // delete is an error, retried by the error policy until it succeeds.
                if ctx.may_write() && delete_if_present(api, id.name()).await? {
                    tracing::info!(listener = %id, token = %hash, "Deleted the Listener: the event server says its token expired.");
                }
                return Ok(Action::await_change());
            }
            TokenState::Stream(state)
        }
        (Err(refused), _, _) => {
            ctx.forwarders.detach(id);
            refused.clone()
        }
        (Ok(_), _, _) => {
            ctx.forwarders.detach(id);
            TokenState::Stream(StreamState::Connecting)
        }
    };

    let status_key = format!("listener/{id}");
    let first_connect = url.is_ok()
        && token_state == TokenState::Stream(StreamState::Connecting)
        && !ctx.last_applied.contains_key(&status_key);
    if first_connect {
        // The stream of a Listener this process has not reported on yet is still opening (a
        // new Listener, or every Listener after a restart): its status is written once the
        // stream says how that went (its notice wakes this reconcile), not once for
        // "Connecting" and again a moment later; after a restart, usually not at all. If no
        // notice comes, the requeue writes "Connecting".
        ctx.last_applied
            .insert(status_key, super::AppliedStatus::Deferred);
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let previous = listener.status.clone().unwrap_or_default();
    let observation = ListenerObservation {
        owner: owner_state,
        token: token_state,
        suspension: ctx.engine.suspension(id, generation),
        token_was_valid: listener
            .condition("TokenValid")
            .is_some_and(|c| c.status == "True"),
    };
    let mut desired = listener_conditions(&observation);
    if let Err(error) = &url {
        // The schema's rule and this parser disagree: say so instead of retrying forever.
        desired[2] = DesiredCondition {
            type_: "Ready",
            status: "False",
            reason: "InvalidSpec",
            message: format!("spec.url cannot be used: {error}"),
        };
    }
    if let Err(error) = &delivery {
        // The schema's rules let it through (an older CRD, or the owner's spec): say which.
        desired[2] = DesiredCondition {
            type_: "Ready",
            status: "False",
            reason: "InvalidSpec",
            message: format!("{error} (on the Listener or its owner)"),
        };
    }
    let host = url.as_ref().ok().map(url_host);
    let effective = delivery.as_ref().ok().map(|overrides| {
        EffectiveDelivery::new(&ctx.engine.effective_policy(overrides), overrides)
    });
    let wrote = write_status(
        listener,
        status_key,
        api,
        ctx,
        &desired,
        StatusFacts { host, effective },
        now,
    )
    .await?;
    if wrote && previous.observed_generation != Some(generation) {
        // New, or its spec changed: the owner's count may have changed.
        ctx.wake_user(id.namespace(), &listener.spec.owner);
    }

    // Wake up when the registration expires, so expiry needs no event; otherwise resync now
    // and then.
    let resync = Duration::from_secs(600);
    let next = match listener.spec.expires_at {
        Some(at) => (at - now).to_std().unwrap_or(Duration::ZERO).min(resync),
        None => resync,
    };
    Ok(Action::requeue(next))
}

/// Whether `listener` is among the oldest `ceiling` Listeners of its owner (by creation time,
/// then name), those being deleted not counted. Only an owner known to be past its ceiling is
/// looked at closer, so the common case costs one count. Listeners past the ceiling that still
/// stream (they were reconciled before the count was complete) are woken to stop.
fn within_ceiling(
    listener: &Listener,
    id: &ListenerId,
    owner: &OwnerKey,
    ceiling: u32,
    ctx: &Context,
) -> bool {
    let ceiling = ceiling as usize;
    if ctx.owned.count(owner) <= ceiling {
        return true;
    }
    let mut ranked: Vec<Arc<Listener>> = ctx
        .listeners
        .state()
        .into_iter()
        .filter(|other| {
            other.namespace().as_deref() == Some(id.namespace())
                && other.spec.owner == listener.spec.owner
                && other.meta().deletion_timestamp.is_none()
        })
        .collect();
    ranked.sort_by(|a, b| {
        (a.creation_timestamp(), a.name_any()).cmp(&(b.creation_timestamp(), b.name_any()))
    });
    let mut within = true;
    for other in ranked.iter().skip(ceiling) {
        let other_id = ListenerId::new(id.namespace(), other.name_any());
        if other_id == *id {
            within = false;
        } else if ctx.index.listener(&other_id).is_some() {
            ctx.wake_listener(&other_id);
        }
    }
    within
}

/// A Listener past its owner's ceiling: not streamed and not routed, and says so, until older
/// ones go (their cleanup wakes it) or the ceiling rises (the owner's reconcile wakes it).
async fn hold_back(
    listener: &Listener,
    id: &ListenerId,
    api: &Api<Listener>,
    ctx: &Context,
    ceiling: u32,
) -> Result<Action, Error> {
    ctx.forwarders.detach(id);
    let why = format!(
        "Its owner {} has more than {ceiling} listeners; this one, among the newest, is not \
         streamed until others are deleted or spec.maxListeners is raised",
        listener.spec.owner
    );
    let desired = [
        DesiredCondition::new(
            "TokenValid",
            "Unknown",
            "ListenerLimitExceeded",
            why.clone(),
        ),
        DesiredCondition::new("Streaming", "False", "ListenerLimitExceeded", why.clone()),
        DesiredCondition::new("Ready", "False", "ListenerLimitExceeded", why),
    ];
    let host = Url::parse(&listener.spec.url)
        .ok()
        .map(|url| url_host(&url));
    let status_key = format!("listener/{id}");
    let facts = StatusFacts {
        host,
        effective: listener
            .status
            .as_ref()
            .and_then(|status| status.effective_delivery.clone()),
    };
    write_status(
        listener,
        status_key,
        api,
        ctx,
        &desired,
        facts,
        ctx.clock.now(),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(600)))
}

/// What a Listener's status shows besides its conditions.
struct StatusFacts {
    /// The url's host, for display.
    host: Option<String>,
    /// The delivery policy in force, when the spec's can be used.
    effective: Option<EffectiveDelivery>,
}

/// Applies the Listener's conditions, expiry, url host and effective delivery policy to its
/// status unless they are what it already says; true when it wrote.
async fn write_status(
    listener: &Listener,
    status_key: String,
    api: &Api<Listener>,
    ctx: &Context,
    desired: &[DesiredCondition],
    facts: StatusFacts,
    now: DateTime<Utc>,
) -> Result<bool, Error> {
    let StatusFacts { host, effective } = facts;
    let generation = listener.meta().generation.unwrap_or(0);
    let previous = listener.status.clone().unwrap_or_default();
    let conditions = to_conditions(desired, &previous.conditions, Some(generation), now);
    let id = listener_id(listener).ok_or(Error::MissingNamespace)?;
    let streamed_by = ctx.streamed_by(&id);
    let unchanged = same_conditions(&conditions, &previous.conditions)
        && previous.expires_at == listener.spec.expires_at
        && previous.url_host == host
        && previous.effective_delivery == effective
        && previous.observed_generation == Some(generation)
        && previous.streamed_by.as_deref() == streamed_by;
    let status = ListenerStatusApply {
        conditions: &conditions,
        expires_at: listener.spec.expires_at,
        url_host: host.as_deref(),
        effective_delivery: effective.as_ref(),
        observed_generation: generation,
        streamed_by,
    };
    let allowed = ctx.may_write_listener(&id);
    ctx.apply_status_if_changed(status_key, api, listener, unchanged, &status, allowed)
        .await
}

/// Makes `owner` the Listener's controlling owner in Kubernetes terms, for garbage collection,
/// replacing any reference to another WebhookUser (the owner changed, or was recreated).
async fn set_owner_reference(
    listener: &Listener,
    owner: Option<&WebhookUser>,
    api: &Api<Listener>,
    ctx: &Context,
) -> Result<(), Error> {
    let current = listener.owner_references();
    let desired = desired_owner_references(current, owner);
    if desired == current || !ctx.may_write() {
        return Ok(());
    }
    wake_dropped_owners(listener, &desired, ctx);
    // The resourceVersion makes this a compare-and-swap: a concurrent change is a conflict.
    let patch = serde_json::json!({"metadata": {
        "ownerReferences": desired,
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

/// The ownerReferences a Listener should have: what it has, with any reference to a
/// WebhookUser replaced by one to `owner` (when it exists) as the controller.
fn desired_owner_references(
    current: &[OwnerReference],
    owner: Option<&WebhookUser>,
) -> Vec<OwnerReference> {
    let api_version = WebhookUser::api_version(&());
    let kind = WebhookUser::kind(&());
    let mut desired: Vec<OwnerReference> = current
        .iter()
        .filter(|r| !(r.kind == kind && r.api_version == api_version))
        .cloned()
        .collect();
    if let Some(owner) = owner {
        if let Some(uid) = owner.uid() {
            desired.push(OwnerReference {
                api_version: api_version.into_owned(),
                kind: kind.into_owned(),
                name: owner.name_any(),
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            });
        }
    }
    desired
}

/// The WebhookUsers no longer referenced count one Listener less.
fn wake_dropped_owners(listener: &Listener, desired: &[OwnerReference], ctx: &Context) {
    let Some(namespace) = listener.namespace() else {
        return;
    };
    for dropped in listener
        .owner_references()
        .iter()
        .filter(|r| !desired.contains(r))
    {
        ctx.wake_user(&namespace, &dropped.name);
    }
}

/// Whether a Listener is ready for its reconcile proper.
#[derive(Debug, PartialEq, Eq)]
enum Adoption {
    /// It has the finalizer (or is being deleted).
    Adopted,
    /// Its finalizer was just added, or was added and the cache does not show it yet.
    Pending,
}

/// A Listener seen for the first time gets its finalizer and its ownerReference in one patch,
/// instead of one each (and a reconcile between them): at 10,000 new Listeners that is half
/// the writes. The patch is made once: a reconcile that still sees the version it was made
/// over waits for the cache.
async fn adopt_new(
    listener: &Listener,
    id: &ListenerId,
    api: &Api<Listener>,
    ctx: &Context,
) -> Result<Adoption, Error> {
    let has_finalizer = listener.finalizers().iter().any(|f| f == FINALIZER);
    if has_finalizer || listener.meta().deletion_timestamp.is_some() {
        ctx.adopting.remove(id);
        return Ok(Adoption::Adopted);
    }
    let version = listener.resource_version().unwrap_or_default();
    if ctx
        .adopting
        .get(id)
        .is_some_and(|patched_over| *patched_over == version)
    {
        return Ok(Adoption::Pending);
    }
    let owner = ctx
        .users
        .get(&ObjectRef::new(&listener.spec.owner).within(id.namespace()));
    let references = desired_owner_references(listener.owner_references(), owner.as_deref());
    wake_dropped_owners(listener, &references, ctx);
    let mut finalizers = listener.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "ownerReferences": references,
        "resourceVersion": version,
    }});
    api.patch(id.name(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.adopting.insert(id.clone(), version);
    Ok(Adoption::Pending)
}

async fn cleanup(listener: &Listener, id: &ListenerId, ctx: &Context) -> Result<Action, Error> {
    forget(listener, id, ctx);
    let namespace = id.namespace();
    let secret_name = &listener.spec.token_secret_ref.name;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    // Only a token Secret the operator manages goes with the Listener, and only when no other
    // Listener still reads it; a Secret a user created is never deleted.
    let shared = ctx.listeners.state().iter().any(|other| {
        other.namespace().as_deref() == Some(namespace)
            && other.name_any() != id.name()
            && other.meta().deletion_timestamp.is_none()
            && &other.spec.token_secret_ref.name == secret_name
    });
    if !shared {
        if let Some(secret) = secrets.get_opt(secret_name).await? {
            let deletable =
                is_managed(&secret.metadata) && credentials_owner(&secret.metadata).is_none();
            if deletable {
                ctx.secrets.forget(namespace, secret_name);
                delete_if_present(&secrets, secret_name).await?;
            }
        }
    }
    tracing::info!(listener = %id, "Removed the Listener.");
    Ok(Action::await_change())
}

/// What every replica does about a Listener that goes: it stops routing to it, its owner's
/// count is refreshed, and one held back past the owner's ceiling may start.
fn forget(listener: &Listener, id: &ListenerId, ctx: &Context) {
    ctx.forget_listener(id);
    let namespace = id.namespace();
    ctx.wake_user(namespace, &listener.spec.owner);
    let owner = OwnerKey::new(namespace, listener.spec.owner.as_str());
    for other in ctx.owned.listeners_of(&owner) {
        if ctx.index.listener(&other).is_none() {
            ctx.wake_listener(&other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conventions::{LISTENER_ANNOTATION, MANAGED_BY, USER_ANNOTATION};
    use kube::api::ObjectMeta;

    fn secret(managed: bool, annotations: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                labels: managed.then(|| {
                    [(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())]
                        .into_iter()
                        .collect()
                }),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    #[test]
    fn a_listener_streams_only_with_a_secret_not_made_for_something_else() {
        // A tenant's own Secret, labelled managed (to be deleted with its last Listener) or not.
        assert!(may_stream_with(&secret(false, &[]), "l-1"));
        assert!(may_stream_with(&secret(true, &[]), "l-1"));
        // The facade's token Secret, for its own Listener only.
        let made_for_l1 = secret(true, &[(LISTENER_ANNOTATION, "l-1")]);
        assert!(may_stream_with(&made_for_l1, "l-1"));
        assert!(!may_stream_with(&made_for_l1, "l-2"));
        // A WebhookUser's credentials never.
        assert!(!may_stream_with(
            &secret(true, &[(USER_ANNOTATION, "acme")]),
            "l-1"
        ));
        // The annotations mean nothing on a Secret the operator does not manage.
        assert!(may_stream_with(
            &secret(false, &[(LISTENER_ANNOTATION, "l-9")]),
            "l-1"
        ));
    }
}
