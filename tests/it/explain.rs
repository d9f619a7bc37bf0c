//! Why a job waits, over the real API of the real binary: a job held for a
//! price window that opens later explains `price_window` with its planned
//! start and both prices; a provider answering 429 with `retry-after`
//! makes the retried job explain `provider_paused`, and `GET /v1/providers`
//! shows the pause in its live view. Every wait is on a condition, with a
//! timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nightshift::api::client::Client;
use nightshift::dispatch::explain::clock;
use serde_json::{Value, json};

use crate::common::*;

/// How long the dispatcher may take to plan, send and publish.
const WAIT: Duration = Duration::from_secs(20);

/// Submits one job; returns its id.
async fn submit(client: &Client, line: String) -> String {
    let job: Value = serde_json::from_str(&line).unwrap();
    let sub = client.post_json("/v1/jobs", &job).await.unwrap();
    assert_eq!(sub["queued"], 1, "{sub}");
    sub["jobs"][0]["id"].as_str().unwrap().to_string()
}

/// Polls `GET path` every 20 ms until `done` holds of the answer; returns it.
async fn get_until(
    client: &Client,
    path: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let v = client.get(path).await.unwrap();
            if done(&v) {
                return v;
            }
            last = v;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}; last: {last}"))
}

fn instant(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap()
        .with_timezone(&Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_for_a_cheaper_window_explains_price_window_with_its_planned_start() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The only provider costs 1% of its list price from two hours from now.
    let start = Utc::now() + chrono::Duration::hours(2);
    let window = format!(
        "rpm = 600\nconcurrency = 4\n[[providers.price_windows]]\nname = \"later\"\nstart = \"{}\"\nend = \"{}\"\nmultiplier = 0.01\n",
        start.to_rfc3339(),
        (start + chrono::Duration::days(3)).to_rfc3339()
    );
    let spec = ProviderSpec {
        name: "later",
        base_url: provider.base_url(),
        model: "later-chat",
        input_per_mtok: 1.0,
        output_per_mtok: 4.0,
        extra: &window,
    };
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &[spec]));
    let client = daemon.unix_client().await;
    let id = submit(&client, chat_line("held", "chat", "hi", None)).await;

    // The dispatcher's live view appears after its first pass.
    let providers = get_until(
        &client,
        "/v1/providers",
        "the dispatcher's live view",
        |v| !v["data"][0]["live"].is_null(),
    )
    .await;
    let live = &providers["data"][0]["live"];
    assert_eq!(live["circuit"]["state"], "closed", "{live}");
    assert_eq!(live["paused"], Value::Null, "{live}");
    let rpm = &live["limits"]["rpm"];
    assert_eq!(
        (
            &rpm["limit"],
            &rpm["usable"],
            &rpm["used"],
            &rpm["window_s"]
        ),
        (&json!(600), &json!(600), &json!(0), &json!(60)),
        "{live}"
    );
    assert_eq!(
        live["limits"]["concurrency"],
        json!({"limit": 4, "in_flight": 0})
    );
    assert_eq!(live["limits"]["tpm"], Value::Null);
    assert_eq!(live["limits"]["full"], json!([]));
    assert_eq!(live["limits"]["next_start_in_ms"], 0);
    assert_eq!(live["next_start"], live["at"], "{live}");
    assert_eq!(live["budgets"], json!([]));
    assert_eq!(
        providers["dispatcher"]["max_in_flight"], 1024,
        "{providers}"
    );
    assert_eq!(providers["data"][0]["health"]["dispatcher"], "healthy");

    let job = get_until(&client, &format!("/v1/jobs/{id}"), "price_window", |j| {
        j["explanation"]["code"] == "price_window"
    })
    .await;
    assert_eq!(job["state"], "queued");
    let planned = instant(&job["plan"]["earliest_start"]);
    assert!(
        planned > Utc::now() + chrono::Duration::minutes(90),
        "{job}"
    );
    let text = job["explanation"]["text"].as_str().unwrap();
    assert!(
        text.starts_with("queued: planned for later/later-chat at "),
        "{text}"
    );
    // The planned start as the explanation writes it (a date before it if
    // it falls on another day than now).
    assert!(text.contains(&clock(planned, planned)), "{text}");
    assert!(text.ends_with("later 0.01/0.04 vs 1.00/4.00 now"), "{text}");
    assert_eq!(job["list_cost_usd"], Value::Null, "{job}");
    assert_eq!(provider.count(), 0, "held, not sent");
    // Listings carry no explanation (it needs the plan).
    let list = client.get("/v1/jobs").await.unwrap();
    assert_eq!(list["data"][0]["explanation"], Value::Null, "{list}");

    // A job due in 30 minutes cannot wait for the window: it runs now, at
    // the list price, and says what it cost against the list price.
    let urgent = submit(
        &client,
        chat_line("urgent", "chat", "now", Some(json!({"deadline": "30m"}))),
    )
    .await;
    let done = get_until(
        &client,
        &format!("/v1/jobs/{urgent}"),
        "the urgent job",
        |j| j["state"] == "succeeded",
    )
    .await;
    // 100 prompt and 10 completion tokens at 1.00/4.00 per 1M.
    assert_eq!(done["cost_usd"], json!(0.00014), "{done}");
    assert_eq!(done["list_cost_usd"], json!(0.00014), "{done}");
    assert_eq!(
        done["explanation"],
        json!({"code": "succeeded", "text": "succeeded on later/later-chat for $0.00014, list $0.00014"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_answering_429_with_retry_after_makes_a_queued_job_explain_provider_paused() {
    // The first request is refused with retry-after: 60; the rest would succeed.
    let answered = Arc::new(AtomicUsize::new(0));
    let n = answered.clone();
    let provider = LoopbackProvider::with(move |seen| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            let mut r = Reply::json(
                429,
                openai_error(
                    "Rate limit reached for requests",
                    "requests",
                    Some("rate_limit_exceeded"),
                ),
            );
            r.headers.push(("retry-after", "60".into()));
            return r;
        }
        default_reply(seen)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    let client = daemon.unix_client().await;
    let id = submit(&client, chat_line("p1", "chat", "hi", None)).await;

    let job = get_until(&client, &format!("/v1/jobs/{id}"), "provider_paused", |j| {
        j["explanation"]["code"] == "provider_paused"
    })
    .await;
    let refused_by = Utc::now();
    assert_eq!(
        (&job["state"], &job["attempts"]),
        (&json!("queued"), &json!(1)),
        "{job}"
    );
    let text = job["explanation"]["text"].as_str().unwrap();
    assert!(text.starts_with("waiting: loop paused until "), "{text}");
    assert!(text.ends_with(" UTC by retry-after"), "{text}");

    // The live view says the same: paused by retry-after, about 60 s on.
    let providers = client.get("/v1/providers").await.unwrap();
    let paused = &providers["data"][0]["live"]["paused"];
    assert_eq!(paused["reason"], "retry_after", "{providers}");
    let until = instant(&paused["until"]);
    assert!(
        until > refused_by + chrono::Duration::seconds(30)
            && until <= refused_by + chrono::Duration::seconds(61),
        "{paused}"
    );
    assert!(text.contains(&clock(until, until)), "{text} vs {paused}");
    let next = instant(&providers["data"][0]["live"]["next_start"]);
    assert!(
        next >= until,
        "the next start is after the pause: {providers}"
    );
    assert!(
        providers["data"][0]["health"]["dispatcher"]
            .as_str()
            .unwrap()
            .starts_with("paused until"),
        "{providers}"
    );
    assert_eq!(provider.count(), 1, "nothing is sent while paused");
}
