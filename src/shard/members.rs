//! Membership through Leases: each replica keeps its own member Lease renewed in the operator's
//! namespace, and the live members are the Leases renewed within their duration. Liveness is
//! judged as the leader election judges its Lease, by this process's own clock: a Lease is live
//! until a whole duration has passed since this process first saw its current renewal, so clock
//! skew between nodes does not matter.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::conventions::{describe_kube_error, MANAGED_BY};
use crate::handover::peer::ADDRESS_ANNOTATION;

/// The label that tells member Leases from the leader Lease and anything else.
pub const COMPONENT: (&str, &str) = ("app.kubernetes.io/component", "member");

/// The field manager of member Lease writes.
const FIELD_MANAGER: &str = "crownstone-webhooks-member";

/// Failures of the member Lease calls. Lease names, identities and addresses are not secret.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    /// The Lease holds its duration in whole seconds.
    #[error(
        "the member lease duration ({0:?}) must be a whole number of seconds, from 1 s to 68 years"
    )]
    WholeSeconds(Duration),
    #[error("a member identity must not be empty")]
    EmptyIdentity,
    #[error("member lease prefix {0:?} is not a DNS subdomain of at most 200 characters")]
    Prefix(String),
    #[error("could not {action} member lease {name}: {message}")]
    Api {
        action: &'static str,
        name: String,
        message: String,
    },
    #[error("could not list member leases: {0}")]
    List(String),
}

/// The number a process starts with, new on every start: progress records of an earlier run
/// of the same identity are told apart by it.
pub const TERM_ANNOTATION: &str = "webhooks.crownstone.rocks/shard-term";
/// The view whose streams this member has open.
pub const WARM_ANNOTATION: &str = "webhooks.crownstone.rocks/shard-warm";
/// The view this member serves: it routes nothing it does not own in it.
pub const SERVING_ANNOTATION: &str = "webhooks.crownstone.rocks/shard-serving";
/// `true` while this member shuts down: it owns nothing in any new view.
pub const LEAVING_ANNOTATION: &str = "webhooks.crownstone.rocks/shard-leaving";

/// A live member as its Lease names it. Annotations it did not write, or wrote malformed,
/// read as absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub identity: String,
    /// Where it serves the handover, if it said.
    pub address: Option<String>,
    /// Its process's term.
    pub term: Option<i32>,
    /// The view whose streams it has open.
    pub warm: Option<String>,
    /// The view it serves.
    pub serving: Option<String>,
    /// It shuts down.
    pub leaving: bool,
}

impl Member {
    fn from_annotations(identity: String, mut annotations: BTreeMap<String, String>) -> Self {
        // A view id is short hex; anything else is no view this replica could agree with.
        let mut view = |key: &str| {
            annotations.remove(key).filter(|v| {
                !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit())
            })
        };
        let warm = view(WARM_ANNOTATION);
        let serving = view(SERVING_ANNOTATION);
        Member {
            identity,
            address: annotations
                .remove(ADDRESS_ANNOTATION)
                .filter(|a| !a.is_empty()),
            term: annotations
                .get(TERM_ANNOTATION)
                .and_then(|t| t.parse().ok()),
            warm,
            serving,
            leaving: annotations.get(LEAVING_ANNOTATION).map(String::as_str) == Some("true"),
        }
    }
}

/// What this process last saw of one Lease, and when, by its own clock.
struct Observed {
    record: (String, MicroTime),
    at: Instant,
}

/// One replica's own member Lease, and its view of the others'.
pub struct Members {
    api: Api<Lease>,
    prefix: String,
    name: String,
    identity: String,
    duration: Duration,
    /// What this member says in its Lease's annotations, written with every renewal.
    annotations: Mutex<BTreeMap<String, String>>,
    observed: Mutex<HashMap<String, Observed>>,
}

/// The Lease name of a member: `<prefix>-member-` and the first 16 hex digits of the SHA-256 of
/// its identity, so any identity makes a valid name.
pub fn lease_name(prefix: &str, identity: &str) -> String {
    let hash = Sha256::digest(identity.as_bytes());
    format!("{prefix}-member-{}", hex::encode(&hash[..8]))
}

fn valid_prefix(prefix: &str) -> bool {
    // Room for `-member-` and 16 hex digits within a name's 253 characters.
    !prefix.is_empty()
        && prefix.len() <= 200
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && prefix.starts_with(|c: char| c.is_ascii_alphanumeric())
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Members {
    /// Membership through Leases named after `prefix` in `namespace`, this replica taking part
    /// as `identity` with Leases of `duration`, telling the others its handover `address`.
    pub fn new(
        client: Client,
        namespace: &str,
        prefix: &str,
        identity: String,
        duration: Duration,
        address: Option<String>,
    ) -> Result<Self, MembersError> {
        if duration.subsec_nanos() != 0
            || duration.as_secs() == 0
            || i32::try_from(duration.as_secs()).is_err()
        {
            return Err(MembersError::WholeSeconds(duration));
        }
        if identity.is_empty() {
            return Err(MembersError::EmptyIdentity);
        }
        if !valid_prefix(prefix) {
            return Err(MembersError::Prefix(prefix.to_owned()));
        }
        Ok(Members {
            api: Api::namespaced(client, namespace),
            prefix: prefix.to_owned(),
            name: lease_name(prefix, &identity),
            identity,
            duration,
            annotations: Mutex::new(
                address
                    .map(|address| BTreeMap::from([(ADDRESS_ANNOTATION.to_owned(), address)]))
                    .unwrap_or_default(),
            ),
            observed: Mutex::new(HashMap::new()),
        })
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Says `key: value` in this replica's Lease from the next renewal on.
    pub fn set_annotation(&self, key: &str, value: impl Into<String>) {
        self.annotations.lock().insert(key.to_owned(), value.into());
    }

    /// The name of this replica's own Lease.
    pub fn lease_name(&self) -> &str {
        &self.name
    }

    /// Creates this replica's Lease, or renews it: one server-side apply, so no read first and
    /// no conflict with a concurrent edit of other fields.
    pub async fn renew(&self) -> Result<(), MembersError> {
        let mut labels = BTreeMap::from([(COMPONENT.0.to_owned(), COMPONENT.1.to_owned())]);
        labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
        let annotations = Some(self.annotations.lock().clone()).filter(|a| !a.is_empty());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(labels),
                annotations,
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                // Whole seconds that fit, as `new` made sure.
                lease_duration_seconds: Some(
                    i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
                ),
                renew_time: Some(now()),
                ..LeaseSpec::default()
            }),
        };
        // Apply needs the kind and version in the body.
        let mut body = serde_json::to_value(&lease).map_err(|error| MembersError::Api {
            action: "encode",
            name: self.name.clone(),
            message: error.to_string(),
        })?;
        body["apiVersion"] = "coordination.k8s.io/v1".into();
        body["kind"] = "Lease".into();
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(|error| MembersError::Api {
                action: "renew",
                name: self.name.clone(),
                message: describe_kube_error(&error),
            })?;
        Ok(())
    }

    /// The live members, this replica among them while it renews, sorted by identity. A Lease
    /// this process sees for the first time counts as live for one duration, even one left by a
    /// replica that died long ago: this process cannot tell that without trusting other clocks.
    pub async fn live(&self) -> Result<Vec<Member>, MembersError> {
        let selector = format!(
            "{}={},{}={}",
            COMPONENT.0, COMPONENT.1, MANAGED_BY.0, MANAGED_BY.1
        );
        let leases = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|error| MembersError::List(describe_kube_error(&error)))?;
        let ours = format!("{}-member-", self.prefix);
        let mut observed = self.observed.lock();
        let mut seen = HashMap::with_capacity(leases.items.len());
        let mut members = BTreeMap::new();
        for lease in leases.items {
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            // Another installation's members in the same namespace.
            if !name.starts_with(&ours) {
                continue;
            }
            let spec = lease.spec.unwrap_or_default();
            let (Some(identity), Some(renewed)) = (
                spec.holder_identity.filter(|identity| !identity.is_empty()),
                spec.renew_time,
            ) else {
                continue;
            };
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.duration, Duration::from_secs);
            let record = (identity.clone(), renewed);
            let at = match observed.remove(&name) {
                Some(last) if last.record == record => last.at,
                _ => Instant::now(),
            };
            if at.elapsed() < duration {
                let annotations = lease.metadata.annotations.unwrap_or_default();
                members.insert(
                    identity.clone(),
                    Member::from_annotations(identity.clone(), annotations),
                );
            }
            seen.insert(name, Observed { record, at });
        }
        // Leases gone from the list are forgotten.
        *observed = seen;
        Ok(members.into_values().collect())
    }

    /// Deletes this replica's Lease, so the others drop it at once instead of after its duration.
    /// A Lease already gone is no failure.
    pub async fn release(&self) -> Result<(), MembersError> {
        match self.api.delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(MembersError::Api {
                action: "delete",
                name: self.name.clone(),
                message: describe_kube_error(&error),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(prefix: &str, identity: &str, duration: Duration) -> Result<Members, MembersError> {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        Members::new(client, "ns", prefix, identity.to_owned(), duration, None)
    }

    #[test]
    fn lease_names_are_the_prefix_and_a_hash_of_the_identity() {
        let name = lease_name("crownstone-webhooks", "pod-a-0000abcd");
        assert!(name.starts_with("crownstone-webhooks-member-"));
        assert_eq!(name.len(), "crownstone-webhooks-member-".len() + 16);
        assert_eq!(name, lease_name("crownstone-webhooks", "pod-a-0000abcd"));
        assert_ne!(name, lease_name("crownstone-webhooks", "pod-b-0000abcd"));
        // Identities that are no valid name still make one.
        let odd = lease_name("p", "Pod_A/ü");
        assert!(odd[2..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }

    #[tokio::test]
    async fn bad_settings_are_refused() {
        let second = Duration::from_secs(1);
        assert!(matches!(
            members("p", "a", Duration::from_millis(1500)),
            Err(MembersError::WholeSeconds(_))
        ));
        assert!(matches!(
            members("p", "a", Duration::ZERO),
            Err(MembersError::WholeSeconds(_))
        ));
        assert!(matches!(
            members("p", "", second),
            Err(MembersError::EmptyIdentity)
        ));
        for prefix in ["", "Upper", "-dash", "under_score", &"x".repeat(201)] {
            assert!(
                matches!(members(prefix, "a", second), Err(MembersError::Prefix(_))),
                "{prefix:?}"
            );
        }
        let ok = members("crownstone-webhooks", "a", second).unwrap();
        assert_eq!(ok.lease_name(), lease_name("crownstone-webhooks", "a"));
    }
}
