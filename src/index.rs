//! The routing index: which listeners hang on which token, and who owns them. Fed by the
//! controllers as they reconcile; read by the forwarders for every event, so routing needs
//! no API call and no scan of unrelated listeners. Also counts each owner's deliveries against
//! its daily allowance.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use parking_lot::{Mutex, RwLock};
use url::Url;

use crate::clock::SharedClock;
use crate::crownstone::EventType;
use crate::delivery::{Charge, DeliveryOverrides, DeliveryTarget, Ledger};
use crate::domain::{ClientSecret, ListenerId, OwnerKey, Skip, TokenHash};

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
    /// The Listener's delivery policy over its owner's; shared by every delivery to it.
    pub delivery: Arc<DeliveryOverrides>,
}

/// Deliveries of one owner on one UTC day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DayUsage {
    pub day: NaiveDate,
    pub deliveries: u64,
}

/// One owner's count of deliveries against its allowance.
#[derive(Debug, Default)]
pub struct UsageCounter(Mutex<CounterState>);

#[derive(Debug, Default)]
struct CounterState {
    /// `None` until the first delivery or seed.
    day: Option<NaiveDate>,
    deliveries: u64,
    /// Changed since the last `take_usage_changes`.
    dirty: bool,
}

impl CounterState {
    /// Moves the count to `today`, starting from zero when the day changed.
    fn roll_to(&mut self, today: NaiveDate) {
        if self.day != Some(today) {
            let had_usage = self.day.is_some() && self.deliveries > 0;
            self.day = Some(today);
            self.deliveries = 0;
            self.dirty |= had_usage;
        }
    }
}

impl UsageCounter {
    /// Counts one delivery on `today` if the allowance has room for it.
    fn try_charge(&self, today: NaiveDate, allowance: u64) -> bool {
        let mut state = self.0.lock();
        state.roll_to(today);
        if state.deliveries >= allowance {
            return false;
        }
        state.deliveries += 1;
        state.dirty = true;
        true
    }
}

impl Ledger for UsageCounter {
    /// Gives back one delivery counted on `day`, if that day is still being counted.
    fn give_back(&self, day: NaiveDate) {
        let mut state = self.0.lock();
        if state.day == Some(day) && state.deliveries > 0 {
            state.deliveries -= 1;
            state.dirty = true;
        }
    }
}

/// The owner's daily allowance a routed delivery is to be counted against. Taken one delivery at
/// a time, right before it is submitted; the [`Charge`] goes with the delivery into the engine,
/// which gives it back whenever the delivery ends without an attempt.
#[derive(Debug)]
pub struct Allowance {
    counter: Arc<UsageCounter>,
    day: NaiveDate,
    limit: u64,
}

impl Allowance {
    /// Counts one delivery, if the allowance has room for it.
    pub fn take(&self) -> Option<Charge> {
        if !self.counter.try_charge(self.day, self.limit) {
            return None;
        }
        let ledger: Arc<dyn Ledger> = self.counter.clone();
        Some(Charge::new(ledger, self.day))
    }
}

/// A listener an event is to be delivered to, and the allowance to count it against.
#[derive(Debug)]
pub struct Routed {
    pub target: DeliveryTarget,
    pub allowance: Allowance,
}

struct OwnerRoute {
    /// The owner's name, shared by every delivery as `clientId`.
    client_id: Arc<str>,
    entry: OwnerEntry,
    usage: Arc<UsageCounter>,
}

/// Looked up for every Listener of every event: hashed with foldhash (randomly seeded, like
/// std's SipHash, but a fraction of its cost on these string keys).
#[derive(Default)]
struct Routes {
    owners: foldhash::HashMap<OwnerKey, OwnerRoute>,
    listeners: foldhash::HashMap<ListenerId, ListenerEntry>,
    by_token: foldhash::HashMap<TokenHash, BTreeSet<ListenerId>>,
}

/// The shared routing state.
pub struct RoutingIndex {
    routes: RwLock<Routes>,
    /// Kept apart from `owners`: usage is seeded before, and outlives changes of, the owner entry.
    usage: Mutex<HashMap<OwnerKey, Arc<UsageCounter>>>,
    clock: SharedClock,
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

    fn usage_counter(&self, key: &OwnerKey) -> Arc<UsageCounter> {
        self.usage.lock().entry(key.clone()).or_default().clone()
    }

    pub fn upsert_owner(&self, key: OwnerKey, entry: OwnerEntry) {
        let usage = self.usage_counter(&key);
        let client_id = key.shared_name();
        self.routes.write().owners.insert(
            key,
            OwnerRoute {
                client_id,
                entry,
                usage,
            },
        );
    }

    pub fn remove_owner(&self, key: &OwnerKey) {
        self.routes.write().owners.remove(key);
        self.usage.lock().remove(key);
    }

    pub fn owner(&self, key: &OwnerKey) -> Option<OwnerEntry> {
        self.routes.read().owners.get(key).map(|o| o.entry.clone())
    }

    /// Adds or replaces a listener. Returns the token it was on before, if that changed.
    /// Callers that run forwarders go through the forwarder registry, which decides under one
    /// lock whether a token's stream is still needed.
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

    /// Every listener in the index.
    pub fn listener_ids(&self) -> Vec<ListenerId> {
        self.routes.read().listeners.keys().cloned().collect()
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

    /// Whether any listener is on a token.
    pub fn has_token(&self, token: &TokenHash) -> bool {
        self.routes.read().by_token.contains_key(token)
    }

    /// The listeners an event of `event_type` on `token` goes to, appended to `out`, each with
    /// its owner's allowance for today to take before submitting. Skipped listeners are reported
    /// to `skip`.
    pub fn route(
        &self,
        token: &TokenHash,
        event_type: EventType,
        out: &mut Vec<Routed>,
        mut skip: impl FnMut(Skip),
    ) {
        let now = self.clock.now();
        let today = now.date_naive();
        let routes = self.routes.read();
        let Some(ids) = routes.by_token.get(token) else {
            return;
        };
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
            let Some(owner) = routes.owners.get(&listener.owner) else {
                skip(Skip::OwnerMissing);
                continue;
            };
            let Some(client_secret) = owner.entry.client_secret.as_ref() else {
                skip(Skip::OwnerWithoutCredentials);
                continue;
            };
            if !owner.entry.enabled {
                skip(Skip::OwnerDisabled);
                continue;
            }
            out.push(Routed {
                target: DeliveryTarget {
                    listener: listener.id.clone(),
                    generation: listener.generation,
                    url: listener.url.clone(),
                    client_id: owner.client_id.clone(),
                    client_secret: client_secret.clone(),
                    user_id: listener.user_id.clone(),
                    delivery: listener.delivery.clone(),
                },
                allowance: Allowance {
                    counter: owner.usage.clone(),
                    day: today,
                    limit: owner.entry.daily_allowance,
                },
            });
        }
    }

    /// Takes over usage recorded on a WebhookUser's status (after a restart), unless the index
    /// already counts more for that owner on that day.
    pub fn seed_usage(&self, owner: &OwnerKey, recorded: DayUsage) {
        let counter = self.usage_counter(owner);
        let mut state = counter.0.lock();
        let never_counted = state.day.is_none();
        if never_counted
            || (state.day == Some(recorded.day) && state.deliveries < recorded.deliveries)
        {
            state.day = Some(recorded.day);
            state.deliveries = recorded.deliveries;
        }
    }

    /// Today's usage of an owner.
    pub fn usage(&self, owner: &OwnerKey) -> DayUsage {
        let today = self.clock.now().date_naive();
        let counter = self.usage.lock().get(owner).cloned();
        let deliveries = counter.map_or(0, |c| {
            let state = c.0.lock();
            if state.day == Some(today) {
                state.deliveries
            } else {
                0
            }
        });
        DayUsage {
            day: today,
            deliveries,
        }
    }

    /// Owners whose usage changed since the last call, with their usage now. A count of an
    /// earlier day rolls over to today's zero here, so status shows the new day at UTC midnight
    /// even when no delivery comes.
    pub fn take_usage_changes(&self) -> Vec<(OwnerKey, DayUsage)> {
        let today = self.clock.now().date_naive();
        let usage = self.usage.lock();
        usage
            .iter()
            .filter_map(|(owner, counter)| {
                let mut state = counter.0.lock();
                if state.day.is_some() {
                    state.roll_to(today);
                }
                if !state.dirty {
                    return None;
                }
                state.dirty = false;
                let day = state.day?;
                Some((
                    owner.clone(),
                    DayUsage {
                        day,
                        deliveries: state.deliveries,
                    },
                ))
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
        OwnerKey::new("ns", name)
    }

    fn day(text: &str) -> NaiveDate {
        crate::clock::parse_day(text).unwrap()
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
            id: ListenerId::new("ns", name),
            owner: owner(owner_name),
            token: TokenHash::of(token),
            generation: 1,
            event_types: types.iter().copied().collect(),
            url: Arc::new(Url::parse("https://example.com/hook").unwrap()),
            user_id: Arc::from("user-1"),
            expires_at: None,
            delivery: Arc::default(),
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
        let mut delivered = Vec::new();
        for routed in &out {
            match routed.allowance.take() {
                Some(_) => delivered.push(routed.target.listener.to_string()),
                None => skips.push(Skip::AllowanceUsed),
            }
        }
        (delivered, skips)
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
            DayUsage {
                day: day("2026-11-24"),
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
            index.remove_listener(&ListenerId::new("ns", "a")),
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
            DayUsage {
                day: day("2026-11-23"),
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
            DayUsage {
                day: day("2026-11-22"),
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

    #[test]
    fn a_refunded_delivery_leaves_the_allowance_untouched() {
        let (index, _) = setup();
        index.upsert_owner(owner("acme"), owner_entry(true, 1));
        index.upsert_listener(listener("a", "acme", "t", &[EventType::Command]));
        let mut out = Vec::new();
        index.route(&TokenHash::of("t"), EventType::Command, &mut out, |_| {});
        assert_eq!(
            index.usage(&owner("acme")).deliveries,
            0,
            "routing alone counts nothing"
        );
        let charge = out[0].allowance.take().unwrap();
        assert_eq!(index.usage(&owner("acme")).deliveries, 1);
        assert!(
            out[0].allowance.take().is_none(),
            "an allowance of 1 is used up"
        );
        charge.refund();
        assert_eq!(index.usage(&owner("acme")).deliveries, 0);
        assert_eq!(routed(&index, "t", EventType::Command).0.len(), 1);
    }

    #[test]
    fn a_charge_given_back_after_midnight_leaves_the_new_day_alone() {
        let (index, clock) = setup();
        index.upsert_owner(owner("acme"), owner_entry(true, 10));
        index.upsert_listener(listener("a", "acme", "t", &[EventType::Command]));
        let mut out = Vec::new();
        index.route(&TokenHash::of("t"), EventType::Command, &mut out, |_| {});
        let charge = out[0].allowance.take().unwrap();
        // 23:00 -> 01:00: the delivery is dropped on the next day, which it was not counted on.
        clock.advance(chrono::Duration::hours(2));
        assert_eq!(routed(&index, "t", EventType::Command).0.len(), 1);
        charge.refund();
        assert_eq!(index.usage(&owner("acme")).deliveries, 1);
    }

    #[test]
    fn usage_rolls_over_at_utc_midnight_without_a_delivery() {
        let (index, clock) = setup();
        index.upsert_owner(owner("acme"), owner_entry(true, 10));
        index.upsert_listener(listener("a", "acme", "t", &[EventType::Command]));
        routed(&index, "t", EventType::Command);
        assert_eq!(
            index.take_usage_changes(),
            [(
                owner("acme"),
                DayUsage {
                    day: day("2026-11-23"),
                    deliveries: 1
                }
            )]
        );
        clock.advance(chrono::Duration::hours(2));
        assert_eq!(
            index.take_usage_changes(),
            [(
                owner("acme"),
                DayUsage {
                    day: day("2026-11-24"),
                    deliveries: 0
                }
            )]
        );
        assert!(index.take_usage_changes().is_empty(), "reported once");
    }

    #[test]
    fn owners_without_credentials_are_skipped_by_their_own_reason() {
        let (index, _) = setup();
        let mut entry = owner_entry(true, 10);
        entry.client_secret = None;
        index.upsert_owner(owner("acme"), entry);
        index.upsert_listener(listener("a", "acme", "t", &[EventType::Command]));
        assert_eq!(
            routed(&index, "t", EventType::Command).1,
            [Skip::OwnerWithoutCredentials]
        );
    }
}
