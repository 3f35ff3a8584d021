//! The event server's scope filter: which events a token's scopes let through.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// A scope a Crownstone access token can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `all`: every event.
    All,
    /// `user_location`: the owner's own presence events.
    UserLocation,
    /// `stone_information`: Crownstone data changes, abilities and switch states.
    StoneInformation,
    /// `sphere_information`: stone, location and sphere data changes.
    SphereInformation,
    /// `switch_stone`: switch commands.
    SwitchStone,
    /// `location_information`: location data changes.
    LocationInformation,
    /// `user_information`: data changes of the owner's own user.
    UserInformation,
    /// `power_consumption`: no events.
    PowerConsumption,
    /// `user_id`: no events.
    UserId,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 9] = [
        Scope::All,
        Scope::UserLocation,
        Scope::StoneInformation,
        Scope::SphereInformation,
        Scope::SwitchStone,
        Scope::LocationInformation,
        Scope::UserInformation,
        Scope::PowerConsumption,
        Scope::UserId,
    ];

    /// The scope's name in a token.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::UserLocation => "user_location",
            Scope::StoneInformation => "stone_information",
            Scope::SphereInformation => "sphere_information",
            Scope::SwitchStone => "switch_stone",
            Scope::LocationInformation => "location_information",
            Scope::UserInformation => "user_information",
            Scope::PowerConsumption => "power_consumption",
            Scope::UserId => "user_id",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_owned()))
    }
}

/// What an entry of the table requires of the event besides its type and subType.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Predicate {
    /// Nothing more.
    Always,
    /// `event.user.id` is the token owner's user id.
    UserIsOwner,
    /// `event.changedItem.id` is the token owner's user id.
    ChangedItemIsOwner,
}

/// Key of an entry that matches every subType of its event type.
const ANY: &str = "*";

/// The scope table: `(scope, event type, subType or operation or "*", predicate)`.
const TABLE: &[(Scope, &str, &str, Predicate)] = &[
    (Scope::UserLocation, "presence", ANY, Predicate::UserIsOwner),
    (
        Scope::StoneInformation,
        "dataChange",
        "stones",
        Predicate::Always,
    ),
    (
        Scope::StoneInformation,
        "abilityChange",
        ANY,
        Predicate::Always,
    ),
    (
        Scope::StoneInformation,
        "switchStateUpdate",
        "stone",
        Predicate::Always,
    ),
    (
        Scope::SphereInformation,
        "dataChange",
        "stones",
        Predicate::Always,
    ),
    (
        Scope::SphereInformation,
        "dataChange",
        "locations",
        Predicate::Always,
    ),
    (
        Scope::SphereInformation,
        "dataChange",
        "spheres",
        Predicate::Always,
    ),
    (
        Scope::SwitchStone,
        "command",
        "switchCrownstone",
        Predicate::Always,
    ),
    (
        Scope::SwitchStone,
        "command",
        "multiSwitch",
        Predicate::Always,
    ),
    (
        Scope::LocationInformation,
        "dataChange",
        "locations",
        Predicate::Always,
    ),
    (
        Scope::UserInformation,
        "dataChange",
        "users",
        Predicate::ChangedItemIsOwner,
    ),
];

/// The fields of an event the filter looks at, borrowed from the event's JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFacts<'a> {
    /// `type`
    pub event_type: Option<&'a str>,
    /// `subType`: `None` when the event has no such key. A key holding something other than a
    /// string is `Some("")`, which no entry matches.
    pub sub_type: Option<&'a str>,
    /// `operation`
    pub operation: Option<&'a str>,
    /// `user.id`
    pub user_id: Option<&'a str>,
    /// `changedItem.id`
    pub changed_item_id: Option<&'a str>,
}

impl<'a> EventFacts<'a> {
    /// Reads the facts from a parsed event.
    pub fn from_value(event: &'a serde_json::Value) -> EventFacts<'a> {
        let text = |v: Option<&'a serde_json::Value>| v.and_then(serde_json::Value::as_str);
        EventFacts {
            event_type: text(event.get("type")),
            sub_type: event.get("subType").map(|v| v.as_str().unwrap_or("")),
            operation: text(event.get("operation")),
            user_id: text(event.get("user").and_then(|u| u.get("id"))),
            changed_item_id: text(event.get("changedItem").and_then(|c| c.get("id"))),
        }
    }
}

/// A token's compiled filter: the table rows of its scopes, owned by its user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeFilter {
    everything: bool,
    owner: String,
    rows: Vec<(&'static str, &'static str, Predicate)>,
}

impl ScopeFilter {
    /// Builds the filter of a token with `scopes`, owned by Crownstone user `owner`.
    pub fn new(scopes: &[Scope], owner: &str) -> ScopeFilter {
        let rows = TABLE
            .iter()
            .filter(|(scope, ..)| scopes.contains(scope))
            .map(|&(_, event_type, key, predicate)| (event_type, key, predicate))
            .collect();
        ScopeFilter {
            everything: scopes.contains(&Scope::All),
            owner: owner.to_owned(),
            rows,
        }
    }

    /// Whether the token may receive the event: the rows of `event.type`; `*` if there is one,
    /// else the row for `subType`, or for `operation` when the event has no `subType` key; no
    /// row: refused.
    pub fn allows(&self, event: &EventFacts<'_>) -> bool {
        if self.everything {
            return true;
        }
        let Some(event_type) = event.event_type else {
            return false;
        };
        let mut of_type = self.rows.iter().filter(|(t, ..)| *t == event_type);
        let row = match of_type.clone().find(|(_, key, _)| *key == ANY) {
            Some(row) => Some(row),
            None => {
                let key = event.sub_type.or(event.operation);
                key.and_then(|key| of_type.find(|(_, k, _)| *k == key))
            }
        };
        match row {
            None => false,
            Some((_, _, Predicate::Always)) => true,
            Some((_, _, Predicate::UserIsOwner)) => event.user_id == Some(self.owner.as_str()),
            Some((_, _, Predicate::ChangedItemIsOwner)) => {
                event.changed_item_id == Some(self.owner.as_str())
            }
        }
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crownstone::samples::{
        self, Ability, ChangedItemKind, DataOperation, PresenceChange,
    };
    use serde_json::Value;

    const OWNER: &str = "owner-user";
    const OTHER: &str = "other-user";

    fn allows(scopes: &[Scope], event: &Value) -> bool {
        ScopeFilter::new(scopes, OWNER).allows(&EventFacts::from_value(event))
    }

    /// `(type, subType or operation)` of the sample events a filter lets through.
    fn passed(scopes: &[Scope]) -> Vec<String> {
        samples::every_event("s1", OWNER)
            .iter()
            .filter(|e| allows(scopes, e))
            .map(|e| {
                let detail = e
                    .get("subType")
                    .or_else(|| e.get("operation"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                format!("{}/{}", e["type"].as_str().unwrap_or_default(), detail)
            })
            .collect()
    }

    fn dedup(mut v: Vec<String>) -> Vec<String> {
        v.dedup();
        v
    }

    #[test]
    fn all_passes_everything() {
        assert_eq!(
            passed(&[Scope::All]).len(),
            samples::every_event("s1", OWNER).len()
        );
        assert!(allows(&[Scope::All], &samples::sphere_tokens_changed("s1")));
        assert!(allows(
            &[Scope::All],
            &samples::presence("s1", OTHER, PresenceChange::EnterSphere)
        ));
    }

    #[test]
    fn user_location_row() {
        assert_eq!(
            passed(&[Scope::UserLocation]),
            [
                "presence/enterSphere",
                "presence/exitSphere",
                "presence/enterLocation",
                "presence/exitLocation"
            ]
        );
        for change in PresenceChange::ALL {
            assert!(!allows(
                &[Scope::UserLocation],
                &samples::presence("s1", OTHER, change)
            ));
        }
    }

    #[test]
    fn stone_information_row() {
        assert_eq!(
            dedup(passed(&[Scope::StoneInformation])),
            [
                "dataChange/stones",
                "abilityChange/dimming",
                "abilityChange/switchcraft",
                "abilityChange/tapToToggle",
                "switchStateUpdate/stone"
            ]
        );
    }

    #[test]
    fn sphere_information_row() {
        assert_eq!(
            dedup(passed(&[Scope::SphereInformation])),
            [
                "dataChange/spheres",
                "dataChange/stones",
                "dataChange/locations"
            ]
        );
    }

    #[test]
    fn switch_stone_row() {
        assert_eq!(passed(&[Scope::SwitchStone]), ["command/multiSwitch"]);
        let mut switch = samples::multi_switch("s1");
        switch["subType"] = "switchCrownstone".into();
        assert!(allows(&[Scope::SwitchStone], &switch));
    }

    #[test]
    fn location_information_row() {
        assert_eq!(
            dedup(passed(&[Scope::LocationInformation])),
            ["dataChange/locations"]
        );
    }

    #[test]
    fn user_information_row() {
        assert_eq!(
            dedup(passed(&[Scope::UserInformation])),
            ["dataChange/users"]
        );
        for op in DataOperation::ALL {
            assert!(!allows(
                &[Scope::UserInformation],
                &samples::data_change("s1", ChangedItemKind::Users, op, OTHER)
            ));
        }
    }

    #[test]
    fn power_consumption_and_user_id_pass_nothing() {
        assert!(passed(&[Scope::PowerConsumption]).is_empty());
        assert!(passed(&[Scope::UserId]).is_empty());
        assert!(passed(&[]).is_empty());
    }

    #[test]
    fn scopes_add_up() {
        let both = passed(&[Scope::SwitchStone, Scope::LocationInformation]);
        assert_eq!(dedup(both), ["command/multiSwitch", "dataChange/locations"]);
    }

    #[test]
    fn owner_predicates_compare_with_the_filter_owner() {
        let filter = ScopeFilter::new(&[Scope::UserLocation, Scope::UserInformation], OTHER);
        let presence = samples::presence("s1", OTHER, PresenceChange::ExitLocation);
        assert!(filter.allows(&EventFacts::from_value(&presence)));
        let owners_presence = samples::presence("s1", OWNER, PresenceChange::ExitLocation);
        assert!(!filter.allows(&EventFacts::from_value(&owners_presence)));
        let change =
            samples::data_change("s1", ChangedItemKind::Users, DataOperation::Update, OTHER);
        assert!(filter.allows(&EventFacts::from_value(&change)));
    }

    #[test]
    fn events_of_another_sphere_are_judged_by_the_same_rules() {
        // Sphere routing happens before the filter; the filter itself looks only at type and owner.
        assert!(allows(
            &[Scope::StoneInformation],
            &samples::ability_change("other-sphere", Ability::Dimming, true)
        ));
        assert!(!allows(
            &[Scope::UserLocation],
            &samples::presence("other-sphere", OTHER, PresenceChange::EnterSphere)
        ));
    }

    #[test]
    fn lookup_prefers_star_over_subtype() {
        // abilityChange has a `*` row under stone_information, so any subType passes.
        let mut event = samples::ability_change("s1", Ability::Dimming, true);
        event["subType"] = "somethingNew".into();
        assert!(allows(&[Scope::StoneInformation], &event));
    }

    #[test]
    fn lookup_uses_subtype_where_the_key_exists() {
        // `operation` is not consulted when `subType` is present, even if it would match.
        let mut event =
            samples::data_change("s1", ChangedItemKind::Stones, DataOperation::Create, "x");
        event["subType"] = "unknown".into();
        event["operation"] = "stones".into();
        assert!(!allows(&[Scope::StoneInformation], &event));
        // A subType key holding null is present: no fallback to `operation`.
        event["subType"] = Value::Null;
        assert!(!allows(&[Scope::StoneInformation], &event));
    }

    #[test]
    fn lookup_falls_back_to_operation_without_a_subtype_key() {
        let mut event =
            samples::data_change("s1", ChangedItemKind::Locations, DataOperation::Update, "x");
        event.as_object_mut().unwrap().remove("subType");
        event["operation"] = "locations".into();
        assert!(allows(&[Scope::LocationInformation], &event));
        event["operation"] = "update".into();
        assert!(!allows(&[Scope::LocationInformation], &event));
    }

    #[test]
    fn no_entry_is_refused() {
        let every_scope: Vec<Scope> = Scope::ALL
            .into_iter()
            .filter(|s| *s != Scope::All)
            .collect();
        for event in [
            // No row for these types.
            samples::invitation_change("s1", samples::InvitationOperation::Invited, "a@b.c"),
            samples::sphere_tokens_changed("s1"),
            // No type at all.
            serde_json::json!({"sphere": {"id": "s1"}}),
            // Neither subType nor operation.
            serde_json::json!({"type": "command", "sphere": {"id": "s1"}}),
            // A `*` row, but no user for the owner predicate.
            serde_json::json!({"type": "presence", "sphere": {"id": "s1"}}),
        ] {
            assert!(!allows(&every_scope, &event), "{event} should be refused");
        }
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
            let json = serde_json::to_string(&scope).unwrap();
            assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), scope);
        }
        assert!("everything".parse::<Scope>().is_err());
        assert!(serde_json::from_str::<Scope>("\"ALL\"").is_err());
    }
}
