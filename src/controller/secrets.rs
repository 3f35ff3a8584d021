//! Which Secrets the operator may touch, which Listeners read which Secret, and the one watch of
//! Secrets that wakes the reconcilers when a token or credentials Secret changes or goes.

use std::collections::BTreeSet;
use std::sync::Arc;

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, WatchStreamExt};

use super::secret_cache::SecretKey;
use super::Context;
use crate::conventions::user_of_credentials_secret;
use crate::domain::ListenerId;
use crate::health::WatchHealth;
use crate::resources::WebhookUser;

/// Listeners by the token Secret they name, kept by the Listener reconciler.
#[derive(Default)]
pub struct SecretRefs {
    by_secret: DashMap<SecretKey, BTreeSet<Arc<str>>>,
    by_listener: DashMap<ListenerId, Arc<str>>,
}

impl SecretRefs {
    /// Records that `listener` reads Secret `secret` of its namespace.
    pub fn set(&self, listener: &ListenerId, secret: &str) {
        if self
            .by_listener
            .get(listener)
            .is_some_and(|current| current.as_ref() == secret)
        {
            return;
        }
        self.remove(listener);
        let secret: Arc<str> = Arc::from(secret);
        self.by_listener.insert(listener.clone(), secret.clone());
        self.by_secret
            .entry(SecretKey::new(listener.namespace(), &secret))
            .or_default()
            .insert(Arc::from(listener.name()));
    }

    /// Forgets a Listener.
    pub fn remove(&self, listener: &ListenerId) {
        let Some((_, secret)) = self.by_listener.remove(listener) else {
            return;
        };
        let key = SecretKey::new(listener.namespace(), &secret);
        let now_empty = self.by_secret.get_mut(&key).is_some_and(|mut names| {
            names.remove(listener.name());
            names.is_empty()
        });
        if now_empty {
            self.by_secret.remove_if(&key, |_, names| names.is_empty());
        }
    }

    /// The Listeners that read a Secret.
    pub fn listeners_of(&self, secret: &SecretKey) -> Vec<ListenerId> {
        self.by_secret
            .get(secret)
            .map(|names| {
                names
                    .iter()
                    .map(|name| ListenerId::new(secret.namespace(), name.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Watches Secret metadata (never their data) in the operator's namespaces: keeps the Secret
/// cache honest, including across a re-list after an outage, and wakes the Listeners that read a
/// changed Secret and the WebhookUser whose credentials Secret changed. Runs until the stream
/// of `shutdown` ends.
pub async fn run_secret_watch(
    apis: Vec<Api<PartialObjectMeta<Secret>>>,
    ctx: Arc<Context>,
    health: Arc<WatchHealth>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let stream = super::scoped_watch(apis, |api| {
        watcher(api, watcher::Config::default().any_semantic()).default_backoff()
    });
    let mut stream = std::pin::pin!(stream);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        health.record(event.is_ok());
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "The Secret watch failed; it retries with a backoff.");
                continue;
            }
        };
        if matches!(event, watcher::Event::InitDone) {
            health.mark_synced();
        }
        for key in ctx.secrets.observe(&event) {
            for listener in ctx.secret_refs.listeners_of(&key) {
                ctx.wake_listener(&listener);
            }
            if let Some(user) = user_of_credentials_secret(key.name()) {
                let reference = ObjectRef::<WebhookUser>::new(user).within(key.namespace());
                // At once, not gathered like count refreshes: a standby that learns the
                // credentials late could take over with its owner's Listeners paused.
                if ctx.users.get(&reference).is_some() {
                    let _ = ctx.triggers.users.send(reference);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_refs_find_listeners_by_secret_and_follow_changes() {
        let refs = SecretRefs::default();
        let a = ListenerId::new("ns", "a");
        let b = ListenerId::new("ns", "b");
        refs.set(&a, "token");
        refs.set(&b, "token");
        refs.set(&ListenerId::new("other", "c"), "token");
        let mut found = refs.listeners_of(&SecretKey::new("ns", "token"));
        found.sort();
        assert_eq!(found, [a.clone(), b.clone()]);
        refs.set(&a, "another");
        assert_eq!(
            refs.listeners_of(&SecretKey::new("ns", "token")),
            std::slice::from_ref(&b)
        );
        assert_eq!(
            refs.listeners_of(&SecretKey::new("ns", "another")),
            std::slice::from_ref(&a)
        );
        refs.remove(&b);
        assert!(refs.listeners_of(&SecretKey::new("ns", "token")).is_empty());
    }
}
