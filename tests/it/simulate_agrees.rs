//! `nightshift simulate` takes the daemon's decisions: one small workload
//! run through the real daemon (simulated providers, real time) and through
//! the simulator (virtual time) ends with the same jobs per provider and
//! the same total cost, within 5%.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nightshift::config::Config;
use nightshift::plan::PlanSettings;
use nightshift::simulate::{self, Policy};
use serde_json::json;

use crate::common::*;

const JOBS: usize = 60;

/// `cheap` costs 0.7 until its window opens a minute after `t0`, then 0.35,
/// and takes 30 requests a minute; `steady` costs 0.8, unlimited. So the
/// plan fills cheap's rate limit and spills the rest onto steady.
fn config(dir: &Path, t0: DateTime<Utc>) -> String {
    let opens = (t0 + chrono::Duration::seconds(60)).to_rfc3339();
    let closes = (t0 + chrono::Duration::hours(2)).to_rfc3339();
    format!(
        r#"[daemon]
state_dir = "{state}"
jobs_dir = "{jobs}"
safety_margin = "15s"

[[providers]]
name = "cheap"
kind = "simulated"
latency = "200ms"
ms_per_output_token = 0.0
rpm = 30

[[providers.price_windows]]
name = "promotion"
start = "{opens}"
end = "{closes}"
multiplier = 0.5

[[providers.models]]
name = "c"
input_per_mtok = 0.7
output_per_mtok = 0.7

[[providers]]
name = "steady"
kind = "simulated"
latency = "200ms"
ms_per_output_token = 0.0

[[providers.models]]
name = "s"
input_per_mtok = 0.8
output_per_mtok = 0.8

[classes]
chat = ["cheap/c", "steady/s"]
"#,
        state = dir.join("state").display(),
        jobs = dir.join("jobs").display(),
    )
}

/// Job lines with ~1,000 input tokens and `max_tokens = 1` (the simulated
/// provider then answers exactly one output token, as the workload says).
fn lines(sim: bool) -> Vec<String> {
    let text = "word ".repeat(800);
    (0..JOBS)
        .map(|i| {
            let mut line = json!({
                "custom_id": format!("j{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "chat", "max_tokens": 1,
                         "messages": [{"role": "user", "content": format!("{i} {text}")}]},
                "nightshift": {"deadline": "150s"}
            });
            if sim {
                line["sim"] = json!({"output_tokens": 1});
            }
            line.to_string()
        })
        .collect()
}

fn within(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_and_the_daemon_agree_on_jobs_per_provider_and_cost() {
    let dir = tempfile::tempdir().unwrap();
    // The window opens a minute after the config is written (the jobs are
    // submitted a moment later, once the daemon is up); both runs see the
    // same absolute window and the same submission time.
    let text = config(dir.path(), Utc::now());
    let mut daemon = Daemon::start(dir.path(), &text);
    daemon.wait_ready().await;
    let t0 = Utc::now();
    drop_file(&daemon.jobs(), "agree.jsonl", &lines(false).join("\n"));
    let (out, err) = wait_for_outbox(&daemon.jobs(), "agree", Duration::from_secs(240)).await;
    assert!(daemon.terminate().await.success());
    assert_eq!(err.len(), 0, "{err:?}");
    let mut daemon_per: BTreeMap<String, usize> = BTreeMap::new();
    let mut daemon_cost = 0.0;
    for l in &out {
        *daemon_per
            .entry(l["nightshift"]["provider"].as_str().unwrap().to_string())
            .or_default() += 1;
        daemon_cost += l["nightshift"]["cost_usd"].as_f64().unwrap();
    }

    let config = Config::parse(&text, "agree.toml", dir.path()).unwrap();
    let workload = simulate::load_workload(&lines(true).join("\n"), &config, t0).unwrap();
    let settings = PlanSettings {
        safety_margin: config.daemon.safety_margin,
        ..PlanSettings::default()
    };
    let (sim, _) = simulate::run(&config, &workload, &Policy::Planner, &settings).unwrap();

    eprintln!(
        "daemon: {daemon_per:?} ${daemon_cost:.6}; simulator: {:?} ${:.6}",
        sim.per_provider, sim.total_cost_usd
    );
    assert_eq!((sim.succeeded, out.len()), (JOBS, JOBS), "{sim:?}");
    // The cheap window is worth using, and neither provider takes everything.
    assert!(
        sim.per_provider.get("cheap").copied().unwrap_or(0) > 10,
        "{sim:?}"
    );
    let tolerance = 0.05 * JOBS as f64;
    for provider in ["cheap", "steady"] {
        let (d, s) = (
            daemon_per.get(provider).copied().unwrap_or(0),
            sim.per_provider.get(provider).copied().unwrap_or(0),
        );
        assert!(
            within(d as f64, s as f64, tolerance),
            "{provider}: daemon {d} vs simulator {s} ({daemon_per:?} vs {:?})",
            sim.per_provider
        );
    }
    assert!(
        within(daemon_cost, sim.total_cost_usd, 0.05 * sim.total_cost_usd),
        "cost: daemon {daemon_cost} vs simulator {}",
        sim.total_cost_usd
    );
}
