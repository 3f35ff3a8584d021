//! The Crownstone event stream's wire types, shared by the forwarders and the simulator.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The event types a listener may subscribe to: the six that Crownstone forwards to webhooks.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum EventType {
    Command,
    Presence,
    DataChange,
    AbilityChange,
    InvitationChange,
    SwitchStateUpdate,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::Command,
        EventType::Presence,
        EventType::DataChange,
        EventType::AbilityChange,
        EventType::InvitationChange,
        EventType::SwitchStateUpdate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Command => "command",
            EventType::Presence => "presence",
            EventType::DataChange => "dataChange",
            EventType::AbilityChange => "abilityChange",
            EventType::InvitationChange => "invitationChange",
            EventType::SwitchStateUpdate => "switchStateUpdate",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event type name that is not one of the six.
#[derive(Debug, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_owned()))
    }
}
