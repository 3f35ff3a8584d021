//! The REST facade against a hostile tenant and a greedy client, on the real control plane:
//! no Secret the facade did not make is ever shown, a DELETE answers only once nothing routes
//! to what it deleted, per-owner Listener ceilings at both doors (REST and kubectl), a per-key
//! rate limit, a header-read timeout, no orphaned token Secret, and PATCH /users all or nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use crownstone_webhooks::api::{self, AdminKeySource, RateLimit};
use crownstone_webhooks::conventions::{managed_labels, API_KEY, LISTENER_ANNOTATION};
use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::resources::{Listener, WebhookUser};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::api::{registration, test_settings, ApiUser, Facade, Key};
use crate::support::cluster::eventually;
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::Receiver;

const SPHERE: &str = "sphere-1";
/// How long a receiver is watched for a delivery that must not come, once a delivery of the
/// same event to another listener has arrived (both are routed in one step).
const QUIET: Duration = Duration::from_secs(2);

fn api_key(user: &ApiUser) -> Key<'_> {
    Key::Header("API_KEY", &user.api_key)
}

/// Sets a WebhookUser's `spec.maxListeners`.
async fn set_max_listeners(h: &Harness, user: &str, max: u32) {
    h.ns.api::<WebhookUser>()
        .patch(
            user,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"maxListeners": max}})),
        )
        .await
        .expect("patch WebhookUser");
}

/// A Secret as a tenant writes it: `token` holding `value`, with the given labels and
/// annotations.
async fn tenant_secret(
    h: &Harness,
    name: &str,
    value: &str,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels,
            annotations,
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "token".to_owned(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    h.ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
}

/// Applies a Listener with kubectl, as a tenant allowed to create Listeners (not to read
/// Secrets) does.
fn kubectl_listener(h: &Harness, name: &str, owner: &str, secret: &str, url: &str) {
    let manifest = json!({
        "apiVersion": "webhooks.crownstone.rocks/v1alpha1",
        "kind": "Listener",
        "metadata": {"name": name},
        "spec": {"owner": owner, "userId": "user-1", "eventTypes": ["command"], "url": url,
                 "tokenSecretRef": {"name": secret, "key": "token"}},
    });
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join(format!("{name}.json"));
    std::fs::write(&path, manifest.to_string()).expect("write the manifest");
    let output =
        h.ns.kubectl(&["apply", "-f", path.to_str().expect("a utf-8 path")]);
    assert!(
        output.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_listener_naming_a_secret_the_facade_did_not_make_never_shows_its_value() {
    let f = Facade::start("facade-foreign-secret").await;
    let acme = f.new_user("Acme").await;
    let receiver = Receiver::start().await;
    let foreign = "SUPER-SECRET-db-password-value";
    let mislabelled = "SUPER-SECRET-of-another-listener";
    // The tenant's own Secret, and one labelled managed-by but made for another Listener.
    tenant_secret(&f.h, "db-password", foreign, None, None).await;
    tenant_secret(
        &f.h,
        "borrowed-token",
        mislabelled,
        Some(managed_labels()),
        Some(BTreeMap::from([(
            LISTENER_ANNOTATION.to_owned(),
            "someone-elses-listener".to_owned(),
        )])),
    )
    .await;
    kubectl_listener(
        &f.h,
        "steal-db",
        &acme.id,
        "db-password",
        receiver.url().as_str(),
    );
    kubectl_listener(
        &f.h,
        "steal-managed",
        &acme.id,
        "borrowed-token",
        receiver.url().as_str(),
    );
    // A listener the facade made shows its token: the rule tells the two apart.
    let token = f.token().await;
    let own = f
        .register(
            &acme,
            registration(
                &token,
                "user-1",
                &["command"],
                receiver.url_with_path("/own").as_ref(),
            ),
        )
        .await;
    let own = own.expect(200).json["id"].as_str().unwrap().to_owned();

    let listed = eventually("the three listeners listed", WAIT, || async {
        let listed = f.listeners(&acme).await;
        (listed.len() == 3).then_some(listed)
    })
    .await;
    for listener in &listed {
        let id = listener["id"].as_str().unwrap();
        if id == own {
            assert_eq!(listener["token"], token.as_str());
        } else {
            assert_eq!(listener["token"], serde_json::Value::Null, "{listener}");
        }
    }
    let answer = f
        .call(Method::GET, "/api/listeners", api_key(&acme), None)
        .await;
    assert!(!answer.text.contains("SUPER-SECRET"), "{}", answer.text);

    // Nor is a foreign value compared: deleting by it finds nothing.
    for value in [foreign, mislabelled] {
        let answer = f
            .call(
                Method::DELETE,
                &format!("/api/listeners/token?token={value}"),
                api_key(&acme),
                None,
            )
            .await;
        assert_eq!(answer.expect(200).json["count"], 0);
    }
    let listeners = f.h.ns.api::<Listener>();
    for name in ["steal-db", "steal-managed"] {
        assert!(listeners.get_opt(name).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn a_listener_naming_another_tenants_token_secret_streams_nothing() {
    let f = Facade::start("facade-borrowed-secret").await;
    let victim = f.new_user("Victim").await;
    let tenant = f.new_user("Tenant").await;
    let victims = Receiver::start().await;
    let stolen = Receiver::start().await;
    let token = f.token().await;
    let answer = f
        .register(
            &victim,
            registration(&token, "user-1", &["command"], victims.url().as_ref()),
        )
        .await;
    let id = answer.expect(200).json["id"].as_str().unwrap().to_owned();
    f.h.wait_ready(&id).await;
    let victim_secret =
        f.h.ns
            .api::<Listener>()
            .get(&id)
            .await
            .unwrap()
            .spec
            .token_secret_ref
            .name;
    // The tenant may create Listeners but not read Secrets: it names the victim's token Secret,
    // and the victim's credentials Secret, hoping the operator streams with what they hold.
    kubectl_listener(
        &f.h,
        "borrow-token",
        &tenant.id,
        &victim_secret,
        stolen.url().as_str(),
    );
    kubectl_listener(
        &f.h,
        "borrow-credentials",
        &tenant.id,
        &format!("{}-credentials", victim.id),
        stolen.url_with_path("/credentials").as_str(),
    );
    for name in ["borrow-token", "borrow-credentials"] {
        f.h.wait_condition(name, "Ready", "False", "TokenSecretNotAllowed")
            .await;
    }
    assert_eq!(publish_and_count(&f.h, &victims, &stolen).await, 0);
}

/// The deliveries `receiver` has after `control` received its next one: `before` when the
/// listener of `receiver` is no longer routed.
async fn publish_and_count(h: &Harness, control: &Receiver, receiver: &Receiver) -> usize {
    let seen = control.request_count();
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .expect("publish");
    control.wait_for_requests(seen + 1, WAIT).await;
    tokio::time::sleep(QUIET).await;
    receiver.request_count()
}

#[tokio::test]
async fn no_event_reaches_what_a_delete_route_deleted_once_it_answered() {
    let f = Facade::start("facade-delete-routing").await;
    let control_user = f.new_user("Control").await;
    let control = Receiver::start().await;
    let token = f.token().await;
    let answer = f
        .register(
            &control_user,
            registration(&token, "user-1", &["command"], control.url().as_str()),
        )
        .await;
    let control_id = answer.expect(200).json["id"].as_str().unwrap().to_owned();
    f.h.wait_ready(&control_id).await;

    let routes = ["id", "userId", "token", "user"];
    for route in routes {
        let victim = f.new_user(&format!("Victim {route}")).await;
        let receiver = Receiver::start().await;
        let answer = f
            .register(
                &victim,
                registration(&token, "user-1", &["command"], receiver.url().as_str()),
            )
            .await;
        let id = answer.expect(200).json["id"].as_str().unwrap().to_owned();
        f.h.wait_ready(&id).await;
        // Routed before: the event reaches it.
        let before = receiver.request_count();
        f.h.admin
            .publish(&[samples::multi_switch(SPHERE)])
            .await
            .unwrap();
        receiver.wait_for_requests(before + 1, WAIT).await;

        let (method, path, key) = match route {
            "id" => (
                Method::DELETE,
                format!("/api/listeners/{id}"),
                api_key(&victim),
            ),
            "userId" => (
                Method::DELETE,
                "/api/listeners/userId?userId=user-1".to_owned(),
                api_key(&victim),
            ),
            "token" => (
                Method::DELETE,
                format!("/api/listeners/token?token={token}"),
                api_key(&victim),
            ),
            _ => (
                Method::DELETE,
                format!("/api/users/{}", victim.id),
                f.admin(),
            ),
        };
        let answer = f.call(method, &path, key, None).await;
        assert!(answer.status.is_success(), "{route}: {}", answer.text);
        let delivered = receiver.request_count();
        assert_eq!(
            publish_and_count(&f.h, &control, &receiver).await,
            delivered,
            "an event published after DELETE ({route}) answered was delivered"
        );
    }
}

#[tokio::test]
async fn the_facade_refuses_a_listener_past_the_owners_ceiling_and_creates_nothing() {
    let f = Facade::start("facade-ceiling").await;
    let acme = f.new_user("Acme").await;
    set_max_listeners(&f.h, &acme.id, 1).await;
    let receiver = Receiver::start().await;
    let token = f.token().await;
    f.register(
        &acme,
        registration(
            &token,
            "user-1",
            &["command"],
            receiver.url_with_path("/1").as_ref(),
        ),
    )
    .await
    .expect(200);
    let counts = f.object_counts().await;
    let answer = eventually("the ceiling applied by the facade", WAIT, || async {
        let answer = f
            .register(
                &acme,
                registration(
                    &token,
                    "user-1",
                    &["command"],
                    receiver.url_with_path("/2").as_ref(),
                ),
            )
            .await;
        (answer.status.as_u16() == 422).then_some(answer)
    })
    .await;
    answer.expect(422);
    assert!(
        answer.message().contains("delete one first"),
        "{}",
        answer.text
    );
    assert_eq!(f.object_counts().await, counts, "nothing was created");
    // A registration that is the existing listener still answers.
    f.register(
        &acme,
        registration(
            &token,
            "user-1",
            &["command"],
            receiver.url_with_path("/1").as_ref(),
        ),
    )
    .await
    .expect(200);
}

#[tokio::test]
async fn listeners_past_the_ceiling_made_with_kubectl_are_held_back_until_room_is_made() {
    let h = Harness::start("facade-ceiling-kubectl").await;
    h.create_user("acme", true, None).await;
    set_max_listeners(&h, "acme", 1).await;
    let first = Receiver::start().await;
    let second = Receiver::start().await;
    h.ready_listener("l-1", "acme", &["command"], &first.url())
        .await;
    let token = h.token("user-1", SPHERE).await;
    h.create_token_secret("l-2-token", &token).await;
    h.create_listener(
        "l-2",
        "acme",
        "l-2-token",
        &["command"],
        second.url().as_str(),
        None,
    )
    .await;
    h.wait_condition("l-2", "Ready", "False", "ListenerLimitExceeded")
        .await;
    // Not routed: an event reaches the first listener and not the second.
    let seen = first.request_count();
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    first.wait_for_requests(seen + 1, WAIT).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(second.request_count(), 0);

    // Room is made: the held-back listener starts.
    h.ns.api::<Listener>()
        .delete("l-1", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_ready("l-2").await;
    eventually("a delivery to the listener that started", WAIT, || async {
        h.admin
            .publish(&[samples::multi_switch(SPHERE)])
            .await
            .ok()?;
        tokio::time::timeout(Duration::from_secs(2), async {
            while second.request_count() == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .ok()
    })
    .await;
}

/// The API key the operator made for `user`.
async fn api_key_of(h: &Harness, user: &str) -> String {
    let secrets = h.ns.api::<Secret>();
    eventually("the user's API key", WAIT, || async {
        let secret = secrets
            .get_opt(&format!("{user}-credentials"))
            .await
            .ok()??;
        String::from_utf8(secret.data?.get(API_KEY)?.0.clone()).ok()
    })
    .await
}

#[tokio::test]
async fn a_key_past_its_rate_gets_429_while_another_key_is_served() {
    let h = Harness::start("facade-rate").await;
    h.create_user("acme", true, None).await;
    h.create_user("other", true, None).await;
    let (acme, other) = (api_key_of(&h, "acme").await, api_key_of(&h, "other").await);
    let mut settings = test_settings(&h, AdminKeySource::None);
    settings.rate_limit = RateLimit {
        per_second: 1,
        burst: 3,
    };
    let facade = api::start(h.ns.client.clone(), settings, None)
        .await
        .expect("the facade starts");
    assert!(facade.wait_ready(WAIT).await);
    let url = format!("http://{}/api/listeners", facade.addr());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |key: &str| http.get(&url).header("API_KEY", key.to_owned()).send();
    // The facade's cache knows both keys before the burst starts.
    for key in [&acme, &other] {
        eventually("the key is known", WAIT, || async {
            (get(key).await.ok()?.status() == 200).then_some(())
        })
        .await;
    }
    let mut refused = None;
    for _ in 0..20 {
        let response = get(&acme).await.unwrap();
        if response.status() == 429 {
            refused = Some(response.json::<serde_json::Value>().await.unwrap());
            break;
        }
    }
    let refused = refused.expect("a burst past the limit is refused");
    assert_eq!(refused["error"]["statusCode"], 429);
    assert_eq!(refused["error"]["name"], "TooManyRequestsError");
    assert_eq!(get(&other).await.unwrap().status(), 200);
    facade.shutdown().await;
}

#[tokio::test]
async fn a_client_that_sends_half_a_request_head_is_disconnected() {
    let h = Harness::start("facade-slow-head").await;
    let mut settings = test_settings(&h, AdminKeySource::None);
    settings.header_read_timeout = Duration::from_secs(1);
    let facade = api::start(h.ns.client.clone(), settings, None)
        .await
        .expect("the facade starts");
    let mut stream = tokio::net::TcpStream::connect(facade.addr()).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: facade\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the connection stays open for a head that never ends"
    );
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "half a head was served"
    );
    // A whole head is served as usual.
    let mut stream = tokio::net::TcpStream::connect(facade.addr()).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: facade\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    facade.shutdown().await;
}

/// A ValidatingAdmissionPolicy and its binding to the test's namespace: the real API server
/// refuses what `expression` rejects.
struct Refusal {
    client: kube::Client,
    name: String,
}

impl Refusal {
    async fn remove(self) {
        let _ = Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await;
        let _ = Api::<ValidatingAdmissionPolicy>::all(self.client)
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

/// Makes the API server refuse `operation` on `resource` (of our group) in the test's namespace
/// where `expression` is false.
async fn refuse(h: &Harness, resource: &str, operation: &str, expression: &str) -> Refusal {
    let ns = &h.ns.name;
    let name = format!("{ns}-{resource}");
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["webhooks.crownstone.rocks"], "apiVersions": ["*"],
                "operations": [operation], "resources": [resource],
            }]},
            "validations": [{"expression": expression, "message": "refused by the test"}],
        },
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": ns,
            }}},
        },
    }))
    .unwrap();
    Api::<ValidatingAdmissionPolicy>::all(h.ns.client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .expect("create the policy");
    Api::<ValidatingAdmissionPolicyBinding>::all(h.ns.client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("bind the policy");
    Refusal {
        client: h.ns.client.clone(),
        name,
    }
}

/// The facade's token Secrets in the namespace.
async fn token_secrets(f: &Facade) -> Vec<Secret> {
    f.h.ns
        .api::<Secret>()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.annotations().contains_key(LISTENER_ANNOTATION))
        .collect()
}

#[tokio::test]
async fn a_token_secret_is_owned_by_its_listener_and_a_failed_create_leaves_none() {
    let f = Facade::start("facade-orphans").await;
    let acme = f.new_user("Acme").await;
    let receiver = Receiver::start().await;
    let token = f.token().await;
    let answer = f
        .register(
            &acme,
            registration(
                &token,
                "user-1",
                &["command"],
                receiver.url_with_path("/1").as_ref(),
            ),
        )
        .await;
    let id = answer.expect(200).json["id"].as_str().unwrap().to_owned();
    let listener = f.h.ns.api::<Listener>().get(&id).await.unwrap();
    let secrets = token_secrets(&f).await;
    assert_eq!(secrets.len(), 1);
    let owners = secrets[0].owner_references();
    assert_eq!(owners.len(), 1);
    assert_eq!(
        (owners[0].kind.as_str(), owners[0].name.as_str()),
        ("Listener", id.as_str())
    );
    assert_eq!(Some(&owners[0].uid), listener.metadata.uid.as_ref());

    // The API server refuses new Listeners posting to /refused from now on.
    let policy = refuse(
        &f.h,
        "listeners",
        "CREATE",
        "!object.spec.url.endsWith('/refused')",
    )
    .await;
    let probe: Listener = serde_json::from_value(json!({
        "apiVersion": "webhooks.crownstone.rocks/v1alpha1", "kind": "Listener",
        "metadata": {"name": "probe"},
        "spec": {"owner": acme.id, "userId": "user-1", "eventTypes": ["command"],
                 "url": "https://x.example/refused",
                 "tokenSecretRef": {"name": "none", "key": "token"}},
    }))
    .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually("the policy in force", WAIT, || async {
        f.h.ns
            .api::<Listener>()
            .create(&dry_run, &probe)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let answer = f
        .register(
            &acme,
            registration(
                &token,
                "user-1",
                &["command"],
                receiver.url_with_path("/refused").as_ref(),
            ),
        )
        .await;
    assert!(!answer.status.is_success(), "{}", answer.text);
    assert_eq!(
        token_secrets(&f).await.len(),
        1,
        "a failed create left a Secret"
    );
    policy.remove().await;
}

#[tokio::test]
async fn a_user_change_the_api_server_refuses_changes_nothing() {
    let f = Facade::start("facade-patch-atomic").await;
    let acme = f.new_user("Acme").await;
    // The API server refuses one display name for WebhookUsers of this namespace.
    let policy = refuse(
        &f.h,
        "webhookusers",
        "UPDATE",
        "object.spec.displayName != 'Refused'",
    )
    .await;
    let users = f.h.ns.api::<WebhookUser>();
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    eventually("the policy in force", WAIT, || async {
        let refused = users
            .patch(
                &acme.id,
                &dry_run,
                &Patch::Merge(&json!({"spec": {"displayName": "Refused"}})),
            )
            .await
            .is_err();
        refused.then_some(())
    })
    .await;

    let answer = f
        .call(
            Method::PATCH,
            &format!("/api/users/{}", acme.id),
            f.admin(),
            Some(json!({"secret": "a-new-client-secret", "name": "Refused"})),
        )
        .await;
    answer.expect(422);
    assert_eq!(f.h.client_secret(&acme.id).await, acme.secret);
    assert_eq!(users.get(&acme.id).await.unwrap().spec.display_name, "Acme");
    // Both apply together when the API server takes them.
    f.call(
        Method::PATCH,
        &format!("/api/users/{}", acme.id),
        f.admin(),
        Some(json!({"secret": "a-new-client-secret", "name": "Accepted"})),
    )
    .await
    .expect(204);
    assert_eq!(f.h.client_secret(&acme.id).await, "a-new-client-secret");
    assert_eq!(
        users.get(&acme.id).await.unwrap().spec.display_name,
        "Accepted"
    );
    policy.remove().await;
}

#[tokio::test]
async fn a_user_being_deleted_is_not_routed_even_while_its_listeners_cannot_be_deleted() {
    let h = Harness::start("facade-user-deleting").await;
    let victim = Receiver::start().await;
    let control = Receiver::start().await;
    h.ready_listener("victim-l", "victim", &["command"], &victim.url())
        .await;
    h.ready_listener("control-l", "control", &["command"], &control.url())
        .await;
    h.admin
        .publish(&[samples::multi_switch(SPHERE)])
        .await
        .unwrap();
    victim.wait_for_requests(1, WAIT).await;
    control.wait_for_requests(1, WAIT).await;

    // The API server refuses to delete Listeners: the user's cleanup cannot get past them.
    let policy = refuse(&h, "listeners", "DELETE", "false").await;
    let listeners = h.ns.api::<Listener>();
    let dry_run = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    eventually("the policy in force", WAIT, || async {
        listeners
            .delete("control-l", &dry_run)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    h.ns.api::<WebhookUser>()
        .delete("victim", &DeleteParams::default())
        .await
        .unwrap();
    // Routing forgot the owner first: its Listener says so, and gets no event.
    h.wait_condition("victim-l", "Ready", "False", "OwnerCredentialsMissing")
        .await;
    let delivered = victim.request_count();
    assert_eq!(
        publish_and_count(&h, &control, &victim).await,
        delivered,
        "an event was delivered for a user being deleted"
    );
    policy.remove().await;
}

#[tokio::test]
async fn a_delete_answers_503_while_the_operator_has_not_confirmed_it() {
    let mut h = Harness::start("facade-delete-unconfirmed").await;
    h.create_user("acme", true, None).await;
    let key = api_key_of(&h, "acme").await;
    let mut settings = test_settings(&h, AdminKeySource::None);
    settings.delete_wait = Duration::from_secs(2);
    let facade = api::start(h.ns.client.clone(), settings, None)
        .await
        .expect("the facade starts");
    assert!(facade.wait_ready(WAIT).await);
    let base = format!("http://{}", facade.addr());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let receiver = Receiver::start().await;
    let token = h.token("user-1", SPHERE).await;
    let answer: serde_json::Value = http
        .post(format!("{base}/api/listeners"))
        .header("API_KEY", &key)
        .json(&registration(
            &token,
            "user-1",
            &["command"],
            receiver.url().as_str(),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["id"].as_str().expect("an id").to_owned();
    h.wait_ready(&id).await;

    // Without the operator nothing confirms that routing stopped: no success is claimed.
    h.stop_operator().await;
    let delete = || {
        http.delete(format!("{base}/api/listeners/{id}"))
            .header("API_KEY", &key)
            .send()
    };
    let answer = delete().await.unwrap();
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["name"], "ServiceUnavailableError");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not confirm"),
        "{body}"
    );
    // The deletion goes on once the operator runs.
    h.restart_operator().await;
    h.wait_gone(&id).await;
    eventually("the deleted listener unknown", WAIT, || async {
        (delete().await.ok()?.status() == 404).then_some(())
    })
    .await;
    facade.shutdown().await;
}
