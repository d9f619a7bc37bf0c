//! Hostile numbers, end to end (issue 11): a job, a batch, a configuration
//! value or a provider header out of every range gets a clear error naming
//! its field, never a panic, and nothing else stops: the other jobs run,
//! the plan answers, the provider stays usable.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use nightshift::api::client::{CallError, Client};
use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(60);

fn spec(p: &LoopbackProvider, extra: &'static str) -> ProviderSpec<'static> {
    ProviderSpec {
        name: "p",
        base_url: p.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra,
    }
}

fn huge_max_tokens(custom_id: &str) -> String {
    format!(
        r#"{{"custom_id":"{custom_id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"chat","messages":[{{"role":"user","content":"huge"}}],"max_tokens":18446744073709551615}}}}"#
    )
}

async fn api_error(r: Result<Value, CallError>) -> (u16, Value) {
    match r {
        Err(CallError::Api { status, body, .. }) => (status.as_u16(), body),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn post_jsonl(client: &Client, lines: &[String]) -> Result<Value, CallError> {
    client
        .json(
            Method::POST,
            "/v1/jobs",
            Some("application/jsonl"),
            lines.join("\n") + "\n",
        )
        .await
}

fn no_panic(daemon: &Daemon) {
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_max_tokens_is_refused_and_everything_else_runs() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &[spec(&provider, "")]));
    let client = daemon.unix_client().await;

    // Others queued first (far deadlines keep some of them queued a while).
    let good: Vec<String> = (1..=6)
        .map(|i| chat_line(&format!("g{i}"), "chat", &format!("good {i}"), None))
        .collect();
    let sub = post_jsonl(&client, &good).await.unwrap();
    assert_eq!(sub["queued"], 6, "{sub}");

    // Over HTTP: 400, the field and the limit named, nothing queued.
    let (status, body) = api_error(post_jsonl(&client, &[huge_max_tokens("huge")]).await).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "body.max_tokens", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("body.max_tokens: 18446744073709551615 is above the limit of 1000000"),
        "{message}"
    );
    // Its kind too: a prompt of ~9 MB, a body nested too deep, a 1e400.
    let big_prompt = chat_line("big", "chat", &"a".repeat(9_000_000), None);
    let deep = chat_line("deep", "chat", "x", None).replacen(
        "\"max_tokens\":20",
        &format!(
            "\"max_tokens\":20,\"x\":{}1{}",
            "[".repeat(200),
            "]".repeat(200)
        ),
        1,
    );
    let inf = chat_line("inf", "chat", "x", None).replacen(
        "\"max_tokens\":20",
        "\"max_tokens\":20,\"temperature\":1e400",
        1,
    );
    for (line, param, says) in [
        (&big_prompt, "body.messages", "above the limit of 2000000"),
        (&deep, "body", "nested more than 128 levels"),
        (&inf, "body.temperature", "range of a 64-bit float"),
    ] {
        let (status, body) = api_error(post_jsonl(&client, std::slice::from_ref(line)).await).await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }

    // In the folder: that line is rejected by line and field, the others queue.
    let mut content = vec![chat_line("f1", "chat", "folder 1", None)];
    content.push(huge_max_tokens("f-huge"));
    content.push(chat_line("f2", "chat", "folder 2", None));
    drop_file(&daemon.jobs(), "mixed.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "mixed", T).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["custom_id"], "f-huge");
    assert_eq!(errors[0]["nightshift"]["field"], "body.max_tokens");
    let message = errors[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("line 2: body.max_tokens: 18446744073709551615 is above the limit"),
        "{message}"
    );
    assert_eq!(output.len(), 2, "{output:?}");

    // The plan and the jobs answer; every good job succeeds.
    let plan = client.get("/v1/plan").await.unwrap();
    assert_eq!(plan["object"], "plan", "{plan}");
    let first = sub["jobs"][0]["id"].as_str().unwrap().to_string();
    client.get(&format!("/v1/jobs/{first}")).await.unwrap();
    let sub_id = sub["id"].as_str().unwrap().to_string();
    wait_until_async("the six good jobs to succeed", T, async || {
        client
            .get(&format!("/v1/submissions/{sub_id}"))
            .await
            .is_ok_and(|s| s["counts"]["succeeded"] == 6)
    })
    .await;
    client.get("/v1/plan").await.unwrap();
    no_panic(&daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_completion_window_is_refused_without_a_panic() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &[spec(&provider, "")]));
    let client = daemon.unix_client().await;
    let boundary = "b0undary";
    let line = chat_line("w1", "chat", "window", None);
    let upload = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{line}\n\r\n--{boundary}--\r\n"
    );
    let file = client
        .json(
            Method::POST,
            "/v1/files",
            Some(&format!("multipart/form-data; boundary={boundary}")),
            upload,
        )
        .await
        .unwrap();
    let batch = |window: &str| json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": window});
    for window in ["99999999d", "100000000y", "366d"] {
        let (status, body) = api_error(client.post_json("/v1/batches", &batch(window)).await).await;
        assert_eq!(status, 400, "{window}: {body}");
        assert_eq!(body["error"]["param"], "completion_window", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("longer than the limit of 365d"),
            "{body}"
        );
    }
    // The same goes for ?deadline= on a submission, and the daemon is fine.
    let r = client
        .json(
            Method::POST,
            "/v1/jobs?deadline=99999999d",
            Some("application/jsonl"),
            line.clone(),
        )
        .await;
    let (status, body) = api_error(r).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("deadline")),
        "{body}"
    );
    let b = client
        .post_json("/v1/batches", &batch("365d"))
        .await
        .unwrap();
    assert_eq!(b["status"], "in_progress", "{b}");
    client.get("/healthz").await.unwrap();
    no_panic(&daemon);
}

#[test]
fn huge_config_durations_and_inf_fail_check_config_and_serve_alike() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[[providers]]\nname = \"s\"\nkind = \"simulated\"\n{provider}\n\
                [[providers.models]]\nname = \"m\"\ninput_per_mtok = 1.0\noutput_per_mtok = 1.0\n";
    let cases = [
        (
            "[daemon]\ndefault_deadline = \"100000000y\"\n",
            "",
            "bad.toml:2: daemon.default_deadline: '100000000y' is longer than the limit of 365d",
        ),
        (
            "[daemon]\nsafety_margin = \"100000000y\"\n",
            "",
            "bad.toml:2: daemon.safety_margin: '100000000y' is longer than the limit of 365d",
        ),
        (
            "",
            "ms_per_output_token = inf",
            "bad.toml:2: providers[0].ms_per_output_token: inf is not",
        ),
        (
            "",
            "markup = nan",
            "bad.toml:2: providers[0].markup: NaN is not",
        ),
        (
            "",
            "tpm = 18446744073709551615",
            "bad.toml:2: providers[0].tpm: 18446744073709551615 is above the limit",
        ),
    ];
    for (daemon, provider, says) in cases {
        let text = format!("{daemon}{}", base.replace("{provider}", provider));
        fs::write(dir.path().join("bad.toml"), &text).unwrap();
        for args in [
            &["check-config", "bad.toml"][..],
            &["serve", "--config", "bad.toml"][..],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
                .args(args)
                .current_dir(dir.path())
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?} {text}: {stderr}");
            assert!(!stderr.contains("panicked"), "{args:?} {text}: {stderr}");
            assert!(stderr.contains(says), "{args:?} {text}: {stderr}");
        }
    }
}

/// Answers each job's first attempt with `first(text)` when that is
/// `Some`, and every other request normally.
fn first_attempt(
    first: impl Fn(&str) -> Option<Reply> + Send + Sync + 'static,
) -> impl Fn(&Seen) -> Reply {
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Default::default();
    move |seen: &Seen| {
        let text = seen.text();
        let n = {
            let mut a = attempts.lock().unwrap();
            let n = a.entry(text.clone()).or_default();
            *n += 1;
            *n
        };
        match first(&text) {
            Some(reply) if n == 1 => reply,
            _ => default_reply(seen),
        }
    }
}

fn with_headers(mut reply: Reply, headers: &[(&'static str, &str)]) -> Reply {
    reply.headers = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_provider_headers_never_panic_and_leave_the_provider_free() {
    let rate_limited = |message: &str| {
        Reply::json(
            429,
            openai_error(message, "requests", Some("rate_limit_exceeded")),
        )
    };
    let ok = |text: &str| Reply::json(200, completion("m", &format!("echo: {text}"), 100, 10));
    let huge_digits = "100000000000000000000000s";
    let provider = LoopbackProvider::with(first_attempt(move |text| {
        Some(match text {
            "429-retry-after" => with_headers(rate_limited("Rate limit reached."), &[("retry-after", "1e20")]),
            "429-retry-after-ms" => with_headers(rate_limited("Rate limit reached."), &[("retry-after-ms", "1e23")]),
            "429-reset" => with_headers(
                rate_limited("Rate limit reached."),
                &[("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", huge_digits)],
            ),
            "429-message" => rate_limited(
                "Rate limit reached for requests. Please try again in 99999999999999999999s. Visit ...",
            ),
            "200-retry-after" => with_headers(ok(text), &[("retry-after", "1e20"), ("retry-after-ms", "1e23")]),
            "200-reset" => with_headers(
                ok(text),
                &[
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "1e23s"),
                    ("x-ratelimit-remaining-tokens", "0"),
                    ("x-ratelimit-reset-tokens", huge_digits),
                ],
            ),
            _ => return None,
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    // One request at a time: a slot a failed task kept would stop everything.
    let config = config_toml(dir.path(), &[spec(&provider, "concurrency = 1")]);
    let daemon = Daemon::start(dir.path(), &config);
    let markers = [
        "429-retry-after",
        "429-retry-after-ms",
        "429-reset",
        "429-message",
        "200-retry-after",
        "200-reset",
    ];
    let content: Vec<String> = markers
        .iter()
        .map(|m| chat_line(m, "chat", m, Some(json!({"deadline": "1h"}))))
        .collect();
    drop_file(&daemon.jobs(), "headers.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "headers", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    let out: BTreeMap<String, Value> = output
        .iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_string(), l.clone()))
        .collect();
    for m in markers {
        // A 429 whose wait is not believed is retried after the usual second;
        // a success is one attempt, its headers ignored.
        let attempts = if m.starts_with("429") { 2 } else { 1 };
        assert_eq!(
            out[m]["nightshift"]["attempts"], attempts,
            "{m}: {}",
            out[m]
        );
        assert_eq!(out[m]["response"]["status_code"], 200, "{m}");
    }
    // Later jobs still run on that provider, promptly: no pause of a day,
    // no concurrency slot held.
    let later: Vec<String> = (1..=4)
        .map(|i| chat_line(&format!("later{i}"), "chat", &format!("later {i}"), None))
        .collect();
    drop_file(&daemon.jobs(), "later.jsonl", &later.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "later", Duration::from_secs(20)).await;
    assert_eq!(
        (output.len(), errors.len()),
        (4, 0),
        "{output:?} {errors:?}"
    );
    let client = daemon.unix_client().await;
    let providers = client.get("/v1/providers").await.unwrap();
    let health = &providers["data"][0]["health"]["dispatcher"];
    assert!(!health.to_string().contains("disabled"), "{health}");
    no_panic(&daemon);
}
