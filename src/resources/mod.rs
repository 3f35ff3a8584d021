//! The custom resources: `Listener` and `WebhookUser`, and the CRD YAML generated from them.

mod listener;
mod webhook_user;

pub use listener::{FailureWindow, Listener, ListenerSpec, ListenerStatus, SecretKeyRef};
pub use webhook_user::{Usage, WebhookUser, WebhookUserSpec, WebhookUserStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt;

/// The API group of every resource of this project.
pub const GROUP: &str = "webhooks.crownstone.rocks";
/// The field manager under which the operator writes.
pub const FIELD_MANAGER: &str = "crownstone-webhooks";

/// The condition of the given type in a status's conditions, if set.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Every CRD this project defines.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![WebhookUser::crd(), Listener::crd()]
}

/// The CRDs as one multi-document YAML stream, as checked in under `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crds_match_the_code() {
        let generated = crd_yaml().unwrap();
        let checked_in = include_str!("../../crds/crownstone-webhooks.yaml");
        assert!(
            generated == checked_in,
            "crds/crownstone-webhooks.yaml is stale: run `cargo run -- crdgen > crds/crownstone-webhooks.yaml`"
        );
    }

    #[test]
    fn both_crds_are_namespaced_with_status_and_short_names() {
        for crd in crds() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, "v1alpha1");
            assert!(version.subresources.as_ref().unwrap().status.is_some());
            assert_eq!(crd.spec.names.short_names.as_ref().unwrap().len(), 1);
        }
    }
}
