//! The chart's RBAC on a real API server, for every combination of values that changes it:
//! rendered, applied, and asked with `kubectl auth can-i` as the chart's ServiceAccount what it
//! may and may not do, namespace by namespace.

use std::process::Command;

use crate::chart::{apply, render};
use crate::support::cluster::{control_plane, TestNamespace};

const LISTENERS: &str = "listeners.webhooks.crownstone.rocks";
const USERS: &str = "webhookusers.webhooks.crownstone.rocks";
const SECRETS: &str = "secrets";
const LEASES: &str = "leases.coordination.k8s.io";
const EVENTS: &str = "events.events.k8s.io";
const OUR_CRD: &str =
    "customresourcedefinitions.apiextensions.k8s.io/listeners.webhooks.crownstone.rocks";
const OTHER_CRD: &str =
    "customresourcedefinitions.apiextensions.k8s.io/servicemonitors.monitoring.coreos.com";

/// One release of the chart whose ServiceAccount is asked.
struct Release<'a> {
    name: String,
    namespace: &'a str,
    kubeconfig: &'a std::path::Path,
}

/// Where a question is asked: a namespace, or every namespace at once.
#[derive(Clone, Copy)]
enum In<'a> {
    Ns(&'a str),
    All,
}

impl Release<'_> {
    /// Whether the ServiceAccount may `verb` `resource` (`resource/name` for one object;
    /// `subresource` such as `status`).
    fn can(&self, verb: &str, resource: &str, subresource: Option<&str>, at: In<'_>) -> bool {
        let mut command = Command::new(&control_plane().kubectl);
        command
            .arg("--kubeconfig")
            .arg(self.kubeconfig)
            .args(["auth", "can-i", verb, resource])
            .arg(format!(
                "--as=system:serviceaccount:{}:{}",
                self.namespace, self.name
            ));
        match at {
            In::Ns(namespace) => command.args(["-n", namespace]),
            In::All => command.arg("--all-namespaces"),
        };
        if let Some(subresource) = subresource {
            command.arg(format!("--subresource={subresource}"));
        }
        let output = command.output().expect("kubectl runs");
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        match answer.as_str() {
            "yes" => true,
            "no" => false,
            _ => panic!(
                "kubectl auth can-i {verb} {resource}: {answer} {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    /// Asserts every `(verb, resource, subresource, where, allowed)` and reports all that differ.
    fn expect(&self, mode: &str, cases: &[(&str, &str, Option<&str>, In<'_>, bool)]) {
        let wrong: Vec<String> = cases
            .iter()
            .filter(|(verb, resource, sub, at, allowed)| {
                self.can(verb, resource, *sub, *at) != *allowed
            })
            .map(|(verb, resource, sub, at, allowed)| {
                let at = match at {
                    In::Ns(namespace) => format!("-n {namespace}"),
                    In::All => "--all-namespaces".to_owned(),
                };
                let sub = sub
                    .map(|s| format!(" --subresource={s}"))
                    .unwrap_or_default();
                let should = if *allowed { "allowed" } else { "refused" };
                format!("{verb} {resource}{sub} {at} should be {should}")
            })
            .collect();
        assert!(wrong.is_empty(), "{mode}:\n{}", wrong.join("\n"));
    }
}

/// What no mode may ever grant: Secret writes in kube-system, and `update` of anything but the
/// Lease, which no code path uses.
fn never<'a>(ns: &'a str) -> Vec<(&'a str, &'a str, Option<&'a str>, In<'a>, bool)> {
    vec![
        ("create", SECRETS, None, In::Ns("kube-system"), false),
        ("delete", SECRETS, None, In::Ns("kube-system"), false),
        ("patch", SECRETS, None, In::Ns("kube-system"), false),
        ("update", SECRETS, None, In::Ns(ns), false),
        ("update", LISTENERS, None, In::Ns(ns), false),
        ("update", USERS, None, In::Ns(ns), false),
        ("update", LISTENERS, Some("status"), In::Ns(ns), false),
        ("update", USERS, Some("status"), In::Ns(ns), false),
        ("deletecollection", SECRETS, None, In::Ns(ns), false),
        ("create", SECRETS, None, In::All, false),
        ("get", OTHER_CRD, None, In::All, false),
        ("get", OUR_CRD, None, In::All, true),
    ]
}

/// What the controller needs in a namespace it watches (and whether it is allowed there).
fn watched<'a>(
    ns: &'a str,
    allowed: bool,
) -> Vec<(&'a str, &'a str, Option<&'a str>, In<'a>, bool)> {
    vec![
        ("list", LISTENERS, None, In::Ns(ns), allowed),
        ("watch", LISTENERS, None, In::Ns(ns), allowed),
        ("patch", LISTENERS, None, In::Ns(ns), allowed),
        ("delete", LISTENERS, None, In::Ns(ns), allowed),
        ("list", USERS, None, In::Ns(ns), allowed),
        ("watch", USERS, None, In::Ns(ns), allowed),
        ("patch", USERS, None, In::Ns(ns), allowed),
        ("patch", LISTENERS, Some("status"), In::Ns(ns), allowed),
        ("patch", USERS, Some("status"), In::Ns(ns), allowed),
        ("get", SECRETS, None, In::Ns(ns), allowed),
        ("list", SECRETS, None, In::Ns(ns), allowed),
        ("watch", SECRETS, None, In::Ns(ns), allowed),
        ("create", EVENTS, None, In::Ns(ns), allowed),
        ("patch", EVENTS, None, In::Ns(ns), allowed),
    ]
}

/// Secret writes of the controller (credentials, and the facade's token Secrets) in a namespace.
fn secret_writes<'a>(
    ns: &'a str,
    allowed: bool,
) -> Vec<(&'a str, &'a str, Option<&'a str>, In<'a>, bool)> {
    vec![
        ("create", SECRETS, None, In::Ns(ns), allowed),
        ("patch", SECRETS, None, In::Ns(ns), allowed),
        ("delete", SECRETS, None, In::Ns(ns), allowed),
    ]
}

/// What only the REST API does, in its namespace.
fn api_only<'a>(
    ns: &'a str,
    allowed: bool,
) -> Vec<(&'a str, &'a str, Option<&'a str>, In<'a>, bool)> {
    vec![
        ("create", LISTENERS, None, In::Ns(ns), allowed),
        ("get", LISTENERS, None, In::Ns(ns), allowed),
        ("create", USERS, None, In::Ns(ns), allowed),
        ("delete", USERS, None, In::Ns(ns), allowed),
    ]
}

/// Lease access: only the release's own Lease, by name, plus create.
fn lease<'a>(
    release_ns: &'a str,
    own: &'a str,
    allowed: bool,
) -> Vec<(&'a str, &'a str, Option<&'a str>, In<'a>, bool)> {
    vec![
        ("get", own, None, In::Ns(release_ns), allowed),
        ("update", own, None, In::Ns(release_ns), allowed),
        ("create", LEASES, None, In::Ns(release_ns), allowed),
        (
            "get",
            "leases.coordination.k8s.io/kube-controller-manager",
            None,
            In::Ns(release_ns),
            false,
        ),
        (
            "update",
            "leases.coordination.k8s.io/another",
            None,
            In::Ns(release_ns),
            false,
        ),
        ("list", LEASES, None, In::Ns(release_ns), false),
        ("delete", own, None, In::Ns(release_ns), false),
        ("delete", LEASES, None, In::Ns(release_ns), false),
        ("patch", own, None, In::Ns(release_ns), false),
        ("get", own, None, In::Ns("kube-system"), false),
    ]
}

/// Lease access with sharding: the leader's Lease as above, and every Lease of the release
/// namespace for the member Leases, whose hashed names no rule can list; nothing elsewhere.
fn member_leases<'a>(
    release_ns: &'a str,
    own: &'a str,
    member: &'a str,
    other: &'a str,
) -> Vec<(&'a str, &'a str, Option<&'a str>, In<'a>, bool)> {
    let mut cases = vec![
        ("get", own, None, In::Ns(release_ns), true),
        ("update", own, None, In::Ns(release_ns), true),
        ("get", member, None, In::Ns(release_ns), true),
        ("patch", member, None, In::Ns(release_ns), true),
        ("delete", member, None, In::Ns(release_ns), true),
        // Members are applied, listed and deleted, never updated, watched or deleted in bulk.
        ("update", member, None, In::Ns(release_ns), false),
        ("watch", LEASES, None, In::Ns(release_ns), false),
        ("deletecollection", LEASES, None, In::Ns(release_ns), false),
        ("list", LEASES, None, In::All, false),
    ];
    for verb in ["get", "list", "create", "patch", "delete"] {
        cases.push((verb, LEASES, None, In::Ns(release_ns), true));
        cases.push((verb, LEASES, None, In::Ns(other), false));
        cases.push((verb, LEASES, None, In::Ns("kube-system"), false));
    }
    cases
}

fn delete_cluster_objects(kubeconfig: &std::path::Path, release: &str) {
    let _ = Command::new(&control_plane().kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "delete",
            "clusterrole,clusterrolebinding",
            "-l",
            &format!("app.kubernetes.io/instance={release}"),
        ])
        .output();
}

#[tokio::test]
async fn every_rbac_mode_grants_what_the_code_uses_and_nothing_else() {
    let release_ns = TestNamespace::new("rbac-rel").await;
    let w1 = TestNamespace::new("rbac-w1").await;
    let w2 = TestNamespace::new("rbac-w2").await;
    let outside = TestNamespace::new("rbac-api").await;
    let other = TestNamespace::new("rbac-other").await;
    let kubeconfig = release_ns.kubeconfig().to_owned();
    let (rel, w1, w2, outside, other) = (
        release_ns.name.as_str(),
        w1.name.as_str(),
        w2.name.as_str(),
        outside.name.as_str(),
        other.name.as_str(),
    );
    let list = |names: &[&str]| format!("watchNamespaces={{{}}}", names.join(","));

    // (mode, values, checks): each release gets its own name, so its own ServiceAccount.
    type Case<'a> = (&'a str, Vec<String>);
    let modes: Vec<Case<'_>> = vec![
        ("default: the release namespace alone", vec![]),
        (
            "two namespaces, the API in the first",
            vec![list(&[w1, w2])],
        ),
        (
            "one namespace, the API outside it",
            vec![list(&[w1]), format!("apiNamespace={outside}")],
        ),
        (
            "controller only, no leader election",
            vec![
                list(&[w1]),
                format!("apiNamespace={outside}"),
                "mode=controller".to_owned(),
                "leaderElection.enabled=false".to_owned(),
            ],
        ),
        (
            "cluster-wide",
            vec![list(&[w1]), "clusterWide=true".to_owned()],
        ),
        (
            "deprecated watchNamespace",
            vec![format!("watchNamespace={w2}")],
        ),
        ("sharding", vec!["sharding.enabled=true".to_owned()]),
    ];
    for (index, (mode, values)) in modes.iter().enumerate() {
        let name = format!("{rel}-m{index}");
        let mut args = vec!["--set".to_owned(), format!("fullnameOverride={name}")];
        for value in values {
            args.extend(["--set".to_owned(), value.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let manifests = render(&name, rel, &args);
        apply(&kubeconfig, &manifests, false);
        let release = Release {
            name: name.clone(),
            namespace: rel,
            kubeconfig: &kubeconfig,
        };
        let own_lease = format!("{LEASES}/{name}");
        let member_lease = format!("{LEASES}/{name}-member-0123456789abcdef");
        let mut cases = never(rel);
        cases.extend(secret_writes(other, false));
        if index != 4 {
            cases.extend(watched(other, false));
            cases.push(("list", LISTENERS, None, In::All, false));
        }
        match index {
            0 => {
                cases.extend(watched(rel, true));
                cases.extend(secret_writes(rel, true));
                cases.extend(api_only(rel, true));
                cases.extend(lease(rel, &own_lease, true));
                cases.extend(watched(w1, false));
            }
            1 => {
                cases.extend(watched(w1, true));
                cases.extend(watched(w2, true));
                cases.extend(secret_writes(w1, true));
                cases.extend(secret_writes(w2, true));
                cases.extend(api_only(w1, true));
                cases.extend(api_only(w2, false));
                cases.extend(watched(rel, false));
                cases.extend(secret_writes(rel, false));
                cases.extend(lease(rel, &own_lease, true));
            }
            2 => {
                cases.extend(watched(w1, true));
                cases.extend(secret_writes(w1, true));
                cases.extend(api_only(w1, false));
                // The API's namespace is watched too, or its Listeners would never run.
                cases.extend(watched(outside, true));
                cases.extend(secret_writes(outside, true));
                cases.extend(api_only(outside, true));
                assert!(
                    manifests.contains(&format!("value: \"{w1},{outside}\"")),
                    "WATCH_NAMESPACE lists both:\n{manifests}"
                );
            }
            3 => {
                cases.extend(watched(w1, true));
                cases.extend(secret_writes(w1, true));
                cases.extend(api_only(w1, false));
                cases.extend(watched(outside, false));
                cases.extend(secret_writes(outside, false));
                cases.extend(api_only(outside, false));
                cases.extend(lease(rel, &own_lease, false));
            }
            4 => {
                // Reads and Listener writes everywhere; Secret writes only where credentials
                // and the API's token Secrets are made.
                cases.extend(watched(w1, true));
                cases.extend(watched(outside, true));
                cases.extend(watched(other, true));
                cases.extend(secret_writes(w1, true));
                cases.extend(api_only(w1, true));
                cases.extend(secret_writes(outside, false));
                cases.extend(api_only(outside, false));
                cases.push(("list", LISTENERS, None, In::All, true));
                cases.push(("watch", SECRETS, None, In::All, true));
                cases.push(("get", SECRETS, None, In::Ns(other), true));
                cases.push(("patch", LISTENERS, None, In::Ns(other), true));
                cases.push(("create", LISTENERS, None, In::Ns(other), false));
                assert!(!manifests.contains("WATCH_NAMESPACE"), "{manifests}");
            }
            5 => {
                cases.extend(watched(w2, true));
                cases.extend(secret_writes(w2, true));
                cases.extend(api_only(w2, true));
                cases.extend(watched(rel, false));
            }
            _ => {
                // Sharding changes Lease access alone.
                cases.extend(watched(rel, true));
                cases.extend(secret_writes(rel, true));
                cases.extend(api_only(rel, true));
                cases.extend(watched(w1, false));
                cases.extend(member_leases(rel, &own_lease, &member_lease, other));
            }
        }
        release.expect(mode, &cases);
        delete_cluster_objects(&kubeconfig, &name);
    }
}
