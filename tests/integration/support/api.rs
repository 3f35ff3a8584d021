//! The REST facade under test: an operator (see `operator.rs`) and the facade in this process,
//! both on the test's namespace and simulator, and a small client speaking to the facade on
//! 127.0.0.1 with either kind of key.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crownstone_webhooks::api::{
    self, AdminKeySource, ApiMetricsExport, ApiSettings, RateLimit, RunningApi, SecretKeyName,
};
use crownstone_webhooks::forwarder::ForwarderRegistry;
use crownstone_webhooks::resources::Listener;
use k8s_openapi::api::core::v1::Secret;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use url::Url;

use super::cluster::eventually;
use super::operator::{Harness, WAIT};

/// The content type of JSON bodies.
pub const JSON: &str = "application/json";

/// A client of the service: what `POST /users` answered.
#[derive(Clone, Debug)]
pub struct ApiUser {
    pub id: String,
    pub api_key: String,
    pub secret: String,
}

/// One answer of the facade.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    /// The body as JSON; `Null` when empty or not JSON.
    pub json: Value,
    pub text: String,
}

impl Answer {
    /// Asserts the status and, for an error, LoopBack's shape with that status.
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {}",
            self.text
        );
        if status >= 400 {
            let error = &self.json["error"];
            assert_eq!(
                error["statusCode"], status,
                "not LoopBack's shape: {}",
                self.text
            );
            assert!(error["name"].is_string(), "{}", self.text);
            assert!(error["message"].is_string(), "{}", self.text);
        }
        self
    }

    pub fn message(&self) -> &str {
        self.json["error"]["message"].as_str().unwrap_or_default()
    }
}

/// How a request carries its key.
#[derive(Clone, Copy, Debug)]
pub enum Key<'a> {
    None,
    /// A header, e.g. `("API_KEY", key)`.
    Header(&'a str, &'a str),
    /// A query parameter, e.g. `("api_key", key)`.
    Query(&'a str, &'a str),
}

/// An operator and a facade on one namespace.
pub struct Facade {
    pub h: Harness,
    /// Serves for as long as the test holds this.
    _api: RunningApi,
    pub admin_key: String,
    base: String,
    metrics_base: String,
    http: reqwest::Client,
}

/// Facade settings for tests: loopback, the harness's namespace and simulator.
pub fn test_settings(h: &Harness, admin_key: AdminKeySource) -> ApiSettings {
    ApiSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics: ApiMetricsExport::Listen("127.0.0.1:0".parse().unwrap()),
        namespace: h.ns.name.clone(),
        admin_key,
        events_url: Url::parse(&h.sim.base_url()).unwrap(),
        events_proxy: None,
        token_check_timeout: Duration::from_secs(5),
        token_check_concurrency: 32,
        credentials_wait: WAIT,
        delete_wait: WAIT,
        // Far above what any test but the rate limit's own sends.
        rate_limit: RateLimit {
            per_second: 10_000,
            burst: 10_000,
        },
        request_timeout: WAIT,
        header_read_timeout: WAIT,
        max_listeners_per_user: 1000,
    }
}

/// Starts a facade and waits until its caches are synced.
pub async fn start_facade(
    h: &Harness,
    admin_key: AdminKeySource,
    forwarders: Option<ForwarderRegistry>,
) -> RunningApi {
    let facade = api::start(h.ns.client.clone(), test_settings(h, admin_key), forwarders)
        .await
        .expect("the facade starts");
    assert!(facade.wait_ready(WAIT).await, "the facade's caches sync");
    facade
}

/// An admin key for a test.
pub fn random_key() -> String {
    format!("admin-{:016x}", rand::random::<u64>())
}

impl Facade {
    /// Operator and facade as `run` wires them: the facade trusts the operator's streams.
    pub async fn start(prefix: &str) -> Facade {
        let h = Harness::start(prefix).await;
        let admin_key = random_key();
        let forwarders = h.operator.as_ref().map(|o| o.forwarders().clone());
        let api = start_facade(
            &h,
            AdminKeySource::Fixed(admin_key.parse().unwrap()),
            forwarders,
        )
        .await;
        Facade::around(h, api, admin_key)
    }

    fn around(h: Harness, api: RunningApi, admin_key: String) -> Facade {
        let base = format!("http://{}", api.addr());
        let metrics_base = format!("http://{}", api.metrics_addr().expect("own metrics server"));
        Facade {
            h,
            metrics_base,
            _api: api,
            admin_key,
            base,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `http://127.0.0.1:<port>` of the facade's metrics server.
    pub fn metrics_base(&self) -> &str {
        &self.metrics_base
    }

    /// Sends `method path` with `key` and an optional JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Key<'_>,
        body: Option<Value>,
    ) -> Answer {
        self.call_at(
            &self.base,
            method,
            path,
            key,
            body.map(|b| b.to_string().into_bytes()),
            Some(JSON),
        )
        .await
    }

    /// Sends a raw body (or none) with a content type (or none), as the test says.
    pub async fn call_at(
        &self,
        base: &str,
        method: Method,
        path: &str,
        key: Key<'_>,
        body: Option<Vec<u8>>,
        content_type: Option<&str>,
    ) -> Answer {
        let mut url = Url::parse(&format!("{base}{path}")).expect("test url");
        if let Key::Query(name, value) = key {
            url.query_pairs_mut().append_pair(name, value);
        }
        let mut request = self.http.request(method, url);
        if let Key::Header(name, value) = key {
            request = request.header(name, value);
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("the facade answers in time")
            .expect("the request completes");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a body");
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            status.as_u16() < 500 || status.as_u16() == 503,
            "a server error: {status} {text}"
        );
        Answer {
            status,
            headers,
            json,
            text,
        }
    }

    /// The admin key in its header.
    pub fn admin(&self) -> Key<'_> {
        Key::Header("admin_key", &self.admin_key)
    }

    /// A new client of the service, made through `POST /users`.
    pub async fn new_user(&self, name: &str) -> ApiUser {
        let answer = self
            .call(
                Method::POST,
                "/api/users",
                self.admin(),
                Some(json!({"name": name})),
            )
            .await;
        answer.expect(200);
        ApiUser {
            id: answer.json["id"].as_str().expect("id").to_owned(),
            api_key: answer.json["apiKey"].as_str().expect("apiKey").to_owned(),
            secret: answer.json["secret"].as_str().expect("secret").to_owned(),
        }
    }

    /// `POST /api/listeners` as `user`.
    pub async fn register(&self, user: &ApiUser, body: Value) -> Answer {
        self.call(
            Method::POST,
            "/api/listeners",
            Key::Header("API_KEY", &user.api_key),
            Some(body),
        )
        .await
    }

    /// `GET /api/listeners` as `user`: the listeners' JSON.
    pub async fn listeners(&self, user: &ApiUser) -> Vec<Value> {
        let answer = self
            .call(
                Method::GET,
                "/api/listeners",
                Key::Header("API_KEY", &user.api_key),
                None,
            )
            .await;
        answer.expect(200);
        answer.json.as_array().expect("an array").clone()
    }

    /// A fresh token of `user-1` on sphere `sphere-1`.
    pub async fn token(&self) -> String {
        self.h.token("user-1", "sphere-1").await
    }

    /// How many Listeners and Secrets the namespace holds, from the API server.
    pub async fn object_counts(&self) -> (usize, usize) {
        let listeners = self
            .h
            .ns
            .api::<Listener>()
            .list(&Default::default())
            .await
            .unwrap();
        let secrets = self
            .h
            .ns
            .api::<Secret>()
            .list(&Default::default())
            .await
            .unwrap();
        (listeners.items.len(), secrets.items.len())
    }

    /// The value of one series of the facade's `/metrics`; 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .call_at(
                &self.metrics_base,
                Method::GET,
                "/metrics",
                Key::None,
                None,
                None,
            )
            .await
            .text;
        metric_value(&text, series)
    }

    /// The token stored in a Listener's Secret, read from the API server.
    pub async fn stored_token(&self, listener: &str) -> Option<String> {
        let listener = self.h.ns.api::<Listener>().get(listener).await.ok()?;
        let reference = listener.spec.token_secret_ref;
        let secret = self
            .h
            .ns
            .api::<Secret>()
            .get_opt(&reference.name)
            .await
            .ok()??;
        String::from_utf8(secret.data?.get(&reference.key)?.0.clone()).ok()
    }

    /// Waits until the namespace has no Listener left.
    pub async fn wait_no_listeners(&self) {
        let api = self.h.ns.api::<Listener>();
        eventually("no Listener left", WAIT, || async {
            api.list(&Default::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await
    }
}

/// One series' value in a Prometheus text exposition; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A listener registration body.
pub fn registration(token: &str, user_id: &str, types: &[&str], url: &str) -> Value {
    json!({"token": token, "userId": user_id, "eventTypes": types, "url": url})
}

/// Where the admin key of a facade comes from in a Secret.
pub fn admin_secret(name: &str, key: &str) -> AdminKeySource {
    AdminKeySource::Secret(SecretKeyName {
        name: name.to_owned(),
        key: key.to_owned(),
    })
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory of the project's Python environment's executables, created on first use.
pub async fn python_bin() -> PathBuf {
    let output = tokio::process::Command::new("bash")
        .arg(repo_root().join("hack/python-env.sh"))
        .current_dir(repo_root())
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("hack/python-env.sh runs");
    assert!(output.status.success(), "hack/python-env.sh failed");
    let python = PathBuf::from(String::from_utf8(output.stdout).expect("a path").trim());
    python.parent().expect("a bin directory").to_owned()
}
