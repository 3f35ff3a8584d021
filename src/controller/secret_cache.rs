//! Token Secrets as last read, reused while the Secret watch has seen no newer version, so the
//! reconciles that status writes trigger do not each read the Secret again.

use std::sync::Arc;

use dashmap::DashMap;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::Event;
use kube::ResourceExt;

type Key = (String, String);

/// Secrets by namespace and name, with the newest resourceVersion the watch has seen of each.
#[derive(Default)]
pub struct SecretCache {
    /// Newest version seen by the watch; `None` once deleted.
    seen: DashMap<Key, Option<String>>,
    read: DashMap<Key, Arc<Secret>>,
}

fn key_of<K: ResourceExt>(object: &K) -> Key {
    (object.namespace().unwrap_or_default(), object.name_any())
}

impl SecretCache {
    /// Records what the Secret metadata watch saw.
    pub fn observe(&self, event: &Event<PartialObjectMeta<Secret>>) {
        match event {
            Event::Apply(meta) | Event::InitApply(meta) => {
                self.seen.insert(key_of(meta), meta.resource_version());
            }
            Event::Delete(meta) => {
                self.seen.insert(key_of(meta), None);
                self.read.remove(&key_of(meta));
            }
            Event::Init | Event::InitDone => {}
        }
    }

    /// The Secret as last read, if the watch has seen no other version since.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Secret>> {
        let key = (namespace.to_owned(), name.to_owned());
        let seen = self.seen.get(&key)?.clone()?;
        let read = self.read.get(&key)?.clone();
        (read.resource_version().as_deref() == Some(seen.as_str())).then_some(read)
    }

    /// Keeps a Secret just read.
    pub fn put(&self, secret: Secret) -> Arc<Secret> {
        let secret = Arc::new(secret);
        self.read.insert(key_of(secret.as_ref()), secret.clone());
        secret
    }

    /// Forgets a Secret (deleted by the operator).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.read.remove(&(namespace.to_owned(), name.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn secret(version: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("token".into()),
                namespace: Some("ns".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    fn meta(version: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: secret(version).metadata,
            ..PartialObjectMeta::default()
        }
    }

    #[test]
    fn a_read_is_reused_only_while_the_watch_agrees_with_it() {
        let cache = SecretCache::default();
        cache.put(secret("1"));
        assert!(
            cache.get("ns", "token").is_none(),
            "not before the watch saw it"
        );
        cache.observe(&Event::Apply(meta("1")));
        assert!(cache.get("ns", "token").is_some());
        cache.observe(&Event::Apply(meta("2")));
        assert!(cache.get("ns", "token").is_none(), "a newer version exists");
        cache.put(secret("2"));
        assert!(cache.get("ns", "token").is_some());
        cache.observe(&Event::Delete(meta("2")));
        assert!(cache.get("ns", "token").is_none(), "deleted");
    }
}
