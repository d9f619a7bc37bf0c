//! Budgets: when a provider's cap is reached its jobs go to another
//! provider; when every cap is reached, a job that cannot wait for the next
//! period fails with `budget_exhausted`.

use std::time::Duration;

use chrono::{Timelike, Utc};
use serde_json::json;

use crate::common::*;

const T: Duration = Duration::from_secs(60);
/// One job's actual cost at $1/M: 100 prompt + 10 completion tokens.
const JOB_COST: f64 = 0.000_11;

/// The budget period must not renew mid-test: near midnight UTC, wait it out.
async fn away_from_midnight() {
    let now = Utc::now();
    let left = 86_400 - now.num_seconds_from_midnight() as u64;
    // Waits out the renewal when it is closer than the default 10 min
    // safety margin plus a minute (so a deadline before it can be planned).
    if left < 660 {
        tokio::time::sleep(Duration::from_secs(left + 5)).await;
    }
}

/// An hour from now, or just before the next midnight UTC if that comes
/// first: a budget that renews before the deadline would (rightly) make the
/// planner wait for the renewal instead of spilling to the other provider.
fn deadline_before_renewal() -> String {
    let now = Utc::now();
    let midnight = (now + chrono::Duration::days(1))
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    (now + chrono::Duration::hours(1))
        .min(midnight - chrono::Duration::seconds(1))
        .to_rfc3339()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_over_its_budget_hands_its_jobs_to_another() {
    away_from_midnight().await;
    let cheap = LoopbackProvider::start().await;
    let backup = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![
        ProviderSpec {
            name: "cheap",
            base_url: cheap.base_url(),
            model: "m",
            input_per_mtok: 1.0,
            output_per_mtok: 1.0,
            extra: "concurrency = 1\ndaily_budget_usd = 0.00025",
        },
        ProviderSpec {
            name: "backup",
            base_url: backup.base_url(),
            model: "m",
            input_per_mtok: 2.0,
            output_per_mtok: 2.0,
            extra: "",
        },
    ];
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &spec));
    let content: Vec<String> = (0..8)
        .map(|i| {
            chat_line(
                &format!("j{i}"),
                "chat",
                &format!("job {i}"),
                Some(json!({"deadline": deadline_before_renewal()})),
            )
        })
        .collect();
    drop_file(&daemon.jobs(), "budget.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "budget", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(output.len(), 8);
    let on_cheap: Vec<f64> = output
        .iter()
        .filter(|l| l["nightshift"]["provider"] == "cheap")
        .map(|l| l["nightshift"]["cost_usd"].as_f64().unwrap())
        .collect();
    let spent: f64 = on_cheap.iter().sum();
    // The cap is checked against each job's estimate before sending and the
    // spend corrected when it is billed: at most one job's worth over.
    assert!(
        !on_cheap.is_empty() && spent <= 0.000_25 + JOB_COST,
        "{spent}"
    );
    assert!(
        cheap.count() < 8 && backup.count() >= 8 - cheap.count(),
        "{} / {}",
        cheap.count(),
        backup.count()
    );
    // The dispatcher's published plan shows what each budget has left.
    let client = daemon.unix_client().await;
    let left = 0.000_25 - spent;
    wait_until_async("the plan to show cheap's budget left", T, async || {
        let plan = client.get("/v1/plan").await.unwrap();
        let providers = plan["providers"].as_array().cloned().unwrap_or_default();
        let of = |name: &str| {
            providers
                .iter()
                .find(|p| p["provider"] == name)
                .map(|p| p["budget_remaining_usd"].clone())
        };
        plan["source"] == "dispatcher"
            && of("backup") == Some(serde_json::Value::Null)
            && of("cheap")
                .and_then(|v| v.as_f64())
                .is_some_and(|b| (b - left.max(0.0)).abs() < 1e-9)
    })
    .await;
    // /v1/stats (the dashboard's overview) shows the same budget: its cap,
    // what today's finished jobs on cheap cost, and its renewal at midnight.
    let stats = client.get("/v1/stats").await.unwrap();
    let budgets = stats["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 1, "{stats}");
    let b = &budgets[0];
    assert_eq!(
        (&b["provider"], &b["period"]),
        (&json!("cheap"), &json!("day")),
        "{b}"
    );
    assert!(
        (b["cap_usd"].as_f64().unwrap() - 0.000_25).abs() < 1e-12,
        "{b}"
    );
    assert!(
        (b["spent_usd"].as_f64().unwrap() - spent).abs() < 1e-9,
        "{b}"
    );
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).date_naive();
    assert_eq!(
        b["renews_at"].as_str().unwrap()[..10],
        tomorrow.format("%Y-%m-%d").to_string(),
        "{b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_cannot_wait_for_the_next_period_fail_with_budget_exhausted() {
    away_from_midnight().await;
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "concurrency = 1",
    }];
    let config = config_toml(dir.path(), &spec).replace(
        "[daemon]\n",
        "[budget]\ndaily_usd = 0.0003\n\n[daemon]\nsafety_margin = \"30s\"\n",
    );
    let daemon = Daemon::start(dir.path(), &config);
    let content: Vec<String> = (0..6)
        .map(|i| {
            chat_line(
                &format!("j{i}"),
                "chat",
                &format!("job {i}"),
                Some(json!({"deadline": "5m"})),
            )
        })
        .collect();
    drop_file(&daemon.jobs(), "capped.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "capped", T).await;
    assert!(
        !output.is_empty() && !errors.is_empty(),
        "{output:?} {errors:?}"
    );
    assert_eq!(output.len() + errors.len(), 6);
    let spent: f64 = output
        .iter()
        .map(|l| l["nightshift"]["cost_usd"].as_f64().unwrap())
        .sum();
    assert!(spent <= 0.0003 + JOB_COST, "{spent}");
    for e in &errors {
        assert_eq!(e["error"]["code"], "budget_exhausted", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("renews at"),
            "{e}"
        );
        assert_eq!(e["response"], serde_json::Value::Null);
    }
    assert_eq!(
        provider.count(),
        output.len(),
        "nothing over budget was sent"
    );
}
