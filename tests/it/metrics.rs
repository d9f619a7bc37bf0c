//! `GET /metrics` parses as Prometheus text (with a real parser) and counts
//! what happened: jobs by state, requests by outcome, 429s, pauses, spend.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn value(
    samples: &[prometheus_parse::Sample],
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    // The first request of "limited" is refused with 429 + Retry-After, then answered.
    let provider = LoopbackProvider::with(limited_once(|s: &Seen| default_reply(s))).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "",
    }];
    let daemon = Daemon::start(dir.path(), &api_config_toml(dir.path(), &spec, ""));
    daemon.wait_ready().await;
    let content = ["a", "b", "limited"]
        .map(|t| chat_line(t, "chat", t, None))
        .join("\n");
    drop_file(&daemon.jobs(), "m.jsonl", &content);
    let (output, _) = wait_for_outbox(&daemon.jobs(), "m", Duration::from_secs(60)).await;
    assert_eq!(output.len(), 3);
    let spent: f64 = output
        .iter()
        .map(|l| l["nightshift"]["cost_usd"].as_f64().unwrap())
        .sum();

    let (base, token) = daemon.tcp_base().await;
    let response = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let s = &scrape.samples;
    assert_eq!(
        value(s, "nightshift_jobs", &[("state", "succeeded")]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(s, "nightshift_jobs", &[("state", "queued")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            s,
            "nightshift_requests_total",
            &[("provider", "p"), ("outcome", "succeeded")]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(
            s,
            "nightshift_requests_total",
            &[("provider", "p"), ("outcome", "retried")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(s, "nightshift_rate_limited_total", &[("provider", "p")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(s, "nightshift_provider_pauses_total", &[("provider", "p")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(s, "nightshift_circuit_state", &[("provider", "p")]),
        Some(0.0)
    );
    assert_eq!(
        value(s, "nightshift_input_tokens_total", &[("provider", "p")]),
        Some(300.0)
    );
    let spend = value(s, "nightshift_spend_usd_total", &[("provider", "p")]).unwrap();
    assert!((spend - spent).abs() < 1e-9, "{spend} vs {spent}");
    assert!(
        s.iter()
            .any(|x| x.metric == "nightshift_dispatch_latency_seconds_count"
                || x.metric == "nightshift_dispatch_latency_seconds"),
        "{text}"
    );

    // The dispatcher's live health shows in /v1/providers.
    let providers: Value = reqwest::Client::new()
        .get(format!("{base}/v1/providers"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let health = providers["data"][0]["health"]["dispatcher"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        health == "healthy" || health.starts_with("paused until"),
        "{health}"
    );
}
