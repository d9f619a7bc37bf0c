//! Provider faults, end to end: a fault-injecting loopback provider answers
//! the real daemon with 429s in every Retry-After form, 5xx, 529, timeouts,
//! connection resets, malformed bodies, 401 and insufficient_quota. Every job
//! must end succeeded, or failed with the right reason, and the provider's
//! pauses must be respected.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(60);

/// A behaviour that answers the first attempt of a job with `first(marker)`
/// (by the job's message text) and later ones normally.
fn first_attempt_fails(
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

fn spec(
    p: &LoopbackProvider,
    name: &'static str,
    price: f64,
    extra: &'static str,
) -> ProviderSpec<'static> {
    ProviderSpec {
        name,
        base_url: p.base_url(),
        model: "m",
        input_per_mtok: price,
        output_per_mtok: price,
        extra,
    }
}

fn by_id(lines: &[Value]) -> BTreeMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_string(), l.clone()))
        .collect()
}

fn rate_limited(headers: Vec<(&'static str, String)>, message: &str) -> Reply {
    Reply {
        headers,
        ..Reply::json(
            429,
            openai_error(message, "requests", Some("rate_limit_exceeded")),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_retry_after_form_pauses_the_whole_provider() {
    let http_date = |secs: i64| {
        (chrono::Utc::now() + chrono::Duration::seconds(secs))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string()
    };
    let provider = LoopbackProvider::with(first_attempt_fails(move |text| {
        Some(match text {
            "ra-ms" => rate_limited(
                vec![("retry-after-ms", "1200".into())],
                "Rate limit reached.",
            ),
            "ra-s" => rate_limited(vec![("retry-after", "1".into())], "Rate limit reached."),
            "ra-date" => rate_limited(vec![("retry-after", http_date(2))], "Rate limit reached."),
            "ra-reset" => rate_limited(
                vec![
                    ("x-ratelimit-remaining-requests", "0".into()),
                    ("x-ratelimit-reset-requests", "1.5s".into()),
                ],
                "Rate limit reached.",
            ),
            "ra-msg" => rate_limited(
                vec![],
                "Rate limit reached for requests. Please try again in 1.1s. Visit ...",
            ),
            _ => return None,
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    // One request at a time, so each pause can be checked against the next request.
    let config = config_toml(dir.path(), &[spec(&provider, "p", 1.0, "concurrency = 1")])
        .replace("max_attempts = 3", "max_attempts = 5");
    let daemon = Daemon::start(dir.path(), &config);
    let markers = ["ra-ms", "ra-s", "ra-date", "ra-reset", "ra-msg"];
    let content: Vec<String> = markers
        .iter()
        .map(|m| chat_line(m, "chat", m, Some(json!({"deadline": "1h"}))))
        .collect();
    drop_file(&daemon.jobs(), "limits.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "limits", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    let out = by_id(&output);
    for m in markers {
        assert_eq!(out[m]["nightshift"]["attempts"], 2, "{m}");
    }
    // After each 429, nothing reached the provider until the pause was over.
    let seen = provider.seen();
    let minimum = |m: &str| match m {
        "ra-ms" => 1.2,
        "ra-s" => 1.0,
        "ra-date" => 1.0, // an HTTP date has whole seconds
        "ra-reset" => 1.5,
        _ => 1.1,
    };
    for (i, s) in seen.iter().enumerate() {
        let text = s.text();
        let first = seen.iter().position(|x| x.text() == text) == Some(i);
        if first && let Some(next) = seen.get(i + 1) {
            let gap = next.at.duration_since(s.at).as_secs_f64();
            assert!(
                gap >= minimum(&text) - 0.05,
                "{text}: next request after {gap:.3}s"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_until_the_job_succeeds() {
    let provider = LoopbackProvider::with(first_attempt_fails(|text| {
        Some(match text {
            "e500" => Reply::json(500, openai_error("The server had an error.", "server_error", None)),
            "e503" => Reply::json(503, openai_error("The engine is currently overloaded.", "server_error", None)),
            "e529" => Reply::json(529, json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
            "e408" => Reply::json(408, openai_error("Request timed out.", "timeout", None)),
            "malformed" => Reply { raw_body: Some("{\"choices\": [ oops"), ..Reply::json(200, Value::Null) },
            "slow" => Reply { delay: Duration::from_secs(3), ..default_reply_for("slow") },
            _ => return None,
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(
        dir.path(),
        &[spec(&provider, "p", 1.0, "timeout = \"700ms\"")],
    );
    let daemon = Daemon::start(dir.path(), &config);
    let markers = ["e500", "e503", "e529", "e408", "malformed", "slow"];
    let content: Vec<String> = markers
        .iter()
        .map(|m| chat_line(m, "chat", m, None))
        .collect();
    drop_file(&daemon.jobs(), "transient.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "transient", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    let out = by_id(&output);
    for m in markers {
        assert_eq!(out[m]["nightshift"]["attempts"], 2, "{m}: {}", out[m]);
        assert_eq!(out[m]["response"]["status_code"], 200);
    }
    let log = daemon.log_text();
    assert!(
        log.contains("code=timeout") || log.contains("timeout"),
        "the slow answer timed out"
    );
}

/// The default reply for a job whose text is `text` (for use inside `first`).
fn default_reply_for(text: &str) -> Reply {
    Reply::json(200, completion("m", &format!("echo: {text}"), 100, 10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_fail_the_job_at_once_with_the_providers_answer() {
    let provider = LoopbackProvider::with(|seen: &Seen| match seen.text().as_str() {
        "e404" => Reply::json(
            404,
            openai_error(
                "The model does not exist.",
                "invalid_request_error",
                Some("model_not_found"),
            ),
        ),
        "e422" => Reply::json(
            422,
            openai_error("Unprocessable.", "invalid_request_error", None),
        ),
        _ => default_reply(seen),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &[spec(&provider, "p", 1.0, "")]),
    );
    drop_file(
        &daemon.jobs(),
        "perm.jsonl",
        &[
            chat_line("e404", "chat", "e404", None),
            chat_line("e422", "chat", "e422", None),
        ]
        .join("\n"),
    );
    let (_, errors) = wait_for_outbox(&daemon.jobs(), "perm", T).await;
    let errs = by_id(&errors);
    assert_eq!(errs["e404"]["response"]["status_code"], 404);
    assert_eq!(
        errs["e404"]["response"]["body"]["error"]["code"],
        "model_not_found"
    );
    assert_eq!(errs["e422"]["response"]["status_code"], 422);
    for e in errs.values() {
        assert_eq!(e["nightshift"]["attempts"], 1);
    }
    assert_eq!(provider.count(), 2, "no retries for permanent errors");
}

async fn refused_key_moves_jobs_elsewhere(refusal: Reply, expect_in_log: &str) {
    let refusal = Arc::new(Mutex::new(Some(refusal)));
    let refusing = LoopbackProvider::with(move |_: &Seen| {
        let mut r = refusal.lock().unwrap();
        let template = r.as_ref().unwrap();
        let reply = Reply::json(template.status, template.body.clone());
        let _ = &mut r;
        reply
    })
    .await;
    let backup = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The refusing provider is the cheaper one: the plan sends jobs there first.
    let config = config_toml(
        dir.path(),
        &[
            spec(&refusing, "cheap", 0.1, "concurrency = 1"),
            spec(&backup, "backup", 1.0, ""),
        ],
    );
    let daemon = Daemon::start(dir.path(), &config);
    let content: Vec<String> = (0..6)
        .map(|i| chat_line(&format!("j{i}"), "chat", &format!("job {i}"), None))
        .collect();
    drop_file(&daemon.jobs(), "refused.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "refused", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(output.len(), 6);
    assert!(
        output
            .iter()
            .all(|l| l["nightshift"]["provider"] == "backup")
    );
    assert_eq!(
        refusing.count(),
        1,
        "a refused key disables the provider after one answer"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("disabled") && log.contains(expect_in_log),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_disables_the_provider_and_its_jobs_go_elsewhere() {
    refused_key_moves_jobs_elsewhere(
        Reply::json(
            401,
            openai_error(
                "Incorrect API key provided.",
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
        ),
        "HTTP 401",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_quota_disables_the_provider_and_its_jobs_go_elsewhere() {
    refused_key_moves_jobs_elsewhere(
        Reply::json(
            429,
            openai_error(
                "You exceeded your current quota.",
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
        ),
        "insufficient_quota",
    )
    .await;
}

/// A TCP server that accepts connections, reads a little, and closes them
/// without an answer: connection resets, as a crashing proxy produces.
async fn resetting_server() -> (String, Arc<Mutex<usize>>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(Mutex::new(0usize));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            *c.lock().unwrap() += 1;
            let mut buf = [0u8; 256];
            let _ = sock.read(&mut buf).await;
            sock.set_zero_linger().ok(); // RST, not FIN
            drop(sock);
        }
    });
    (format!("http://{addr}/v1"), count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_open_the_circuit_and_jobs_fail_over() {
    let (reset_url, resets) = resetting_server().await;
    let backup = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let flaky = ProviderSpec {
        name: "flaky",
        base_url: reset_url,
        model: "m",
        input_per_mtok: 0.1,
        output_per_mtok: 0.1,
        extra: "",
    };
    let config = config_toml(dir.path(), &[flaky, spec(&backup, "backup", 1.0, "")])
        .replace("max_attempts = 3", "max_attempts = 10");
    let started = Instant::now();
    let daemon = Daemon::start(dir.path(), &config);
    let content: Vec<String> = (0..20)
        .map(|i| {
            chat_line(
                &format!("j{i:02}"),
                "chat",
                &format!("job {i}"),
                Some(json!({"deadline": "1h"})),
            )
        })
        .collect();
    drop_file(&daemon.jobs(), "resets.jsonl", &content.join("\n"));
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "resets", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(output.len(), 20);
    assert!(
        output
            .iter()
            .all(|l| l["nightshift"]["provider"] == "backup")
    );
    let log = daemon.log_text();
    assert!(log.contains("circuit open"), "the breaker opened: {log}");
    // The breaker caps the damage: the first wave of attempts, then probes.
    let n = *resets.lock().unwrap();
    assert!(n >= 5, "{n}");
    assert!(
        n <= 20 + (started.elapsed().as_secs() as usize / 10 + 1),
        "{n} resets: the circuit should have stopped most"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_failing_fails_before_its_deadline() {
    let provider = LoopbackProvider::with(|_: &Seen| {
        Reply::json(500, openai_error("Down.", "server_error", None))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(dir.path(), &[spec(&provider, "p", 1.0, "")])
        .replace("max_attempts = 3", "max_attempts = 100")
        .replace("retry_max = \"200ms\"", "retry_max = \"2s\"")
        .replace("[daemon]\n", "[daemon]\nsafety_margin = \"1s\"\n");
    let daemon = Daemon::start(dir.path(), &config);
    drop_file(
        &daemon.jobs(),
        "doomed.jsonl",
        &chat_line("doomed", "chat", "x", Some(json!({"deadline": "6s"}))),
    );
    let (_, errors) = wait_for_outbox(&daemon.jobs(), "doomed", T).await;
    let e = &errors[0];
    assert_eq!(e["response"]["status_code"], 500, "{e}");
    let completed =
        chrono::DateTime::parse_from_rfc3339(e["nightshift"]["completed_at"].as_str().unwrap())
            .unwrap();
    let deadline_from =
        chrono::DateTime::parse_from_rfc3339(e["nightshift"]["dispatched_at"].as_str().unwrap())
            .unwrap();
    assert!(
        completed - deadline_from < chrono::Duration::seconds(7),
        "{e}"
    );
    assert!(
        e["nightshift"]["attempts"].as_u64().unwrap() >= 2,
        "it was retried: {e}"
    );
}
