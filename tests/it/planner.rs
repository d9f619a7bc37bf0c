//! The planner in the real daemon: jobs wait for a cheaper hour when their
//! deadline allows it, and run at once when it does not.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::common::*;

fn instant(v: &serde_json::Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waits_for_a_price_window_that_opens_before_its_deadline_and_an_urgent_one_does_not()
{
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Half price from 15 s after start for an hour.
    let opens = Utc::now() + chrono::Duration::seconds(15);
    let window = format!(
        "\n[[providers.price_windows]]\nname = \"night\"\nstart = \"{}\"\nend = \"{}\"\nmultiplier = 0.5\n",
        opens.to_rfc3339(),
        (opens + chrono::Duration::hours(1)).to_rfc3339()
    );
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: &window,
    }];
    let config =
        config_toml(dir.path(), &spec).replace("[daemon]\n", "[daemon]\nsafety_margin = \"1s\"\n");
    let daemon = Daemon::start(dir.path(), &config);
    let content = [
        chat_line(
            "patient",
            "chat",
            "can wait",
            Some(json!({"deadline": "2h"})),
        ),
        chat_line(
            "urgent",
            "chat",
            "cannot wait",
            Some(json!({"deadline": "10s"})),
        ),
    ]
    .join("\n");
    drop_file(&daemon.jobs(), "window.jsonl", &content);

    // The urgent job is answered before the window opens, the patient one is not.
    wait_until("the urgent job is sent", Duration::from_secs(10), || {
        provider.count() >= 1
    })
    .await;
    assert_eq!(provider.seen()[0].text(), "cannot wait");
    assert!(
        Utc::now() < opens,
        "the test machine was too slow to observe the order"
    );
    assert_eq!(
        provider.count(),
        1,
        "the patient job must wait for the window"
    );

    let (output, errors) = wait_for_outbox(&daemon.jobs(), "window", Duration::from_secs(60)).await;
    assert!(errors.is_empty(), "{errors:?}");
    let by_id =
        |id: &str| output.iter().find(|l| l["custom_id"] == id).unwrap()["nightshift"].clone();
    let (patient, urgent) = (by_id("patient"), by_id("urgent"));
    assert!(instant(&urgent["dispatched_at"]) < opens);
    assert!(instant(&patient["dispatched_at"]) >= opens);
    // 100 + 10 tokens at $1/M, and at half that in the window.
    assert!(
        (urgent["cost_usd"].as_f64().unwrap() - 0.000_11).abs() < 1e-12,
        "{urgent}"
    );
    assert!(
        (patient["cost_usd"].as_f64().unwrap() - 0.000_055).abs() < 1e-12,
        "{patient}"
    );
    assert!(daemon.log_text().contains("plan"));
}
