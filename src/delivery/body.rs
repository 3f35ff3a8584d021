//! The webhook body: Crownstone's envelope spliced around the event's raw JSON bytes.

use bytes::Bytes;

/// Everything of a webhook body that comes before the event:
/// `{"clientId":"…","clientSecret":"…","userId":"…","data":`.
///
/// It is built once per target, so a delivery only copies the event bytes and one closing brace.
/// It holds the client secret, so it has no `Debug`.
#[derive(Clone)]
pub struct BodyPrefix(Bytes);

impl BodyPrefix {
    /// Builds the prefix, escaping the three strings as JSON.
    pub fn new(client_id: &str, client_secret: &str, user_id: &str) -> Self {
        let client_id = json_string(client_id);
        let client_secret = json_string(client_secret);
        let user_id = json_string(user_id);
        let mut out =
            Vec::with_capacity(48 + client_id.len() + client_secret.len() + user_id.len());
        out.extend_from_slice(b"{\"clientId\":");
        out.extend_from_slice(client_id.as_bytes());
        out.extend_from_slice(b",\"clientSecret\":");
        out.extend_from_slice(client_secret.as_bytes());
        out.extend_from_slice(b",\"userId\":");
        out.extend_from_slice(user_id.as_bytes());
        out.extend_from_slice(b",\"data\":");
        Self(Bytes::from(out))
    }

    /// Bytes of the prefix.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The full body for one event: the prefix, the event exactly as it arrived, and `}`.
    ///
    /// `event` must be one JSON value (the forwarder hands over a parsed-and-checked frame);
    /// it is not re-serialised, so unknown fields and field order pass through unchanged.
    pub fn assemble(&self, event: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(self.0.len() + event.len() + 1);
        out.extend_from_slice(&self.0);
        out.extend_from_slice(event);
        out.push(b'}');
        Bytes::from(out)
    }
}

/// A string as a JSON string literal, quotes included.
fn json_string(value: &str) -> String {
    // `Value`'s `Display` cannot fail, unlike `serde_json::to_string`'s signature suggests.
    serde_json::Value::from(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_envelope_around_the_raw_event() {
        let prefix = BodyPrefix::new("owner-1", "0123456789abcdef0123456789abcdef", "user-1");
        let event = br#"{"type":"presence","subType":"enterSphere","zeta":1,"alpha":{"b":2,"a":1},"sphere":{"id":"s1","name":"Home","uid":3}}"#;
        let body = prefix.assemble(event);
        let expected = concat!(
            r#"{"clientId":"owner-1","clientSecret":"0123456789abcdef0123456789abcdef","userId":"user-1","data":"#,
            r#"{"type":"presence","subType":"enterSphere","zeta":1,"alpha":{"b":2,"a":1},"sphere":{"id":"s1","name":"Home","uid":3}}"#,
            "}"
        );
        assert_eq!(std::str::from_utf8(&body).ok(), Some(expected));
    }

    #[test]
    fn event_bytes_are_not_reformatted() {
        let prefix = BodyPrefix::new("a", "b", "c");
        // Whitespace, number spelling and unicode escapes survive byte for byte.
        let event = b"{ \"type\" : \"command\", \"n\": 1.50, \"s\": \"\\u00e9\" }";
        let body = prefix.assemble(event);
        assert!(body
            .ends_with(b"\"data\":{ \"type\" : \"command\", \"n\": 1.50, \"s\": \"\\u00e9\" }}"));
    }

    #[test]
    fn strings_are_escaped() {
        let prefix = BodyPrefix::new("quote\"back\\slash", "line\nbreak", "tab\there\u{1}");
        let body = prefix.assemble(b"null");
        let parsed: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(value) => value,
            Err(error) => panic!("body is not JSON: {error}"),
        };
        assert_eq!(parsed["clientId"], "quote\"back\\slash");
        assert_eq!(parsed["clientSecret"], "line\nbreak");
        assert_eq!(parsed["userId"], "tab\there\u{1}");
        assert_eq!(parsed["data"], serde_json::Value::Null);
    }
}
