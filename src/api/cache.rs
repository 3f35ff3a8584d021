//! The facade's read side: the WebhookUsers, Listeners and operator-managed Secrets of the API
//! namespace, each fed by a watch, with the indexes the routes look things up by (listeners by
//! owner, users by a SHA-256 of their API key). Reads and authentication never call the API
//! server; writers wait here, bounded, until their change is visible.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::conventions::{
    credentials_owner, credentials_secret_name, is_managed, secret_value, API_KEY, CLIENT_SECRET,
    MANAGED_BY,
};
use crate::health::WatchHealth;
use crate::resources::{Listener, WebhookUser};

/// SHA-256 of an API key: how the index finds a user without keeping keys as map keys, and
/// without a comparison whose time depends on the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiKeyHash([u8; 32]);

impl ApiKeyHash {
    pub fn of(key: &str) -> ApiKeyHash {
        ApiKeyHash(Sha256::digest(key.as_bytes()).into())
    }
}

/// Objects of one kind by name, with one index, replaced whole when a watch (re-)lists.
struct Indexed<K, I> {
    objects: HashMap<String, Arc<K>>,
    index: HashMap<I, BTreeSet<String>>,
    /// Objects of a list in progress; they replace `objects` when it is done.
    listing: Option<HashMap<String, Arc<K>>>,
    key_of: fn(&K) -> Option<I>,
}

impl<K: Resource, I: Hash + Eq + Clone> Indexed<K, I> {
    fn new(key_of: fn(&K) -> Option<I>) -> Self {
        Indexed {
            objects: HashMap::new(),
            index: HashMap::new(),
            listing: None,
            key_of,
        }
    }

    fn unindex(&mut self, name: &str, object: &K) {
        if let Some(key) = (self.key_of)(object) {
            if let Some(names) = self.index.get_mut(&key) {
                names.remove(name);
                if names.is_empty() {
                    self.index.remove(&key);
                }
            }
        }
    }

    fn insert(&mut self, object: K) {
        let name = object.name_any();
        let object = Arc::new(object);
        if let Some(key) = (self.key_of)(&object) {
            self.index.entry(key).or_default().insert(name.clone());
        }
        if let Some(previous) = self.objects.insert(name.clone(), object.clone()) {
            if (self.key_of)(&previous) != (self.key_of)(&object) {
                self.unindex(&name, &previous);
            }
        }
    }

    fn remove(&mut self, object: &K) {
        let name = object.name_any();
        if let Some(previous) = self.objects.remove(&name) {
            self.unindex(&name, &previous);
        }
    }

    fn apply(&mut self, event: watcher::Event<K>) {
        match event {
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                let listing = self.listing.get_or_insert_with(HashMap::new);
                listing.insert(object.name_any(), Arc::new(object));
            }
            watcher::Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.index.clear();
                for (name, object) in &self.objects {
                    if let Some(key) = (self.key_of)(object) {
                        self.index.entry(key).or_default().insert(name.clone());
                    }
                }
            }
            watcher::Event::Apply(object) => self.insert(object),
            watcher::Event::Delete(object) => self.remove(&object),
        }
    }

    fn get(&self, name: &str) -> Option<Arc<K>> {
        self.objects.get(name).cloned()
    }

    fn by_key(&self, key: &I) -> Vec<Arc<K>> {
        self.index
            .get(key)
            .map(|names| names.iter().filter_map(|n| self.get(n)).collect())
            .unwrap_or_default()
    }
}

/// A client's credentials, as the operator stored them.
pub struct Credentials {
    pub api_key: String,
    pub client_secret: String,
}

/// One watch: its state for readiness.
#[derive(Default)]
struct WatchState {
    health: WatchHealth,
    synced: AtomicBool,
}

/// The caches of the API namespace.
pub struct FacadeCache {
    users: RwLock<Indexed<WebhookUser, ()>>,
    listeners: RwLock<Indexed<Listener, String>>,
    secrets: RwLock<Indexed<Secret, ApiKeyHash>>,
    watches: [WatchState; 3],
    /// Bumped on every change, so writers can wait for theirs to show.
    changes: watch::Sender<u64>,
}

fn no_key(_: &WebhookUser) -> Option<()> {
    None
}

fn listener_owner(listener: &Listener) -> Option<String> {
    Some(listener.spec.owner.clone())
}

/// The WebhookUser a credentials Secret belongs to: one the operator made for that user, under
/// the name it gives such Secrets.
pub fn credentials_user(secret: &Secret) -> Option<&str> {
    if !is_managed(&secret.metadata) {
        return None;
    }
    let user = credentials_owner(&secret.metadata)?;
    (secret.metadata.name.as_deref() == Some(credentials_secret_name(user).as_str()))
        .then_some(user)
}

fn api_key_of(secret: &Secret) -> Option<ApiKeyHash> {
    credentials_user(secret)?;
    secret_value(secret, API_KEY).map(|key| ApiKeyHash::of(&key))
}

fn is_live<K: Resource>(object: &K) -> bool {
    object.meta().deletion_timestamp.is_none()
}

impl Default for FacadeCache {
    fn default() -> Self {
        FacadeCache {
            users: RwLock::new(Indexed::new(no_key)),
            listeners: RwLock::new(Indexed::new(listener_owner)),
            secrets: RwLock::new(Indexed::new(api_key_of)),
            watches: Default::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl FacadeCache {
    /// Starts the three watches of `namespace`; they run until `stop` is cancelled.
    pub fn start(
        self: &Arc<Self>,
        client: &kube::Client,
        namespace: &str,
        stop: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
        vec![
            tokio::spawn(run_watch(
                Api::<WebhookUser>::namespaced(client.clone(), namespace),
                watcher::Config::default().any_semantic(),
                self.clone(),
                |cache, event| cache.users.write().apply(event),
                0,
                stop.clone(),
            )),
            tokio::spawn(run_watch(
                Api::<Listener>::namespaced(client.clone(), namespace),
                watcher::Config::default().any_semantic(),
                self.clone(),
                |cache, event| cache.listeners.write().apply(event),
                1,
                stop.clone(),
            )),
            // Only Secrets the operator manages (credentials, and the facade's token Secrets)
            // are read, with their data; a tenant's other Secrets are never held here.
            tokio::spawn(run_watch(
                Api::<Secret>::namespaced(client.clone(), namespace),
                watcher::Config::default().any_semantic().labels(&managed),
                self.clone(),
                |cache, event| cache.secrets.write().apply(event),
                2,
                stop.clone(),
            )),
        ]
    }

    /// Every watch has listed once and none is failing now.
    pub fn is_ready(&self) -> bool {
        self.watches.iter().all(|w| w.health.is_healthy())
    }

    /// Every watch has listed once: reads can be served (a watch failing since still serves
    /// what it has, as the operator's caches do).
    pub fn is_synced(&self) -> bool {
        self.watches
            .iter()
            .all(|w| w.synced.load(Ordering::Relaxed))
    }

    /// Alive unless a watch has failed without a break for minutes.
    pub fn is_alive(&self) -> bool {
        self.watches.iter().all(|w| w.health.is_alive())
    }

    /// A WebhookUser, unless it is being deleted.
    pub fn user(&self, name: &str) -> Option<Arc<WebhookUser>> {
        self.users.read().get(name).filter(|u| is_live(u.as_ref()))
    }

    /// A WebhookUser as the cache has it, being deleted or not.
    pub fn user_any_state(&self, name: &str) -> Option<Arc<WebhookUser>> {
        self.users.read().get(name)
    }

    /// Every WebhookUser not being deleted.
    pub fn users(&self) -> Vec<Arc<WebhookUser>> {
        self.users
            .read()
            .objects
            .values()
            .filter(|u| is_live(u.as_ref()))
            .cloned()
            .collect()
    }

    /// A Listener, unless it is being deleted.
    pub fn listener(&self, name: &str) -> Option<Arc<Listener>> {
        self.listeners
            .read()
            .get(name)
            .filter(|l| is_live(l.as_ref()))
    }

    /// A Listener as the cache has it, being deleted or not.
    pub fn listener_any_state(&self, name: &str) -> Option<Arc<Listener>> {
        self.listeners.read().get(name)
    }

    /// The Listeners of an owner that are not being deleted.
    pub fn listeners_of(&self, owner: &str) -> Vec<Arc<Listener>> {
        self.listeners
            .read()
            .by_key(&owner.to_owned())
            .into_iter()
            .filter(|l| is_live(l.as_ref()))
            .collect()
    }

    /// Whether any Listener other than `except` names Secret `secret`.
    pub fn secret_shared(&self, secret: &str, except: &str) -> bool {
        self.listeners
            .read()
            .objects
            .values()
            .any(|l| l.name_any() != except && l.spec.token_secret_ref.name == secret)
    }

    /// A managed Secret.
    pub fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.secrets.read().get(name)
    }

    /// The credentials of a user, when the operator has made them.
    pub fn credentials(&self, user: &str) -> Option<Credentials> {
        let secret = self.secret(&credentials_secret_name(user))?;
        if credentials_user(&secret) != Some(user) {
            return None;
        }
        Some(Credentials {
            api_key: secret_value(&secret, API_KEY)?,
            client_secret: secret_value(&secret, CLIENT_SECRET)?,
        })
    }

    /// The WebhookUser whose API key `key` is: found by the key's hash, confirmed by a
    /// constant-time comparison, and only while the user exists and is not being deleted.
    pub fn user_by_api_key(&self, key: &str) -> Option<String> {
        let candidates = self.secrets.read().by_key(&ApiKeyHash::of(key));
        let mut found = None;
        for secret in candidates {
            let (Some(user), Some(stored)) =
                (credentials_user(&secret), secret_value(&secret, API_KEY))
            else {
                continue;
            };
            if bool::from(stored.as_bytes().ct_eq(key.as_bytes())) && self.user(user).is_some() {
                if found.is_some() {
                    // Two users with one key: neither is who the caller says.
                    return None;
                }
                found = Some(user.to_owned());
            }
        }
        found
    }

    /// Waits until `check` finds what it looks for, or `deadline` passes (then checks once
    /// more). Wakes on every change of any cache.
    pub async fn wait_for<T>(
        &self,
        deadline: Duration,
        mut check: impl FnMut(&FacadeCache) -> Option<T>,
    ) -> Option<T> {
        let mut changes = self.changes.subscribe();
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(found) = check(self) {
                return Some(found);
            }
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return check(self),
            }
        }
    }

    fn changed(&self) {
        self.changes
            .send_modify(|version| *version = version.wrapping_add(1));
    }
}

/// Feeds one watch into the cache until `stop`.
async fn run_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    cache: Arc<FacadeCache>,
    apply: fn(&FacadeCache, watcher::Event<K>),
    slot: usize,
    stop: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let kind = std::any::type_name::<K>()
        .rsplit("::")
        .next()
        .unwrap_or("object");
    let stream = watcher(api, config)
        .modify(crate::resources::strip_bookkeeping)
        .default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        let health = &cache.watches[slot].health;
        health.record(event.is_ok());
        match event {
            Ok(event) => {
                let done = matches!(event, watcher::Event::InitDone);
                apply(&cache, event);
                if done {
                    health.mark_synced();
                    cache.watches[slot].synced.store(true, Ordering::Relaxed);
                }
                cache.changed();
            }
            Err(error) => {
                tracing::warn!(%error, kind, "A watch of the REST facade failed; it retries with a backoff.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conventions::USER_ANNOTATION;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    fn listener(name: &str, owner: &str) -> Listener {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "webhooks.crownstone.rocks/v1alpha1", "kind": "Listener",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"owner": owner, "userId": "u", "eventTypes": ["command"],
                     "url": "http://h/", "tokenSecretRef": {"name": format!("{name}-token"), "key": "token"}}
        }))
        .unwrap()
    }

    fn user(name: &str) -> WebhookUser {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "webhooks.crownstone.rocks/v1alpha1", "kind": "WebhookUser",
            "metadata": {"name": name, "namespace": "ns"}, "spec": {"displayName": name}
        }))
        .unwrap()
    }

    fn credentials(user: &str, key: &str, managed: bool, name: Option<&str>) -> Secret {
        let mut labels = BTreeMap::new();
        if managed {
            labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(
                    name.map(str::to_owned)
                        .unwrap_or_else(|| credentials_secret_name(user)),
                ),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    USER_ANNOTATION.to_owned(),
                    user.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                (API_KEY.to_owned(), ByteString(key.as_bytes().to_vec())),
                (CLIENT_SECRET.to_owned(), ByteString(b"secret".to_vec())),
            ])),
            ..Secret::default()
        }
    }

    #[test]
    fn listeners_are_indexed_by_owner_through_changes_and_relists() {
        let cache = FacadeCache::default();
        let mut store = cache.listeners.write();
        store.apply(watcher::Event::Init);
        store.apply(watcher::Event::InitApply(listener("a", "acme")));
        store.apply(watcher::Event::InitApply(listener("b", "other")));
        assert!(
            store.by_key(&"acme".to_owned()).is_empty(),
            "not before the list is done"
        );
        store.apply(watcher::Event::InitDone);
        assert_eq!(store.by_key(&"acme".to_owned()).len(), 1);
        // The owner changes: the index follows.
        store.apply(watcher::Event::Apply(listener("a", "other")));
        assert!(store.by_key(&"acme".to_owned()).is_empty());
        assert_eq!(store.by_key(&"other".to_owned()).len(), 2);
        store.apply(watcher::Event::Delete(listener("b", "other")));
        assert_eq!(store.by_key(&"other".to_owned()).len(), 1);
        // A relist without `a` forgets it.
        store.apply(watcher::Event::Init);
        store.apply(watcher::Event::InitDone);
        assert!(store.by_key(&"other".to_owned()).is_empty());
        assert!(store.get("a").is_none());
    }

    #[test]
    fn api_keys_find_their_user_only_through_a_managed_credentials_secret() {
        let cache = FacadeCache::default();
        cache
            .users
            .write()
            .apply(watcher::Event::Apply(user("acme")));
        cache
            .users
            .write()
            .apply(watcher::Event::Apply(user("evil")));
        {
            let mut secrets = cache.secrets.write();
            secrets.apply(watcher::Event::Apply(credentials(
                "acme", "key-a", true, None,
            )));
            // Not the operator's: never a source of identity.
            secrets.apply(watcher::Event::Apply(credentials(
                "evil", "key-e", false, None,
            )));
            // Managed, but not under the name the operator gives the user's credentials.
            secrets.apply(watcher::Event::Apply(credentials(
                "evil",
                "key-x",
                true,
                Some("other-name"),
            )));
        }
        assert_eq!(cache.user_by_api_key("key-a").as_deref(), Some("acme"));
        assert_eq!(cache.user_by_api_key("key-e"), None);
        assert_eq!(cache.user_by_api_key("key-x"), None);
        assert_eq!(cache.user_by_api_key("key-"), None);
        assert_eq!(cache.credentials("acme").unwrap().client_secret, "secret");
        // A user that is gone has no valid key, even while its Secret lingers.
        cache
            .users
            .write()
            .apply(watcher::Event::Delete(user("acme")));
        assert_eq!(cache.user_by_api_key("key-a"), None);
    }

    #[tokio::test]
    async fn waiters_wake_on_changes_and_give_up_at_their_deadline() {
        let cache = Arc::new(FacadeCache::default());
        let waiter = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .wait_for(Duration::from_secs(10), |c| c.user("late"))
                    .await
                    .is_some()
            })
        };
        tokio::task::yield_now().await;
        cache
            .users
            .write()
            .apply(watcher::Event::Apply(user("late")));
        cache.changed();
        assert!(waiter.await.unwrap());
        let missing = cache
            .wait_for(Duration::from_millis(50), |c| c.user("never"))
            .await;
        assert!(missing.is_none());
    }
}
