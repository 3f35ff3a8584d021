//! The reconcilers of WebhookUser and Listener, the state they share, and how they run.

mod conditions;
mod credentials;
mod listener;
mod owners;
mod scoped_watch;
mod secret_cache;
mod secrets;
mod status;
mod webhook_user;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::finalizer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

pub use conditions::{listener_conditions, ListenerObservation, OwnerState, TokenState};
pub use credentials::{generate_client_secret, generate_credentials, Credentials};
pub use listener::run_listener_controller;
pub use owners::ListenersByOwner;
pub use scoped_watch::{scoped_apis, scoped_watch};
pub use secret_cache::SecretCache;
pub use secret_cache::SecretKey;
pub use secrets::{run_secret_watch, SecretRefs};
pub use status::{FlushRequest, StatusPacing, StatusWriter};
pub use webhook_user::run_webhook_user_controller;

use crate::clock::SharedClock;
use crate::conventions::describe_kube_error;
use crate::delivery::DeliveryEngine;
use crate::domain::{ListenerId, OwnerKey};
use crate::forwarder::ForwarderRegistry;
use crate::index::RoutingIndex;
use crate::leader::Leadership;
use crate::metrics::{ControllerLabel, ControllerMetrics};
use crate::resources::{self, Listener, WebhookUser};
use crate::shard::coordinator::ShardTable;

/// The finalizer both resources carry.
pub const FINALIZER: &str = "webhooks.crownstone.rocks/cleanup";

/// How long listener-count refreshes of a WebhookUser are gathered before one reconcile.
pub const COUNT_REFRESH: Duration = Duration::from_millis(500);

/// What the reconcilers share.
pub struct Context {
    pub client: Client,
    pub index: Arc<RoutingIndex>,
    pub forwarders: ForwarderRegistry,
    pub engine: DeliveryEngine,
    pub recorder: Recorder,
    pub clock: SharedClock,
    pub metrics: ControllerMetrics,
    /// Deliveries allowed per owner per UTC day when the WebhookUser does not say.
    pub default_daily_allowance: u64,
    /// Listeners per WebhookUser unless it sets `spec.maxListeners`.
    pub default_max_listeners: u32,
    /// How long a replaced client secret still signs deliveries beside the new one.
    pub secret_rotation_overlap: Duration,
    pub listeners: Store<Listener>,
    pub users: Store<WebhookUser>,
    /// Secrets as last read.
    pub secrets: SecretCache,
    /// Which Listeners name which token Secret, so a Secret event finds them without a scan.
    pub secret_refs: SecretRefs,
    /// Which Listeners each WebhookUser owns.
    pub owned: ListenersByOwner,
    /// Failed reconciles in a row, per object, for the backoff of transient errors.
    pub failures_in_a_row: DashMap<String, u32>,
    /// WebhookUsers whose listener count is due to be refreshed.
    pub count_refresh_pending: Arc<DashMap<OwnerKey, ()>>,
    /// What each reconciler last did about an object's status. The cache may not show a write
    /// yet, so a status counts as unchanged only against both.
    pub last_applied: DashMap<String, AppliedStatus>,
    /// New Listeners whose finalizer this process added, by the version of the object the patch
    /// was made over: until the cache shows the patch, a reconcile waits instead of patching
    /// again (which could only conflict).
    pub adopting: DashMap<ListenerId, String>,
    /// Listeners this process has reconciled at least once: until every Listener in the cache
    /// is, the streams it routes are not all known yet.
    pub reconciled_once: DashMap<ListenerId, ()>,
    pub triggers: Triggers,
    /// Whether this replica leads: a standby reconciles into its routing index and streams,
    /// but writes nothing to the API server.
    pub leadership: Leadership,
    /// Sharded: which tokens this replica delivers. A Listener's status is written by the
    /// replica that delivers its token.
    pub shards: Option<Arc<ShardTable>>,
    /// This replica's name, shown in `status.streamedBy`.
    pub identity: String,
}

/// What this process last did about an object's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppliedStatus {
    /// The first write waits for a verdict (a new stream's outcome) or a timeout.
    Deferred,
    /// The status with this digest was applied over the object at `over_version`.
    Written {
        digest: u64,
        over_version: Option<String>,
    },
}

/// Whether a reconciler's status (its `digest`) needs no write: the cached object shows it
/// (`cached_same`) and this process applied nothing else since; or this process applied exactly
/// it over the very version the cache still holds, so the cache has not caught up yet.
fn status_write_needless(
    last: Option<&AppliedStatus>,
    digest: u64,
    cached_same: bool,
    cached_version: Option<&str>,
) -> bool {
    match last {
        None | Some(AppliedStatus::Deferred) => cached_same,
        Some(AppliedStatus::Written {
            digest: written,
            over_version,
        }) => *written == digest && (cached_same || over_version.as_deref() == cached_version),
    }
}

/// Where to ask for a reconcile outside the controllers' own watches.
pub struct Triggers {
    pub listeners: mpsc::UnboundedSender<ObjectRef<Listener>>,
    pub users: mpsc::UnboundedSender<ObjectRef<WebhookUser>>,
}

/// The receiving ends of [`Triggers`], one per controller.
pub struct TriggerStreams {
    pub listeners: mpsc::UnboundedReceiver<ObjectRef<Listener>>,
    pub users: mpsc::UnboundedReceiver<ObjectRef<WebhookUser>>,
}

impl Triggers {
    pub fn new() -> (Triggers, TriggerStreams) {
        let (listeners, listener_stream) = mpsc::unbounded_channel();
        let (users, user_stream) = mpsc::unbounded_channel();
        (
            Triggers { listeners, users },
            TriggerStreams {
                listeners: listener_stream,
                users: user_stream,
            },
        )
    }
}

/// What can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", describe_kube_error(.0))]
    Kube(#[from] kube::Error),
    #[error("{}", describe_finalizer_error(.0))]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("the object has no namespace")]
    MissingNamespace,
}

/// How an error is handled: by what it says about the next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Someone else wrote the object first (409, or a failed patch precondition): retry at once.
    Conflict,
    /// The API server could not answer now: retry with a growing backoff.
    Transient,
    /// Retrying cannot help until the object changes.
    Permanent,
}

impl ErrorKind {
    /// Every kind, for registering metrics at zero.
    pub const ALL: [ErrorKind; 3] = [
        ErrorKind::Conflict,
        ErrorKind::Transient,
        ErrorKind::Permanent,
    ];

    /// The metric label: `conflict`, `transient`, `permanent`.
    pub fn as_label(self) -> &'static str {
        match self {
            ErrorKind::Conflict => "conflict",
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

impl Error {
    /// A label for metrics: the kind of failure, never its details.
    pub fn metric_label(&self) -> &'static str {
        self.kind().as_label()
    }

    /// The Kubernetes API error underneath, if there is one.
    fn kube_error(&self) -> Option<&kube::Error> {
        match self {
            Error::Kube(error) => Some(error),
            Error::Finalizer(error) => match error.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.kube_error()
                }
                finalizer::Error::AddFinalizer(error)
                | finalizer::Error::RemoveFinalizer(error) => Some(error),
                finalizer::Error::UnnamedObject | finalizer::Error::InvalidFinalizer => None,
            },
            Error::MissingNamespace => None,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self.kube_error() {
            // 422 comes from the finalizer helper's JSON patch test: the list changed meanwhile.
            Some(kube::Error::Api(status)) if matches!(status.code, 409 | 422) => {
                ErrorKind::Conflict
            }
            Some(kube::Error::Api(status)) if matches!(status.code, 400 | 403 | 404) => {
                ErrorKind::Permanent
            }
            Some(_) => ErrorKind::Transient,
            None => ErrorKind::Permanent,
        }
    }
}

fn describe_finalizer_error(error: &finalizer::Error<Error>) -> String {
    match error {
        finalizer::Error::ApplyFailed(inner) => inner.to_string(),
        finalizer::Error::CleanupFailed(inner) => format!("cleanup failed: {inner}"),
        finalizer::Error::AddFinalizer(error) => {
            format!(
                "could not add the finalizer: {}",
                describe_kube_error(error)
            )
        }
        finalizer::Error::RemoveFinalizer(error) => format!(
            "could not remove the finalizer: {}",
            describe_kube_error(error)
        ),
        finalizer::Error::UnnamedObject => "the object has no name".into(),
        finalizer::Error::InvalidFinalizer => "the finalizer name is invalid".into(),
    }
}

impl From<finalizer::Error<Error>> for Error {
    fn from(error: finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(error))
    }
}

/// Backoff after `failures` transient failures in a row: 1 s doubling to 5 min.
fn transient_backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(9);
    Duration::from_secs(1u64 << exponent).min(Duration::from_secs(300))
}

impl Context {
    /// Whether this replica may write to the API server: only while it leads. A write skipped
    /// while standing by is made by the reconcile that [`requeue_all`](Self::requeue_all)
    /// asks for when this replica starts leading.
    pub fn may_write(&self) -> bool {
        self.leadership.is_leading()
    }

    /// Whether this replica may write a Listener's status and Events: the replica that
    /// delivers its token when sharded (the leader for a Listener without a token yet),
    /// else the leader.
    pub fn may_write_listener(&self, id: &ListenerId) -> bool {
        match (&self.shards, self.index.listener(id)) {
            (Some(shards), Some(entry)) => shards.writes(&entry.token),
            _ => self.may_write(),
        }
    }

    /// The replica named in a Listener's `status.streamedBy` when sharded: this one while it
    /// may write the Listener and streams its token; nobody while the token is not streamed.
    /// Without sharding the leader streams every token, and the Lease names it: naming it in
    /// every Listener would rewrite them all on each leader change.
    pub fn streamed_by(&self, id: &ListenerId) -> Option<&str> {
        self.shards.as_ref()?;
        let entry = self.index.listener(id)?;
        let streams = self.forwarders.state(&entry.token).is_some();
        (streams && self.may_write_listener(id)).then_some(self.identity.as_str())
    }

    /// Asks for a reconcile of every Listener and WebhookUser in the caches: this replica just
    /// started leading, and what it skipped writing while standing by is due now.
    pub fn requeue_all(&self) {
        use kube::ResourceExt;
        for listener in self.listeners.state() {
            if let Some(namespace) = listener.namespace() {
                let _ = self
                    .triggers
                    .listeners
                    .send(ObjectRef::new(&listener.name_any()).within(&namespace));
            }
        }
        for user in self.users.state() {
            if let Some(namespace) = user.namespace() {
                let _ = self
                    .triggers
                    .users
                    .send(ObjectRef::new(&user.name_any()).within(&namespace));
            }
        }
    }

    /// A Secret, from the cache while the Secret watch has seen no newer version of it.
    async fn read_secret(&self, namespace: &str, name: &str) -> Result<Option<Arc<Secret>>, Error> {
        if let Some(secret) = self.secrets.get(namespace, name) {
            return Ok(Some(secret));
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Ok(secrets.get_opt(name).await?.map(|s| self.secrets.put(s)))
    }

    /// Asks for a reconcile of a Listener.
    pub fn wake_listener(&self, id: &ListenerId) {
        let _ = self
            .triggers
            .listeners
            .send(ObjectRef::new(id.name()).within(id.namespace()));
    }

    /// Asks for a reconcile of a WebhookUser because its listener count changed. Such wakes are
    /// gathered: at most one per user per [`COUNT_REFRESH`], so creating thousands of Listeners
    /// does not rewrite their owner's status thousands of times. (The user's own changes reach
    /// its reconciler through its watch, never delayed.)
    pub fn wake_user(&self, namespace: &str, name: &str) {
        let key = OwnerKey::new(namespace, name);
        if self.count_refresh_pending.insert(key.clone(), ()).is_some() {
            return;
        }
        let users = self.triggers.users.clone();
        let pending = self.count_refresh_pending.clone();
        tokio::spawn(async move {
            tokio::time::sleep(COUNT_REFRESH).await;
            pending.remove(&key);
            let _ = users.send(ObjectRef::new(key.name()).within(key.namespace()));
        });
    }

    /// Asks for a reconcile of every Listener of an owner: its existence, spec or credentials
    /// changed.
    pub fn wake_listeners_of_owner(&self, owner: &OwnerKey) {
        for listener in self.owned.listeners_of(owner) {
            self.wake_listener(&listener);
        }
    }

    /// Stops routing to a Listener that is gone (or going): its routing entry, its stream when
    /// no other Listener uses the token, its delivery state and its Secret reference.
    pub fn forget_listener(&self, id: &ListenerId) {
        self.last_applied.remove(&format!("listener/{id}"));
        self.adopting.remove(id);
        self.reconciled_once.remove(id);
        if let Some(owner) = self.owned.remove(id) {
            self.wake_user(owner.namespace(), owner.name());
        }
        self.forwarders.detach(id);
        self.engine.forget_listener(id);
        self.secret_refs.remove(id);
    }

    /// Forgets every Listener of the index that the cache no longer has: deleted while a watch
    /// was down, or deleted without its finalizer running.
    pub fn forget_vanished_listeners(&self) {
        for id in self.index.listener_ids() {
            let reference = ObjectRef::<Listener>::new(id.name()).within(id.namespace());
            if self.listeners.get(&reference).is_none() {
                tracing::info!(listener = %id, "Forgot a Listener that is gone.");
                self.forget_listener(&id);
            }
        }
        self.reconciled_once.retain(|id, _| {
            let reference = ObjectRef::<Listener>::new(id.name()).within(id.namespace());
            self.listeners.get(&reference).is_some()
        });
    }

    /// Whether every Listener in the cache has been reconciled at least once by this process,
    /// so every token they route on is known to the forwarders.
    pub fn every_listener_reconciled(&self) -> bool {
        self.listeners.state().iter().all(|listener| {
            listener::listener_id(listener).is_none_or(|id| self.reconciled_once.contains_key(&id))
        })
    }

    /// Applies a reconciler's part of the status of `cached` (the object as the cache holds
    /// it) unless that is needless: see [`status_write_needless`]. Returns whether it wrote.
    async fn apply_status_if_changed<K, S>(
        &self,
        object: String,
        api: &Api<K>,
        cached: &K,
        cached_same: bool,
        status: &S,
        allowed: bool,
    ) -> Result<bool, Error>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
        S: Serialize + std::fmt::Debug,
    {
        let digest = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            serde_json::to_vec(status)
                .unwrap_or_default()
                .hash(&mut hasher);
            hasher.finish()
        };
        if !allowed {
            return Ok(false);
        }
        let cached_version = cached.meta().resource_version.as_deref();
        let last = self.last_applied.get(&object).map(|last| last.clone());
        if status_write_needless(last.as_ref(), digest, cached_same, cached_version) {
            return Ok(false);
        }
        let name = cached.meta().name.as_deref().unwrap_or_default();
        apply_status(api, name, resources::FIELD_MANAGER, status).await?;
        self.last_applied.insert(
            object,
            AppliedStatus::Written {
                digest,
                over_version: cached_version.map(str::to_owned),
            },
        );
        Ok(true)
    }

    /// Counts one reconciliation of `controller`.
    fn count_reconcile(&self, controller: &'static str) {
        self.metrics
            .reconciliations
            .get_or_create(&ControllerLabel {
                controller,
                error: "",
            })
            .inc();
    }

    /// Forgets the failures of an object that reconciled.
    fn reconciled(&self, object: &str) {
        self.failures_in_a_row.remove(object);
    }

    /// The error policy of both controllers: count, log by kind, and retry as the kind says.
    fn retry_after_error(&self, controller: &'static str, object: &str, error: &Error) -> Action {
        self.metrics
            .failures
            .get_or_create(&ControllerLabel {
                controller,
                error: error.metric_label(),
            })
            .inc();
        match error.kind() {
            ErrorKind::Conflict => {
                tracing::debug!(controller, object, %error, "Reconcile met a conflict; retrying at once.");
                Action::requeue(Duration::from_millis(50))
            }
            ErrorKind::Transient => {
                let failures = {
                    let mut count = self
                        .failures_in_a_row
                        .entry(format!("{controller}/{object}"))
                        .or_insert(0);
                    *count += 1;
                    *count
                };
                let delay = transient_backoff(failures);
                tracing::warn!(controller, object, %error, failures, retry_in = ?delay, "Reconcile failed; retrying after a backoff.");
                Action::requeue(delay)
            }
            ErrorKind::Permanent => {
                tracing::warn!(controller, object, %error, "Reconcile failed in a way a retry cannot fix; waiting for a change.");
                Action::requeue(Duration::from_secs(600))
            }
        }
    }
}

/// Whether the API server answered 404.
pub(crate) fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// Deletes an object; one already gone counts as deleted. Returns whether it was there.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, Error>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(error) if is_not_found(&error) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// A server-side apply of part of a resource's status, typed: `S` holds exactly the fields the
/// field manager owns.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a, S> {
    api_version: &'a str,
    kind: &'a str,
    status: &'a S,
}

/// Applies `status` (the fields `manager` owns) to the status of `K` named `name`.
pub(crate) async fn apply_status<K, S>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: &S,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + std::fmt::Debug,
{
    let patch = StatusApply {
        api_version: &K::api_version(&()),
        kind: &K::kind(&()),
        status,
    };
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api_error(code: u16) -> Error {
        Error::Kube(kube::Error::Api(Box::new(
            Status::failure("the object has been modified", "Conflict").with_code(code),
        )))
    }

    #[test]
    fn errors_are_handled_by_kind() {
        assert_eq!(api_error(409).kind(), ErrorKind::Conflict);
        let finalizer_conflict: Error = finalizer::Error::AddFinalizer(kube::Error::Api(Box::new(
            Status::failure("test failed", "Invalid").with_code(422),
        )))
        .into();
        assert_eq!(finalizer_conflict.kind(), ErrorKind::Conflict);
        assert_eq!(api_error(500).kind(), ErrorKind::Transient);
        assert_eq!(api_error(403).kind(), ErrorKind::Permanent);
        assert_eq!(Error::MissingNamespace.kind(), ErrorKind::Permanent);
    }

    #[test]
    fn api_errors_read_as_one_sentence_without_a_struct_dump() {
        let text = api_error(409).to_string();
        assert_eq!(
            text,
            "the API server answered 409 (Conflict): the object has been modified"
        );
        assert!(!text.contains("Status {"));
    }

    #[test]
    fn a_status_write_is_skipped_only_when_it_would_change_nothing() {
        let written = |digest, over: &str| AppliedStatus::Written {
            digest,
            over_version: Some(over.to_owned()),
        };
        // Nothing written by this process: the cache decides.
        assert!(status_write_needless(None, 1, true, Some("5")));
        assert!(!status_write_needless(None, 1, false, Some("5")));
        assert!(status_write_needless(
            Some(&AppliedStatus::Deferred),
            1,
            true,
            Some("5")
        ));
        // The same status was written over the version the cache still holds: it has not caught
        // up yet, and writing again would change nothing.
        assert!(status_write_needless(
            Some(&written(1, "5")),
            1,
            false,
            Some("5")
        ));
        // Written over an older version, and the cache shows something else since: write.
        assert!(!status_write_needless(
            Some(&written(1, "4")),
            1,
            false,
            Some("5")
        ));
        // This process last wrote something else, which the cache may not show yet: write.
        assert!(!status_write_needless(
            Some(&written(2, "5")),
            1,
            true,
            Some("5")
        ));
        assert!(status_write_needless(
            Some(&written(1, "4")),
            1,
            true,
            Some("6")
        ));
    }

    #[test]
    fn transient_backoff_grows_and_is_capped() {
        assert_eq!(transient_backoff(1), Duration::from_secs(1));
        assert_eq!(transient_backoff(2), Duration::from_secs(2));
        assert_eq!(transient_backoff(5), Duration::from_secs(16));
        assert_eq!(transient_backoff(50), Duration::from_secs(300));
    }
}
