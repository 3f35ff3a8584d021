//! Well-formed sample events of every type and subType of the event stream, for tests, demos
//! and benchmarks.
//!
//! Every event carries `sphere: {id, name, uid}`; names, uids and MAC addresses are derived from
//! the ids given, so the same arguments always give the same event (apart from
//! `sequenceTime.timestamp`, which is the current time).

use serde_json::{json, Value};

/// The `subType` of a `presence` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceChange {
    /// `enterSphere`
    EnterSphere,
    /// `exitSphere`
    ExitSphere,
    /// `enterLocation`
    EnterLocation,
    /// `exitLocation`
    ExitLocation,
}

impl PresenceChange {
    /// All four, in wire order.
    pub const ALL: [PresenceChange; 4] = [
        PresenceChange::EnterSphere,
        PresenceChange::ExitSphere,
        PresenceChange::EnterLocation,
        PresenceChange::ExitLocation,
    ];

    /// The wire subType.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceChange::EnterSphere => "enterSphere",
            PresenceChange::ExitSphere => "exitSphere",
            PresenceChange::EnterLocation => "enterLocation",
            PresenceChange::ExitLocation => "exitLocation",
        }
    }
}

/// The `subType` of a `dataChange` event: what kind of item changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangedItemKind {
    /// `users`
    Users,
    /// `spheres`
    Spheres,
    /// `stones`
    Stones,
    /// `locations`
    Locations,
}

impl ChangedItemKind {
    /// All four, in wire order.
    pub const ALL: [ChangedItemKind; 4] = [
        ChangedItemKind::Users,
        ChangedItemKind::Spheres,
        ChangedItemKind::Stones,
        ChangedItemKind::Locations,
    ];

    /// The wire subType.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangedItemKind::Users => "users",
            ChangedItemKind::Spheres => "spheres",
            ChangedItemKind::Stones => "stones",
            ChangedItemKind::Locations => "locations",
        }
    }
}

/// The `operation` of a `dataChange` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataOperation {
    /// `create`
    Create,
    /// `delete`
    Delete,
    /// `update`
    Update,
}

impl DataOperation {
    /// All three, in wire order.
    pub const ALL: [DataOperation; 3] = [
        DataOperation::Create,
        DataOperation::Delete,
        DataOperation::Update,
    ];

    /// The wire operation.
    pub fn as_str(self) -> &'static str {
        match self {
            DataOperation::Create => "create",
            DataOperation::Delete => "delete",
            DataOperation::Update => "update",
        }
    }
}

/// The `subType` of an `abilityChange` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ability {
    /// `dimming`
    Dimming,
    /// `switchcraft`
    Switchcraft,
    /// `tapToToggle`
    TapToToggle,
}

impl Ability {
    /// All three, in wire order.
    pub const ALL: [Ability; 3] = [Ability::Dimming, Ability::Switchcraft, Ability::TapToToggle];

    /// The wire subType (also the ability's `type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Ability::Dimming => "dimming",
            Ability::Switchcraft => "switchcraft",
            Ability::TapToToggle => "tapToToggle",
        }
    }
}

/// The `operation` of an `invitationChange` event (which has no subType).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvitationOperation {
    /// `invited`
    Invited,
    /// `invitationRevoked`
    InvitationRevoked,
}

impl InvitationOperation {
    /// Both, in wire order.
    pub const ALL: [InvitationOperation; 2] = [
        InvitationOperation::Invited,
        InvitationOperation::InvitationRevoked,
    ];

    /// The wire operation.
    pub fn as_str(self) -> &'static str {
        match self {
            InvitationOperation::Invited => "invited",
            InvitationOperation::InvitationRevoked => "invitationRevoked",
        }
    }
}

/// A small number derived from an id, used for uids and MAC addresses.
fn derived_number(id: &str) -> u32 {
    // FNV-1a: stable across runs and platforms, unlike the standard hasher.
    id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn mac_address(id: &str) -> String {
    let n = derived_number(id).to_be_bytes();
    format!("E1:5C:{:02X}:{:02X}:{:02X}:{:02X}", n[0], n[1], n[2], n[3])
}

/// The `sphere` object every event carries.
pub fn sphere(sphere_id: &str) -> Value {
    json!({
        "id": sphere_id,
        "name": format!("Sphere {sphere_id}"),
        "uid": derived_number(sphere_id) % 256,
    })
}

/// A Crownstone (`stone`) object: `{id, name, macAddress, uid}`.
pub fn stone(stone_id: &str) -> Value {
    json!({
        "id": stone_id,
        "name": format!("Crownstone {stone_id}"),
        "macAddress": mac_address(stone_id),
        "uid": derived_number(stone_id) % 256,
    })
}

/// The id of the `n`th sample Crownstone of a sphere.
fn stone_id(sphere_id: &str, n: u32) -> String {
    format!("{sphere_id}-stone-{n}")
}

/// `command/multiSwitch`: one Crownstone turned on, one off, one dimmed to 40 %.
pub fn multi_switch(sphere_id: &str) -> Value {
    let entry = |n: u32, kind: &str| {
        let mut s = stone(&stone_id(sphere_id, n));
        s["type"] = json!(kind);
        s
    };
    let mut dimmed = entry(3, "PERCENTAGE");
    dimmed["percentage"] = json!(40);
    let now = chrono::Utc::now().timestamp_millis();
    json!({
        "type": "command",
        "subType": "multiSwitch",
        "sphere": sphere(sphere_id),
        "switchData": [entry(1, "TURN_ON"), entry(2, "TURN_OFF"), dimmed],
        "sequenceTime": {"timestamp": now, "counter": 1},
    })
}

/// `presence/<change>` of user `user_id`; location changes name location `<sphere>-location-1`.
pub fn presence(sphere_id: &str, user_id: &str, change: PresenceChange) -> Value {
    let mut event = json!({
        "type": "presence",
        "subType": change.as_str(),
        "sphere": sphere(sphere_id),
        "user": {"id": user_id, "name": format!("User {user_id}")},
    });
    if matches!(
        change,
        PresenceChange::EnterLocation | PresenceChange::ExitLocation
    ) {
        let location_id = format!("{sphere_id}-location-1");
        event["location"] = json!({"id": location_id, "name": "Living room"});
    }
    event
}

/// `dataChange/<kind>` with `operation`, about the item `item_id` (for `users`, a user id).
pub fn data_change(
    sphere_id: &str,
    kind: ChangedItemKind,
    operation: DataOperation,
    item_id: &str,
) -> Value {
    json!({
        "type": "dataChange",
        "subType": kind.as_str(),
        "operation": operation.as_str(),
        "sphere": sphere(sphere_id),
        "changedItem": {"id": item_id, "name": format!("{} {item_id}", kind.as_str())},
    })
}

/// `abilityChange/<ability>` on the sphere's first sample Crownstone.
pub fn ability_change(sphere_id: &str, ability: Ability, enabled: bool) -> Value {
    json!({
        "type": "abilityChange",
        "subType": ability.as_str(),
        "sphere": sphere(sphere_id),
        "stone": stone(&stone_id(sphere_id, 1)),
        "ability": {"type": ability.as_str(), "enabled": enabled, "syncedToCrownstone": true},
    })
}

/// `invitationChange` with `operation` for `email`; this type has no subType.
pub fn invitation_change(sphere_id: &str, operation: InvitationOperation, email: &str) -> Value {
    json!({
        "type": "invitationChange",
        "operation": operation.as_str(),
        "sphere": sphere(sphere_id),
        "email": email,
    })
}

/// `switchStateUpdate/stone`: the sphere's first sample Crownstone now at `percentage`.
pub fn switch_state_update(sphere_id: &str, percentage: u8) -> Value {
    let mut crownstone = stone(&stone_id(sphere_id, 1));
    crownstone["percentage"] = json!(percentage);
    json!({
        "type": "switchStateUpdate",
        "subType": "stone",
        "sphere": sphere(sphere_id),
        "crownstone": crownstone,
    })
}

/// `sphereTokensChanged/sphereAuthorizationTokens`: on the stream, but never forwarded.
pub fn sphere_tokens_changed(sphere_id: &str) -> Value {
    json!({
        "type": "sphereTokensChanged",
        "subType": "sphereAuthorizationTokens",
        "sphere": sphere(sphere_id),
    })
}

/// One event of every forwardable type × subType × operation, in sphere `sphere_id`, with
/// `user_id` as the present user and as the changed item of `dataChange/users`.
pub fn every_event(sphere_id: &str, user_id: &str) -> Vec<Value> {
    let mut events = vec![multi_switch(sphere_id)];
    events.extend(
        PresenceChange::ALL
            .into_iter()
            .map(|c| presence(sphere_id, user_id, c)),
    );
    for kind in ChangedItemKind::ALL {
        let item_id = match kind {
            ChangedItemKind::Users => user_id.to_owned(),
            ChangedItemKind::Spheres => sphere_id.to_owned(),
            ChangedItemKind::Stones => stone_id(sphere_id, 1),
            ChangedItemKind::Locations => format!("{sphere_id}-location-1"),
        };
        events.extend(
            DataOperation::ALL
                .into_iter()
                .map(|op| data_change(sphere_id, kind, op, &item_id)),
        );
    }
    events.extend(
        Ability::ALL
            .into_iter()
            .map(|a| ability_change(sphere_id, a, true)),
    );
    events.extend(
        InvitationOperation::ALL
            .into_iter()
            .map(|op| invitation_change(sphere_id, op, "guest@example.com")),
    );
    events.push(switch_state_update(sphere_id, 100));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_covers_every_type_subtype_and_operation() {
        let events = every_event("s1", "u1");
        let keys: Vec<(String, String)> = events
            .iter()
            .map(|e| {
                let t = e["type"].as_str().unwrap().to_owned();
                let detail = match (e.get("subType"), e.get("operation")) {
                    (Some(s), Some(o)) => {
                        format!("{}/{}", s.as_str().unwrap(), o.as_str().unwrap())
                    }
                    (Some(s), None) => s.as_str().unwrap().to_owned(),
                    (None, Some(o)) => o.as_str().unwrap().to_owned(),
                    (None, None) => String::new(),
                };
                (t, detail)
            })
            .collect();
        let expected: Vec<(&str, &str)> = vec![
            ("command", "multiSwitch"),
            ("presence", "enterSphere"),
            ("presence", "exitSphere"),
            ("presence", "enterLocation"),
            ("presence", "exitLocation"),
            ("dataChange", "users/create"),
            ("dataChange", "users/delete"),
            ("dataChange", "users/update"),
            ("dataChange", "spheres/create"),
            ("dataChange", "spheres/delete"),
            ("dataChange", "spheres/update"),
            ("dataChange", "stones/create"),
            ("dataChange", "stones/delete"),
            ("dataChange", "stones/update"),
            ("dataChange", "locations/create"),
            ("dataChange", "locations/delete"),
            ("dataChange", "locations/update"),
            ("abilityChange", "dimming"),
            ("abilityChange", "switchcraft"),
            ("abilityChange", "tapToToggle"),
            ("invitationChange", "invited"),
            ("invitationChange", "invitationRevoked"),
            ("switchStateUpdate", "stone"),
        ];
        let keys: Vec<(&str, &str)> = keys.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn every_event_carries_its_sphere() {
        for event in every_event("s1", "u1") {
            assert_eq!(event["sphere"]["id"], "s1");
            assert!(event["sphere"]["name"].is_string());
            assert!(event["sphere"]["uid"].is_u64());
        }
    }

    #[test]
    fn shapes_follow_the_payload_table() {
        let cmd = multi_switch("s1");
        let data = cmd["switchData"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for entry in data {
            for key in ["id", "name", "macAddress", "uid", "type"] {
                assert!(entry.get(key).is_some(), "switchData entry lacks {key}");
            }
        }
        assert_eq!(data[2]["percentage"], 40);
        assert!(cmd["sequenceTime"]["timestamp"].is_i64());
        assert_eq!(cmd["sequenceTime"]["counter"], 1);

        let enter = presence("s1", "u1", PresenceChange::EnterLocation);
        assert_eq!(enter["user"]["id"], "u1");
        assert!(enter["location"]["id"].is_string());
        assert!(presence("s1", "u1", PresenceChange::EnterSphere)
            .get("location")
            .is_none());

        let invitation = invitation_change("s1", InvitationOperation::Invited, "a@b.c");
        assert!(invitation.get("subType").is_none());
        assert_eq!(invitation["email"], "a@b.c");

        let ability = ability_change("s1", Ability::TapToToggle, false);
        assert_eq!(ability["ability"]["type"], "tapToToggle");
        assert_eq!(ability["ability"]["enabled"], false);
        assert!(ability["stone"]["macAddress"].is_string());

        let state = switch_state_update("s1", 55);
        assert_eq!(state["crownstone"]["percentage"], 55);
        assert!(state["crownstone"]["uid"].is_u64());
    }
}
