//! The watched folder, end to end: the real daemon binary, real inotify, a
//! real SQLite file, and loopback providers speaking OpenAI's wire format.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(30);

fn by_custom_id(lines: &[Value]) -> BTreeMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["custom_id"].as_str().unwrap_or("").to_string(), l.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_lines_are_answered_and_bad_lines_explained() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    let content = [
        chat_line("a", "chat", "first", Some(json!({"deadline": "1h"}))),
        chat_line("b", "loop-model", "second", None),
        r#"{"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "chat", "input": "embed me"}}"#.to_string(),
        "{broken json".to_string(),
        r#"{"method": "POST", "url": "/v1/chat/completions", "body": {"model": "chat", "messages": [{"role": "user", "content": "x"}]}}"#.to_string(),
        chat_line("c", "no-such-model", "x", None),
        chat_line("a", "chat", "duplicate id", None),
        r#"{"custom_id": "g", "method": "GET", "url": "/v1/chat/completions", "body": {}}"#.to_string(),
        chat_line("h", "chat", "x", Some(json!({"deadline": "12h", "colour": "red"}))),
        String::new(), // blank lines are skipped, not errors
    ]
    .join("\n");
    drop_file(&daemon.jobs(), "mixed.jsonl", &content);
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "mixed", T).await;

    // Every valid line answered, in the design brief's result format.
    let out = by_custom_id(&output);
    assert_eq!(out.keys().collect::<Vec<_>>(), ["a", "b", "e"]);
    let a = &out["a"];
    assert_eq!(a["response"]["status_code"], 200);
    assert_eq!(a["response"]["request_id"], "req_loopback");
    assert_eq!(
        a["response"]["body"]["choices"][0]["message"]["content"],
        "echo: first"
    );
    assert_eq!(a["error"], Value::Null);
    let ns = &a["nightshift"];
    assert_eq!(ns["provider"], "loop");
    assert_eq!(ns["model"], "loop-model");
    assert_eq!(ns["attempts"], 1);
    assert_eq!(
        (ns["input_tokens"].as_u64(), ns["output_tokens"].as_u64()),
        (Some(100), Some(10))
    );
    // 100 × $1/M + 10 × $2/M, from the provider's usage.
    assert!(
        (ns["cost_usd"].as_f64().unwrap() - 0.000_12).abs() < 1e-12,
        "{ns}"
    );
    assert!(ns["dispatched_at"].as_str().unwrap() <= ns["completed_at"].as_str().unwrap());
    assert_eq!(out["e"]["nightshift"]["input_tokens"], 8);

    // Every invalid line explained with its line number and field.
    let errs: BTreeMap<u64, &Value> = errors
        .iter()
        .map(|e| (e["nightshift"]["line"].as_u64().unwrap(), e))
        .collect();
    assert_eq!(errs.keys().copied().collect::<Vec<_>>(), [4, 5, 6, 7, 8, 9]);
    let expect = [
        (4, Value::Null, "invalid JSON"),
        (5, json!("custom_id"), "required"),
        (6, json!("body.model"), "no-such-model"),
        (
            7,
            json!("custom_id"),
            "duplicate custom_id (first used on line 1)",
        ),
        (8, json!("method"), "GET"),
        (9, json!("nightshift.colour"), "unknown field"),
    ];
    for (line, field, needle) in expect {
        let e = errs[&line];
        assert_eq!(e["nightshift"]["field"], field, "line {line}: {e}");
        assert_eq!(e["error"]["code"], "invalid_line");
        assert_eq!(e["response"], Value::Null);
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("line {line}: ")), "{message}");
        assert!(message.contains(needle), "line {line}: {message}");
    }

    // The provider saw exactly the valid jobs, with the configured model and key.
    let seen = provider.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.model() == "loop-model"));
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some(&format!("Bearer {TEST_KEY}")[..]))
    );
    assert_eq!(
        seen.iter().filter(|s| s.path == "/v1/embeddings").count(),
        1
    );

    // The file moved to processed/, the inbox is empty, and the key is in no log.
    assert!(daemon.jobs().join("processed/mixed.jsonl").exists());
    assert_eq!(
        fs::read_dir(daemon.jobs().join("inbox")).unwrap().count(),
        0
    );
    assert!(!daemon.log_text().contains(TEST_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_already_in_the_inbox_at_start_up_is_ingested() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs");
    drop_file(
        &jobs,
        "early.jsonl",
        &(0..5)
            .map(|i| chat_line(&format!("j{i}"), "chat", "hi", None))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    // Make it look settled (written well before start-up).
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(jobs.join("inbox/early.jsonl"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "early", T).await;
    assert_eq!(output.len(), 5);
    assert!(errors.is_empty());
    assert_eq!(provider.count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_content_dropped_twice_is_queued_once() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    let content = (0..3)
        .map(|i| chat_line(&format!("j{i}"), "chat", "hi", None))
        .collect::<Vec<_>>()
        .join("\n");
    drop_file(&daemon.jobs(), "first.jsonl", &content);
    wait_for_outbox(&daemon.jobs(), "first", T).await;
    assert_eq!(provider.count(), 3);

    // Same bytes, new name; then the same name again.
    drop_file(&daemon.jobs(), "again.jsonl", &content);
    let processed = daemon.jobs().join("processed/again.jsonl");
    wait_until("again.jsonl moved to processed/", T, || processed.exists()).await;
    drop_file(&daemon.jobs(), "first.jsonl", &content);
    let processed2 = daemon.jobs().join("processed/first.2.jsonl");
    wait_until(
        "first.jsonl moved to processed/ as first.2.jsonl",
        T,
        || processed2.exists(),
    )
    .await;

    assert_eq!(
        provider.count(),
        3,
        "a re-dropped file must not be sent again"
    );
    assert!(!daemon.jobs().join("outbox/again.output.jsonl").exists());
    assert!(daemon.log_text().contains("not queued again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_daemon_restarts_with_nothing_lost() {
    // Slow answers and a concurrency cap keep most jobs queued when the kill comes.
    let provider = LoopbackProvider::with(|seen| Reply {
        delay: Duration::from_millis(150),
        ..default_reply(seen)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = one_provider(&provider);
    spec[0].extra = "concurrency = 2";
    let config = config_toml(dir.path(), &spec);
    let mut daemon = Daemon::start(dir.path(), &config);
    let n = 30;
    let content = (0..n)
        .map(|i| chat_line(&format!("j{i:02}"), "chat", &format!("job {i}"), None))
        .collect::<Vec<_>>()
        .join("\n");
    drop_file(&daemon.jobs(), "batch.jsonl", &content);
    wait_until("some jobs sent", T, || provider.count() >= 4).await;
    daemon.kill();
    let sent_before_kill = provider.count();
    assert!(sent_before_kill < n, "the kill should interrupt the batch");
    assert!(!daemon.jobs().join("outbox/batch.output.jsonl").exists());

    let daemon = Daemon::start(dir.path(), &config);
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "batch", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    let ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("j{i:02}")).collect();
    assert_eq!(ids, expected, "every job exactly once, in line order");
    // At-least-once: only what was in flight at the kill (≤ concurrency) may be sent twice.
    let duplicates = provider.count() - n;
    assert!(duplicates <= 2, "{duplicates} duplicate provider calls");
    assert!(
        daemon
            .log_text()
            .contains("re-queued jobs that were running")
            || duplicates == 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_returns_unfinished_jobs_to_the_queue() {
    let provider = LoopbackProvider::with(|seen| Reply {
        delay: Duration::from_secs(5),
        ..default_reply(seen)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = one_provider(&provider);
    spec[0].extra = "concurrency = 1";
    let config = config_toml(dir.path(), &spec);
    let mut daemon = Daemon::start(dir.path(), &config);
    drop_file(
        &daemon.jobs(),
        "slow.jsonl",
        &[
            chat_line("a", "chat", "x", None),
            chat_line("b", "chat", "y", None),
        ]
        .join("\n"),
    );
    wait_until("first request in flight", T, || provider.count() == 1).await;
    let status = daemon.terminate().await;
    assert!(status.success(), "{status:?}");
    let log = daemon.log_text();
    assert!(
        log.contains("returned unfinished jobs to the queue"),
        "{log}"
    );

    // Restarted against a fast provider, both jobs complete.
    let fast = LoopbackProvider::start().await;
    let config = config_toml(dir.path(), &one_provider(&fast));
    let daemon = Daemon::start(dir.path(), &config);
    let (output, _) = wait_for_outbox(&daemon.jobs(), "slow", T).await;
    assert_eq!(output.len(), 2);
    assert_eq!(
        output[0]["nightshift"]["attempts"], 2,
        "the interrupted attempt is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_fail_the_job_with_their_status_and_body() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    let content = [
        chat_line("ok", "chat", "fine", None),
        chat_line("bad", "chat", "please return status:400", None),
        chat_line("boom", "chat", "please return status:500", None),
    ]
    .join("\n");
    drop_file(&daemon.jobs(), "faults.jsonl", &content);
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "faults", T).await;
    assert_eq!(by_custom_id(&output).keys().collect::<Vec<_>>(), ["ok"]);
    let errs = by_custom_id(&errors);
    assert_eq!(errs.keys().collect::<Vec<_>>(), ["bad", "boom"]);
    let bad = &errs["bad"];
    assert_eq!(bad["response"]["status_code"], 400);
    assert_eq!(
        bad["response"]["body"]["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(bad["error"], Value::Null);
    assert_eq!(bad["nightshift"]["state"], "failed");
    assert_eq!(bad["nightshift"]["provider"], "loop");
    // 400 is permanent: one attempt. 500 is retried, then final after max_attempts (3).
    assert_eq!(bad["nightshift"]["attempts"], 1);
    let boom = &errs["boom"];
    assert_eq!(boom["response"]["status_code"], 500);
    assert_eq!(boom["response"]["body"]["error"]["type"], "server_error");
    assert_eq!(boom["nightshift"]["attempts"], 3);
    let sent = |marker: &str| {
        provider
            .seen()
            .iter()
            .filter(|s| s.text().contains(marker))
            .count()
    };
    assert_eq!(
        (sent("status:400"), sent("status:500"), sent("fine")),
        (1, 3, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_fails_the_job_with_a_reason() {
    // Bind and drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "gone",
        base_url: format!("http://127.0.0.1:{port}/v1"),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "",
    }];
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &spec));
    drop_file(
        &daemon.jobs(),
        "gone.jsonl",
        &chat_line("x", "chat", "hi", None),
    );
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "gone", T).await;
    assert!(output.is_empty());
    assert_eq!(errors[0]["response"], Value::Null);
    assert_eq!(errors[0]["error"]["code"], "connection_failed");
    assert_eq!(
        errors[0]["nightshift"]["attempts"], 3,
        "retried up to max_attempts"
    );
    assert!(
        errors[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&port.to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cheapest_eligible_provider_is_the_one_called() {
    let pricey = LoopbackProvider::start().await;
    let cheap = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![
        ProviderSpec {
            name: "pricey",
            base_url: pricey.base_url(),
            model: "big",
            input_per_mtok: 1.0,
            output_per_mtok: 4.0,
            extra: "",
        },
        ProviderSpec {
            name: "cheap",
            base_url: cheap.base_url(),
            model: "small",
            input_per_mtok: 0.1,
            output_per_mtok: 0.4,
            extra: "",
        },
    ];
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &spec));
    let content = [
        chat_line("c1", "chat", "x", None),
        chat_line("c2", "chat", "x", None),
        chat_line("c3", "chat", "x", None),
        chat_line("pinned", "pricey/big", "x", None),
        chat_line(
            "restricted",
            "chat",
            "x",
            Some(json!({"providers": ["pricey"]})),
        ),
    ]
    .join("\n");
    drop_file(&daemon.jobs(), "route.jsonl", &content);
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "route", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    let out = by_custom_id(&output);
    for id in ["c1", "c2", "c3"] {
        assert_eq!(out[id]["nightshift"]["provider"], "cheap", "{id}");
        // The list cost is the class's reference model (pricey/big) at arrival.
        let ns = &out[id]["nightshift"];
        assert!(
            ns["list_cost_usd"].as_f64().unwrap() > 9.0 * ns["cost_usd"].as_f64().unwrap(),
            "{ns}"
        );
    }
    assert_eq!(out["pinned"]["nightshift"]["provider"], "pricey");
    assert_eq!(out["restricted"]["nightshift"]["provider"], "pricey");
    assert_eq!(cheap.count(), 3);
    assert_eq!(pricey.count(), 2);
    assert!(cheap.seen().iter().all(|s| s.model() == "small"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_window_in_effect_changes_which_provider_is_cheapest() {
    let a = LoopbackProvider::start().await;
    let b = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now();
    // "a" lists at twice b's price, but runs a 90%-off promotion right now.
    let promo = format!(
        "\n[[providers.price_windows]]\nname = \"promo\"\nstart = \"{}\"\nend = \"{}\"\nmultiplier = 0.1\n",
        (now - chrono::Duration::hours(1)).to_rfc3339(),
        (now + chrono::Duration::hours(1)).to_rfc3339()
    );
    let spec = vec![
        ProviderSpec {
            name: "a",
            base_url: a.base_url(),
            model: "m",
            input_per_mtok: 2.0,
            output_per_mtok: 2.0,
            extra: &promo,
        },
        ProviderSpec {
            name: "b",
            base_url: b.base_url(),
            model: "m",
            input_per_mtok: 1.0,
            output_per_mtok: 1.0,
            extra: "",
        },
    ];
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &spec));
    drop_file(
        &daemon.jobs(),
        "promo.jsonl",
        &chat_line("x", "chat", "hi", None),
    );
    let (output, _) = wait_for_outbox(&daemon.jobs(), "promo", T).await;
    assert_eq!(output[0]["nightshift"]["provider"], "a");
    // Charged at the promotional price: 100 × $0.2/M + 10 × $0.2/M.
    let cost = output[0]["nightshift"]["cost_usd"].as_f64().unwrap();
    assert!((cost - 0.000_022).abs() < 1e-12, "{cost}");
    assert_eq!((a.count(), b.count()), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_jsonl_is_rejected_with_the_reason_beside_it() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    drop_file(
        &daemon.jobs(),
        "notes.jsonl",
        "these are my notes\nnot jobs at all\n",
    );
    let note = daemon.jobs().join("rejected/notes.jsonl.error.txt");
    wait_until("rejection note", T, || note.exists()).await;
    assert!(daemon.jobs().join("rejected/notes.jsonl").exists());
    let text = fs::read_to_string(note).unwrap();
    assert!(
        text.contains("notes.jsonl") && text.contains("not a JSONL job file"),
        "{text}"
    );
    // Hidden and temporary files are ignored, not rejected.
    fs::write(daemon.jobs().join("inbox/.hidden.jsonl"), "junk").unwrap();
    fs::write(daemon.jobs().join("inbox/partial.jsonl.part"), "junk").unwrap();
    drop_file(
        &daemon.jobs(),
        "ok.jsonl",
        &chat_line("x", "chat", "hi", None),
    );
    wait_for_outbox(&daemon.jobs(), "ok", T).await;
    assert!(daemon.jobs().join("inbox/.hidden.jsonl").exists());
    assert!(daemon.jobs().join("inbox/partial.jsonl.part").exists());
    assert_eq!(provider.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_start_before_its_deadline_expires_and_one_over_its_max_cost_fails() {
    // One request at a time, each taking 4 s: "late" (due in 2 s) cannot start in time.
    let provider = LoopbackProvider::with(|seen| Reply {
        delay: Duration::from_secs(4),
        ..default_reply(seen)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = one_provider(&provider);
    spec[0].extra = "concurrency = 1";
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &spec));
    drop_file(
        &daemon.jobs(),
        "first.jsonl",
        &chat_line("first", "chat", "occupies the provider", None),
    );
    wait_until("the provider is busy", T, || provider.count() == 1).await;
    let content = [
        chat_line(
            "late",
            "chat",
            "cannot start in time",
            Some(json!({"deadline": "2s"})),
        ),
        chat_line(
            "dear",
            "chat",
            "too expensive",
            Some(json!({"max_cost_usd": 1e-12})),
        ),
    ]
    .join("\n");
    drop_file(&daemon.jobs(), "limits.jsonl", &content);
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "limits", T).await;
    assert!(output.is_empty(), "{output:?}");
    let errs = by_custom_id(&errors);
    let late = &errs["late"];
    assert_eq!(late["error"]["code"], "expired", "{late}");
    assert_eq!(late["response"], Value::Null);
    assert_eq!(late["nightshift"]["attempts"], 0);
    let dear = &errs["dear"];
    assert_eq!(dear["error"]["code"], "max_cost_exceeded", "{dear}");
    assert!(
        dear["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_cost_usd")
    );
    assert_eq!(
        provider.seen().iter().map(|s| s.text()).collect::<Vec<_>>(),
        ["occupies the provider"]
    );
}
