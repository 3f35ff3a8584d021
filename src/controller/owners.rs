//! Which Listeners each WebhookUser owns, kept by the Listener reconciler, so a user's listener
//! count and an owner change find their Listeners without a pass over every Listener.

use std::collections::BTreeSet;
use std::sync::Arc;

use dashmap::DashMap;

use crate::domain::{ListenerId, OwnerKey};

/// Listeners by owner.
#[derive(Default)]
pub struct ListenersByOwner {
    by_owner: DashMap<OwnerKey, BTreeSet<Arc<str>>>,
    by_listener: DashMap<ListenerId, OwnerKey>,
}

impl ListenersByOwner {
    /// Records that `listener` belongs to `owner`; returns the owner it had before, if another.
    pub fn set(&self, listener: &ListenerId, owner: &OwnerKey) -> Option<OwnerKey> {
        if self.by_listener.get(listener).is_some_and(|o| *o == *owner) {
            return None;
        }
        let previous = self.remove(listener);
        self.by_listener.insert(listener.clone(), owner.clone());
        self.by_owner
            .entry(owner.clone())
            .or_default()
            .insert(Arc::from(listener.name()));
        previous
    }

    /// Forgets a Listener; returns its owner.
    pub fn remove(&self, listener: &ListenerId) -> Option<OwnerKey> {
        let (_, owner) = self.by_listener.remove(listener)?;
        let now_empty = self.by_owner.get_mut(&owner).is_some_and(|mut names| {
            names.remove(listener.name());
            names.is_empty()
        });
        if now_empty {
            self.by_owner.remove_if(&owner, |_, names| names.is_empty());
        }
        Some(owner)
    }

    /// How many Listeners an owner has.
    pub fn count(&self, owner: &OwnerKey) -> usize {
        self.by_owner.get(owner).map_or(0, |names| names.len())
    }

    /// The Listeners of an owner.
    pub fn listeners_of(&self, owner: &OwnerKey) -> Vec<ListenerId> {
        self.by_owner
            .get(owner)
            .map(|names| {
                names
                    .iter()
                    .map(|name| ListenerId::new(owner.namespace(), name.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_follow_their_owner() {
        let index = ListenersByOwner::default();
        let (acme, beta) = (OwnerKey::new("ns", "acme"), OwnerKey::new("ns", "beta"));
        let (a, b) = (ListenerId::new("ns", "a"), ListenerId::new("ns", "b"));
        assert_eq!(index.set(&a, &acme), None);
        assert_eq!(index.set(&b, &acme), None);
        assert_eq!(index.set(&b, &acme), None, "unchanged");
        assert_eq!(index.count(&acme), 2);
        assert_eq!(index.set(&b, &beta), Some(acme.clone()), "moved");
        assert_eq!((index.count(&acme), index.count(&beta)), (1, 1));
        assert_eq!(index.listeners_of(&beta), std::slice::from_ref(&b));
        assert_eq!(index.remove(&a), Some(acme.clone()));
        assert_eq!(index.count(&acme), 0);
        assert_eq!(index.remove(&a), None);
    }
}
