//! The chart's Grafana dashboard and PrometheusRule against a real operator's `/metrics`: every
//! expression parses as PromQL, and every metric its selectors name is one the operator (with the
//! REST API's metrics, as `run` serves them) exposes.

use std::collections::BTreeSet;

use promql_parser::parser::{self, Expr};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_yaml::Value;

use crate::chart::{documents, find, render};
use crownstone_webhooks::api::{self, AdminKeySource, ApiMetricsExport};
use crownstone_webhooks::crownstone::samples;

use crate::support::api::{random_key, test_settings};
use crate::support::operator::{Harness, WAIT};
use crate::support::receiver::Receiver;

const RELEASE: &str = "obs";
const NAMESPACE: &str = "monitoring-test";

/// Both optional parts switched on.
const BOTH: &[&str] = &[
    "--set",
    "dashboards.enabled=true",
    "--set",
    "prometheusRule.enabled=true",
];

/// Values Grafana substitutes before it sends a query; the others (`$namespace`, `$job`) only
/// occur inside label values, where PromQL takes any string.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[
    ("$__rate_interval", "5m"),
    ("$__interval", "1m"),
    ("$__range", "1h"),
];

/// Collects the metric name of every selector in an expression.
#[derive(Default)]
struct MetricNames {
    names: BTreeSet<String>,
    unnamed: Vec<String>,
}

impl ExprVisitor for MetricNames {
    type Error = ();

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, ()> {
        let selector = match expr {
            Expr::VectorSelector(selector) => selector,
            Expr::MatrixSelector(matrix) => &matrix.vs,
            _ => return Ok(true),
        };
        let by_matcher = selector
            .matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__")
            .map(|m| m.value.clone());
        match selector.name.clone().or(by_matcher) {
            Some(name) => {
                self.names.insert(name);
            }
            None => self.unnamed.push(selector.to_string()),
        }
        Ok(true)
    }
}

/// The metric names an expression's selectors name; an error when it does not parse or a
/// selector names no metric.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let mut query = expr.to_owned();
    for (variable, value) in GRAFANA_VARIABLES {
        query = query.replace(variable, value);
    }
    let parsed = parser::parse(&query).map_err(|e| format!("{expr:?} does not parse: {e}"))?;
    let mut visitor = MetricNames::default();
    let _ = walk_expr(&mut visitor, &parsed);
    if !visitor.unnamed.is_empty() {
        return Err(format!(
            "{expr:?} has selectors without a metric name: {:?}",
            visitor.unnamed
        ));
    }
    Ok(visitor.names)
}

/// The series names an exposition offers, from its `# TYPE` lines (so a family without samples
/// yet still counts) and its samples.
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Every PromQL expression of a render: the dashboard's panel queries and the alerts' `expr`,
/// each with where it comes from.
fn expressions(rendered: &str) -> Vec<(String, String)> {
    let docs = documents(rendered);
    let fullname = format!("{RELEASE}-crownstone-webhooks");
    let config_map = find(&docs, "ConfigMap", &format!("{fullname}-dashboard"))
        .expect("the dashboard ConfigMap renders");
    let json = config_map["data"]["crownstone-webhooks.json"]
        .as_str()
        .expect("the dashboard JSON is in the ConfigMap");
    let dashboard: serde_json::Value = serde_json::from_str(json).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target has an expr");
            out.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or("")),
                expr.to_owned(),
            ));
        }
    }
    let rule = find(&docs, "PrometheusRule", &fullname).expect("the PrometheusRule renders");
    for group in rule["spec"]["groups"].as_sequence().expect("groups") {
        for alert in group["rules"].as_sequence().expect("rules") {
            out.push((
                format!("alert {}", alert["alert"].as_str().unwrap_or("")),
                alert["expr"]
                    .as_str()
                    .expect("an alert has an expr")
                    .to_owned(),
            ));
        }
    }
    out
}

/// Names the expressions use that the exposition lacks, with where each is used.
fn missing(expressions: &[(String, String)], exposed: &BTreeSet<String>) -> Vec<String> {
    let mut missing = Vec::new();
    for (origin, expr) in expressions {
        let names = metric_names(expr).unwrap_or_else(|e| panic!("{origin}: {e}"));
        missing.extend(
            names
                .into_iter()
                .filter(|name| !exposed.contains(name))
                .map(|name| format!("{origin}: {name}")),
        );
    }
    missing
}

#[test]
fn the_dashboard_and_rules_are_off_by_default_and_carry_the_sidecar_label() {
    let default = documents(&render(RELEASE, NAMESPACE, &[]));
    assert!(
        !default
            .iter()
            .any(|d| d["kind"] == "PrometheusRule" || d["kind"] == "ConfigMap"),
        "the default render has neither a dashboard nor rules"
    );

    let docs = documents(&render(RELEASE, NAMESPACE, BOTH));
    let config_map = find(&docs, "ConfigMap", "obs-crownstone-webhooks-dashboard").unwrap();
    assert_eq!(
        config_map["metadata"]["labels"]["grafana_dashboard"],
        Value::from("1")
    );
    let rule = find(&docs, "PrometheusRule", "obs-crownstone-webhooks").unwrap();
    assert_eq!(rule["apiVersion"], Value::from("monitoring.coreos.com/v1"));
    let alerts: Vec<&Value> = rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .collect();
    for name in [
        "CrownstoneWebhooksNoLeader",
        "CrownstoneWebhooksListenerFailing",
        "CrownstoneWebhooksStreamCannotConnect",
        "CrownstoneWebhooksDeliveriesDropped",
    ] {
        let alert = alerts
            .iter()
            .find(|a| a["alert"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("alert {name} is missing"));
        assert!(alert["labels"]["severity"].as_str().is_some(), "{name}");
        for annotation in ["summary", "description"] {
            assert!(
                alert["annotations"][annotation]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {annotation}"
            );
        }
        // Each alert watches this release's series only.
        assert!(
            alert["expr"]
                .as_str()
                .unwrap()
                .contains(&format!("namespace=\"{NAMESPACE}\"")),
            "{name}"
        );
    }

    // The sidecar's label is the one configured, in the namespace configured.
    let docs = documents(&render(
        RELEASE,
        NAMESPACE,
        &[
            "--set",
            "dashboards.enabled=true",
            "--set",
            "dashboards.label=team_dashboard",
            "--set",
            "dashboards.labelValue=yes",
            "--set",
            "dashboards.namespace=grafana",
        ],
    ));
    let config_map = find(&docs, "ConfigMap", "obs-crownstone-webhooks-dashboard").unwrap();
    assert_eq!(
        config_map["metadata"]["labels"]["team_dashboard"],
        Value::from("yes")
    );
    assert_eq!(config_map["metadata"]["namespace"], Value::from("grafana"));
    assert!(config_map["metadata"]["labels"]["grafana_dashboard"].is_null());
}

#[test]
fn the_check_refuses_an_unknown_metric_and_an_expression_that_does_not_parse() {
    let exposed = exposed_names(
        "# HELP crownstone_webhooks_leader 1 while leading\n\
         # TYPE crownstone_webhooks_leader gauge\n\
         crownstone_webhooks_leader 1\n\
         # TYPE crownstone_webhooks_forwarder_events counter\n\
         # TYPE crownstone_webhooks_webhook_delivery_attempt_duration_seconds histogram\n",
    );
    let known = [
        ("a".to_owned(), "sum(crownstone_webhooks_leader)".to_owned()),
        (
            "b".to_owned(),
            "rate(crownstone_webhooks_forwarder_events_total[$__rate_interval])".to_owned(),
        ),
        (
            "c".to_owned(),
            "histogram_quantile(0.9, sum by (le) (rate(\
             crownstone_webhooks_webhook_delivery_attempt_duration_seconds_bucket[5m])))"
                .to_owned(),
        ),
    ];
    assert_eq!(missing(&known, &exposed), Vec::<String>::new());
    let unknown = [(
        "d".to_owned(),
        "sum(crownstone_webhooks_leader) + sum(rate(crownstone_webhooks_forwarder_event_total[5m]))"
            .to_owned(),
    )];
    assert_eq!(
        missing(&unknown, &exposed),
        vec!["d: crownstone_webhooks_forwarder_event_total".to_owned()]
    );
    // A counter is exposed with `_total` only.
    assert!(!exposed.contains("crownstone_webhooks_forwarder_events"));
    assert!(metric_names("sum(rate(crownstone_webhooks_leader[5m]) by").is_err());
    assert!(metric_names("{job=\"x\"}").is_err());
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_name_is_on_metrics() {
    let expressions = expressions(&render(RELEASE, NAMESPACE, BOTH));
    assert!(expressions.len() >= 20, "{expressions:?}");

    // The operator and the REST API in one process, one registry, as `run` serves them.
    let h = Harness::start("observability").await;
    let operator = h.operator.as_ref().expect("the operator runs");
    let mut settings = test_settings(&h, AdminKeySource::Fixed(random_key().parse().unwrap()));
    settings.metrics = ApiMetricsExport::Registry(operator.metrics_registry());
    let api = api::start(
        h.ns.client.clone(),
        settings,
        Some(operator.forwarders().clone()),
    )
    .await
    .expect("the REST API starts");
    // What a working operator has done: reconciled a Listener, streamed and delivered an
    // event, answered a REST request; a series made on first use exists only after it.
    let receiver = Receiver::start().await;
    h.ready_listener("metrics", "owner", &["command"], &receiver.url())
        .await;
    h.admin
        .publish(&[samples::multi_switch("sphere-1")])
        .await
        .expect("the simulator publishes");
    receiver.wait_for_requests(1, WAIT).await;
    let answer = reqwest::get(format!("http://{}/api/users", api.addr()))
        .await
        .expect("the REST API answers");
    assert_eq!(answer.status(), reqwest::StatusCode::UNAUTHORIZED);

    let text = reqwest::get(format!("http://{}/metrics", operator.health_addr()))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics body");
    let exposed = exposed_names(&text);
    assert!(
        exposed.contains("crownstone_webhooks_api_requests_total"),
        "{text}"
    );

    let missing = missing(&expressions, &exposed);
    assert!(
        missing.is_empty(),
        "named by the chart but not on /metrics:\n{}\n\n/metrics:\n{text}",
        missing.join("\n")
    );
}
