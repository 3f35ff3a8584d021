//! The routing index: which listeners hang on which token, and who owns them. Fed by the
//! controllers as they reconcile; read by the forwarders for every event, so routing needs
//! no API call and no scan of unrelated listeners.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use parking_lot::{Mutex, RwLock};
use url::Url;

use crate::clock::{format_day, parse_day, SharedClock};
use crate::crownstone::EventType;
use crate::delivery::{ClientSecret, DeliveryTarget, ListenerId};
use crate::forwarder::TokenHash;
use crate::resources::Usage;

/// A WebhookUser, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerKey {
    pub namespace: String,
    pub name: String,
}

/// A set of event types, as a bitmask: checked for every event and every listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventTypeSet(u8);

impl EventTypeSet {
    pub fn contains(self, event_type: EventType) -> bool {
        self.0 & Self::bit(event_type) != 0
    }

    fn bit(event_type: EventType) -> u8 {
        1 << (event_type as u8)
    }
}

impl FromIterator<EventType> for EventTypeSet {
    fn from_iter<I: IntoIterator<Item = EventType>>(iter: I) -> Self {
        EventTypeSet(iter.into_iter().fold(0, |bits, t| bits | Self::bit(t)))
    }
}

/// What routing needs of a WebhookUser.
#[derive(Clone, Debug)]
pub struct OwnerEntry {
    pub enabled: bool,
    /// Deliveries allowed per UTC day.
    pub daily_allowance: u64,
    /// None until the credentials Secret has been read: no delivery can be signed without it.
    pub client_secret: Option<ClientSecret>,
}

/// What routing needs of a Listener.
#[derive(Clone, Debug)]
pub struct ListenerEntry {
    pub id: ListenerId,
    pub owner: OwnerKey,
    pub token: TokenHash,
    pub generation: i64,
    pub event_types: EventTypeSet,
    pub url: Arc<Url>,
    pub user_id: Arc<str>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Routes {
    owners: HashMap<OwnerKey, (Arc<str>, OwnerEntry)>,
    listeners: HashMap<ListenerId, ListenerEntry>,
    by_token: HashMap<TokenHash, BTreeSet<ListenerId>>,
}

/// Deliveries counted against an owner's allowance on one UTC day.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct DailyUsage {
    /// `None` until the first delivery or seed.
    day: Option<NaiveDate>,
    deliveries: u64,
    /// Changed since the last `take_usage_changes`.
    dirty: bool,
}

/// The shared routing state.
pub struct RoutingIndex {
    routes: RwLock<Routes>,
    usage: Mutex<HashMap<OwnerKey, DailyUsage>>,
    clock: SharedClock,
}

/// Why `route` skipped a listener; counted in metrics, never logged per event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    NotSubscribed,
    OwnerMissing,
    OwnerDisabled,
    AllowanceUsed,
    Expired,
}

impl RoutingIndex {
    pub fn new(clock: SharedClock) -> Self {
        RoutingIndex {
            routes: RwLock::default(),
            usage: Mutex::default(),
            clock,
        }
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    pub fn upsert_owner(&self, key: OwnerKey, entry: OwnerEntry) {
        let client_id: Arc<str> = Arc::from(key.name.as_str());
        self.routes.write().owners.insert(key, (client_id, entry));
    }

    pub fn remove_owner(&self, key: &OwnerKey) {
        self.routes.write().owners.remove(key);
        self.usage.lock().remove(key);
    }

    pub fn owner(&self, key: &OwnerKey) -> Option<OwnerEntry> {
        self.routes.read().owners.get(key).map(|(_, e)| e.clone())
    }

    /// Adds or replaces a listener. Returns the token it was on before, if that changed.
    pub fn upsert_listener(&self, entry: ListenerEntry) -> Option<TokenHash> {
        let mut routes = self.routes.write();
        let previous = routes.listeners.insert(entry.id.clone(), entry.clone());
        routes
            .by_token
            .entry(entry.token)
            .or_default()
            .insert(entry.id.clone());
        let moved_from = previous.map(|p| p.token).filter(|t| *t != entry.token)?;
        Self::unlink(&mut routes, moved_from, &entry.id);
        Some(moved_from)
    }

    /// Removes a listener; returns the token it was on.
    pub fn remove_listener(&self, id: &ListenerId) -> Option<TokenHash> {
        let mut routes = self.routes.write();
        let entry = routes.listeners.remove(id)?;
        Self::unlink(&mut routes, entry.token, id);
        Some(entry.token)
    }

    fn unlink(routes: &mut Routes, token: TokenHash, id: &ListenerId) {
        if let Some(ids) = routes.by_token.get_mut(&token) {
            ids.remove(id);
            if ids.is_empty() {
                routes.by_token.remove(&token);
            }
        }
    }

    pub fn listener(&self, id: &ListenerId) -> Option<ListenerEntry> {
        self.routes.read().listeners.get(id).cloned()
    }

    /// Every listener on a token.
    pub fn listeners_of_token(&self, token: &TokenHash) -> Vec<ListenerId> {
        self.routes
            .read()
            .by_token
            .get(token)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every listener of an owner.
    pub fn listeners_of_owner(&self, owner: &OwnerKey) -> Vec<ListenerId> {
        self.routes
            .read()
            .listeners
            .values()
            .filter(|l| &l.owner == owner)
            .map(|l| l.id.clone())
            .collect()
    }

    /// The targets an event of `event_type` on `token` goes to, appended to `out`; each one is
    /// counted against its owner's allowance for today. Skipped listeners are reported to `skip`.
    pub fn route(
        &self,
        token: &TokenHash,
        event_type: EventType,
        out: &mut Vec<DeliveryTarget>,
        mut skip: impl FnMut(Skip),
    ) {
        let now = self.clock.now();
        let today = now.date_naive();
        let routes = self.routes.read();
        let Some(ids) = routes.by_token.get(token) else {
            return;
        };
        let mut usage = self.usage.lock();
        for id in ids {
            let Some(listener) = routes.listeners.get(id) else {
                continue;
            };
            if !listener.event_types.contains(event_type) {
                skip(Skip::NotSubscribed);
                continue;
            }
            if listener.expires_at.is_some_and(|at| at <= now) {
                skip(Skip::Expired);
                continue;
            }
            let Some((client_id, owner)) = routes.owners.get(&listener.owner) else {
                skip(Skip::OwnerMissing);
                continue;
            };
            let Some(client_secret) = owner.client_secret.as_ref() else {
                skip(Skip::OwnerMissing);
                continue;
            };
            if !owner.enabled {
                skip(Skip::OwnerDisabled);
                continue;
            }
            // Looked up before inserting: no key is cloned per delivery once an owner is known.
            if !usage.contains_key(&listener.owner) {
                usage.insert(listener.owner.clone(), DailyUsage::default());
            }
            let Some(used) = usage.get_mut(&listener.owner) else {
                continue;
            };
            if used.day != Some(today) {
                *used = DailyUsage {
                    day: Some(today),
                    deliveries: 0,
                    dirty: true,
                };
            }
            if used.deliveries >= owner.daily_allowance {
                skip(Skip::AllowanceUsed);
                continue;
            }
            used.deliveries += 1;
            used.dirty = true;
            out.push(DeliveryTarget {
                listener: listener.id.clone(),
                generation: listener.generation,
                url: listener.url.clone(),
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                user_id: listener.user_id.clone(),
            });
        }
    }

    /// Takes over usage recorded on a WebhookUser's status (after a restart), unless the index
    /// already counts that owner today.
    pub fn seed_usage(&self, owner: &OwnerKey, recorded: &Usage) {
        let Some(day) = parse_day(&recorded.day) else {
            return;
        };
        let mut usage = self.usage.lock();
        let current = usage.entry(owner.clone()).or_default();
        let never_counted = current.day.is_none();
        if never_counted || (current.day == Some(day) && current.deliveries < recorded.deliveries) {
            current.day = Some(day);
            current.deliveries = recorded.deliveries;
        }
    }

    /// Today's usage of an owner.
    pub fn usage(&self, owner: &OwnerKey) -> Usage {
        let today = self.clock.now().date_naive();
        let usage = self.usage.lock();
        let deliveries = usage
            .get(owner)
            .filter(|u| u.day == Some(today))
            .map_or(0, |u| u.deliveries);
        Usage {
            day: format_day(today),
            deliveries,
        }
    }

    /// Owners whose usage changed since the last call, with their usage now.
    pub fn take_usage_changes(&self) -> Vec<(OwnerKey, Usage)> {
        let mut usage = self.usage.lock();
        usage
            .iter_mut()
            .filter(|(_, u)| u.dirty)
            .filter_map(|(owner, u)| {
                u.dirty = false;
                let usage = Usage {
                    day: format_day(u.day?),
                    deliveries: u.deliveries,
                };
                Some((owner.clone(), usage))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use chrono::TimeZone;

    fn owner(name: &str) -> OwnerKey {
        OwnerKey {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn owner_entry(enabled: bool, allowance: u64) -> OwnerEntry {
        OwnerEntry {
            enabled,
            daily_allowance: allowance,
            client_secret: Some(ClientSecret::new("0123456789abcdef0123456789abcdef")),
        }
    }

    fn listener(name: &str, owner_name: &str, token: &str, types: &[EventType]) -> ListenerEntry {
        ListenerEntry {
            id: ListenerId::new(format!("ns/{name}")),
            owner: owner(owner_name),
            token: TokenHash::of(token),
            generation: 1,
            event_types: types.iter().copied().collect(),
            url: Arc::new(Url::parse("https://example.com/hook").unwrap()),
            user_id: Arc::from("user-1"),
            expires_at: None,
        }
    }

    fn setup() -> (RoutingIndex, ManualClock) {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 23, 0, 0).unwrap());
        (RoutingIndex::new(Arc::new(clock.clone())), clock)
    }

    fn routed(index: &RoutingIndex, token: &str, t: EventType) -> (Vec<String>, Vec<Skip>) {
        let mut out = Vec::new();
        let mut skips = Vec::new();
        index.route(&TokenHash::of(token), t, &mut out, |s| skips.push(s));
        (out.iter().map(|t| t.listener.to_string()).collect(), skips)
    }

    #[test]
    fn routes_by_token_and_event_type() {
        let (index, _) = setup();
        index.upsert_owner(owner("acme"), owner_entry(true, 100));
        index.upsert_listener(listener("a", "acme", "t1", &[EventType::Command]));
        index.upsert_listener(listener("b", "acme", "t1", &[EventType::Presence]));
        index.upsert_listener(listener("c", "acme", "t2", &[EventType::Command]));

        let (targets, skips) = routed(&index, "t1", EventType::Command);
        assert_eq!(targets, ["ns/a"]);
        assert_eq!(skips, [Skip::NotSubscribed]);
        assert!(routed(&index, "t3", EventType::Command).0.is_empty());
    }

    #[test]
    fn disabled_or_missing_owners_get_nothing() {
        let (index, _) = setup();
        index.upsert_owner(owner("on"), owner_entry(true, 100));
        index.upsert_owner(owner("off"), owner_entry(false, 100));
        index.upsert_listener(listener("a", "on", "t", &[EventType::Command]));
        index.upsert_listener(listener("b", "off", "t", &[EventType::Command]));
        index.upsert_listener(listener("c", "gone", "t", &[EventType::Command]));
        let (targets, mut skips) = routed(&index, "t", EventType::Command);
        assert_eq!(targets, ["ns/a"]);
        skips.sort_by_key(|s| format!("{s:?}"));
        assert_eq!(skips, [Skip::OwnerDisabled, Skip::OwnerMissing]);
    }

    #[test]
    fn allowance_is_per_owner_per_utc_day() {
        let (index, clock) = setup();
        index.upsert_owner(owner("acme"), owner_entry(true, 2));
        index.upsert_listener(listener("a", "acme", "t", &[EventType::Command]));
        assert_eq!(routed(&index, "t", EventType::Command).0.len(), 1);
        assert_eq!(routed(&index, "t", EventType::Command).0.len(), 1);
        let (targets, skips) = routed(&index, "t", EventType::Command);
        assert!(targets.is_empty());
        assert_eq!(skips, [Skip::AllowanceUsed]);
        assert_eq!(index.usage(&owner("acme")).deliveries, 2);

        // 23:00 -> 01:00 the next day: a new UTC day, a fresh allowance.
        clock.advance(chrono::Duration::hours(2));
        assert_eq!(routed(&index, "t", EventType::Command).0.len(), 1);
        assert_eq!(
            index.usage(&owner("acme")),
            Usage {
                day: "2026-11-24".into(),
                deliveries: 1
            }
        );
    }

    #[test]
    fn expired_listeners_get_nothing() {
        let (index, clock) = setup();
        index.upsert_owner(owner("acme"), owner_entry(true, 100));
        let mut entry = listener("a", "acme", "t", &[EventType::Command]);
        entry.expires_at = Some(clock.now() + chrono::Duration::minutes(1));
        index.upsert_listener(entry);
        assert_eq!(routed(&index, "t", EventType::Command).0.len(), 1);
        clock.advance(chrono::Duration::minutes(1));
        assert_eq!(routed(&index, "t", EventType::Command).1, [Skip::Expired]);
    }

    #[test]
    fn moving_a_listener_to_another_token_unlinks_the_old_one() {
        let (index, _) = setup();
        index.upsert_listener(listener("a", "acme", "t1", &[EventType::Command]));
        let moved = index.upsert_listener(listener("a", "acme", "t2", &[EventType::Command]));
        assert_eq!(moved, Some(TokenHash::of("t1")));
        assert!(index.listeners_of_token(&TokenHash::of("t1")).is_empty());
        assert_eq!(index.listeners_of_token(&TokenHash::of("t2")).len(), 1);
        assert_eq!(
            index.remove_listener(&ListenerId::new("ns/a")),
            Some(TokenHash::of("t2"))
        );
        assert!(index.listeners_of_token(&TokenHash::of("t2")).is_empty());
    }

    #[test]
    fn usage_recorded_before_a_restart_is_taken_over() {
        let (index, _) = setup();
        index.upsert_owner(owner("acme"), owner_entry(true, 3));
        index.upsert_listener(listener("a", "acme", "t", &[EventType::Command]));
        index.seed_usage(
            &owner("acme"),
            &Usage {
                day: "2026-11-23".into(),
                deliveries: 3,
            },
        );
        assert_eq!(
            routed(&index, "t", EventType::Command).1,
            [Skip::AllowanceUsed]
        );
        // Usage of another day is stale and ignored.
        let (index, _) = setup();
        index.seed_usage(
            &owner("acme"),
            &Usage {
                day: "2026-11-22".into(),
                deliveries: 3,
            },
        );
        assert_eq!(index.usage(&owner("acme")).deliveries, 0);
    }

    #[test]
    fn usage_changes_are_reported_once() {
        let (index, _) = setup();
        index.upsert_owner(owner("acme"), owner_entry(true, 10));
        index.upsert_listener(listener("a", "acme", "t", &[EventType::Command]));
        routed(&index, "t", EventType::Command);
        assert_eq!(index.take_usage_changes().len(), 1);
        assert!(index.take_usage_changes().is_empty());
    }
}
