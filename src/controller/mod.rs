//! The reconcilers of WebhookUser and Listener, the state they share, and how they run.

mod conditions;
mod credentials;
mod listener;
mod secret_cache;
mod status;
mod webhook_user;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::Client;
use serde::de::DeserializeOwned;

pub use conditions::{listener_conditions, ListenerObservation, OwnerState, TokenState};
pub use credentials::{generate_credentials, Credentials, API_KEY, CLIENT_SECRET};
pub use listener::{listener_id, run_listener_controller};
pub use secret_cache::SecretCache;
pub use status::StatusWriter;
pub use webhook_user::run_webhook_user_controller;

use crate::clock::SharedClock;
use crate::delivery::DeliveryEngine;
use crate::forwarder::ForwarderRegistry;
use crate::index::RoutingIndex;
use crate::metrics::{ControllerLabel, ControllerMetrics};
use crate::resources::{Listener, WebhookUser};

/// The finalizer both resources carry.
pub const FINALIZER: &str = "webhooks.crownstone.rocks/cleanup";
/// Label on every object the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "crownstone-webhooks");

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
    pub listeners: Store<Listener>,
    pub users: Store<WebhookUser>,
    /// Token Secrets as last read.
    pub secrets: SecretCache,
}

/// What can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
}

impl Error {
    /// A label for metrics: the kind of failure, never its details.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::MissingNamespace => "missing_namespace",
            Error::InvalidSpec(_) => "invalid_spec",
        }
    }
}

impl Context {
    /// A Secret, from the cache while the Secret watch has seen no newer version of it.
    async fn read_secret(&self, namespace: &str, name: &str) -> Result<Option<Arc<Secret>>, Error> {
        if let Some(secret) = self.secrets.get(namespace, name) {
            return Ok(Some(secret));
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Ok(secrets.get_opt(name).await?.map(|s| self.secrets.put(s)))
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

    /// The error policy of both controllers: count, log, retry soon.
    fn retry_after_error(&self, controller: &'static str, object: &str, error: &Error) -> Action {
        self.metrics
            .failures
            .get_or_create(&ControllerLabel {
                controller,
                error: error.metric_label(),
            })
            .inc();
        tracing::warn!(controller, object, %error, "reconciling failed");
        Action::requeue(Duration::from_secs(5))
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

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(error: kube::runtime::finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(error))
    }
}
