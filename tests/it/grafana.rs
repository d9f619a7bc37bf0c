//! `contrib/grafana/nightshift.json` imports cleanly (a `${DS_PROMETHEUS}`
//! datasource input, used by every panel) and queries only metrics the
//! daemon serves: every metric name in a panel's `expr` (or the template
//! variable's query) is a sample name of a real `GET /metrics` scrape,
//! taken while every labelled family has samples.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// The metrics prefix (`Registry::with_prefix` in src/telemetry.rs).
const PREFIX: &str = "nightshift_";

fn dashboard() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/grafana/nightshift.json"
    ))
    .unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel, those inside collapsed rows too.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The PromQL of the dashboard: each panel target's `expr` and each
/// template variable's query.
fn queries(dashboard: &Value) -> Vec<String> {
    let mut out: Vec<String> = panels(dashboard)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("a target with an expr")
                .to_string()
        })
        .collect();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        match &v["query"] {
            Value::String(q) => out.push(q.clone()),
            q => out.extend(q["query"].as_str().map(str::to_string)),
        }
    }
    out
}

/// The identifiers in `expr` that start with the metrics prefix.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find(PREFIX) {
        let before = rest[..at].chars().next_back();
        let name: String = rest[at..].chars().take_while(|&c| ident(c)).collect();
        if !before.is_some_and(ident) {
            out.insert(name.clone());
        }
        rest = &rest[at + name.len().max(1)..];
    }
    out
}

/// The sample names of Prometheus text: each sample line's name.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

/// The dashboard's metric names that `scrape` has no sample of.
fn missing(wanted: &BTreeSet<String>, scrape: &BTreeSet<String>) -> Vec<String> {
    wanted.difference(scrape).cloned().collect()
}

#[test]
fn metric_names_are_read_from_promql() {
    let expr = "histogram_quantile(0.9, sum by (le, provider) (rate(nightshift_dispatch_latency_seconds_bucket{provider=~\"$provider\"}[$__rate_interval]))) / my_nightshift_other + nightshift_jobs";
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "nightshift_dispatch_latency_seconds_bucket",
            "nightshift_jobs"
        ]
    );
}

#[test]
fn the_dashboard_imports_with_a_prometheus_datasource_input() {
    let d = dashboard();
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    assert_eq!(d["uid"], "nightshift");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["schemaVersion"].as_u64().is_some());
    let ds = json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let mut ids = BTreeSet::new();
    let mut graphs = 0;
    for p in panels(&d) {
        assert!(ids.insert(p["id"].as_u64().expect("a panel id")), "{p}");
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].as_u64().is_some(), "gridPos.{k}: {p}");
        }
        if p["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert_eq!(p["datasource"], ds, "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"], ds, "{}", p["title"]);
            assert!(t["expr"].as_str().is_some_and(|e| e.contains(PREFIX)));
        }
    }
    assert!(graphs >= 8, "{graphs} panels");
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            assert_eq!(v["datasource"], ds, "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_served() {
    let wanted: BTreeSet<String> = queries(&dashboard())
        .iter()
        .flat_map(|q| metric_names(q))
        .collect();
    // The panels the brief asks for are there.
    for name in [
        "nightshift_jobs",
        "nightshift_queued_jobs",
        "nightshift_planned_now_jobs",
        "nightshift_requests_total",
        "nightshift_rate_limited_total",
        "nightshift_dispatch_latency_seconds_bucket",
        "nightshift_spend_usd_total",
        "nightshift_savings_usd_total",
        "nightshift_circuit_state",
        "nightshift_provider_pauses_total",
    ] {
        assert!(wanted.contains(name), "no panel queries {name}: {wanted:?}");
    }

    // "limited" is refused once with 429 + Retry-After (a 429 and a pause);
    // "slow" holds the provider's one connection for 5 s, so that a job
    // after it is queued and planned to start now meanwhile.
    let provider = LoopbackProvider::with(limited_once(|s: &Seen| {
        let mut r = default_reply(s);
        if s.text() == "slow" {
            r.delay = Duration::from_secs(5);
        }
        r
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 2.0,
        extra: "concurrency = 1",
    }];
    let daemon = Daemon::start(dir.path(), &api_config_toml(dir.path(), &spec, ""));
    let client = daemon.unix_client().await;
    let submit = async |texts: &[&str]| {
        let body = texts
            .iter()
            .map(|t| chat_line(t, "chat", t, None))
            .collect::<Vec<_>>()
            .join("\n");
        client
            .json(
                hyper::Method::POST,
                "/v1/jobs",
                Some("application/jsonl"),
                body,
            )
            .await
            .unwrap()
    };
    // Two jobs to completion: requests, a 429, a pause, latency, tokens, money.
    submit(&["a", "limited"]).await;
    wait_until_async("two jobs to succeed", Duration::from_secs(30), async || {
        let page = client.get("/v1/jobs?state=succeeded").await.unwrap();
        page["data"].as_array().is_some_and(|d| d.len() == 2)
    })
    .await;
    // Then one in flight and one waiting for it: the queue gauges.
    submit(&["slow", "b"]).await;
    let (base, token) = daemon.tcp_base().await;
    let http = reqwest::Client::new();
    let mut scrape = String::new();
    wait_until_async(
        "a scrape with a job queued and planned to start now",
        Duration::from_secs(30),
        async || {
            let r = http
                .get(format!("{base}/metrics"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            scrape = r.text().await.unwrap();
            let names = sample_names(&scrape);
            names.contains("nightshift_planned_now_jobs")
                && names.contains("nightshift_queued_jobs")
        },
    )
    .await;
    prometheus_parse::Scrape::parse(scrape.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    let served = sample_names(&scrape);
    let missing_now = missing(&wanted, &served);
    assert!(
        missing_now.is_empty(),
        "the dashboard queries metrics /metrics does not serve: {missing_now:?}\nscrape:\n{scrape}"
    );
    // The check has teeth: a panel querying a metric that does not exist
    // would be reported.
    let mut bogus = wanted.clone();
    bogus.insert("nightshift_requests".to_string());
    assert_eq!(missing(&bogus, &served), ["nightshift_requests"]);
}
