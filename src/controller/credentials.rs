//! A WebhookUser's credentials: the one place that generates them, and how a changed client
//! secret keeps the one it replaced for an overlap.
//!
//! However the secret changes (the REST facade, or a hand edit of the credentials Secret), the
//! Secret's `clientSecret` differs from its `recordedClientSecret`: the recorded one becomes a
//! previous secret that still signs deliveries until `now + overlap`. The previous secrets and
//! their expiry live in the Secret (`previousSecrets`), so they survive restarts and leader
//! changes. Only the leader writes the record; a standby signs with what it would write.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams};
use rand::RngCore;

use super::{Context, Error};
use crate::conventions::{secret_value, PREVIOUS_SECRETS, RECORDED_CLIENT_SECRET};
use crate::domain::{ClientSecret, PreviousSecret};

/// At most this many previous secrets sign beside the current one; past it the oldest goes.
pub const MAX_PREVIOUS_SECRETS: usize = 3;

/// The field manager of the operator's writes to credentials Secrets.
const FIELD_MANAGER: &str = "crownstone-webhooks-credentials";

/// A WebhookUser's credentials: the API key it calls the REST API with, and the secret sent in
/// (and signing) every delivery.
pub struct Credentials {
    pub api_key: String,
    pub client_secret: String,
}

/// Fresh credentials: 32 random bytes for the API key, 16 for the client secret, both hex, as
/// Crownstone's service issues them.
pub fn generate_credentials() -> Credentials {
    Credentials {
        api_key: random_hex(32),
        client_secret: generate_client_secret(),
    }
}

/// A fresh client secret: 16 random bytes, hex.
pub fn generate_client_secret() -> String {
    random_hex(16)
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    hex::encode(buffer)
}

/// Why (part of) a stored `previousSecrets` was ignored. Says where, never what: the text
/// around the fault may be a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreviousSecretsProblem {
    #[error("it is not a JSON array (line {line}, column {column})")]
    NotAnArray { line: usize, column: usize },
    #[error("entry {index} is not an object")]
    NotAnObject { index: usize },
    #[error("entry {index} has a field other than secret and expiresAt")]
    UnknownField { index: usize },
    #[error("entry {index} has no secret, or an empty one")]
    NoSecret { index: usize },
    #[error("entry {index} has no expiresAt, or one that is not an RFC 3339 time")]
    NoExpiry { index: usize },
}

/// Reads `previousSecrets` strictly: each entry exactly `{"secret": non-empty string,
/// "expiresAt": RFC 3339}`. A bad entry is skipped, and the problems say which.
pub fn parse_previous_secrets(stored: &[u8]) -> (Vec<PreviousSecret>, Vec<PreviousSecretsProblem>) {
    let entries = match serde_json::from_slice::<Vec<serde_json::Value>>(stored) {
        Ok(entries) => entries,
        Err(error) => {
            return (
                Vec::new(),
                vec![PreviousSecretsProblem::NotAnArray {
                    line: error.line(),
                    column: error.column(),
                }],
            )
        }
    };
    let mut previous = Vec::with_capacity(entries.len());
    let mut problems = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        match parse_entry(index, entry) {
            Ok(secret) => previous.push(secret),
            Err(problem) => problems.push(problem),
        }
    }
    (previous, problems)
}

fn parse_entry(
    index: usize,
    entry: &serde_json::Value,
) -> Result<PreviousSecret, PreviousSecretsProblem> {
    let object = entry
        .as_object()
        .ok_or(PreviousSecretsProblem::NotAnObject { index })?;
    if object
        .keys()
        .any(|key| key != "secret" && key != "expiresAt")
    {
        return Err(PreviousSecretsProblem::UnknownField { index });
    }
    let secret = object
        .get("secret")
        .and_then(serde_json::Value::as_str)
        .filter(|secret| !secret.is_empty())
        .ok_or(PreviousSecretsProblem::NoSecret { index })?;
    let expires_at = object
        .get("expiresAt")
        .and_then(serde_json::Value::as_str)
        .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
        .ok_or(PreviousSecretsProblem::NoExpiry { index })?;
    Ok(PreviousSecret::new(secret, expires_at.with_timezone(&Utc)))
}

/// `previousSecrets` as the operator writes it: newest first, times in UTC to the second.
pub fn format_previous_secrets(previous: &[PreviousSecret]) -> String {
    let entries: Vec<serde_json::Value> = previous
        .iter()
        .map(|secret| {
            serde_json::json!({
                "secret": secret.expose(),
                "expiresAt": secret.expires_at().to_rfc3339_opts(SecondsFormat::Secs, true),
            })
        })
        .collect();
    serde_json::Value::from(entries).to_string()
}

/// What a credentials Secret means for signing, and what the leader writes back to it.
pub struct Rotation {
    /// The current secret with the previous ones still live.
    pub client_secret: ClientSecret,
    /// The Secret's keys to rewrite, when what is stored is not the record as it should be: a
    /// change to record, an expired or surplus secret to prune, bad data to drop.
    pub rewrite: Option<BTreeMap<String, ByteString>>,
    /// Problems with the stored `previousSecrets`, for a warning.
    pub problems: Vec<PreviousSecretsProblem>,
}

impl fmt::Debug for Rotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rotation")
            .field("client_secret", &self.client_secret)
            .field("rewrite", &self.rewrite.as_ref().map(|_| "<redacted>"))
            .field("problems", &self.problems)
            .finish()
    }
}

/// Works out the live secrets from what a credentials Secret holds: the `current` secret, the
/// one last `recorded` as current, the `stored` previous secrets. A current secret that differs
/// from the recorded one replaced it now, so the recorded one stays live for `overlap`.
pub fn observe_rotation(
    current: &str,
    recorded: Option<&str>,
    stored: Option<&[u8]>,
    now: DateTime<Utc>,
    overlap: Duration,
) -> Rotation {
    let (mut previous, problems) = match stored {
        Some(stored) => parse_previous_secrets(stored),
        None => (Vec::new(), Vec::new()),
    };
    if let Some(replaced) = recorded.filter(|recorded| *recorded != current) {
        let overlap = TimeDelta::from_std(overlap).unwrap_or(TimeDelta::MAX);
        let expires_at = now
            .checked_add_signed(overlap)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        // Whole seconds, as it is stored: what signs now is what a restart reads back.
        let expires_at = DateTime::from_timestamp(expires_at.timestamp(), 0).unwrap_or(expires_at);
        previous.insert(0, PreviousSecret::new(replaced, expires_at));
    }
    // Newest first; a secret listed twice (or the current one again) signs once, as the newest.
    previous.sort_by_key(|secret| std::cmp::Reverse(secret.expires_at()));
    let mut live: Vec<PreviousSecret> = Vec::with_capacity(MAX_PREVIOUS_SECRETS);
    for secret in previous {
        if secret.expires_at() > now
            && secret.expose() != current
            && !live.iter().any(|kept| kept.expose() == secret.expose())
            && live.len() < MAX_PREVIOUS_SECRETS
        {
            live.push(secret);
        }
    }
    let formatted = format_previous_secrets(&live);
    let stored_same = match stored {
        Some(stored) => stored == formatted.as_bytes(),
        None => live.is_empty(),
    };
    let rewrite = (recorded != Some(current) || !stored_same).then(|| {
        BTreeMap::from([
            (
                RECORDED_CLIENT_SECRET.to_owned(),
                ByteString(current.as_bytes().to_vec()),
            ),
            (
                PREVIOUS_SECRETS.to_owned(),
                ByteString(formatted.into_bytes()),
            ),
        ])
    });
    Rotation {
        client_secret: ClientSecret::with_previous(current, live),
        rewrite,
        problems,
    }
}

/// The live secrets of a managed credentials Secret with its `current` client secret; the
/// leader records a change and prunes what expired. Never logs a secret.
pub(super) async fn observe_credentials(
    existing: &Secret,
    current: &str,
    user: &str,
    namespace: &str,
    ctx: &Context,
) -> Result<Rotation, Error> {
    let name = existing.metadata.name.as_deref().unwrap_or_default();
    let rotation = observe_rotation(
        current,
        secret_value(existing, RECORDED_CLIENT_SECRET).as_deref(),
        existing
            .data
            .as_ref()
            .and_then(|data| data.get(PREVIOUS_SECRETS))
            .map(|stored| stored.0.as_slice()),
        ctx.clock.now(),
        ctx.secret_rotation_overlap,
    );
    for problem in &rotation.problems {
        tracing::warn!(namespace, user, secret = %name, %problem, "Ignored part of {PREVIOUS_SECRETS} in a credentials Secret; those secrets sign nothing.");
    }
    let Some(rewrite) = rotation.rewrite.as_ref().filter(|_| ctx.may_write()) else {
        return Ok(rotation);
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    // Only over the version read: a change made meanwhile is judged by the next reconcile.
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": existing.metadata.resource_version },
        "data": rewrite,
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let written = secrets.patch(name, &params, &Patch::Merge(&patch)).await?;
    ctx.secrets.put(written);
    if secret_value(existing, RECORDED_CLIENT_SECRET).is_some_and(|recorded| recorded != current) {
        tracing::info!(namespace, user, secret = %name, overlap = %humantime::format_duration(ctx.secret_rotation_overlap), "The client secret changed; the previous one signs beside it until the overlap ends.");
    }
    Ok(rotation)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn now() -> DateTime<Utc> {
        at("2026-01-01T12:00:00.250Z")
    }

    fn live(rotation: &Rotation) -> Vec<(&str, DateTime<Utc>)> {
        rotation
            .client_secret
            .previous()
            .iter()
            .map(|secret| (secret.expose(), secret.expires_at()))
            .collect()
    }

    fn written(rotation: &Rotation, key: &str) -> String {
        let rewrite = rotation.rewrite.as_ref().expect("a rewrite");
        String::from_utf8(rewrite[key].0.clone()).unwrap()
    }

    #[test]
    fn credentials_have_the_upstream_shape_and_differ() {
        let a = generate_credentials();
        let b = generate_credentials();
        assert_eq!(a.api_key.len(), 64);
        assert_eq!(a.client_secret.len(), 32);
        assert!(a.api_key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.api_key, b.api_key);
        assert_ne!(a.client_secret, b.client_secret);
        assert_eq!(generate_client_secret().len(), 32);
        assert_ne!(generate_client_secret(), generate_client_secret());
    }

    #[test]
    fn a_changed_secret_keeps_the_recorded_one_for_the_overlap() {
        let rotation = observe_rotation("new", Some("old"), None, now(), 24 * HOUR);
        assert_eq!(rotation.client_secret.expose(), "new");
        assert_eq!(live(&rotation), [("old", at("2026-01-02T12:00:00Z"))]);
        assert_eq!(written(&rotation, RECORDED_CLIENT_SECRET), "new");
        assert_eq!(
            written(&rotation, PREVIOUS_SECRETS),
            r#"[{"expiresAt":"2026-01-02T12:00:00Z","secret":"old"}]"#
        );
    }

    #[test]
    fn what_was_written_is_read_back_unchanged() {
        let first = observe_rotation("new", Some("old"), None, now(), 24 * HOUR);
        let stored = written(&first, PREVIOUS_SECRETS);
        let again = observe_rotation(
            "new",
            Some("new"),
            Some(stored.as_bytes()),
            now() + TimeDelta::hours(1),
            24 * HOUR,
        );
        assert!(again.rewrite.is_none(), "{again:?}");
        assert_eq!(live(&again), live(&first));
        // A Secret the operator just made, with nothing replaced, needs no write either.
        assert!(observe_rotation("s", Some("s"), None, now(), HOUR)
            .rewrite
            .is_none());
    }

    #[test]
    fn a_secret_without_a_record_is_recorded_without_a_previous_one() {
        let rotation = observe_rotation("current", None, None, now(), HOUR);
        assert!(live(&rotation).is_empty());
        assert_eq!(written(&rotation, RECORDED_CLIENT_SECRET), "current");
        assert_eq!(written(&rotation, PREVIOUS_SECRETS), "[]");
    }

    #[test]
    fn expired_secrets_are_pruned_and_the_oldest_go_past_the_limit() {
        let stored = br#"[
            {"secret":"a","expiresAt":"2026-01-01T13:00:00Z"},
            {"secret":"b","expiresAt":"2026-01-01T12:00:00Z"},
            {"secret":"c","expiresAt":"2026-01-01T14:00:00+02:00"},
            {"secret":"d","expiresAt":"2026-01-01T12:30:00Z"}
        ]"#;
        // "b" expires exactly now; "c" is 12:00 UTC too.
        let rotation = observe_rotation("current", Some("current"), Some(stored), now(), HOUR);
        assert_eq!(
            live(&rotation),
            [
                ("a", at("2026-01-01T13:00:00Z")),
                ("d", at("2026-01-01T12:30:00Z"))
            ]
        );
        assert_eq!(
            written(&rotation, PREVIOUS_SECRETS),
            r#"[{"expiresAt":"2026-01-01T13:00:00Z","secret":"a"},{"expiresAt":"2026-01-01T12:30:00Z","secret":"d"}]"#
        );
        // Two more rotations: four would be live, and the one expiring first goes.
        let stored = written(&rotation, PREVIOUS_SECRETS);
        let next = observe_rotation(
            "newer",
            Some("current"),
            Some(stored.as_bytes()),
            now(),
            2 * HOUR,
        );
        let stored = written(&next, PREVIOUS_SECRETS);
        let last = observe_rotation(
            "newest",
            Some("newer"),
            Some(stored.as_bytes()),
            now() + TimeDelta::minutes(1),
            2 * HOUR,
        );
        let names: Vec<&str> = live(&last).into_iter().map(|(s, _)| s).collect();
        assert_eq!(names, ["newer", "current", "a"]);
        assert_eq!(last.client_secret.expose(), "newest");
    }

    #[test]
    fn the_current_secret_and_repeats_are_not_previous_secrets() {
        let stored = br#"[
            {"secret":"x","expiresAt":"2026-01-01T15:00:00Z"},
            {"secret":"now","expiresAt":"2026-01-01T15:00:00Z"},
            {"secret":"x","expiresAt":"2026-01-01T14:00:00Z"}
        ]"#;
        let rotation = observe_rotation("now", Some("now"), Some(stored), now(), HOUR);
        assert_eq!(live(&rotation), [("x", at("2026-01-01T15:00:00Z"))]);
        // Rotating back to a previous secret: it is current, and the replaced one is previous.
        let back = observe_rotation("x", Some("now"), Some(stored), now(), HOUR);
        assert_eq!(back.client_secret.expose(), "x");
        let names: Vec<&str> = live(&back).into_iter().map(|(s, _)| s).collect();
        assert_eq!(names, ["now"]);
    }

    #[test]
    fn a_zero_overlap_keeps_nothing() {
        let rotation = observe_rotation("new", Some("old"), None, now(), Duration::ZERO);
        assert!(live(&rotation).is_empty());
        assert_eq!(written(&rotation, RECORDED_CLIENT_SECRET), "new");
    }

    #[test]
    fn bad_entries_are_skipped_with_a_problem_that_shows_no_secret() {
        let stored = br#"[
            {"secret":"good","expiresAt":"2026-01-01T15:00:00Z"},
            "leaked-1",
            {"secret":"leaked-2","expiresAt":"2026-01-01T15:00:00Z","leaked-3":1},
            {"secret":"","expiresAt":"2026-01-01T15:00:00Z"},
            {"expiresAt":"2026-01-01T15:00:00Z"},
            {"secret":"leaked-4","expiresAt":"tomorrow leaked-5"},
            {"secret":"leaked-6","expiresAt":1767279600},
            {"secret":"leaked-7"}
        ]"#;
        let (previous, problems) = parse_previous_secrets(stored);
        assert_eq!(previous.len(), 1);
        assert_eq!(previous[0].expose(), "good");
        assert_eq!(
            problems,
            [
                PreviousSecretsProblem::NotAnObject { index: 1 },
                PreviousSecretsProblem::UnknownField { index: 2 },
                PreviousSecretsProblem::NoSecret { index: 3 },
                PreviousSecretsProblem::NoSecret { index: 4 },
                PreviousSecretsProblem::NoExpiry { index: 5 },
                PreviousSecretsProblem::NoExpiry { index: 6 },
                PreviousSecretsProblem::NoExpiry { index: 7 },
            ]
        );
        for problem in &problems {
            assert!(!problem.to_string().contains("leaked"), "{problem}");
        }
        // The leader writes back only what is valid.
        let rotation = observe_rotation("current", Some("current"), Some(stored), now(), HOUR);
        assert_eq!(rotation.problems.len(), 7);
        assert_eq!(
            written(&rotation, PREVIOUS_SECRETS),
            r#"[{"expiresAt":"2026-01-01T15:00:00Z","secret":"good"}]"#
        );
        assert!(!format!("{rotation:?}").contains("good"));
    }

    #[test]
    fn data_that_is_not_an_array_is_ignored_whole() {
        for stored in [
            &br#"{"secret":"leaked","expiresAt":"2026-01-01T15:00:00Z"}"#[..],
            b"leaked",
            b"[{\"secret\":\"leaked\"",
            b"",
        ] {
            let (previous, problems) = parse_previous_secrets(stored);
            assert!(previous.is_empty());
            assert!(
                matches!(problems[..], [PreviousSecretsProblem::NotAnArray { .. }]),
                "{problems:?}"
            );
            assert!(!problems[0].to_string().contains("leaked"));
        }
        // A change is still recorded over bad data.
        let rotation = observe_rotation("new", Some("old"), Some(b"leaked"), now(), HOUR);
        let names: Vec<&str> = live(&rotation).into_iter().map(|(s, _)| s).collect();
        assert_eq!(names, ["old"]);
    }
}
