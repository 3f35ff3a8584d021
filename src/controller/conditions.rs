//! Status conditions: what a Listener's and a WebhookUser's conditions should say, computed
//! from what was observed, with no API call, so every rule has a unit test.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::conventions::cap_message;
use crate::delivery::Suspension;
use crate::forwarder::{InvalidTokenCause, StreamState};

/// A condition before timestamps: type, status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(
        type_: &'static str,
        status: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        DesiredCondition {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The owner of a Listener, as observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerState {
    Missing,
    Disabled,
    /// The owner exists but has no usable client secret, so no delivery could be signed.
    WithoutCredentials,
    Enabled,
}

/// The token of a Listener, as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenState {
    /// The Secret or its key is missing; the message says which.
    SecretMissing(String),
    /// The Secret is one the operator made for something else (another Listener's token, a
    /// WebhookUser's credentials): never streamed with, so a Listener cannot borrow another
    /// tenant's token by naming its Secret.
    SecretNotAllowed(String),
    /// The token was read and its forwarder is in this state.
    Stream(StreamState),
}

/// Everything the Listener's conditions depend on.
#[derive(Clone, Debug)]
pub struct ListenerObservation {
    pub owner: OwnerState,
    pub token: TokenState,
    pub suspension: Option<Suspension>,
    /// The previous `TokenValid` status, so a reconnect does not forget that the token worked.
    pub token_was_valid: bool,
}

/// `TokenValid`, `Streaming` and `Ready` for a Listener.
pub fn listener_conditions(o: &ListenerObservation) -> [DesiredCondition; 3] {
    let (token_valid, streaming) = match &o.token {
        TokenState::SecretMissing(why) => (
            DesiredCondition::new("TokenValid", "Unknown", "TokenSecretMissing", why.clone()),
            DesiredCondition::new("Streaming", "False", "TokenSecretMissing", why.clone()),
        ),
        TokenState::SecretNotAllowed(why) => (
            DesiredCondition::new("TokenValid", "Unknown", "TokenSecretNotAllowed", why.clone()),
            DesiredCondition::new("Streaming", "False", "TokenSecretNotAllowed", why.clone()),
        ),
        TokenState::Stream(StreamState::Connecting) => (
            DesiredCondition::new(
                "TokenValid",
                "Unknown",
                "Connecting",
                "Opening the event stream to check the token",
            ),
            DesiredCondition::new(
                "Streaming",
                "False",
                "Connecting",
                "Opening the event stream",
            ),
        ),
        TokenState::Stream(StreamState::Streaming) => (
            DesiredCondition::new(
                "TokenValid",
                "True",
                "StreamStarted",
                "The event server accepted the token",
            ),
            DesiredCondition::new(
                "Streaming",
                "True",
                "Streaming",
                "The token's event stream is open",
            ),
        ),
        TokenState::Stream(StreamState::Reconnecting { reason }) => (
            if o.token_was_valid {
                DesiredCondition::new(
                    "TokenValid",
                    "True",
                    "StreamStarted",
                    "The event server accepted the token",
                )
            } else {
                DesiredCondition::new(
                    "TokenValid",
                    "Unknown",
                    "Connecting",
                    "Waiting for the event server to accept the token",
                )
            },
            DesiredCondition::new(
                "Streaming",
                "False",
                "Reconnecting",
                cap_message(&format!("{reason}; reconnecting")),
            ),
        ),
        TokenState::Stream(StreamState::InvalidToken(cause)) => (
            DesiredCondition::new(
                "TokenValid",
                "False",
                "InvalidToken",
                match cause {
                    InvalidTokenCause::RefusedByServer => {
                        "The event server refused the token; update the token Secret"
                    }
                    InvalidTokenCause::NotAHeaderValue => {
                        "The token holds characters an HTTP header cannot carry, so it was never sent; update the token Secret"
                    }
                },
            ),
            DesiredCondition::new(
                "Streaming",
                "False",
                "InvalidToken",
                "Not streaming: the token is invalid",
            ),
        ),
        TokenState::Stream(StreamState::Expired) => (
            DesiredCondition::new(
                "TokenValid",
                "False",
                "TokenExpired",
                "The token has expired; the Listener is being deleted",
            ),
            DesiredCondition::new(
                "Streaming",
                "False",
                "TokenExpired",
                "Not streaming: the token has expired",
            ),
        ),
    };
    let ready = if o.owner == OwnerState::Missing {
        DesiredCondition::new(
            "Ready",
            "False",
            "OwnerNotFound",
            "The WebhookUser named in spec.owner does not exist",
        )
    } else if o.owner == OwnerState::Disabled {
        DesiredCondition::new(
            "Ready",
            "False",
            "OwnerDisabled",
            "The owning WebhookUser is disabled",
        )
    } else if o.owner == OwnerState::WithoutCredentials {
        DesiredCondition::new(
            "Ready",
            "False",
            "OwnerCredentialsMissing",
            "The owning WebhookUser has no usable client secret; see its Ready condition",
        )
    } else if let Some(suspension) = o.suspension {
        let message = match suspension {
            Suspension::EndpointGone => "The receiver answered 410 Gone; change the spec to resume deliveries",
            Suspension::EndpointFailing => "Every delivery to the receiver has failed for too long; change the spec to resume deliveries",
        };
        DesiredCondition::new("Ready", "False", suspension.as_reason(), message)
    } else if streaming.status == "True" {
        DesiredCondition::new(
            "Ready",
            "True",
            "Forwarding",
            "Events are forwarded to the url",
        )
    } else {
        DesiredCondition::new(
            "Ready",
            "False",
            streaming.reason,
            streaming.message.clone(),
        )
    };
    [token_valid, streaming, ready]
}

/// Turns desired conditions into API conditions, keeping `lastTransitionTime` of those whose
/// status did not change.
pub fn to_conditions(
    desired: &[DesiredCondition],
    previous: &[Condition],
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let before = previous.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match before {
                Some(c) if c.status == d.status => c.last_transition_time.clone(),
                _ => to_time(now),
            };
            Condition {
                type_: d.type_.to_owned(),
                status: d.status.to_owned(),
                reason: d.reason.to_owned(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Whether two condition lists say the same, ignoring timestamps.
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

/// A chrono time as an API time.
pub fn to_time(at: DateTime<Utc>) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_millisecond(at.timestamp_millis())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observe(owner: OwnerState, token: TokenState) -> ListenerObservation {
        ListenerObservation {
            owner,
            token,
            suspension: None,
            token_was_valid: false,
        }
    }

    fn summary(o: &ListenerObservation) -> Vec<(&'static str, &'static str, &'static str)> {
        listener_conditions(o)
            .iter()
            .map(|c| (c.type_, c.status, c.reason))
            .collect()
    }

    #[test]
    fn listener_conditions_table() {
        use OwnerState::*;
        use StreamState::*;
        let cases = [
            (
                observe(Enabled, TokenState::Stream(Streaming)),
                [
                    ("TokenValid", "True", "StreamStarted"),
                    ("Streaming", "True", "Streaming"),
                    ("Ready", "True", "Forwarding"),
                ],
            ),
            (
                observe(Missing, TokenState::Stream(Streaming)),
                [
                    ("TokenValid", "True", "StreamStarted"),
                    ("Streaming", "True", "Streaming"),
                    ("Ready", "False", "OwnerNotFound"),
                ],
            ),
            (
                observe(Disabled, TokenState::Stream(Streaming)),
                [
                    ("TokenValid", "True", "StreamStarted"),
                    ("Streaming", "True", "Streaming"),
                    ("Ready", "False", "OwnerDisabled"),
                ],
            ),
            (
                observe(
                    Enabled,
                    TokenState::SecretMissing("Secret t not found".into()),
                ),
                [
                    ("TokenValid", "Unknown", "TokenSecretMissing"),
                    ("Streaming", "False", "TokenSecretMissing"),
                    ("Ready", "False", "TokenSecretMissing"),
                ],
            ),
            (
                observe(
                    Enabled,
                    TokenState::SecretNotAllowed("Secret t was not made for this Listener".into()),
                ),
                [
                    ("TokenValid", "Unknown", "TokenSecretNotAllowed"),
                    ("Streaming", "False", "TokenSecretNotAllowed"),
                    ("Ready", "False", "TokenSecretNotAllowed"),
                ],
            ),
            (
                observe(Enabled, TokenState::Stream(Connecting)),
                [
                    ("TokenValid", "Unknown", "Connecting"),
                    ("Streaming", "False", "Connecting"),
                    ("Ready", "False", "Connecting"),
                ],
            ),
            (
                observe(WithoutCredentials, TokenState::Stream(Streaming)),
                [
                    ("TokenValid", "True", "StreamStarted"),
                    ("Streaming", "True", "Streaming"),
                    ("Ready", "False", "OwnerCredentialsMissing"),
                ],
            ),
            (
                observe(
                    Enabled,
                    TokenState::Stream(InvalidToken(InvalidTokenCause::NotAHeaderValue)),
                ),
                [
                    ("TokenValid", "False", "InvalidToken"),
                    ("Streaming", "False", "InvalidToken"),
                    ("Ready", "False", "InvalidToken"),
                ],
            ),
            (
                observe(
                    Enabled,
                    TokenState::Stream(Reconnecting { reason: "x".into() }),
                ),
                [
                    ("TokenValid", "Unknown", "Connecting"),
                    ("Streaming", "False", "Reconnecting"),
                    ("Ready", "False", "Reconnecting"),
                ],
            ),
        ];
        for (observation, expected) in cases {
            assert_eq!(summary(&observation), expected, "{observation:?}");
        }
    }

    #[test]
    fn a_reconnect_keeps_a_valid_token_valid() {
        let mut o = observe(
            OwnerState::Enabled,
            TokenState::Stream(StreamState::Reconnecting { reason: "x".into() }),
        );
        o.token_was_valid = true;
        assert_eq!(summary(&o)[0], ("TokenValid", "True", "StreamStarted"));
    }

    #[test]
    fn a_suspended_endpoint_makes_the_listener_not_ready() {
        let mut o = observe(
            OwnerState::Enabled,
            TokenState::Stream(StreamState::Streaming),
        );
        o.suspension = Some(Suspension::EndpointGone);
        assert_eq!(summary(&o)[2], ("Ready", "False", "EndpointGone"));
        o.suspension = Some(Suspension::EndpointFailing);
        assert_eq!(summary(&o)[2], ("Ready", "False", "EndpointFailing"));
    }

    #[test]
    fn transition_time_is_kept_while_the_status_stays() {
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::minutes(5);
        let first = to_conditions(
            &[DesiredCondition::new("Ready", "True", "Forwarding", "m")],
            &[],
            Some(1),
            t0,
        );
        let same = to_conditions(
            &[DesiredCondition::new("Ready", "True", "Forwarding", "m")],
            &first,
            Some(1),
            t1,
        );
        assert_eq!(same[0].last_transition_time, first[0].last_transition_time);
        assert!(same_conditions(&first, &same));
        let changed = to_conditions(
            &[DesiredCondition::new(
                "Ready",
                "False",
                "OwnerDisabled",
                "m",
            )],
            &first,
            Some(1),
            t1,
        );
        assert_ne!(
            changed[0].last_transition_time,
            first[0].last_transition_time
        );
        assert!(!same_conditions(&first, &changed));
    }
}
