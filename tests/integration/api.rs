//! The REST facade against the real control plane, the simulator and real receivers: every
//! route with every status it gives, clients kept apart, upstream's dedup rules, races, bad
//! input that changes nothing, a signed delivery end to end, the OpenAPI document fuzzed by
//! schemathesis, and the binary's `api` and `run` processes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crownstone_webhooks::api::AdminKeySource;
use crownstone_webhooks::conventions::MANAGED_BY;
use crownstone_webhooks::crownstone::samples;
use crownstone_webhooks::delivery::{verify, SigningKey};
use crownstone_webhooks::resources::{Listener, WebhookUser};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::api::{
    admin_secret, metric_value, python_bin, random_key, registration, start_facade, ApiUser,
    Facade, Key, JSON,
};
use crate::support::cluster::{control_plane, eventually};
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::{Receiver, RecordedRequest};

const SPHERE: &str = "sphere-1";

fn api_key(user: &ApiUser) -> Key<'_> {
    Key::Header("API_KEY", &user.api_key)
}

fn signed_with(request: &RecordedRequest, client_secret: &str) -> bool {
    let (Some(id), Some(timestamp), Some(signature)) = (
        request.header("webhook-id"),
        request.header("webhook-timestamp"),
        request.header("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(timestamp) = timestamp.parse::<i64>() else {
        return false;
    };
    let key = SigningKey::from_client_secret(client_secret).unwrap();
    // Any entry: while a replaced secret is in its overlap, each live secret signs.
    verify(&key, id, timestamp, &request.body, signature)
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.chars().all(|c| c.is_ascii_hexdigit())
}

#[tokio::test]
async fn user_routes_answer_with_every_status_they_can_give() {
    let f = Facade::start("api-users").await;
    let admin = f.admin_key.clone();
    let bearer = format!("Bearer {admin}");
    for key in [
        Key::Header("admin_key", &admin),
        Key::Header("ADMIN_KEY", &admin),
        Key::Header("access_token", &admin),
        Key::Header("Authorization", &bearer),
        Key::Query("admin_key", &admin),
    ] {
        let answer = f
            .call(Method::GET, "/api/users/isValidAdminKey", key, None)
            .await;
        assert_eq!(answer.expect(200).json, json!(true), "{key:?}");
    }
    for key in [
        Key::None,
        Key::Header("admin_key", "wrong"),
        Key::Query("admin_key", ""),
    ] {
        let answer = f
            .call(Method::GET, "/api/users/isValidAdminKey", key, None)
            .await;
        assert_eq!(answer.expect(401).message(), "Unauthorized.");
    }

    // POST /users: the operator's credentials, and the key works at once.
    let acme = f.new_user("Acme").await;
    assert!(acme.id.starts_with("u-"), "{}", acme.id);
    assert!(is_hex(&acme.api_key, 64), "{}", acme.api_key);
    assert!(is_hex(&acme.secret, 32), "{}", acme.secret);
    let answer = f
        .call(
            Method::GET,
            "/api/users/isValidApiKey",
            api_key(&acme),
            None,
        )
        .await;
    assert_eq!(answer.expect(200).json, json!(true));
    // One place generates credentials: what the answer says is what the operator stored.
    let secret =
        f.h.ns
            .api::<Secret>()
            .get(&format!("{}-credentials", acme.id))
            .await
            .unwrap();
    let data = secret.data.clone().unwrap();
    assert_eq!(data["apiKey"].0, acme.api_key.as_bytes());
    assert_eq!(data["clientSecret"].0, acme.secret.as_bytes());
    assert_eq!(
        secret.labels().get(MANAGED_BY.0).map(String::as_str),
        Some(MANAGED_BY.1)
    );
    let user = f.h.ns.api::<WebhookUser>().get(&acme.id).await.unwrap();
    assert_eq!(user.spec.display_name, "Acme");
    assert!(user.spec.enabled);

    // An API key is no admin key, and the admin key no API key.
    let answer = f
        .call(
            Method::GET,
            "/api/users/isValidAdminKey",
            Key::Header("admin_key", &acme.api_key),
            None,
        )
        .await;
    answer.expect(401);
    let answer = f
        .call(
            Method::GET,
            "/api/users",
            Key::Header("Authorization", &acme.api_key),
            None,
        )
        .await;
    answer.expect(401);
    let answer = f
        .call(
            Method::GET,
            "/api/users/isValidApiKey",
            Key::Header("API_KEY", &admin),
            None,
        )
        .await;
    assert_eq!(answer.expect(401).message(), "Invalid ApiKey.");
    let answer = f
        .call(
            Method::GET,
            "/api/listeners",
            Key::Header("access_token", &admin),
            None,
        )
        .await;
    answer.expect(401);

    // GET /users
    let answer = f.call(Method::GET, "/api/users", f.admin(), None).await;
    assert_eq!(
        answer.expect(200).json,
        json!([{"id": acme.id, "name": "Acme", "apiKey": acme.api_key, "secret": acme.secret, "enabled": true}])
    );

    // PATCH /users/{id}
    let path = format!("/api/users/{}", acme.id);
    let answer = f
        .call(
            Method::PATCH,
            &path,
            f.admin(),
            Some(json!({"name": "Acme Inc.", "enabled": false})),
        )
        .await;
    answer.expect(204);
    assert!(answer.text.is_empty());
    let user = f.h.ns.api::<WebhookUser>().get(&acme.id).await.unwrap();
    assert_eq!(user.spec.display_name, "Acme Inc.");
    assert!(!user.spec.enabled);
    let answer = f
        .call(
            Method::PATCH,
            &path,
            f.admin(),
            Some(json!({"secret": "a-new-client-secret"})),
        )
        .await;
    answer.expect(204);
    let secret =
        f.h.ns
            .api::<Secret>()
            .get(&format!("{}-credentials", acme.id))
            .await
            .unwrap();
    assert_eq!(
        secret.data.unwrap()["clientSecret"].0,
        b"a-new-client-secret"
    );
    let answer = f.call(Method::GET, "/api/users", f.admin(), None).await;
    let listed = &answer.expect(200).json[0];
    assert_eq!(listed["name"], "Acme Inc.");
    assert_eq!(listed["enabled"], false);
    assert_eq!(listed["secret"], "a-new-client-secret");
    assert_eq!(listed["apiKey"], acme.api_key.as_str());
    // A disabled user still holds a valid key: its listeners receive nothing, nothing more.
    f.call(
        Method::GET,
        "/api/users/isValidApiKey",
        api_key(&acme),
        None,
    )
    .await
    .expect(200);

    f.call(
        Method::PATCH,
        "/api/users/u-nobody",
        f.admin(),
        Some(json!({"enabled": true})),
    )
    .await
    .expect(404);
    for (body, status) in [
        (json!({"apiKey": "mine"}), 422),
        (json!({"name": ""}), 422),
        (json!({"enabled": "yes"}), 422),
        (json!({"secret": "has a space"}), 422),
        (json!({"secret": ""}), 422),
    ] {
        f.call(Method::PATCH, &path, f.admin(), Some(body.clone()))
            .await
            .expect(status);
    }
    let malformed = f
        .call_at(
            f.base(),
            Method::PATCH,
            &path,
            f.admin(),
            Some(b"{\"name\":".to_vec()),
            Some(JSON),
        )
        .await;
    malformed.expect(400);
    f.call(
        Method::PATCH,
        &path,
        Key::None,
        Some(json!({"enabled": true})),
    )
    .await
    .expect(401);

    // POST /users refuses what is not a name.
    for (body, status) in [
        (json!({}), 422),
        (json!({"name": ""}), 422),
        (json!({"name": "x".repeat(257)}), 422),
        (json!({"name": "x", "apiKey": "chosen"}), 422),
        (json!(["x"]), 422),
    ] {
        f.call(Method::POST, "/api/users", f.admin(), Some(body.clone()))
            .await
            .expect(status);
    }
    f.call(
        Method::POST,
        "/api/users",
        Key::None,
        Some(json!({"name": "x"})),
    )
    .await
    .expect(401);
    let users =
        f.h.ns
            .api::<WebhookUser>()
            .list(&Default::default())
            .await
            .unwrap();
    assert_eq!(users.items.len(), 1, "refused requests made no user");

    // DELETE /users/{id}
    f.call(Method::DELETE, &path, Key::None, None)
        .await
        .expect(401);
    f.call(Method::DELETE, &path, f.admin(), None)
        .await
        .expect(204);
    f.call(Method::DELETE, &path, f.admin(), None)
        .await
        .expect(404);
    f.call(
        Method::PATCH,
        &path,
        f.admin(),
        Some(json!({"enabled": true})),
    )
    .await
    .expect(404);
    f.call(
        Method::GET,
        "/api/users/isValidApiKey",
        api_key(&acme),
        None,
    )
    .await
    .expect(401);
    let users = f.h.ns.api::<WebhookUser>();
    eventually("the user deleted", WAIT, || async {
        users.get_opt(&acme.id).await.ok()?.is_none().then_some(())
    })
    .await;
    let answer = f.call(Method::GET, "/api/users", f.admin(), None).await;
    assert_eq!(answer.expect(200).json, json!([]));
}

#[tokio::test]
async fn admin_routes_answer_401_without_an_admin_key_and_follow_one_in_a_secret() {
    let f = Facade::start("api-admin-key").await;
    let none = start_facade(&f.h, AdminKeySource::None, None).await;
    let base = format!("http://{}", none.addr());
    for key in [
        Key::Header("admin_key", ""),
        Key::Header("admin_key", "anything"),
        Key::None,
    ] {
        f.call_at(
            &base,
            Method::GET,
            "/api/users/isValidAdminKey",
            key,
            None,
            None,
        )
        .await
        .expect(401);
        f.call_at(&base, Method::GET, "/api/users", key, None, None)
            .await
            .expect(401);
    }

    let from_secret = start_facade(&f.h, admin_secret("admin-key", "key"), None).await;
    let base = format!("http://{}", from_secret.addr());
    let check = |key: String| {
        let base = base.clone();
        let f = &f;
        async move {
            f.call_at(
                &base,
                Method::GET,
                "/api/users/isValidAdminKey",
                Key::Header("admin_key", &key),
                None,
                None,
            )
            .await
            .status
            .as_u16()
        }
    };
    assert_eq!(check("first".into()).await, 401, "no Secret yet");
    let secrets = f.h.ns.api::<Secret>();
    let secret = |value: &str| Secret {
        metadata: ObjectMeta {
            name: Some("admin-key".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "key".to_owned(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret("first"))
        .await
        .unwrap();
    eventually("the admin key from the Secret", WAIT, || async {
        (check("first".into()).await == 200).then_some(())
    })
    .await;
    secrets
        .patch(
            "admin-key",
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {"key": "c2Vjb25k"}})),
        )
        .await
        .unwrap();
    eventually("the rotated admin key", WAIT, || async {
        (check("second".into()).await == 200).then_some(())
    })
    .await;
    assert_eq!(check("first".into()).await, 401, "the old key is gone");
    none.shutdown().await;
    from_secret.shutdown().await;
}

#[tokio::test]
async fn without_a_controller_a_new_user_is_refused_and_nothing_is_left_behind() {
    // A namespace no operator watches: the `api` process with its controller down.
    let f = Facade::start("api-no-controller").await;
    let h =
        f.h.beside(crate::support::cluster::TestNamespace::new("api-no-controller").await);
    let mut settings =
        crate::support::api::test_settings(&h, AdminKeySource::Fixed(f.admin_key.parse().unwrap()));
    settings.credentials_wait = Duration::from_secs(1);
    let alone = crownstone_webhooks::api::start(h.ns.client.clone(), settings, None)
        .await
        .unwrap();
    assert!(alone.wait_ready(WAIT).await);
    let base = format!("http://{}", alone.addr());
    let answer = f
        .call_at(
            &base,
            Method::POST,
            "/api/users",
            f.admin(),
            Some(json!({"name": "Acme"}).to_string().into_bytes()),
            Some(JSON),
        )
        .await;
    answer.expect(503);
    assert!(answer.message().contains("controller"), "{}", answer.text);
    let users = h.ns.api::<WebhookUser>();
    eventually("the half-made user removed", WAIT, || async {
        users
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;

    // A WebhookUser whose credentials Secret someone else planted: listed without
    // credentials, and its secret cannot be changed through the facade.
    let user: WebhookUser = serde_json::from_value(json!({
        "apiVersion": "webhooks.crownstone.rocks/v1alpha1", "kind": "WebhookUser",
        "metadata": {"name": "planted"}, "spec": {"displayName": "Planted"}
    }))
    .unwrap();
    users.create(&PostParams::default(), &user).await.unwrap();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("planted-credentials".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "apiKey".to_owned(),
            ByteString(b"planted-key".to_vec()),
        )])),
        ..Secret::default()
    };
    h.ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let listed = eventually("the planted user listed", WAIT, || async {
        let answer = f
            .call_at(&base, Method::GET, "/api/users", f.admin(), None, None)
            .await;
        let users = answer.json.as_array()?.clone();
        (!users.is_empty()).then_some(users)
    })
    .await;
    assert_eq!(
        listed,
        vec![
            json!({"id": "planted", "name": "Planted", "apiKey": null, "secret": null, "enabled": true})
        ]
    );
    let answer = f
        .call_at(
            &base,
            Method::PATCH,
            "/api/users/planted",
            f.admin(),
            Some(json!({"secret": "mine-now"}).to_string().into_bytes()),
            Some(JSON),
        )
        .await;
    answer.expect(409);
    // The planted key is no API key.
    f.call_at(
        &base,
        Method::GET,
        "/api/users/isValidApiKey",
        Key::Header("API_KEY", "planted-key"),
        None,
        None,
    )
    .await
    .expect(401);
    alone.shutdown().await;
}

#[tokio::test]
async fn api_keys_are_read_from_every_documented_place() {
    let f = Facade::start("api-keys").await;
    let acme = f.new_user("Acme").await;
    let bearer = format!("Bearer {}", acme.api_key);
    for key in [
        Key::Header("API_KEY", &acme.api_key),
        Key::Header("api_key", &acme.api_key),
        Key::Header("access_token", &acme.api_key),
        Key::Header("Authorization", &bearer),
        Key::Header("Authorization", &acme.api_key),
        Key::Query("api_key", &acme.api_key),
    ] {
        let answer = f
            .call(Method::GET, "/api/users/isValidApiKey", key, None)
            .await;
        assert_eq!(answer.expect(200).json, json!(true), "{key:?}");
        f.call(Method::GET, "/api/listeners", key, None)
            .await
            .expect(200);
    }
    let mut near = acme.api_key.clone().into_bytes();
    near[0] = if near[0] == b'a' { b'b' } else { b'a' };
    let near = String::from_utf8(near).unwrap();
    for key in [
        Key::None,
        Key::Header("API_KEY", ""),
        Key::Header("API_KEY", &near),
        Key::Header("API_KEY", &acme.secret),
        Key::Query("api_key", "x"),
        Key::Header("admin_key", &acme.api_key),
    ] {
        let answer = f
            .call(Method::GET, "/api/users/isValidApiKey", key, None)
            .await;
        assert_eq!(answer.expect(401).message(), "Invalid ApiKey.", "{key:?}");
        assert!(answer.headers.contains_key("www-authenticate"));
        assert!(
            !answer.text.contains(&acme.api_key[..16]),
            "a key echoed back"
        );
    }
}

#[tokio::test]
async fn listener_routes_answer_with_every_status_they_can_give() {
    let f = Facade::start("api-listeners").await;
    let acme = f.new_user("Acme").await;
    let receiver = Receiver::start().await;
    let url = receiver.url().to_string();
    let token = f.token().await;

    let answer = f
        .register(&acme, registration(&token, "user-1", &["command"], &url))
        .await;
    let listener = answer.expect(200).json.clone();
    let id = listener["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("l-"), "{id}");
    assert_eq!(
        listener,
        json!({"id": id, "token": token, "userId": "user-1", "expiresAt": null,
               "eventTypes": ["command"], "url": url, "ownerId": acme.id})
    );
    // Stored as resources: the Listener, and its token in a managed Secret it owns.
    let stored = f.h.ns.api::<Listener>().get(&id).await.unwrap();
    assert_eq!(stored.spec.owner, acme.id);
    let secret =
        f.h.ns
            .api::<Secret>()
            .get(&stored.spec.token_secret_ref.name)
            .await
            .unwrap();
    assert_eq!(
        secret.labels().get(MANAGED_BY.0).map(String::as_str),
        Some(MANAGED_BY.1)
    );
    assert_eq!(secret.owner_references()[0].name, id);
    assert_eq!(f.stored_token(&id).await.as_deref(), Some(token.as_str()));
    f.h.wait_ready(&id).await;

    assert_eq!(f.listeners(&acme).await, vec![listener.clone()]);
    let active = |query: &'static str| {
        let f = &f;
        let acme = &acme;
        async move {
            f.call(
                Method::GET,
                &format!("/api/listeners/active{query}"),
                api_key(acme),
                None,
            )
            .await
        }
    };
    assert_eq!(active("?userId=user-1").await.expect(200).json, json!(true));
    assert_eq!(
        active("?userId=someone-else").await.expect(200).json,
        json!(false)
    );
    active("").await.expect(400);
    active("?userId=").await.expect(400);
    let long = format!("/api/listeners/active?userId={}", "u".repeat(300));
    f.call(Method::GET, &long, api_key(&acme), None)
        .await
        .expect(422);
    f.call(
        Method::GET,
        "/api/listeners/active?userId=user-1",
        Key::None,
        None,
    )
    .await
    .expect(401);

    // DELETE /listeners/{id}
    let path = format!("/api/listeners/{id}");
    f.call(Method::DELETE, &path, Key::None, None)
        .await
        .expect(401);
    let answer = f.call(Method::DELETE, &path, api_key(&acme), None).await;
    assert_eq!(answer.expect(200).json, json!({"count": 1}));
    f.call(Method::DELETE, &path, api_key(&acme), None)
        .await
        .expect(404);
    f.call(
        Method::DELETE,
        "/api/listeners/l-unknown",
        api_key(&acme),
        None,
    )
    .await
    .expect(404);
    assert!(f.listeners(&acme).await.is_empty());
    assert_eq!(
        active("?userId=user-1").await.expect(200).json,
        json!(false)
    );
    f.h.wait_gone(&id).await;
    f.h.wait_secret_gone(&stored.spec.token_secret_ref.name)
        .await;

    // DELETE /listeners/userId
    for path in ["/a", "/b"] {
        let url = receiver.url_with_path(path).to_string();
        f.register(&acme, registration(&token, "user-1", &["command"], &url))
            .await
            .expect(200);
    }
    let other_user = f
        .register(&acme, registration(&token, "user-2", &["command"], &url))
        .await;
    other_user.expect(200);
    let answer = f
        .call(
            Method::DELETE,
            "/api/listeners/userId?userId=user-1",
            api_key(&acme),
            None,
        )
        .await;
    assert_eq!(answer.expect(200).json, json!({"count": 2}));
    let answer = f
        .call(
            Method::DELETE,
            "/api/listeners/userId?userId=user-1",
            api_key(&acme),
            None,
        )
        .await;
    assert_eq!(answer.expect(200).json, json!({"count": 0}));
    f.call(
        Method::DELETE,
        "/api/listeners/userId",
        api_key(&acme),
        None,
    )
    .await
    .expect(400);
    f.call(
        Method::DELETE,
        "/api/listeners/userId?userId=user-1",
        Key::None,
        None,
    )
    .await
    .expect(401);
    let left = f.listeners(&acme).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["userId"], "user-2");

    // DELETE /listeners/token
    let path = format!("/api/listeners/token?token={token}");
    let answer = f.call(Method::DELETE, &path, api_key(&acme), None).await;
    assert_eq!(answer.expect(200).json, json!({"count": 1}));
    let answer = f.call(Method::DELETE, &path, api_key(&acme), None).await;
    assert_eq!(answer.expect(200).json, json!({"count": 0}));
    f.call(Method::DELETE, "/api/listeners/token", api_key(&acme), None)
        .await
        .expect(400);
    f.call(Method::DELETE, &path, Key::None, None)
        .await
        .expect(401);
    assert!(f.listeners(&acme).await.is_empty());
    f.wait_no_listeners().await;

    // A token Crownstone refuses: 400 and nothing stored; nor for a revoked one.
    let before = f.object_counts().await;
    let answer = f
        .register(
            &acme,
            registration("not-a-token", "user-1", &["command"], &url),
        )
        .await;
    assert_eq!(answer.expect(400).message(), "Invalid token.");
    let revoked = f.token().await;
    f.h.admin.revoke_token(&revoked).await.unwrap();
    let answer = f
        .register(&acme, registration(&revoked, "user-1", &["command"], &url))
        .await;
    assert_eq!(answer.expect(400).message(), "Invalid token.");
    // Crownstone cannot be reached: 503 with a reason, nothing stored.
    f.h.admin.set_outage(true).await.unwrap();
    let answer = f
        .register(
            &acme,
            registration(&f.token().await, "user-1", &["command"], &url),
        )
        .await;
    answer.expect(503);
    assert!(answer.message().contains("Crownstone"), "{}", answer.text);
    f.h.admin.set_outage(false).await.unwrap();
    assert_eq!(f.object_counts().await, before);
    f.call(
        Method::POST,
        "/api/listeners",
        Key::None,
        Some(registration(&token, "u", &["command"], &url)),
    )
    .await
    .expect(401);
    assert_eq!(
        f.metric(r#"crownstone_webhooks_api_token_checks_total{outcome="invalid",via="stream"}"#)
            .await,
        2.0
    );
    assert_eq!(
        f.metric(
            r#"crownstone_webhooks_api_token_checks_total{outcome="unreachable",via="stream"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn clients_cannot_see_test_or_delete_each_others_listeners() {
    let f = Facade::start("api-isolation").await;
    let acme = f.new_user("Acme").await;
    let other = f.new_user("Other").await;
    let receiver = Receiver::start().await;
    let url = receiver.url().to_string();
    let token = f.token().await;
    let mine = f
        .register(&acme, registration(&token, "user-1", &["command"], &url))
        .await;
    let mine = mine.expect(200).json["id"].as_str().unwrap().to_owned();

    assert!(f.listeners(&other).await.is_empty());
    let answer = f
        .call(
            Method::GET,
            "/api/listeners/active?userId=user-1",
            api_key(&other),
            None,
        )
        .await;
    assert_eq!(answer.expect(200).json, json!(false));
    f.call(
        Method::DELETE,
        &format!("/api/listeners/{mine}"),
        api_key(&other),
        None,
    )
    .await
    .expect(404);
    for path in [
        "/api/listeners/userId?userId=user-1".to_owned(),
        format!("/api/listeners/token?token={token}"),
    ] {
        let answer = f.call(Method::DELETE, &path, api_key(&other), None).await;
        assert_eq!(answer.expect(200).json, json!({"count": 0}), "{path}");
    }
    assert_eq!(f.listeners(&acme).await.len(), 1);
    assert!(f
        .h
        .ns
        .api::<Listener>()
        .get_opt(&mine)
        .await
        .unwrap()
        .is_some());

    // The same registration by another client is another client's listener.
    let theirs = f
        .register(&other, registration(&token, "user-1", &["command"], &url))
        .await;
    let theirs = theirs.expect(200).json.clone();
    assert_ne!(theirs["id"].as_str().unwrap(), mine);
    assert_eq!(theirs["ownerId"], other.id.as_str());
    assert_eq!(f.listeners(&other).await, vec![theirs.clone()]);
    let acme_sees = f.listeners(&acme).await;
    assert_eq!(acme_sees.len(), 1);
    assert_eq!(acme_sees[0]["id"], mine.as_str());
    // Deleting theirs by token leaves mine.
    let answer = f
        .call(
            Method::DELETE,
            &format!("/api/listeners/token?token={token}"),
            api_key(&other),
            None,
        )
        .await;
    assert_eq!(answer.expect(200).json, json!({"count": 1}));
    assert_eq!(f.listeners(&acme).await.len(), 1);
}

#[tokio::test]
async fn registrations_are_deduplicated_as_upstream_does() {
    let f = Facade::start("api-dedup").await;
    let acme = f.new_user("Acme").await;
    let receiver = Receiver::start().await;
    let url = receiver.url().to_string();
    let first_token = f.token().await;
    let body = registration(&first_token, "user-1", &["command", "presence"], &url);

    let first = f.register(&acme, body.clone()).await;
    let id = first.expect(200).json["id"].as_str().unwrap().to_owned();
    // The same request ten times: one listener.
    for _ in 0..10 {
        let again = f.register(&acme, body.clone()).await;
        assert_eq!(again.expect(200).json["id"], id.as_str());
    }
    // A subset of its types: the same listener, with its own types.
    let subset = f
        .register(
            &acme,
            registration(&first_token, "user-1", &["presence"], &url),
        )
        .await;
    assert_eq!(subset.expect(200).json["id"], id.as_str());
    assert_eq!(subset.json["eventTypes"], json!(["command", "presence"]));
    assert_eq!(f.object_counts().await.0, 1);
    // Every token check after the first was skipped: the token was already the listener's.
    assert_eq!(
        f.metric(r#"crownstone_webhooks_api_token_checks_total{outcome="valid",via="stream"}"#)
            .await,
        1.0
    );

    // A type it does not have, or another url: new listeners.
    let wider = f
        .register(
            &acme,
            registration(&first_token, "user-1", &["command", "dataChange"], &url),
        )
        .await;
    let wider = wider.expect(200).json["id"].as_str().unwrap().to_owned();
    let elsewhere_url = receiver.url_with_path("/elsewhere").to_string();
    let elsewhere = f
        .register(
            &acme,
            registration(&first_token, "user-1", &["command"], &elsewhere_url),
        )
        .await;
    let elsewhere = elsewhere.expect(200).json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(wider, id);
    assert_ne!(elsewhere, id);
    assert_ne!(elsewhere, wider);
    assert_eq!(f.object_counts().await.0, 3);

    // A new valid token: replaced in the listener's Secret.
    let second_token = f.token().await;
    let replaced = f
        .register(
            &acme,
            registration(&second_token, "user-1", &["command", "presence"], &url),
        )
        .await;
    assert_eq!(replaced.expect(200).json["id"], id.as_str());
    assert_eq!(replaced.json["token"], second_token.as_str());
    assert_eq!(
        f.stored_token(&id).await.as_deref(),
        Some(second_token.as_str())
    );
    // An invalid token: 400, and the listener keeps its token.
    let refused = f
        .register(
            &acme,
            registration("expired-or-made-up", "user-1", &["command"], &url),
        )
        .await;
    refused.expect(400);
    assert_eq!(
        f.stored_token(&id).await.as_deref(),
        Some(second_token.as_str())
    );
    let listed = f.listeners(&acme).await;
    let shown = listed.iter().find(|l| l["id"] == id.as_str()).unwrap();
    assert_eq!(shown["token"], second_token.as_str());
    assert_eq!(f.object_counts().await.0, 3);

    // The operator follows the Secret: when the first token expires, only the listeners
    // still on it go.
    f.h.admin.revoke_token(&first_token).await.unwrap();
    f.h.wait_gone(&wider).await;
    f.h.wait_gone(&elsewhere).await;
    f.h.wait_ready(&id).await;
    assert_eq!(f.listeners(&acme).await.len(), 1);
}

#[tokio::test]
async fn racing_identical_registrations_make_one_listener() {
    let f = Facade::start("api-race").await;
    let acme = f.new_user("Acme").await;
    let receiver = Receiver::start().await;
    let token = f.token().await;
    let body = registration(&token, "user-1", &["command"], receiver.url().as_str());
    let answers = futures::future::join_all((0..8).map(|_| f.register(&acme, body.clone()))).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|a| a.expect(200).json["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "one listener for every answer: {ids:?}");
    // One Listener, and besides the credentials one token Secret: the losers removed theirs.
    assert_eq!(f.object_counts().await, (1, 2));
    assert_eq!(f.listeners(&acme).await.len(), 1);
}

#[tokio::test]
async fn deleting_a_user_removes_its_listeners_and_their_secrets() {
    let f = Facade::start("api-user-delete").await;
    let acme = f.new_user("Acme").await;
    let other = f.new_user("Other").await;
    let receiver = Receiver::start().await;
    let token = f.token().await;
    let mut acme_listeners = Vec::new();
    for path in ["/a", "/b"] {
        let url = receiver.url_with_path(path).to_string();
        let answer = f
            .register(&acme, registration(&token, "user-1", &["command"], &url))
            .await;
        acme_listeners.push(answer.expect(200).json["id"].as_str().unwrap().to_owned());
    }
    let theirs = f
        .register(
            &other,
            registration(&token, "user-1", &["command"], receiver.url().as_str()),
        )
        .await;
    let theirs = theirs.expect(200).json["id"].as_str().unwrap().to_owned();
    let secrets: Vec<String> = {
        let mut names = Vec::new();
        for id in &acme_listeners {
            let l = f.h.ns.api::<Listener>().get(id).await.unwrap();
            names.push(l.spec.token_secret_ref.name);
        }
        names
    };

    f.call(
        Method::DELETE,
        &format!("/api/users/{}", acme.id),
        f.admin(),
        None,
    )
    .await
    .expect(204);
    for id in &acme_listeners {
        f.h.wait_gone(id).await;
    }
    for name in &secrets {
        f.h.wait_secret_gone(name).await;
    }
    f.call(Method::GET, "/api/listeners", api_key(&acme), None)
        .await
        .expect(401);
    assert!(f
        .h
        .ns
        .api::<Listener>()
        .get_opt(&theirs)
        .await
        .unwrap()
        .is_some());
    assert_eq!(f.listeners(&other).await.len(), 1);
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let f = Facade::start("api-bad-input").await;
    let acme = f.new_user("Acme").await;
    let token = f.token().await;
    let url = "http://127.0.0.1:9/hook";
    let valid = registration(&token, "user-1", &["command"], url);
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body.to_string().into_bytes()
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        body.to_string().into_bytes()
    };
    const FORM: &str = "application/x-www-form-urlencoded";
    let cases: Vec<(&str, Vec<u8>, &str, u16)> = vec![
        ("malformed JSON", b"{\"token\": ".to_vec(), JSON, 400),
        ("an empty body", Vec::new(), JSON, 400),
        ("not JSON at all", b"token=x".to_vec(), JSON, 400),
        ("a form instead of JSON", b"token=x".to_vec(), FORM, 415),
        ("an array", b"[]".to_vec(), JSON, 422),
        ("no token", without("token"), JSON, 422),
        ("no userId", without("userId"), JSON, 422),
        ("no eventTypes", without("eventTypes"), JSON, 422),
        ("no url", without("url"), JSON, 422),
        (
            "an unknown field",
            with("ownerId", json!("someone-else")),
            JSON,
            422,
        ),
        ("a number as userId", with("userId", json!(42)), JSON, 422),
        (
            "a string as eventTypes",
            with("eventTypes", json!("command")),
            JSON,
            422,
        ),
        ("null as token", with("token", Value::Null), JSON, 422),
        ("empty eventTypes", with("eventTypes", json!([])), JSON, 422),
        (
            "an unknown event type",
            with("eventTypes", json!(["ping"])),
            JSON,
            422,
        ),
        (
            "a duplicate event type",
            with("eventTypes", json!(["command", "command"])),
            JSON,
            422,
        ),
        (
            "an ftp url",
            with("url", json!("ftp://127.0.0.1/hook")),
            JSON,
            422,
        ),
        ("a relative url", with("url", json!("/hook")), JSON, 422),
        (
            "a javascript url",
            with("url", json!("javascript:alert(1)")),
            JSON,
            422,
        ),
        (
            "an url of 2049 characters",
            with(
                "url",
                json!(format!("http://h.example/{}", "a".repeat(2032))),
            ),
            JSON,
            422,
        ),
        ("an empty userId", with("userId", json!("")), JSON, 422),
        (
            "an absurd userId",
            with("userId", json!("u".repeat(100_000))),
            JSON,
            413,
        ),
        (
            "a long userId",
            with("userId", json!("u".repeat(5_000))),
            JSON,
            422,
        ),
        (
            "a long token",
            with("token", json!("t".repeat(10_000))),
            JSON,
            422,
        ),
        (
            "a body over 64 KiB",
            with("padding", json!("x".repeat(70_000))),
            JSON,
            413,
        ),
    ];
    let before = f.object_counts().await;
    for (what, body, content_type, status) in &cases {
        let answer = f
            .call_at(
                f.base(),
                Method::POST,
                "/api/listeners",
                api_key(&acme),
                Some(body.clone()),
                Some(*content_type),
            )
            .await;
        assert_eq!(answer.status.as_u16(), *status, "{what}: {}", answer.text);
        answer.expect(*status);
        assert!(
            !answer.text.contains(&token),
            "{what}: the token was echoed"
        );
    }
    // Routes that do not exist, and methods a route does not have.
    for (method, path, status) in [
        (Method::GET, "/api/nothing", 404),
        (Method::GET, "/nothing", 404),
        (Method::POST, "/api/listeners/active", 405),
        (Method::PUT, "/api/listeners", 405),
        (Method::GET, "/api/users/u-1", 405),
    ] {
        let answer = f.call(method.clone(), path, api_key(&acme), None).await;
        answer.expect(status);
        if status == 405 {
            assert!(
                answer.headers.contains_key("allow"),
                "{method} {path}: no Allow"
            );
        }
    }
    assert_eq!(f.object_counts().await, before, "nothing was stored");
    assert!(f.listeners(&acme).await.is_empty());
    // Each refusal was counted by status, none as a server error.
    let metrics = f
        .call_at(
            f.metrics_base(),
            Method::GET,
            "/metrics",
            Key::None,
            None,
            None,
        )
        .await
        .text;
    let route =
        r#"crownstone_webhooks_api_requests_total{method="POST",route="/api/listeners",status="#;
    let count = |status: u16| metric_value(&metrics, &format!("{route}\"{status}\"}}"));
    let expected = |status: u16| cases.iter().filter(|c| c.3 == status).count() as f64;
    for status in [400, 413, 415, 422] {
        assert_eq!(count(status), expected(status), "{status}");
    }
    assert!(!metrics.contains("status=\"500\""), "{metrics}");
}

#[tokio::test]
async fn a_listener_registered_over_rest_receives_signed_events() {
    let f = Facade::start("api-delivery").await;
    let acme = f.new_user("Acme").await;
    let receiver = Receiver::start().await;
    let token = f.token().await;
    let answer = f
        .register(
            &acme,
            registration(&token, "user-1", &["command"], receiver.url().as_str()),
        )
        .await;
    let id = answer.expect(200).json["id"].as_str().unwrap().to_owned();
    f.h.wait_ready(&id).await;

    let event = samples::multi_switch(SPHERE);
    f.h.admin
        .publish(std::slice::from_ref(&event))
        .await
        .unwrap();
    let requests = receiver.wait_for_requests(1, WAIT).await;
    let body = requests[0].json();
    assert_eq!(
        body,
        json!({"clientId": acme.id, "clientSecret": acme.secret, "userId": "user-1", "data": event})
    );
    assert!(signed_with(&requests[0], &acme.secret));

    // A new secret through the admin API signs the next deliveries.
    f.call(
        Method::PATCH,
        &format!("/api/users/{}", acme.id),
        f.admin(),
        Some(json!({"secret": "rotated-client-secret"})),
    )
    .await
    .expect(204);
    eventually("a delivery signed with the new secret", WAIT, || async {
        let before = receiver.request_count();
        f.h.admin
            .publish(&[samples::multi_switch(SPHERE)])
            .await
            .ok()?;
        let requests = receiver.wait_for_requests(before + 1, WAIT).await;
        signed_with(&requests[before], "rotated-client-secret").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_token_the_operator_streams_is_trusted_without_a_second_stream() {
    let f = Facade::start("api-trust").await;
    let acme = f.new_user("Acme").await;
    let receiver = Receiver::start().await;
    let token = f.token().await;
    let first = f
        .register(
            &acme,
            registration(&token, "user-1", &["command"], receiver.url().as_str()),
        )
        .await;
    let id = first.expect(200).json["id"].as_str().unwrap().to_owned();
    f.h.wait_ready(&id).await;

    // New streams now fail; the open one goes on.
    f.h.admin.set_outage(true).await.unwrap();
    let url = receiver.url_with_path("/second").to_string();
    f.register(&acme, registration(&token, "user-1", &["command"], &url))
        .await
        .expect(200);
    assert_eq!(
        f.metric(r#"crownstone_webhooks_api_token_checks_total{outcome="valid",via="forwarder"}"#)
            .await,
        1.0
    );
    // A facade without forwarders (the `api` process) must ask, and cannot now.
    let alone = start_facade(&f.h, AdminKeySource::None, None).await;
    let base = format!("http://{}", alone.addr());
    let before = f.object_counts().await;
    let third = receiver.url_with_path("/third").to_string();
    let answer = f
        .call_at(
            &base,
            Method::POST,
            "/api/listeners",
            api_key(&acme),
            Some(
                registration(&token, "user-1", &["command"], &third)
                    .to_string()
                    .into_bytes(),
            ),
            Some(JSON),
        )
        .await;
    answer.expect(503);
    assert_eq!(f.object_counts().await, before);
    f.h.admin.set_outage(false).await.unwrap();
    alone.shutdown().await;
}

#[tokio::test]
async fn the_openapi_document_health_and_metrics_are_served() {
    let f = Facade::start("api-openapi").await;
    let acme = f.new_user("Acme").await;
    let answer = f
        .call_at(
            f.base(),
            Method::GET,
            "/api/openapi.json",
            Key::None,
            None,
            None,
        )
        .await;
    let doc = answer.expect(200).json.clone();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(operations, 13);
    assert!(
        doc["paths"]["/api/users/{id}/rotate"]["post"].is_object(),
        "the rotate action is documented"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["apiKey"]["name"],
        "API_KEY"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["adminKey"]["name"],
        "admin_key"
    );
    for path in ["/healthz", "/readyz"] {
        f.call_at(f.base(), Method::GET, path, Key::None, None, None)
            .await
            .expect(200);
    }

    let token = f.token().await;
    let receiver = Receiver::start().await;
    let answer = f
        .register(
            &acme,
            registration(&token, "user-1", &["command"], receiver.url().as_str()),
        )
        .await;
    let id = answer.expect(200).json["id"].as_str().unwrap().to_owned();
    f.call(
        Method::DELETE,
        &format!("/api/listeners/{id}"),
        api_key(&acme),
        None,
    )
    .await
    .expect(200);
    f.call(Method::GET, "/api/nothing", api_key(&acme), None)
        .await
        .expect(404);
    let text = f
        .call_at(
            f.metrics_base(),
            Method::GET,
            "/metrics",
            Key::None,
            None,
            None,
        )
        .await
        .text;
    for series in [
        r#"crownstone_webhooks_api_requests_total{method="POST",route="/api/users",status="200"}"#,
        r#"crownstone_webhooks_api_requests_total{method="POST",route="/api/listeners",status="200"}"#,
        r#"crownstone_webhooks_api_requests_total{method="DELETE",route="/api/listeners/{id}",status="200"}"#,
        r#"crownstone_webhooks_api_requests_total{method="GET",route="unmatched",status="404"}"#,
        r#"crownstone_webhooks_api_request_duration_seconds_count{method="POST",route="/api/listeners"}"#,
    ] {
        assert_eq!(metric_value(&text, series), 1.0, "{series}\n{text}");
    }
    for secret in [
        &acme.api_key,
        &acme.secret,
        &f.admin_key,
        &token,
        &id,
        &acme.id,
    ] {
        assert!(!text.contains(secret.as_str()), "metrics name {secret}");
    }
}

/// Runs schemathesis against the document with one key, and returns its exit status and
/// output.
async fn schemathesis(f: &Facade, header: String) -> (bool, String) {
    let bin = python_bin().await;
    // Its working directory takes its caches, outside the checkout.
    let workdir = tempfile::tempdir().unwrap();
    let config = workdir.path().join("schemathesis.toml");
    // Keys are given, not generated: a generated `api_key` may be a real key that a response
    // of POST /users showed, and schemathesis would take its acceptance for ignored auth.
    // POST /listeners checks tokens with Crownstone: schema-valid random tokens are refused
    // with 400 `Invalid token.`, which is no rejection of well-formed input.
    std::fs::write(
        &config,
        r#"
[generation]
with-security-parameters = false

[[operations]]
include-path = "/api/listeners"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404"]
"#,
    )
    .unwrap();
    let output = tokio::process::Command::new(bin.join("schemathesis"))
        .current_dir(workdir.path())
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{}/api/openapi.json", f.base())])
        .args(["--checks", "all", "--max-examples", "50"])
        .args(["--workers", "2", "--seed", "7", "--request-timeout", "20"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .arg("-H")
        .arg(header)
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", "")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("schemathesis runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_answer_the_document_does_not_allow() {
    let f = Facade::start("api-fuzz").await;
    let acme = f.new_user("Fuzzer").await;
    let (ok, output) = schemathesis(&f, format!("API_KEY: {}", acme.api_key)).await;
    assert!(ok, "schemathesis with the API key failed:\n{output}");
    let (ok, output) = schemathesis(&f, format!("admin_key: {}", f.admin_key)).await;
    assert!(ok, "schemathesis with the admin key failed:\n{output}");
}

/// The binary, run as a pod runs it; its JSON log lines are read for where it listens.
struct Process {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Process {
    fn spawn(args: &[&str]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
            .args(args)
            .args(["--log-format", "json"])
            .env("KUBECONFIG", &control_plane().kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let (send, lines) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = send.send(line);
                }
            });
        }
        Process { child, lines }
    }

    /// The `field` of the first log line with `message`.
    fn logged(&self, message: &str, field: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        while std::time::Instant::now() < deadline {
            let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            if let Ok(value) = serde_json::from_str::<Value>(&line) {
                if value["fields"]["message"] == message {
                    return value["fields"][field].as_str().unwrap().to_owned();
                }
            }
            seen.push(line);
        }
        panic!("no log line {message:?}; saw {seen:#?}");
    }

    /// Stops it as Kubernetes stops a pod; returns whether it exited cleanly.
    fn stop(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Waits for it to exit by itself; returns its status and everything it logged.
    fn finish(mut self) -> (bool, String) {
        let status = self.child.wait().expect("waits");
        let mut text = String::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            text.push_str(&line);
            text.push('\n');
        }
        (status.success(), text)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

async fn ready(url: String) {
    eventually(&format!("{url} ready"), WAIT, || async {
        let status = reqwest::get(&url).await.ok()?.status();
        status.is_success().then_some(())
    })
    .await
}

#[tokio::test]
async fn the_binary_serves_the_api_alone_and_beside_the_controller() {
    let h = Harness::start("api-binary").await;
    let admin = random_key();
    let events = h.sim.base_url();
    let ns = h.ns.name.clone();

    // `api`: the facade alone, in its namespace, with the controller elsewhere (the harness's).
    let process = Process::spawn(&[
        "api",
        "--api-listen",
        "127.0.0.1:0",
        "--api-metrics-listen",
        "127.0.0.1:0",
        "--api-namespace",
        &ns,
        "--events-url",
        &events,
        "--admin-key",
        &admin,
    ]);
    let addr = process.logged("REST API started.", "addr");
    ready(format!("http://{addr}/readyz")).await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("http://{addr}/api/users"))
        .header("admin_key", &admin)
        .json(&json!({"name": "Made by the api process"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["apiKey"]
        .as_str()
        .expect("credentials from the controller");
    let valid = http
        .get(format!("http://{addr}/api/users/isValidApiKey"))
        .header("API_KEY", key)
        .send()
        .await
        .unwrap();
    assert_eq!(valid.status(), 200);
    assert!(process.stop(), "the api process stops cleanly");

    // `run`: controller and facade side by side, each on its own port. Its namespace is
    // the one it watches.
    let mut harness = h;
    harness.stop_operator().await;
    let process = Process::spawn(&[
        "run",
        "--events-url",
        &events,
        "--watch-namespace",
        &ns,
        "--health-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--admin-key",
        &admin,
    ]);
    let health = process.logged("Operator started.", "health_addr");
    let addr = process.logged("REST API started.", "addr");
    assert_ne!(health, addr);
    ready(format!("http://{health}/readyz")).await;
    ready(format!("http://{addr}/readyz")).await;
    let created = http
        .post(format!("http://{addr}/api/users"))
        .header("admin_key", &admin)
        .json(&json!({"name": "Made by the run process"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.status(),
        200,
        "the in-process controller made the credentials"
    );
    assert!(process.stop(), "the run process stops cleanly");

    // `run` refuses an API namespace its controller does not watch.
    let process = Process::spawn(&[
        "run",
        "--events-url",
        &events,
        "--watch-namespace",
        &ns,
        "--api-namespace",
        "elsewhere",
        "--health-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
    ]);
    let (ok, text) = process.finish();
    assert!(!ok);
    assert!(text.contains("elsewhere"), "{text}");
    // `controller` has no REST API.
    let help = Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
        .args(["controller", "--help"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("--api-listen"));
    let help = Command::new(env!("CARGO_BIN_EXE_crownstone-webhooks"))
        .args(["api", "--help"])
        .env("CROWNSTONE_USER_ADMIN_KEY", "do-not-print-me")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--admin-key"));
    assert!(!help.contains("do-not-print-me"), "the admin key in --help");
}
