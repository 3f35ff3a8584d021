//! Wire types of Crownstone's event stream, shared by the forwarder and the simulator.

pub mod samples;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The event types a listener may subscribe to: the six that Crownstone forwards to webhooks.
// The variants carry plain comments, not doc comments: schemars would turn documented variants
// into a `oneOf`, and the CRD wants a plain string enum.
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
    // `command`: a request to switch Crownstones.
    Command,
    // `presence`: a user entered or left a sphere or location.
    Presence,
    // `dataChange`: a user, sphere, stone or location was created, updated or deleted.
    DataChange,
    // `abilityChange`: a Crownstone ability was switched on or off.
    AbilityChange,
    // `invitationChange`: someone was invited to a sphere, or an invitation was revoked.
    InvitationChange,
    // `switchStateUpdate`: a Crownstone's switch state changed.
    SwitchStateUpdate,
}

impl EventType {
    /// Every forwardable type, in wire order.
    pub const ALL: [EventType; 6] = [
        EventType::Command,
        EventType::Presence,
        EventType::DataChange,
        EventType::AbilityChange,
        EventType::InvitationChange,
        EventType::SwitchStateUpdate,
    ];

    /// The type's name on the wire.
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

/// A string that is not one of the six forwardable event types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// The `subType` of a `system` frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SystemCode {
    /// `STREAM_START` (200): the token is valid, events follow.
    StreamStart,
    /// `NO_ACCESS_TOKEN` (400): the request carried no token.
    NoAccessToken,
    /// `INVALID_ACCESS_TOKEN` (401): the token is unknown.
    InvalidAccessToken,
    /// `TOKEN_EXPIRED` (401): the token's lifetime has passed.
    TokenExpired,
    /// `NO_CONNECTION` (500): the event server lost its own upstream.
    NoConnection,
    /// `STREAM_CLOSED` (408 or 500): the stream was closed.
    StreamClosed,
    /// A subType this code does not know; kept so new server versions do not break parsing.
    Other(String),
}

impl SystemCode {
    /// The subType on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            SystemCode::StreamStart => "STREAM_START",
            SystemCode::NoAccessToken => "NO_ACCESS_TOKEN",
            SystemCode::InvalidAccessToken => "INVALID_ACCESS_TOKEN",
            SystemCode::TokenExpired => "TOKEN_EXPIRED",
            SystemCode::NoConnection => "NO_CONNECTION",
            SystemCode::StreamClosed => "STREAM_CLOSED",
            SystemCode::Other(s) => s,
        }
    }

    /// Reads a wire subType; unknown ones become [`SystemCode::Other`].
    pub fn from_wire(s: &str) -> SystemCode {
        match s {
            "STREAM_START" => SystemCode::StreamStart,
            "NO_ACCESS_TOKEN" => SystemCode::NoAccessToken,
            "INVALID_ACCESS_TOKEN" => SystemCode::InvalidAccessToken,
            "TOKEN_EXPIRED" => SystemCode::TokenExpired,
            "NO_CONNECTION" => SystemCode::NoConnection,
            "STREAM_CLOSED" => SystemCode::StreamClosed,
            other => SystemCode::Other(other.to_owned()),
        }
    }

    /// The code the event server sends with this subType. `STREAM_CLOSED` is sent with 500
    /// when the server stops (408, for a client that went away, never reaches anyone).
    pub fn status(&self) -> Option<u16> {
        match self {
            SystemCode::StreamStart => Some(200),
            SystemCode::NoAccessToken => Some(400),
            SystemCode::InvalidAccessToken | SystemCode::TokenExpired => Some(401),
            SystemCode::NoConnection | SystemCode::StreamClosed => Some(500),
            SystemCode::Other(_) => None,
        }
    }

    /// The message the event server sends with this subType.
    pub fn message(&self) -> &'static str {
        match self {
            SystemCode::StreamStart => "Stream Starting.",
            SystemCode::NoAccessToken => "No accessToken provided...",
            SystemCode::InvalidAccessToken => "No valid accessToken provided...",
            SystemCode::TokenExpired => "Token Expired.",
            SystemCode::NoConnection => "Not connected to cloud service. Try again later...",
            SystemCode::StreamClosed => "Server stopping. Try again later.",
            SystemCode::Other(_) => "",
        }
    }

    /// Whether the server ends the stream after this frame.
    pub fn ends_stream(&self) -> bool {
        !matches!(self, SystemCode::StreamStart | SystemCode::Other(_))
    }
}

impl fmt::Display for SystemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message of the event stream: the JSON payload of one `data:` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamFrame {
    /// An event. `json` is the payload exactly as received, so it can be forwarded unchanged.
    Data {
        /// The event's type when it is one of the six forwardable types, else `None`
        /// (`sphereTokensChanged`, types this code does not know).
        event_type: Option<EventType>,
        /// The event's `type` as sent.
        type_name: Cow<'static, str>,
        /// The event's JSON text, unchanged; shared, not copied, by everything it is sent to.
        json: Bytes,
    },
    /// A keep-alive with its counter (0 for the first ping of a stream).
    Ping {
        /// Pings sent on this stream before this one.
        counter: u64,
    },
    /// A system frame: stream start, or the reason the stream ends.
    System {
        /// The frame's subType.
        code: SystemCode,
        /// The frame's `code` (an HTTP-like status).
        status: u16,
        /// The human-readable message.
        message: String,
    },
}

/// A `data:` payload that is not a frame of the event stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The payload is not a JSON object with a string `type`.
    #[error("frame is not a JSON object with a string \"type\": {0}")]
    Json(#[from] serde_json::Error),
    /// A ping or system frame lacks a field it needs.
    #[error("{frame} frame has no valid \"{field}\"")]
    MissingField {
        /// `ping` or `system`.
        frame: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// A ping or system frame has a field of the wrong type.
    #[error("{frame} frame has a field of the wrong type: {source}")]
    FieldType {
        /// `ping` or `system`.
        frame: &'static str,
        /// What serde found.
        source: serde_json::Error,
    },
}

/// The one field every frame is read for: its `type` decides what it is. Every other field is
/// skipped, not typed, so a data event may carry any value under any other key (a string
/// `code`, an object `counter`) and still be forwarded unchanged.
#[derive(Deserialize)]
struct FrameKind<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

/// The fields of a `ping` frame.
#[derive(Deserialize)]
struct PingFields {
    #[serde(default)]
    counter: Option<u64>,
}

/// The fields of a `system` frame.
#[derive(Deserialize)]
struct SystemFields<'a> {
    #[serde(rename = "subType", borrow, default)]
    sub_type: Option<Cow<'a, str>>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
}

impl StreamFrame {
    /// Parses one `data:` payload.
    pub fn parse(data: &str) -> Result<StreamFrame, FrameError> {
        StreamFrame::parse_owned(data.to_owned())
    }

    /// Parses one `data:` payload, keeping it without a copy: the forwarder's path, per event.
    /// Only `type` decides the kind; only `ping` and `system` frames are read a second time,
    /// for their typed fields (they are rare: one ping per 30 s).
    pub fn parse_owned(data: String) -> Result<StreamFrame, FrameError> {
        let head: FrameKind<'_> = serde_json::from_str(&data)?;
        match head.kind.as_ref() {
            "ping" => {
                let fields: PingFields =
                    serde_json::from_str(&data).map_err(|source| FrameError::FieldType {
                        frame: "ping",
                        source,
                    })?;
                Ok(StreamFrame::Ping {
                    counter: fields.counter.ok_or(FrameError::MissingField {
                        frame: "ping",
                        field: "counter",
                    })?,
                })
            }
            "system" => {
                let fields: SystemFields<'_> =
                    serde_json::from_str(&data).map_err(|source| FrameError::FieldType {
                        frame: "system",
                        source,
                    })?;
                Ok(StreamFrame::System {
                    code: SystemCode::from_wire(fields.sub_type.as_deref().unwrap_or_default()),
                    status: fields.code.ok_or(FrameError::MissingField {
                        frame: "system",
                        field: "code",
                    })?,
                    message: fields.message.map(Cow::into_owned).unwrap_or_default(),
                })
            }
            other => {
                let event_type: Option<EventType> = other.parse().ok();
                let type_name = match event_type {
                    Some(known) => Cow::Borrowed(known.as_str()),
                    None => Cow::Owned(other.to_owned()),
                };
                drop(head);
                // `Bytes::from(String)` takes over the string's buffer: no copy of the event.
                Ok(StreamFrame::Data {
                    event_type,
                    type_name,
                    json: Bytes::from(data),
                })
            }
        }
    }

    /// A system frame with the standard code and message of `code`.
    pub fn system(code: SystemCode) -> StreamFrame {
        StreamFrame::System {
            status: code.status().unwrap_or(500),
            message: code.message().to_owned(),
            code,
        }
    }

    /// The frame's JSON payload, as the event server writes it.
    pub fn to_json(&self) -> String {
        match self {
            StreamFrame::Data { json, .. } => String::from_utf8_lossy(json).into_owned(),
            StreamFrame::Ping { counter } => format!("{{\"type\":\"ping\",\"counter\":{counter}}}"),
            StreamFrame::System {
                code,
                status,
                message,
            } => {
                // Key order is part of the wire format: type, subType, code, message.
                #[derive(Serialize)]
                struct SystemBody<'a> {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    #[serde(rename = "subType")]
                    sub_type: &'a str,
                    code: u16,
                    message: &'a str,
                }
                let body = SystemBody {
                    kind: "system",
                    sub_type: code.as_str(),
                    code: *status,
                    message,
                };
                // Serialising a struct of strings and an integer cannot fail.
                serde_json::to_string(&body).unwrap_or_default()
            }
        }
    }

    /// The whole frame as written on the stream: `data:<json>\n\n`.
    pub fn to_sse_bytes(&self) -> Bytes {
        sse_frame(&self.to_json())
    }
}

/// Wraps one JSON payload into an event-stream frame: `data:<json>\n\n`, with no `event:` or `id:`.
/// The payload must be compact JSON (no newline), as every frame is a single line.
pub fn sse_frame(json: &str) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 7);
    out.extend_from_slice(b"data:");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_round_trips_through_its_wire_name() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>().ok(), Some(t));
            assert_eq!(t.to_string(), t.as_str());
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<EventType>(&json).unwrap(), t);
        }
        assert!("sphereTokensChanged".parse::<EventType>().is_err());
        assert!("Command".parse::<EventType>().is_err());
    }

    #[test]
    fn event_type_schema_is_a_string_enum_of_the_six_types() {
        let schema = serde_json::to_value(schemars::schema_for!(EventType)).unwrap();
        assert_eq!(schema["type"], "string");
        let values: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            values,
            [
                "command",
                "presence",
                "dataChange",
                "abilityChange",
                "invitationChange",
                "switchStateUpdate"
            ]
        );
    }

    #[test]
    fn system_frames_serialise_with_the_wire_key_order() {
        let cases = [
            (
                SystemCode::StreamStart,
                r#"{"type":"system","subType":"STREAM_START","code":200,"message":"Stream Starting."}"#,
            ),
            (
                SystemCode::NoAccessToken,
                r#"{"type":"system","subType":"NO_ACCESS_TOKEN","code":400,"message":"No accessToken provided..."}"#,
            ),
            (
                SystemCode::InvalidAccessToken,
                r#"{"type":"system","subType":"INVALID_ACCESS_TOKEN","code":401,"message":"No valid accessToken provided..."}"#,
            ),
            (
                SystemCode::TokenExpired,
                r#"{"type":"system","subType":"TOKEN_EXPIRED","code":401,"message":"Token Expired."}"#,
            ),
            (
                SystemCode::NoConnection,
                r#"{"type":"system","subType":"NO_CONNECTION","code":500,"message":"Not connected to cloud service. Try again later..."}"#,
            ),
            (
                SystemCode::StreamClosed,
                r#"{"type":"system","subType":"STREAM_CLOSED","code":500,"message":"Server stopping. Try again later."}"#,
            ),
        ];
        for (code, json) in cases {
            let frame = StreamFrame::system(code);
            assert_eq!(frame.to_json(), json);
            assert_eq!(frame.to_sse_bytes(), format!("data:{json}\n\n").as_bytes());
            assert_eq!(StreamFrame::parse(json).unwrap(), frame);
        }
    }

    #[test]
    fn ping_serialises_and_parses() {
        let frame = StreamFrame::Ping { counter: 7 };
        assert_eq!(frame.to_json(), r#"{"type":"ping","counter":7}"#);
        assert_eq!(
            frame.to_sse_bytes(),
            &b"data:{\"type\":\"ping\",\"counter\":7}\n\n"[..]
        );
        assert_eq!(StreamFrame::parse(&frame.to_json()).unwrap(), frame);
        assert!(matches!(
            StreamFrame::parse(r#"{"type":"ping"}"#),
            Err(FrameError::MissingField {
                field: "counter",
                ..
            })
        ));
    }

    #[test]
    fn data_frames_keep_their_json_text_unchanged() {
        let json = r#"{"type":"presence","subType":"enterSphere","z":1,"a":{"b":[1,2]},"sphere":{"id":"s1","name":"Home","uid":1}}"#;
        match StreamFrame::parse(json).unwrap() {
            StreamFrame::Data {
                event_type,
                type_name,
                json: text,
            } => {
                assert_eq!(event_type, Some(EventType::Presence));
                assert_eq!(type_name, "presence");
                assert_eq!(&text[..], json.as_bytes());
            }
            other => panic!("expected a data frame, got {other:?}"),
        }
    }

    #[test]
    fn every_sample_event_parses_as_its_type() {
        for event in samples::every_event("sphere-1", "user-1") {
            let json = serde_json::to_string(&event).unwrap();
            let frame = StreamFrame::parse(&json).unwrap();
            let expected: EventType = event["type"].as_str().unwrap().parse().unwrap();
            assert!(
                matches!(frame, StreamFrame::Data { event_type: Some(t), .. } if t == expected)
            );
        }
    }

    #[test]
    fn other_types_are_data_without_an_event_type() {
        let json = samples::sphere_tokens_changed("s1").to_string();
        assert!(matches!(
            StreamFrame::parse(&json).unwrap(),
            StreamFrame::Data { event_type: None, ref type_name, .. } if type_name == "sphereTokensChanged"
        ));
    }

    #[test]
    fn unknown_system_subtypes_are_kept() {
        let frame = StreamFrame::parse(
            r#"{"type":"system","subType":"NEW_THING","code":299,"message":"m"}"#,
        )
        .unwrap();
        assert_eq!(
            frame,
            StreamFrame::System {
                code: SystemCode::Other("NEW_THING".into()),
                status: 299,
                message: "m".into()
            }
        );
    }

    #[test]
    fn data_events_with_odd_field_types_are_delivered_unchanged() {
        // Only `type` decides the kind: the keys that ping and system frames use mean nothing
        // on a data event, whatever their type.
        let cases = [
            (
                r#"{"type":"command","subType":"multiSwitch","code":"not-a-number"}"#,
                Some(EventType::Command),
            ),
            (
                r#"{"type":"presence","counter":{"a":1},"subType":"enterSphere"}"#,
                Some(EventType::Presence),
            ),
            (
                r#"{"type":"dataChange","subType":7,"operation":"update"}"#,
                Some(EventType::DataChange),
            ),
            (
                r#"{"type":"abilityChange","message":["a",1],"code":-1.5e3}"#,
                Some(EventType::AbilityChange),
            ),
            (
                r#"{"type":"switchStateUpdate","subType":null,"code":null,"counter":-1,"message":{}}"#,
                Some(EventType::SwitchStateUpdate),
            ),
            (
                r#"{"code":70000,"type":"invitationChange","counter":"x"}"#,
                Some(EventType::InvitationChange),
            ),
            (
                r#"{"type":"sphereTokensChanged","subType":false,"code":"401"}"#,
                None,
            ),
            (r#"{"type":"brandNew","counter":1.5}"#, None),
        ];
        for (json, expected) in cases {
            match StreamFrame::parse(json) {
                Ok(StreamFrame::Data {
                    event_type,
                    type_name,
                    json: text,
                }) => {
                    assert_eq!(event_type, expected, "{json}");
                    let sent: serde_json::Value = serde_json::from_str(json).unwrap();
                    assert_eq!(type_name, sent["type"].as_str().unwrap(), "{json}");
                    assert_eq!(&text[..], json.as_bytes());
                }
                other => panic!("{json} should be a data frame, got {other:?}"),
            }
        }
    }

    #[test]
    fn every_sample_event_with_odd_extra_fields_still_parses_as_its_type() {
        for mut event in samples::every_event("sphere-1", "user-1") {
            event["code"] = serde_json::json!("E42");
            event["counter"] = serde_json::json!({"n": 1});
            event["message"] = serde_json::json!(17);
            let json = serde_json::to_string(&event).unwrap();
            let expected: EventType = event["type"].as_str().unwrap().parse().unwrap();
            match StreamFrame::parse(&json).unwrap() {
                StreamFrame::Data {
                    event_type,
                    json: text,
                    ..
                } => {
                    assert_eq!(event_type, Some(expected));
                    assert_eq!(&text[..], json.as_bytes());
                }
                other => panic!("expected a data frame, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_data_event_keeps_the_buffer_it_arrived_in() {
        let data = String::from(r#"{"type":"command","code":"x","sphere":{"id":"s"}}"#);
        let buffer = data.as_ptr();
        match StreamFrame::parse_owned(data).unwrap() {
            StreamFrame::Data { json, .. } => assert_eq!(json.as_ptr(), buffer),
            other => panic!("expected a data frame, got {other:?}"),
        }
    }

    #[test]
    fn ping_and_system_frames_still_need_typed_fields() {
        for bad in [
            r#"{"type":"ping","counter":"1"}"#,
            r#"{"type":"ping","counter":-1}"#,
            r#"{"type":"system","subType":"STREAM_START","code":"200"}"#,
            r#"{"type":"system","subType":5,"code":200}"#,
            r#"{"type":"system","subType":"STREAM_START","code":200,"message":1}"#,
        ] {
            assert!(
                matches!(StreamFrame::parse(bad), Err(FrameError::FieldType { .. })),
                "{bad:?} should be refused for a field's type"
            );
        }
        // Fields a ping or system frame does not use may hold anything.
        assert_eq!(
            StreamFrame::parse(r#"{"type":"ping","counter":3,"code":"x","subType":1}"#).unwrap(),
            StreamFrame::Ping { counter: 3 }
        );
        assert_eq!(
            StreamFrame::parse(
                r#"{"type":"system","subType":"STREAM_START","code":200,"counter":"x","message":"Stream Starting."}"#
            )
            .unwrap(),
            StreamFrame::system(SystemCode::StreamStart)
        );
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for bad in [
            "",
            "not json",
            "[1,2]",
            r#"{"subType":"x"}"#,
            r#"{"type":5}"#,
        ] {
            assert!(StreamFrame::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(matches!(
            StreamFrame::parse(r#"{"type":"system","subType":"TOKEN_EXPIRED"}"#),
            Err(FrameError::MissingField { field: "code", .. })
        ));
    }
}
