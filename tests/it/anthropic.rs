//! `kind = "anthropic"`: job files (OpenAI chat lines) through a daemon to a
//! loopback server speaking Anthropic's Messages API. The request is
//! translated (system, max_tokens, stop_sequences, x-api-key,
//! anthropic-version), the answer comes back as an OpenAI chat.completion
//! with cached tokens priced at their own prices; 529 is retried, a spend
//! limit is not, and a field Anthropic cannot take is refused at ingest.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(60);

/// A config with an Anthropic provider `claude` (model `claude-haiku-4-5`:
/// $1 / $5 per M, cache reads $0.10, writes $1.25) at `anthropic`, these
/// OpenAI-compatible `backups` after it, and a class `chat` over all.
fn config(
    dir: &std::path::Path,
    anthropic: &LoopbackProvider,
    extra: &str,
    backups: &[ProviderSpec],
) -> String {
    let base = config_toml(dir, backups);
    let (head, _) = base.split_once("[classes]").unwrap();
    let mut members = vec!["\"claude/claude-haiku-4-5\"".to_string()];
    members.extend(
        backups
            .iter()
            .map(|b| format!("\"{}/{}\"", b.name, b.model)),
    );
    format!(
        "{head}[[providers]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"http://{}\"\n\
         api_key_env = \"{KEY_ENV}\"\n{extra}\n\
         [[providers.models]]\nname = \"claude-haiku-4-5\"\ninput_per_mtok = 1.0\noutput_per_mtok = 5.0\n\
         cached_input_per_mtok = 0.1\ncache_write_per_mtok = 1.25\n\n\
         [classes]\nchat = [{}]\n",
        anthropic.addr,
        members.join(", ")
    )
}

fn line(custom_id: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_file_runs_on_anthropic_translated_both_ways_and_priced_with_its_cache() {
    let server = LoopbackProvider::anthropic(|seen: &Seen| {
        Reply::json(
            200,
            anthropic_message(
                seen.model(),
                &format!("echo: {}", seen.text()),
                "stop_sequence",
                [20, 100, 30, 7],
            ),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &config(dir.path(), &server, "", &[]));
    let body = json!({
        "model": "chat", "max_tokens": 20, "stop": ["END"], "temperature": 0.3,
        "messages": [{"role": "system", "content": "Answer in one word."},
                     {"role": "user", "content": "Capital of France?"}]
    });
    drop_file(&daemon.jobs(), "a.jsonl", &line("a1", body));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "a", T).await;
    assert!(errors.is_empty(), "{errors:?}");

    // What the server saw: the Messages API, with its headers and no bearer.
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.path, "/v1/messages");
    assert_eq!(s.x_api_key.as_deref(), Some(TEST_KEY));
    assert_eq!(s.anthropic_version.as_deref(), Some("2023-06-01"));
    assert_eq!(s.authorization, None);
    assert_eq!(
        s.body,
        json!({"model": "claude-haiku-4-5", "system": "Answer in one word.", "max_tokens": 20,
               "stop_sequences": ["END"], "temperature": 0.3,
               "messages": [{"role": "user", "content": "Capital of France?"}]})
    );

    // The result line: an OpenAI chat.completion.
    assert_eq!(output.len(), 1);
    let out = &output[0];
    assert_eq!(out["custom_id"], "a1");
    assert_eq!(out["response"]["status_code"], 200);
    assert_eq!(out["response"]["request_id"], "req_anthropic_loopback");
    let b = &out["response"]["body"];
    assert_eq!(b["object"], "chat.completion");
    assert_eq!(b["model"], "claude-haiku-4-5");
    assert_eq!(
        b["choices"][0]["message"]["content"],
        "echo: Capital of France?"
    );
    assert_eq!(b["choices"][0]["message"]["role"], "assistant");
    assert_eq!(b["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        b["usage"],
        json!({"prompt_tokens": 150, "completion_tokens": 7, "total_tokens": 157,
               "prompt_tokens_details": {"cached_tokens": 100}})
    );
    let ns = &out["nightshift"];
    assert_eq!(ns["provider"], "claude");
    assert_eq!(ns["input_tokens"], 150);
    assert_eq!(ns["output_tokens"], 7);
    // 20 × $1 + 100 × $0.10 + 30 × $1.25 + 7 × $5, per million tokens.
    let want = (20.0 + 10.0 + 37.5 + 35.0) / 1e6;
    let cost = ns["cost_usd"].as_f64().unwrap();
    assert!((cost - want).abs() < 1e-12, "{cost} vs {want}");
    let log = daemon.log_text();
    assert!(!log.contains(TEST_KEY), "the key is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_529_is_retried_and_then_succeeds() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let server = LoopbackProvider::anthropic(move |seen: &Seen| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::json(529, anthropic_error("overloaded_error", "Overloaded"))
        } else {
            anthropic_reply(seen)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &config(dir.path(), &server, "", &[]));
    drop_file(
        &daemon.jobs(),
        "o.jsonl",
        &chat_line("o1", "chat", "hello", None),
    );
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "o", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["nightshift"]["attempts"], 2);
    assert_eq!(
        output[0]["response"]["body"]["choices"][0]["message"]["content"],
        "echo: hello"
    );
    assert_eq!(server.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_limit_429_is_not_retried_and_the_jobs_go_elsewhere() {
    let server = LoopbackProvider::anthropic(|_: &Seen| {
        Reply::json(
            429,
            anthropic_error(
                "rate_limit_error",
                "You have reached your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC.",
            ),
        )
    })
    .await;
    let backup = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let backup_spec = ProviderSpec {
        name: "backup",
        base_url: backup.base_url(),
        model: "m",
        input_per_mtok: 50.0, // dearer: the plan tries Anthropic first
        output_per_mtok: 50.0,
        extra: "",
    };
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), &server, "concurrency = 1", &[backup_spec]),
    );
    let content: Vec<String> = (0..4)
        .map(|i| chat_line(&format!("s{i}"), "chat", &format!("job {i}"), None))
        .collect();
    drop_file(&daemon.jobs(), "s.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "s", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(output.len(), 4);
    assert!(
        output
            .iter()
            .all(|l| l["nightshift"]["provider"] == "backup"),
        "{output:?}"
    );
    assert_eq!(server.count(), 1, "a spend limit is not retried");
    let log = daemon.log_text();
    assert!(
        log.contains("disabled") && log.contains("spend limit"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_anthropic_cannot_take_is_a_per_line_error_at_ingest() {
    let seen_texts = Arc::new(Mutex::new(Vec::new()));
    let st = seen_texts.clone();
    let server = LoopbackProvider::anthropic(move |seen: &Seen| {
        st.lock().unwrap().push(seen.text());
        anthropic_reply(seen)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &config(dir.path(), &server, "", &[]));
    let msg = |t: &str| json!([{"role": "user", "content": t}]);
    let lines = [
        line(
            "ok",
            json!({"model": "chat", "messages": msg("fine"), "max_tokens": 5}),
        ),
        line(
            "lp",
            json!({"model": "chat", "messages": msg("x"), "logprobs": true}),
        ),
        line(
            "hot",
            json!({"model": "chat", "messages": msg("x"), "temperature": 1.7}),
        ),
        line(
            "audio",
            json!({"model": "chat", "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}),
        ),
    ];
    drop_file(&daemon.jobs(), "u.jsonl", &lines.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "u", T).await;
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["custom_id"], "ok");
    let errs: BTreeMap<String, &Value> = errors
        .iter()
        .map(|e| (e["custom_id"].as_str().unwrap().to_string(), e))
        .collect();
    let expect = [
        (
            "lp",
            "body.logprobs",
            "not supported by Anthropic's Messages API",
        ),
        ("hot", "body.temperature", "outside Anthropic's range"),
        (
            "audio",
            "body.messages[0].content[0].type",
            "not supported by Anthropic's Messages API",
        ),
    ];
    assert_eq!(errs.len(), expect.len(), "{errors:?}");
    for (id, field, needle) in expect {
        let e = errs[id];
        assert_eq!(e["error"]["code"], "invalid_line", "{e}");
        assert_eq!(e["nightshift"]["field"], field, "{e}");
        assert_eq!(e["response"], Value::Null);
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{id}: {message}");
    }
    assert_eq!(*seen_texts.lock().unwrap(), ["fine"]);
}
