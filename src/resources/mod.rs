//! The custom resources: `Listener` and `WebhookUser`, and the CRD YAML generated from them.

mod delivery;
mod listener;
mod webhook_user;

pub use delivery::{
    resource_overrides, BackoffPolicy, DeadLetterSink, DeliverySpec, DeliverySpecError,
    EffectiveDelivery, ServiceReference, SinkError,
};
pub use listener::{FailureWindow, Listener, ListenerSpec, ListenerStatus, SecretKeyRef};
pub use webhook_user::{Usage, WebhookUser, WebhookUserSpec, WebhookUserStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt;

/// The API group of every resource of this project.
pub const GROUP: &str = "webhooks.crownstone.rocks";
/// The field manager under which the operator writes.
pub const FIELD_MANAGER: &str = "crownstone-webhooks";

/// The annotation `kubectl apply` keeps a whole copy of the object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what an object carries for the API server's bookkeeping and nothing here reads: its
/// managed fields and kubectl's last-applied copy. Caches keep thousands of objects; these two
/// are most of each one's size.
pub fn strip_bookkeeping<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

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
    fn bookkeeping_is_stripped_and_everything_else_kept() {
        use k8s_openapi::api::core::v1::Secret;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
        let mut object = Secret::default();
        let meta = &mut object.metadata;
        meta.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        meta.annotations = Some(
            [
                (LAST_APPLIED.to_owned(), "{...}".to_owned()),
                ("team".to_owned(), "a".to_owned()),
            ]
            .into(),
        );
        meta.labels = Some([("app".to_owned(), "x".to_owned())].into());
        strip_bookkeeping(&mut object);
        let meta = &object.metadata;
        assert!(meta.managed_fields.is_none());
        assert_eq!(
            meta.annotations,
            Some([("team".to_owned(), "a".to_owned())].into())
        );
        assert_eq!(
            meta.labels,
            Some([("app".to_owned(), "x".to_owned())].into())
        );

        let mut only_last_applied = Secret::default();
        only_last_applied.metadata.annotations =
            Some([(LAST_APPLIED.to_owned(), "{}".to_owned())].into());
        strip_bookkeeping(&mut only_last_applied);
        assert!(only_last_applied.metadata.annotations.is_none());
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
