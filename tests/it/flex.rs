//! The flex channel: a provider with `[providers.flex]` offers its models a
//! second time, the same endpoint with `"service_tier": "flex"` at the flex
//! price. A backlog goes there when it is cheaper and the deadline allows; a
//! flex refusal (429 `resource_unavailable`) is not the provider's rate
//! limit: the provider's standard jobs keep flowing, and the job is answered
//! on the standard channel, or, with time to spare, waits for flex.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const T: Duration = Duration::from_secs(60);
/// 100 prompt + 10 completion tokens at $1/M.
const SYNC_COST: f64 = 0.000_11;

fn is_flex(seen: &Seen) -> bool {
    seen.body["service_tier"] == "flex"
}

fn jobs(prefix: &str, n: usize, nightshift: Option<Value>) -> String {
    (0..n)
        .map(|i| {
            chat_line(
                &format!("{prefix}{i}"),
                "chat",
                &format!("job {i}"),
                nightshift.clone(),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// OpenAI's answer when flex is short of capacity.
fn refusal() -> Reply {
    Reply::json(
        429,
        openai_error(
            "Resource Unavailable: flex capacity is exhausted, please retry later.",
            "invalid_request_error",
            Some("resource_unavailable"),
        ),
    )
}

fn channel(line: &Value) -> &str {
    line["nightshift"]["channel"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_goes_to_flex_at_the_flex_price() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "openai",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "[providers.flex]\ndiscount = 0.5",
    }];
    let mut daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &spec));
    drop_file(&daemon.jobs(), "backlog.jsonl", &jobs("f", 20, None));
    let (out, err) = wait_for_outbox(&daemon.jobs(), "backlog", T).await;
    daemon.terminate().await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(out.len(), 20);
    for line in &out {
        assert_eq!(channel(line), "flex", "{line}");
        assert_eq!(line["nightshift"]["model"], "m", "the wire name: {line}");
        let cost = line["nightshift"]["cost_usd"].as_f64().unwrap();
        assert!((cost - SYNC_COST / 2.0).abs() < 1e-12, "{line}");
        // The list cost is the standard channel's, so the savings show.
        let list = line["nightshift"]["list_cost_usd"].as_f64().unwrap();
        assert!((list - SYNC_COST).abs() < 1e-12, "{line}");
    }
    let seen = provider.seen();
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().all(is_flex), "every request asked for flex");
    assert!(seen.iter().all(|s| s.model() == "m"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flex_refusal_is_answered_on_the_standard_channel_without_pausing_the_provider() {
    // Flex has no capacity; the standard channel answers as usual. The
    // refusal carries a retry-after of an hour: were it taken for the
    // provider's rate limit, everything would stop.
    let provider = LoopbackProvider::with(|seen| {
        if is_flex(seen) {
            let mut reply = refusal();
            reply.headers.push(("retry-after", "3600".into()));
            reply
        } else {
            default_reply(seen)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "openai",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        // A back-off longer than the jobs can wait: once flex refused,
        // the rest go to standard directly.
        extra: "concurrency = 2\n[providers.flex]\ndiscount = 0.5\nbackoff = \"1h\"",
    }];
    let mut daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &spec));
    // Deadlines that allow flex now (a 15 min flex timeout + the 10 min
    // safety margin) but not after the back-off.
    let soon = Some(serde_json::json!({"deadline": "40m"}));
    drop_file(&daemon.jobs(), "first.jsonl", &jobs("a", 6, soon.clone()));
    let (out, err) = wait_for_outbox(&daemon.jobs(), "first", T).await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(out.len(), 6);
    for line in &out {
        assert_eq!(channel(line), "sync", "{line}");
        assert_eq!(line["response"]["status_code"], 200, "{line}");
        let cost = line["nightshift"]["cost_usd"].as_f64().unwrap();
        assert!(
            (cost - SYNC_COST).abs() < 1e-12,
            "the standard price: {line}"
        );
        assert_eq!(line["nightshift"]["attempts"], 1, "no retry: {line}");
    }
    let refused = provider.seen().iter().filter(|s| is_flex(s)).count();
    assert!(
        (1..=2).contains(&refused),
        "the jobs in flight when flex refused tried it, no more: {refused}"
    );
    // The provider was not paused: its standard jobs keep flowing, none
    // of them to flex while it is backed off.
    let before = provider.count();
    drop_file(&daemon.jobs(), "second.jsonl", &jobs("b", 6, soon));
    let (out, err) = wait_for_outbox(&daemon.jobs(), "second", T).await;
    assert!(err.is_empty(), "{err:?}");
    assert!(out.iter().all(|l| channel(l) == "sync"), "{out:?}");
    let later = &provider.seen()[before..];
    assert_eq!(later.len(), 6);
    assert!(!later.iter().any(is_flex));
    // The dispatcher's live view says flex is backed off, not the provider.
    let api = daemon.unix_client().await;
    let providers = api.get("/v1/providers").await.unwrap();
    let live = &providers["data"][0]["live"];
    assert!(live["flex_backoff_until"].is_string(), "{live}");
    assert!(live["paused"].is_null(), "{live}");
    daemon.terminate().await;
    let log = daemon.log_text();
    assert!(log.contains("resource_unavailable"), "{log}");
    assert!(!log.contains("paused until"), "{log}");
    assert!(!log.contains("circuit open"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_flex_job_with_time_to_spare_waits_for_flex_instead_of_paying_standard() {
    // Flex refuses the first two flex requests, then has capacity again.
    let refusals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = refusals.clone();
    let provider = LoopbackProvider::with(move |seen| {
        use std::sync::atomic::Ordering;
        if is_flex(seen) && counter.fetch_add(1, Ordering::SeqCst) < 2 {
            refusal()
        } else {
            default_reply(seen)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "openai",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "concurrency = 1\n[providers.flex]\ndiscount = 0.5\nbackoff = \"1s\"",
    }];
    let mut daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &spec));
    // Due in 6h: room for the back-off, a 15 min flex answer and the margin.
    let later = Some(serde_json::json!({"deadline": "6h"}));
    drop_file(&daemon.jobs(), "patient.jsonl", &jobs("p", 4, later));
    let (out, err) = wait_for_outbox(&daemon.jobs(), "patient", T).await;
    daemon.terminate().await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(out.len(), 4);
    for line in &out {
        assert_eq!(channel(line), "flex", "{line}");
        let cost = line["nightshift"]["cost_usd"].as_f64().unwrap();
        assert!(
            (cost - SYNC_COST / 2.0).abs() < 1e-12,
            "the flex price: {line}"
        );
    }
    let retried = out
        .iter()
        .filter(|l| l["nightshift"]["attempts"].as_u64() > Some(1))
        .count();
    assert!(retried >= 1, "a refused job came back for flex: {out:?}");
    let seen = provider.seen();
    assert!(
        seen.iter().all(is_flex),
        "nothing sent at the standard price"
    );
    assert_eq!(seen.len(), 6, "4 answers and 2 refusals");
}
