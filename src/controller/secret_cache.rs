//! Secrets as last read, reused while the Secret watch has seen no newer version, so reconciles
//! do not each read the Secret again. The watch only sees metadata; data is read on demand.

use std::collections::HashSet;
use std::sync::Arc;

use dashmap::DashMap;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::Event;
use kube::ResourceExt;
use parking_lot::Mutex;

/// A Secret, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretKey {
    namespace: Arc<str>,
    name: Arc<str>,
}

impl SecretKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        SecretKey {
            namespace: Arc::from(namespace),
            name: Arc::from(name),
        }
    }

    fn of<K: ResourceExt>(object: &K) -> Self {
        SecretKey::new(&object.namespace().unwrap_or_default(), &object.name_any())
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Secrets by namespace and name, with the newest resourceVersion the watch has seen of each.
#[derive(Default)]
pub struct SecretCache {
    /// Newest version seen by the watch; absent once deleted.
    seen: DashMap<SecretKey, String>,
    read: DashMap<SecretKey, Arc<Secret>>,
    /// The keys a re-list has shown so far; `Some` between `Init` and `InitDone`.
    relisting: Mutex<Option<HashSet<SecretKey>>>,
}

impl SecretCache {
    /// Records what the Secret metadata watch saw; returns the Secrets that changed, appeared or
    /// went, whose readers are to be told. A re-list ends by dropping every Secret it did not
    /// show: those were deleted while the watch was down.
    pub fn observe(&self, event: &Event<PartialObjectMeta<Secret>>) -> Vec<SecretKey> {
        match event {
            Event::Apply(meta) => {
                let key = SecretKey::of(meta);
                self.see(&key, meta.resource_version())
                    .then_some(key)
                    .into_iter()
                    .collect()
            }
            Event::InitApply(meta) => {
                let key = SecretKey::of(meta);
                if let Some(listed) = self.relisting.lock().as_mut() {
                    listed.insert(key.clone());
                }
                self.see(&key, meta.resource_version())
                    .then_some(key)
                    .into_iter()
                    .collect()
            }
            Event::Delete(meta) => {
                let key = SecretKey::of(meta);
                self.forget_key(&key);
                vec![key]
            }
            Event::Init => {
                *self.relisting.lock() = Some(HashSet::new());
                Vec::new()
            }
            Event::InitDone => {
                let Some(listed) = self.relisting.lock().take() else {
                    return Vec::new();
                };
                let gone: Vec<SecretKey> = self
                    .seen
                    .iter()
                    .filter(|entry| !listed.contains(entry.key()))
                    .map(|entry| entry.key().clone())
                    .collect();
                for key in &gone {
                    self.forget_key(key);
                }
                gone
            }
        }
    }

    /// Records a version; true when it is new to the cache.
    fn see(&self, key: &SecretKey, version: Option<String>) -> bool {
        let version = version.unwrap_or_default();
        match self.seen.insert(key.clone(), version.clone()) {
            Some(previous) => previous != version,
            None => true,
        }
    }

    fn forget_key(&self, key: &SecretKey) {
        self.seen.remove(key);
        self.read.remove(key);
    }

    /// The Secret as last read, if the watch has seen no other version since.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Secret>> {
        let key = SecretKey::new(namespace, name);
        let seen = self.seen.get(&key)?.clone();
        let read = self.read.get(&key)?.clone();
        (read.resource_version().as_deref() == Some(seen.as_str())).then_some(read)
    }

    /// Keeps a Secret just read.
    pub fn put(&self, mut secret: Secret) -> Arc<Secret> {
        crate::resources::strip_bookkeeping(&mut secret);
        let secret = Arc::new(secret);
        self.read
            .insert(SecretKey::of(secret.as_ref()), secret.clone());
        secret
    }

    /// Forgets a Secret (deleted by the operator).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.read.remove(&SecretKey::new(namespace, name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn secret(name: &str, version: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    fn meta(name: &str, version: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: secret(name, version).metadata,
            ..PartialObjectMeta::default()
        }
    }

    #[test]
    fn a_read_is_reused_only_while_the_watch_agrees_with_it() {
        let cache = SecretCache::default();
        cache.put(secret("token", "1"));
        assert!(
            cache.get("ns", "token").is_none(),
            "not before the watch saw it"
        );
        cache.observe(&Event::Apply(meta("token", "1")));
        assert!(cache.get("ns", "token").is_some());
        cache.observe(&Event::Apply(meta("token", "2")));
        assert!(cache.get("ns", "token").is_none(), "a newer version exists");
        cache.put(secret("token", "2"));
        assert!(cache.get("ns", "token").is_some());
        cache.observe(&Event::Delete(meta("token", "2")));
        assert!(cache.get("ns", "token").is_none(), "deleted");
    }

    #[test]
    fn a_relist_drops_secrets_deleted_while_the_watch_was_down() {
        let cache = SecretCache::default();
        for name in ["kept", "deleted"] {
            cache.observe(&Event::Apply(meta(name, "1")));
            cache.put(secret(name, "1"));
        }
        // The watch comes back and lists again; "deleted" is not in the list.
        assert!(cache.observe(&Event::Init).is_empty());
        assert!(
            cache
                .observe(&Event::InitApply(meta("kept", "1")))
                .is_empty(),
            "an unchanged Secret wakes nobody"
        );
        let gone = cache.observe(&Event::InitDone);
        assert_eq!(gone, [SecretKey::new("ns", "deleted")]);
        assert!(cache.get("ns", "deleted").is_none());
        assert!(cache.get("ns", "kept").is_some());
    }

    #[test]
    fn changes_are_reported_once() {
        let cache = SecretCache::default();
        assert_eq!(cache.observe(&Event::Apply(meta("t", "1"))).len(), 1);
        assert!(cache.observe(&Event::Apply(meta("t", "1"))).is_empty());
        assert_eq!(cache.observe(&Event::Apply(meta("t", "2"))).len(), 1);
    }
}
