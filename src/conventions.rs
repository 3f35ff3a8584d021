//! What every writer and reader of the operator's Kubernetes objects agrees on: the labels,
//! annotations, Secret names and keys that mark an object as the operator's and say whom it
//! belongs to, and one readable description of an API server error. The controller, the REST
//! facade and the leader election all import it; it imports nothing of theirs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;

/// Label on every object the operator created, and the mark that lets it delete or rewrite a
/// Secret: a token Secret carrying it is deleted with the last Listener that names it. A Secret
/// without it is only ever read.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "crownstone-webhooks");
/// Annotation on a credentials Secret naming the WebhookUser it belongs to. An annotation, not a
/// label: WebhookUser names may be longer than a label value may be.
pub const USER_ANNOTATION: &str = "webhooks.crownstone.rocks/webhookuser";
/// Annotation on a token Secret the REST facade made, naming the Listener it was made for.
pub const LISTENER_ANNOTATION: &str = "webhooks.crownstone.rocks/listener";

/// Secret key holding a WebhookUser's API key.
pub const API_KEY: &str = "apiKey";
/// Secret key holding a WebhookUser's client secret.
pub const CLIENT_SECRET: &str = "clientSecret";
/// Secret key holding the client secrets a WebhookUser's current one replaced, still signing
/// until each expires: JSON `[{"secret": "…", "expiresAt": "RFC 3339"}]`, newest first.
pub const PREVIOUS_SECRETS: &str = "previousSecrets";
/// Secret key holding the client secret the operator last saw as current: when `clientSecret`
/// differs from it, the secret was changed and this one becomes a previous secret.
pub const RECORDED_CLIENT_SECRET: &str = "recordedClientSecret";
/// The Secret key of the facade's token Secrets.
pub const TOKEN_KEY: &str = "token";

const CREDENTIALS_SUFFIX: &str = "-credentials";

/// The longest message the operator copies into a condition, `lastError`, an Event or an error
/// answer: text that comes from outside (an event server, a receiver, the API server) never
/// grows them without bound.
pub const MAX_MESSAGE_CHARS: usize = 256;

/// The labels that mark an object as the operator's: `{MANAGED_BY}`.
pub fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())])
}

/// Whether the operator created, or was explicitly given, this object.
pub fn is_managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|labels| labels.get(MANAGED_BY.0))
        .is_some_and(|value| value == MANAGED_BY.1)
}

/// The WebhookUser a credentials Secret says it belongs to.
pub fn credentials_owner(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(USER_ANNOTATION)
        .map(String::as_str)
}

/// The Listener a token Secret says it was made for.
pub fn token_secret_listener(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(LISTENER_ANNOTATION)
        .map(String::as_str)
}

/// Whether `secret` is a token Secret the operator made for Listener `listener`: managed, and
/// annotated with that Listener. Only such a Secret's value is ever shown through the REST API;
/// any other Secret a Listener names may be a tenant's, and is only read to stream with.
pub fn is_managed_token_secret_of(secret: &Secret, listener: &str) -> bool {
    is_managed(&secret.metadata)
        && credentials_owner(&secret.metadata).is_none()
        && token_secret_listener(&secret.metadata) == Some(listener)
}

/// The name of a WebhookUser's credentials Secret.
pub fn credentials_secret_name(user: &str) -> String {
    format!("{user}{CREDENTIALS_SUFFIX}")
}

/// The WebhookUser whose credentials Secret this could be, by its name.
pub fn user_of_credentials_secret(secret: &str) -> Option<&str> {
    secret
        .strip_suffix(CREDENTIALS_SUFFIX)
        .filter(|user| !user.is_empty())
}

/// A non-empty UTF-8 value of a Secret key, trimmed.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    let value = std::str::from_utf8(&bytes.0).ok()?.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// One readable sentence for a Kubernetes API error: what the server said, not a struct dump.
pub fn describe_kube_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            let message = if status.message.is_empty() {
                "no message"
            } else {
                &status.message
            };
            format!(
                "the API server answered {} ({}): {}",
                status.code,
                if status.reason.is_empty() {
                    "no reason"
                } else {
                    &status.reason
                },
                cap_message(message)
            )
        }
        other => cap_message(&other.to_string()),
    }
}

/// Text from outside, cut to [`MAX_MESSAGE_CHARS`] characters on a character boundary.
pub fn cap_message(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Secret {
        let map = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            )
        };
        Secret {
            metadata: ObjectMeta {
                labels: map(labels),
                annotations: map(annotations),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    #[test]
    fn only_the_managed_by_label_makes_a_secret_managed() {
        assert!(!is_managed(&ObjectMeta::default()));
        assert!(!is_managed(
            &secret(&[(MANAGED_BY.0, "someone-else")], &[]).metadata
        ));
        assert!(is_managed(&secret(&[MANAGED_BY], &[]).metadata));
    }

    #[test]
    fn a_token_secret_is_shown_only_with_both_the_label_and_its_listener() {
        let bound = secret(&[MANAGED_BY], &[(LISTENER_ANNOTATION, "l-1")]);
        assert!(is_managed_token_secret_of(&bound, "l-1"));
        // Another Listener's Secret, an unlabelled one, one without the annotation, and a
        // credentials Secret are never shown.
        assert!(!is_managed_token_secret_of(&bound, "l-2"));
        assert!(!is_managed_token_secret_of(
            &secret(&[], &[(LISTENER_ANNOTATION, "l-1")]),
            "l-1"
        ));
        assert!(!is_managed_token_secret_of(
            &secret(&[MANAGED_BY], &[]),
            "l-1"
        ));
        assert!(!is_managed_token_secret_of(
            &secret(
                &[MANAGED_BY],
                &[(LISTENER_ANNOTATION, "l-1"), (USER_ANNOTATION, "acme")]
            ),
            "l-1"
        ));
    }

    #[test]
    fn credentials_secret_names_round_trip() {
        assert_eq!(credentials_secret_name("acme"), "acme-credentials");
        assert_eq!(user_of_credentials_secret("acme-credentials"), Some("acme"));
        assert_eq!(user_of_credentials_secret("-credentials"), None);
        assert_eq!(user_of_credentials_secret("acme-token"), None);
    }

    #[test]
    fn secret_values_are_trimmed_utf8_and_never_empty() {
        let s = Secret {
            data: Some(BTreeMap::from([
                ("a".to_owned(), ByteString(b" value\n".to_vec())),
                ("b".to_owned(), ByteString(b"  ".to_vec())),
                ("c".to_owned(), ByteString(vec![0xff])),
            ])),
            ..Secret::default()
        };
        assert_eq!(secret_value(&s, "a").as_deref(), Some("value"));
        assert_eq!(secret_value(&s, "b"), None);
        assert_eq!(secret_value(&s, "c"), None);
        assert_eq!(secret_value(&s, "missing"), None);
    }

    #[test]
    fn messages_from_outside_are_capped() {
        assert_eq!(cap_message("short"), "short");
        let long = "é".repeat(1000);
        let capped = cap_message(&long);
        assert_eq!(capped.chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
