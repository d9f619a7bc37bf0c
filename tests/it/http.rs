//! The local HTTP API over the real Unix socket and TCP listener of the
//! real binary: submit, get, list with pagination, cancel; every error
//! case; the token; the socket's mode; the CLI that uses it.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nightshift::api::client::CallError;
use serde_json::{Value, json};

use crate::common::*;

fn cheap(base_url: String) -> ProviderSpec<'static> {
    ProviderSpec {
        name: "alpha",
        base_url,
        model: "alpha-chat",
        input_per_mtok: 0.10,
        output_per_mtok: 0.40,
        extra: "",
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`.
async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(x) = f().await {
            return x;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn api_error(r: Result<Value, CallError>) -> (u16, Value) {
    match r {
        Err(CallError::Api { status, body, .. }) => (status.as_u16(), body),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn jsonl(lines: &[String]) -> String {
    lines.join("\n") + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_round_trip_over_the_unix_socket_with_pagination() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &[cheap(provider.base_url())]),
    );
    let client = daemon.unix_client().await;

    let lines: Vec<String> = (1..=5)
        .map(|i| chat_line(&format!("c{i}"), "chat", &format!("hello {i}"), None))
        .collect();
    let sub = post_jsonl(&client, jsonl(&lines)).await.unwrap();
    assert_eq!(sub["object"], "submission");
    assert_eq!(sub["queued"], 5);
    let ids: Vec<String> = sub["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["job_1", "job_2", "job_3", "job_4", "job_5"]);
    assert_eq!(sub["jobs"][2]["custom_id"], "c3");

    // Pagination: pages of 2 in id order, has_more until the last.
    let page = client.get("/v1/jobs?limit=2").await.unwrap();
    assert_eq!(
        (page["first_id"].as_str(), page["last_id"].as_str()),
        (Some("job_1"), Some("job_2"))
    );
    assert_eq!(page["has_more"], true);
    let page = client.get("/v1/jobs?limit=2&after=job_2").await.unwrap();
    let got: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["job_3", "job_4"]);
    assert_eq!(page["has_more"], true);
    let page = client.get("/v1/jobs?limit=2&after=job_4").await.unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["has_more"], false);
    assert_eq!(page["last_id"], "job_5");

    // Every job runs; its result is the result line of the design brief.
    let sub_id = sub["id"].as_str().unwrap().to_string();
    poll(
        "the submission to finish",
        Duration::from_secs(30),
        || async {
            let s = client
                .get(&format!("/v1/submissions/{sub_id}"))
                .await
                .unwrap();
            (s["done"] == true).then_some(s)
        },
    )
    .await;
    let job = client.get("/v1/jobs/job_3").await.unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["custom_id"], "c3");
    assert_eq!(job["provider"], "alpha");
    assert_eq!(job["plan"], Value::Null);
    let result = &job["result"];
    assert_eq!(result["custom_id"], "c3");
    assert_eq!(result["response"]["status_code"], 200);
    assert_eq!(result["error"], Value::Null);
    assert_eq!(result["nightshift"]["job_id"], "job_3");
    assert_eq!(result["nightshift"]["input_tokens"], 100);
    assert!(result["nightshift"]["cost_usd"].as_f64().unwrap() > 0.0);

    let done = client
        .get("/v1/jobs?state=succeeded&limit=100")
        .await
        .unwrap();
    assert_eq!(done["data"].as_array().unwrap().len(), 5);
    let (status, out) = client
        .send(
            hyper::Method::GET,
            &format!("/v1/submissions/{sub_id}/output"),
            None,
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let out: Vec<Value> = String::from_utf8(out.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), 5);
    assert_eq!(out[0]["custom_id"], "c1");

    let stats = client.get("/v1/stats").await.unwrap();
    assert_eq!(stats["jobs"]["succeeded"], 5);
    assert!(stats["spend_usd"].as_f64().unwrap() > 0.0);
    // Everything finished just now: today's and this month's spend are all of it.
    assert_eq!(stats["spend_today_usd"], stats["spend_usd"], "{stats}");
    assert_eq!(stats["spend_month_usd"], stats["spend_usd"], "{stats}");
    assert_eq!(stats["queued_by_class"], json!({}), "{stats}");
    assert_eq!(stats["providers"][0]["provider"], "alpha");
    assert_eq!(stats["providers"][0]["succeeded"], 5);
    let providers = client.get("/v1/providers").await.unwrap();
    let p = &providers["data"][0];
    assert_eq!(p["name"], "alpha");
    assert_eq!(p["health"]["status"], "ok");
    assert_eq!(p["health"]["succeeded"], 5);
    assert_eq!(p["models"][0]["current_price"]["input_per_mtok"], 0.10);
    let plan = client.get("/v1/plan").await.unwrap();
    assert_eq!(plan["object"], "plan");
    assert_eq!(plan["queued_jobs"], 0);
    assert_eq!(client.get("/healthz").await.unwrap()["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_refuses_requests_without_the_right_token_and_the_socket_is_0660() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &api_config_toml(dir.path(), &[cheap(provider.base_url())], ""),
    );
    let (base, token) = daemon.tcp_base().await;
    let http = reqwest::Client::new();

    let r = http.get(format!("{base}/v1/jobs")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing bearer token")
    );
    let r = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth("ns-wrong")
        .body(chat_line("x", "chat", "hi", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["message"], "incorrect bearer token");
    // Nothing was queued by the refused request.
    let client = daemon.unix_client().await;
    assert_eq!(client.get("/v1/jobs").await.unwrap()["data"], json!([]));
    // Liveness needs no token.
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // With the token: one object, then an array.
    let r = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(chat_line("one", "chat", "hi", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let one: Value = r.json().await.unwrap();
    assert_eq!(one["queued"], 1);
    let array = format!(
        "[{}, {}]",
        chat_line("a", "chat", "hi", None),
        chat_line("b", "chat", "hi", Some(json!({"deadline": "2h"})))
    );
    let r = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&token)
        .body(array)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let two: Value = r.json().await.unwrap();
    assert_eq!(two["queued"], 2);
    let id = two["jobs"][1]["id"].as_str().unwrap();
    let r = http
        .get(format!("{base}/v1/jobs/{id}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["custom_id"], "b");

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&daemon.socket()), 0o660);
    assert_eq!(mode(&dir.path().join("state/api-token")), 0o600);
    assert!(token.starts_with("ns-"));
    assert!(
        !daemon.log_text().contains(&token),
        "the token must never be logged"
    );

    // `nightshift token` prints the same token.
    let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .args([
            "token",
            "--config",
            dir.path().join("nightshift.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_openais_shape_and_the_right_status() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &api_config_toml(
            dir.path(),
            &[cheap(provider.base_url())],
            "max_body = \"4KB\"\nmax_upload = \"8KB\"",
        ),
    );
    let (base, token) = daemon.tcp_base().await;
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<String>| {
        let mut r = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            r = r.body(b);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            if status >= 400 {
                // OpenAI's shape, always all four fields.
                let e = body["error"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{body}"));
                for k in ["message", "type", "param", "code"] {
                    assert!(e.contains_key(k), "{k} missing in {body}");
                }
            }
            (status, body)
        }
    };
    use reqwest::Method as M;

    // Malformed JSON.
    let (s, b) = call(M::POST, "/v1/jobs", Some("{\"custom_id\": \"a\",".into())).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_json")),
        "{b}"
    );
    let (s, b) = call(M::POST, "/v1/jobs", Some("[{\"custom_id\": 1},".into())).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_json")),
        "{b}"
    );
    // Missing fields.
    let no_id = r#"{"method":"POST","url":"/v1/chat/completions","body":{"model":"chat","messages":[{"role":"user","content":"hi"}]}}"#;
    let (s, b) = call(M::POST, "/v1/jobs", Some(no_id.into())).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("custom_id")),
        "{b}"
    );
    let no_model = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"hi"}]}}"#;
    let (s, b) = call(M::POST, "/v1/jobs", Some(no_model.into())).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("body.model")),
        "{b}"
    );
    // Unknown model: param names the field.
    let (s, b) = call(
        M::POST,
        "/v1/jobs",
        Some(chat_line("a", "gpt-9000", "hi", None)),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(b["error"]["param"], "body.model");
    assert_eq!(b["error"]["code"], "model_not_found");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("gpt-9000"),
        "{b}"
    );
    // All or nothing, with every line's error.
    let body = jsonl(&[
        chat_line("ok", "chat", "hi", None),
        chat_line("bad-model", "nope", "hi", None),
        chat_line("ok", "chat", "dup", None),
        chat_line(
            "bad-deadline",
            "chat",
            "hi",
            Some(json!({"deadline": "soon"})),
        ),
    ]);
    let (s, b) = call(M::POST, "/v1/jobs", Some(body)).await;
    assert_eq!(s, 400);
    let lines = b["error"]["lines"].as_array().unwrap();
    let got: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| (l["line"].as_u64().unwrap(), l["field"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (2, "body.model"),
            (3, "custom_id"),
            (4, "nightshift.deadline")
        ]
    );
    assert_eq!(lines[0]["custom_id"], "bad-model");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 2: body.model:"),
        "{b}"
    );
    let (_, listed) = call(M::GET, "/v1/jobs", None).await;
    assert_eq!(listed["data"], json!([]), "nothing may be queued");
    // Bad query parameters.
    let (s, b) = call(M::GET, "/v1/jobs?state=bogus", None).await;
    assert_eq!((s, b["error"]["param"].as_str()), (400, Some("state")));
    let (s, b) = call(M::GET, "/v1/jobs?limit=0", None).await;
    assert_eq!((s, b["error"]["param"].as_str()), (400, Some("limit")));
    let (s, b) = call(
        M::POST,
        "/v1/jobs?deadline=soon",
        Some(chat_line("a", "chat", "hi", None)),
    )
    .await;
    assert_eq!((s, b["error"]["param"].as_str()), (400, Some("deadline")));

    // Oversized bodies: 413 over max_body, and over max_upload for files.
    let big = jsonl(
        &(0..40)
            .map(|i| chat_line(&format!("j{i}"), "chat", "some text", None))
            .collect::<Vec<_>>(),
    );
    assert!(big.len() > 4_000);
    let (s, b) = call(M::POST, "/v1/jobs", Some(big.clone())).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("request_too_large")),
        "{b}"
    );
    let upload = |content: String| {
        let (base, token, http) = (base.clone(), token.clone(), http.clone());
        async move {
            let boundary = "nightshift-test-boundary";
            let body = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
                 --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
            );
            let r = http
                .post(format!("{base}/v1/files"))
                .bearer_auth(&token)
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, b) = upload(big.clone() + &big).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("request_too_large")),
        "{b}"
    );
    let (s, _) = upload(big).await;
    assert_eq!(s, 200, "under max_upload, over max_body: accepted");
    // Batches: missing field, malformed JSON, unknown file.
    let (s, b) = call(
        M::POST,
        "/v1/batches",
        Some(json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}).to_string()),
    )
    .await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("completion_window")),
        "{b}"
    );
    assert_eq!(b["error"]["code"], "missing_required_parameter");
    let (s, b) = call(M::POST, "/v1/batches", Some("{nope".into())).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_json")),
        "{b}"
    );
    let (s, b) = call(M::POST, "/v1/batches", Some(json!({"input_file_id": "file-99", "endpoint": "/v1/chat/completions", "completion_window": "24h"}).to_string())).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (404, Some("input_file_id")),
        "{b}"
    );
    let (s, b) = call(M::POST, "/v1/batches", Some(json!({"input_file_id": "file-1", "endpoint": "/v1/images", "completion_window": "24h"}).to_string())).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("endpoint")),
        "{b}"
    );
    let (s, b) = call(M::POST, "/v1/batches", Some(json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "soon"}).to_string())).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("completion_window")),
        "{b}"
    );

    // Unknown ids: 404.
    for (m, path) in [
        (M::GET, "/v1/jobs/job_999"),
        (M::GET, "/v1/jobs/not-a-job"),
        (M::POST, "/v1/jobs/job_999/cancel"),
        (M::GET, "/v1/submissions/sub_999"),
        (M::GET, "/v1/submissions/sub_999/output"),
        (M::GET, "/v1/files/file-999"),
        (M::GET, "/v1/files/file-999/content"),
        (M::GET, "/v1/batches/batch_999"),
        (M::POST, "/v1/batches/batch_999/cancel"),
    ] {
        let (s, b) = call(m, path, None).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}: {b}"
        );
    }
    let (s, b) = call(M::GET, "/v1/nowhere", None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("unknown_url")));
    let (s, b) = call(M::DELETE, "/v1/jobs", None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
}

/// A provider cheap only from two hours from now: the planner holds jobs
/// with a 24 h deadline until then, so they stay queued.
fn cheaper_later(base_url: String, extra: &'static str) -> ProviderSpec<'static> {
    ProviderSpec {
        name: "later",
        base_url,
        model: "later-chat",
        input_per_mtok: 1.0,
        output_per_mtok: 4.0,
        extra,
    }
}

pub fn later_window() -> &'static str {
    let start = chrono::Utc::now() + chrono::Duration::hours(2);
    let end = start + chrono::Duration::days(3);
    Box::leak(
        format!(
            "[[providers.price_windows]]\nname = \"later\"\nstart = \"{}\"\nend = \"{}\"\nmultiplier = 0.01\n",
            start.to_rfc3339(),
            end.to_rfc3339()
        )
        .into_boxed_str(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_is_cancelled_and_a_running_one_is_not() {
    let provider = LoopbackProvider::with(|seen| {
        let mut r = default_reply(seen);
        if seen.text().contains("slow") {
            r.delay = Duration::from_secs(3);
        }
        r
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(
        dir.path(),
        &[cheaper_later(provider.base_url(), later_window())],
    );
    let daemon = Daemon::start(dir.path(), &config);
    let client = daemon.unix_client().await;
    let sub = post_jsonl(
        &client,
        jsonl(&[
            chat_line("a", "chat", "hi", None),
            chat_line("b", "chat", "hi", None),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(sub["queued"], 2);

    // Held for the cheap window; its plan says so.
    let job = client.get("/v1/jobs/job_1").await.unwrap();
    assert_eq!(job["state"], "queued");
    let start = job["plan"]["earliest_start"]
        .as_str()
        .unwrap_or_else(|| panic!("{job}"));
    let start = chrono::DateTime::parse_from_rfc3339(start).unwrap();
    assert!(
        start > chrono::Utc::now() + chrono::Duration::minutes(90),
        "{job}"
    );
    assert_eq!(job["plan"]["allocations"][0]["provider"], "later");

    let cancelled = client
        .post_json("/v1/jobs/job_1/cancel", &json!({}))
        .await
        .unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(cancelled["result"]["error"]["code"], "cancelled");
    let (s, b) = api_error(client.post_json("/v1/jobs/job_1/cancel", &json!({})).await).await;
    assert_eq!((s, b["error"]["code"].as_str()), (409, Some("job_final")));
    let other = client.get("/v1/jobs/job_2").await.unwrap();
    assert_eq!(other["state"], "queued", "only the cancelled job changes");

    // A job due in 30 minutes cannot wait for the cheap window: it runs now.
    let sub = post_jsonl(
        &client,
        chat_line(
            "urgent",
            "chat",
            "slow please",
            Some(json!({"deadline": "30m"})),
        ),
    )
    .await
    .unwrap();
    let id = sub["jobs"][0]["id"].as_str().unwrap().to_string();
    poll("the urgent job to run", Duration::from_secs(20), || async {
        let j = client.get(&format!("/v1/jobs/{id}")).await.unwrap();
        (j["state"] == "running").then_some(())
    })
    .await;
    let (s, b) = api_error(
        client
            .post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("job_running")),
        "{b}"
    );
    poll(
        "the running job's result",
        Duration::from_secs(20),
        || async {
            let j = client.get(&format!("/v1/jobs/{id}")).await.unwrap();
            (j["state"] == "succeeded").then_some(())
        },
    )
    .await;

    // The CLI cancels too.
    let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .args([
            "cancel",
            "job_2",
            "--config",
            dir.path().join("nightshift.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "job_2: cancelled\n");
    assert_eq!(
        client.get("/v1/jobs/job_2").await.unwrap()["state"],
        "cancelled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_is_not_stolen() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(dir.path(), &[cheap(provider.base_url())]);
    let mut daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready().await;
    daemon.kill();
    assert!(
        daemon.socket().exists(),
        "SIGKILL leaves the socket file behind"
    );
    let daemon = Daemon::start(dir.path(), &config);
    let client = daemon.unix_client().await;
    assert_eq!(client.get("/healthz").await.unwrap()["status"], "ok");

    // Another daemon (its own state) pointed at the live socket refuses to start.
    let other = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[http]\nsocket = \"{}\"\n",
        config_toml(other.path(), &[cheap(provider.base_url())]),
        daemon.socket().display()
    );
    let path = other.path().join("nightshift.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .env(KEY_ENV, TEST_KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another process is listening on"),
        "{stderr}"
    );
    assert_eq!(client.get("/healthz").await.unwrap()["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_waits_lists_and_reports_status() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &[cheap(provider.base_url())]),
    );
    daemon.wait_ready().await;
    let config = dir.path().join("nightshift.toml");
    let config = config.to_str().unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
            .args(args)
            .args(["--config", config])
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        jsonl(&[
            chat_line("g1", "chat", "hi", None),
            chat_line("g2", "chat", "status:400", None),
        ]),
    )
    .unwrap();
    let results = dir.path().join("results");
    std::fs::create_dir_all(&results).unwrap();
    let (ok, stdout, stderr) = cli(&[
        "submit",
        good.to_str().unwrap(),
        "--deadline",
        "2h",
        "--wait",
        "--out",
        results.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1 succeeded, 1 failed"), "{stdout}");
    assert!(stdout.contains("good.output.jsonl"), "{stdout}");
    let output = read_jsonl(&results.join("good.output.jsonl"));
    let errors = read_jsonl(&results.join("good.errors.jsonl"));
    assert_eq!((output.len(), errors.len()), (1, 1));
    assert_eq!(output[0]["custom_id"], "g1");
    assert_eq!(errors[0]["response"]["status_code"], 400);

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        jsonl(&[
            chat_line("b1", "chat", "hi", None),
            chat_line("b2", "nope", "hi", None),
        ]),
    )
    .unwrap();
    let (ok, _, stderr) = cli(&["submit", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{}:2: body.model: unknown model or class 'nope'",
            bad.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was queued"), "{stderr}");

    let (ok, stdout, stderr) = cli(&["jobs", "--state", "succeeded"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("job_1") && stdout.contains("g1") && !stdout.contains("g2"),
        "{stdout}"
    );
    let (ok, stdout, _) = cli(&["jobs", "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let (ok, stdout, stderr) = cli(&["status"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("succeeded 1") && stdout.contains("alpha") && stdout.contains("spend: $"),
        "{stdout}"
    );
    let (ok, stdout, _) = cli(&["status", "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["stats"]["jobs"]["failed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_is_refused_with_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &api_config_toml(
            dir.path(),
            &[cheap(provider.base_url())],
            "max_body = \"4KB\"",
        ),
    );
    daemon.wait_ready().await;
    // No Content-Length: the limit must hold while the body streams in.
    let mut request =
        b"POST /v1/jobs HTTP/1.1\r\nHost: nightshift\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    let chunk = "x".repeat(1000);
    for _ in 0..6 {
        request.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut stream = tokio::net::UnixStream::connect(daemon.socket())
        .await
        .unwrap();
    let _ = stream.write_all(&request).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"code\":\"request_too_large\""),
        "{answer}"
    );
    let client = daemon.unix_client().await;
    assert_eq!(client.get("/v1/jobs").await.unwrap()["data"], json!([]));
}

/// `GET /v1/jobs?source=&custom_id=`: jobs of one kind of source (the
/// watched folder, the API, batches) or one source, jobs of one custom_id,
/// both together and with state and pagination; bad values are 400s naming
/// the field; `nightshift jobs --source --custom-id` passes them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_listed_by_source_and_custom_id() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Cheap only in two hours: every job (due in a day) stays queued.
    let config = config_toml(
        dir.path(),
        &[cheaper_later(provider.base_url(), later_window())],
    );
    let daemon = Daemon::start(dir.path(), &config);
    let client = daemon.unix_client().await;
    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap_or_else(|| panic!("{page}"))
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };

    // job_1, job_2 from a dropped file; job_3, job_4 from POST /v1/jobs;
    // job_5, job_6 from a batch. custom_id "a" is in each.
    drop_file(
        &daemon.jobs(),
        "f.jsonl",
        &jsonl(&[
            chat_line("a", "chat", "hi", None),
            chat_line("b", "chat", "hi", None),
        ]),
    );
    poll("the file's jobs", Duration::from_secs(30), || async {
        let page = client.get("/v1/jobs").await.unwrap();
        (ids(&page).len() == 2).then_some(())
    })
    .await;
    let sub = post_jsonl(
        &client,
        jsonl(&[
            chat_line("a", "chat", "hi", None),
            chat_line("c", "chat", "hi", None),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(sub["id"], "sub_2");
    let boundary = "nightshift-test-boundary";
    let content = jsonl(&[
        chat_line("a", "chat", "hi", None),
        chat_line("d", "chat", "hi", None),
    ]);
    let multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let file = client
        .json(
            hyper::Method::POST,
            "/v1/files",
            Some(&format!("multipart/form-data; boundary={boundary}")),
            multipart,
        )
        .await
        .unwrap();
    let batch = client
        .post_json(
            "/v1/batches",
            &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                    "completion_window": "24h"}),
        )
        .await
        .unwrap();
    assert_eq!(batch["id"], "batch_1", "{batch}");
    assert_eq!(batch["status"], "in_progress", "{batch}");
    let job_1 = client.get("/v1/jobs/job_1").await.unwrap();
    assert_eq!(job_1["submission_id"], "sub_1", "a dropped file's id");

    let list = |query: &str| {
        let client = &client;
        let path = format!("/v1/jobs?{query}");
        async move { client.get(&path).await.unwrap() }
    };
    for (query, want) in [
        ("source=file", &["job_1", "job_2"][..]),
        ("source=submission", &["job_3", "job_4"]),
        ("source=batch", &["job_5", "job_6"]),
        ("source=sub_1", &["job_1", "job_2"]),
        ("source=sub_2", &["job_3", "job_4"]),
        ("source=batch_1", &["job_5", "job_6"]),
        ("source=batch_9", &[]),
        ("source=sub_9", &[]),
        ("custom_id=a", &["job_1", "job_3", "job_5"]),
        ("custom_id=d", &["job_6"]),
        ("custom_id=zzz", &[]),
        ("custom_id=a&source=batch", &["job_5"]),
        ("custom_id=a&source=sub_2", &["job_3"]),
        ("custom_id=c&source=file", &[]),
        ("state=queued&source=file", &["job_1", "job_2"]),
        ("state=succeeded&source=file", &[]),
        ("state=queued&custom_id=a", &["job_1", "job_3", "job_5"]),
        ("source=submission&after=job_3", &["job_4"]),
        ("submission=sub_2", &["job_3", "job_4"]),
    ] {
        assert_eq!(ids(&list(query).await), want, "{query}");
    }
    // Pages of one through the jobs of custom_id "a".
    let page = list("custom_id=a&limit=1&after=job_1").await;
    assert_eq!(ids(&page), ["job_3"]);
    assert_eq!(page["has_more"], true);
    let page = list("custom_id=a&limit=1&after=job_3").await;
    assert_eq!(
        (ids(&page), &page["has_more"]),
        (vec!["job_5".to_string()], &json!(false))
    );

    // Bad values: 400 naming the field.
    let long = "x".repeat(513);
    for (query, field) in [
        ("source=files", "source"),
        ("source=sub_01", "source"),
        ("source=sub_", "source"),
        ("source=batch_x", "source"),
        ("source=job_1", "source"),
        ("source=sub_99999999999999999999", "source"),
        ("source=file&submission=sub_1", "source"),
        (&format!("custom_id={long}") as &str, "custom_id"),
    ] {
        let (status, body) = api_error(client.get(&format!("/v1/jobs?{query}")).await).await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some(field)),
            "{query}: {body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().len() < 300,
            "{body}"
        );
    }

    // The CLI passes both on.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
            .args(args)
            .args([
                "--config",
                dir.path().join("nightshift.toml").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v: Value = serde_json::from_str(&cli(&[
        "jobs",
        "--source",
        "batch",
        "--custom-id",
        "a",
        "--json",
    ]))
    .unwrap();
    assert_eq!(ids(&v), ["job_5"]);
    let table = cli(&["jobs", "--source", "file", "--limit", "1"]);
    assert!(
        table.contains("job_1") && !table.contains("job_2 "),
        "{table}"
    );
    assert!(
        table.contains("more: nightshift jobs --after job_1 --source file"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboards_views_page_and_bound_their_parameters() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(
        dir.path(),
        &[cheaper_later(provider.base_url(), later_window())],
    );
    let daemon = Daemon::start(dir.path(), &config);
    let client = daemon.unix_client().await;
    for name in ["one", "two", "three"] {
        let sub = client
            .json(
                hyper::Method::POST,
                &format!("/v1/jobs?name={name}"),
                Some("application/jsonl"),
                jsonl(&[chat_line(name, "chat", "hi", None)]),
            )
            .await
            .unwrap();
        assert_eq!(sub["queued"], 1);
    }
    // Sources: newest first, paged with before=.
    let page = client.get("/v1/sources?limit=2").await.unwrap();
    let names: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["three", "two"], "{page}");
    assert_eq!(page["has_more"], true);
    let last = page["last_id"].as_str().unwrap();
    let rest = client
        .get(&format!("/v1/sources?before={last}"))
        .await
        .unwrap();
    assert_eq!(rest["data"][0]["name"], "one", "{rest}");
    assert_eq!(rest["has_more"], false);
    // Prices: the class's cheapest price steps where the window opens.
    let prices = client.get("/v1/prices?hours=4").await.unwrap();
    let steps = prices["classes"][0]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{prices}");
    assert!(
        steps[1]["typical_job_usd"].as_f64().unwrap()
            < steps[0]["typical_job_usd"].as_f64().unwrap() / 10.0,
        "{prices}"
    );
    // Out-of-range and malformed values are 400s naming the parameter.
    for (path, param) in [
        ("/v1/prices?hours=0", "hours"),
        ("/v1/prices?hours=169", "hours"),
        ("/v1/prices?hours=99999999999999999999999", "hours"),
        ("/v1/sources?limit=0", "limit"),
        ("/v1/sources?limit=201", "limit"),
        ("/v1/sources?before=job_1", "before"),
        ("/v1/sources?before=sub_01", "before"),
    ] {
        let (status, body) = api_error(client.get(path).await).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().len() < 200,
            "{path}: the bad value is quoted short"
        );
    }
}
