//! The OpenAI Batch API round trip exactly as the official SDKs make it
//! (bearer token, multipart upload with purpose=batch, create, poll,
//! download the output and error files), checked field by field against
//! the design brief's result format.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

/// What an SDK client does, over reqwest: base URL + bearer token.
struct Sdk {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Sdk {
    async fn new(daemon: &Daemon) -> Sdk {
        let (base, token) = daemon.tcp_base().await;
        Sdk {
            base,
            token,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    async fn get_bytes(&self, path: &str) -> Vec<u8> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.bytes().await.unwrap().to_vec()
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// `client.files.create(file=open(...), purpose="batch")`: httpx's
    /// multipart encoding, data fields first, then the file.
    async fn upload(&self, filename: &str, content: &str) -> Value {
        let boundary = "4f7a2c9e1b0d43a8b6e5d2c1a0f9e8d7";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
        );
        let r = self
            .http
            .post(format!("{}/v1/files", self.base))
            .bearer_auth(&self.token)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// `client.batches.retrieve(id)` until `status` is final.
    async fn wait_final(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let b = self.get(&format!("/v1/batches/{id}")).await;
            let s = b["status"].as_str().unwrap().to_string();
            if ["completed", "failed", "expired", "cancelled"].contains(&s.as_str()) {
                return b;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "batch stuck: {b}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn jsonl_of(text: &[u8]) -> Vec<Value> {
    String::from_utf8(text.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const BATCH_KEYS: &[&str] = &[
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "metadata",
];

fn provider(base_url: String, extra: &'static str) -> ProviderSpec<'static> {
    ProviderSpec {
        name: "alpha",
        base_url,
        model: "alpha-chat",
        input_per_mtok: 0.10,
        output_per_mtok: 0.40,
        extra,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_batch_round_trip_works_as_the_sdk_does_it() {
    let loopback = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &api_config_toml(dir.path(), &[provider(loopback.base_url(), "")], ""),
    );
    let sdk = Sdk::new(&daemon).await;
    let content = [
        chat_line("r1", "chat", "one", None),
        chat_line("r2", "chat", "two", None),
        chat_line("r3", "chat", "status:400", None),
        chat_line("r4", "gpt-9000", "four", None),
        chat_line("r5", "chat", "five", None),
    ]
    .join("\n")
        + "\n";

    // Upload.
    let before = chrono::Utc::now().timestamp();
    let file = sdk.upload("batch.jsonl", &content).await;
    let file_id = file["id"].as_str().unwrap().to_string();
    assert!(file_id.starts_with("file-"), "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], content.len());
    assert_eq!(file["filename"], "batch.jsonl");
    assert_eq!(file["purpose"], "batch");
    let created = file["created_at"].as_i64().unwrap();
    assert!((before..=before + 5).contains(&created), "{file}");
    assert_eq!(sdk.get(&format!("/v1/files/{file_id}")).await, file);
    assert_eq!(
        sdk.get_bytes(&format!("/v1/files/{file_id}/content")).await,
        content.as_bytes()
    );

    // Create.
    let (status, batch) = sdk
        .post(
            "/v1/batches",
            json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                   "completion_window": "24h", "metadata": {"customer": "acme"}}),
        )
        .await;
    assert_eq!(status, 200, "{batch}");
    for k in BATCH_KEYS {
        assert!(batch.get(k).is_some(), "batch lacks {k}: {batch}");
    }
    let id = batch["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("batch_"));
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");
    assert_eq!(batch["input_file_id"], file_id);
    assert_eq!(batch["completion_window"], "24h");
    assert_eq!(batch["status"], "in_progress");
    assert_eq!(batch["metadata"], json!({"customer": "acme"}));
    let created_at = batch["created_at"].as_i64().unwrap();
    assert_eq!(batch["expires_at"].as_i64().unwrap(), created_at + 86_400);
    assert!(batch["in_progress_at"].as_i64().unwrap() >= created_at);
    assert_eq!(batch["request_counts"]["total"], 5);
    // The invalid line is reported in OpenAI's errors list.
    let errors = &batch["errors"];
    assert_eq!(errors["object"], "list");
    assert_eq!(errors["data"][0]["line"], 4);
    assert_eq!(errors["data"][0]["param"], "body.model");
    assert_eq!(errors["data"][0]["code"], "invalid_line");
    // The window is the jobs' deadline.
    let jobs = sdk.get("/v1/jobs").await;
    for j in jobs["data"].as_array().unwrap() {
        let deadline =
            chrono::DateTime::parse_from_rfc3339(j["deadline"].as_str().unwrap()).unwrap();
        assert!(
            (deadline.timestamp() - (created_at + 86_400)).abs() <= 1,
            "{j}"
        );
    }

    // Poll until completed.
    let done = sdk.wait_final(&id).await;
    assert_eq!(done["status"], "completed", "{done}");
    for k in BATCH_KEYS {
        assert!(done.get(k).is_some(), "batch lacks {k}: {done}");
    }
    assert_eq!(
        done["request_counts"],
        json!({"total": 5, "completed": 3, "failed": 2})
    );
    let completed_at = done["completed_at"].as_i64().unwrap();
    assert!(completed_at >= created_at);
    assert_eq!(done["finalizing_at"], done["completed_at"]);
    for k in ["failed_at", "expired_at", "cancelling_at", "cancelled_at"] {
        assert_eq!(done[k], Value::Null, "{k}");
    }

    // Download the output file.
    let out_id = done["output_file_id"].as_str().unwrap();
    let out_file = sdk.get(&format!("/v1/files/{out_id}")).await;
    assert_eq!(out_file["object"], "file");
    assert_eq!(out_file["purpose"], "batch_output");
    let out = sdk.get_bytes(&format!("/v1/files/{out_id}/content")).await;
    assert_eq!(out_file["bytes"], out.len());
    let out = jsonl_of(&out);
    let ids: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["r1", "r2", "r5"]);
    for line in &out {
        assert!(
            line["id"].as_str().unwrap().starts_with("batch_req_"),
            "{line}"
        );
        let r = &line["response"];
        assert_eq!(r["status_code"], 200);
        assert_eq!(r["request_id"], "req_loopback");
        assert_eq!(r["body"]["object"], "chat.completion");
        assert_eq!(r["body"]["usage"]["prompt_tokens"], 100);
        assert_eq!(line["error"], Value::Null);
        let n = &line["nightshift"];
        assert_eq!(n["provider"], "alpha");
        assert_eq!(n["model"], "alpha-chat");
        assert_eq!(n["state"], "succeeded");
        assert_eq!(n["attempts"], 1);
        assert_eq!(n["input_tokens"], 100);
        assert_eq!(n["output_tokens"], 10);
        assert!(n["dispatched_at"].as_str().unwrap().ends_with('Z'));
        assert!(n["completed_at"].as_str().unwrap().ends_with('Z'));
        // 100 in × 0.10 + 10 out × 0.40 per 1M tokens.
        assert_eq!(n["cost_usd"], 0.000014);
        assert_eq!(n["list_cost_usd"], 0.000014);
    }

    // Download the error file: the provider's 400 keeps its status and
    // body; the invalid line has no response and an error.
    let err_id = done["error_file_id"].as_str().unwrap();
    let err_file = sdk.get(&format!("/v1/files/{err_id}")).await;
    let errs = sdk.get_bytes(&format!("/v1/files/{err_id}/content")).await;
    assert_eq!(err_file["bytes"], errs.len());
    let errs = jsonl_of(&errs);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_eq!(errs[0]["custom_id"], "r3");
    assert_eq!(errs[0]["response"]["status_code"], 400);
    assert_eq!(
        errs[0]["response"]["body"]["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(errs[0]["error"], Value::Null);
    assert_eq!(errs[0]["nightshift"]["state"], "failed");
    assert_eq!(errs[1]["custom_id"], "r4");
    assert_eq!(errs[1]["response"], Value::Null);
    assert_eq!(errs[1]["error"]["code"], "invalid_line");
    assert!(
        errs[1]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 4: body.model: unknown model or class 'gpt-9000'"),
        "{}",
        errs[1]
    );

    // A second batch from the same file; the list pages newest first.
    let (_, second) = sdk
        .post(
            "/v1/batches",
            json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "2h"}),
        )
        .await;
    let second_id = second["id"].as_str().unwrap();
    assert_eq!(
        second["expires_at"].as_i64().unwrap(),
        second["created_at"].as_i64().unwrap() + 7200
    );
    let page = sdk.get("/v1/batches?limit=1").await;
    assert_eq!(page["object"], "list");
    assert_eq!(page["data"][0]["id"], second_id);
    assert_eq!(page["first_id"], second_id);
    assert_eq!(page["last_id"], second_id);
    assert_eq!(page["has_more"], true);
    let page = sdk
        .get(&format!("/v1/batches?limit=1&after={second_id}"))
        .await;
    assert_eq!(page["data"][0]["id"], id);
    assert_eq!(page["has_more"], false);
    let all = sdk.get("/v1/batches").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_cancelled_and_one_without_a_valid_line_fails() {
    let loopback = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Cheap only from two hours from now: the planner holds the jobs.
    let start = chrono::Utc::now() + chrono::Duration::hours(2);
    let window: &'static str = Box::leak(
        format!(
            "[[providers.price_windows]]\nname = \"later\"\nstart = \"{}\"\nend = \"{}\"\nmultiplier = 0.01\n",
            start.to_rfc3339(),
            (start + chrono::Duration::days(3)).to_rfc3339()
        )
        .into_boxed_str(),
    );
    let daemon = Daemon::start(
        dir.path(),
        &api_config_toml(dir.path(), &[provider(loopback.base_url(), window)], ""),
    );
    let sdk = Sdk::new(&daemon).await;
    let content = (1..=4)
        .map(|i| chat_line(&format!("q{i}"), "chat", "later", None))
        .collect::<Vec<_>>()
        .join("\n");
    let file = sdk.upload("later.jsonl", &content).await;
    let (_, batch) = sdk
        .post(
            "/v1/batches",
            json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    assert_eq!(batch["status"], "in_progress");
    let id = batch["id"].as_str().unwrap();
    let (status, cancelled) = sdk
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{cancelled}");
    // Nothing was running, so it is cancelled at once.
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(cancelled["cancelling_at"].as_i64().is_some());
    assert!(cancelled["cancelled_at"].as_i64().is_some());
    assert_eq!(
        cancelled["request_counts"],
        json!({"total": 4, "completed": 0, "failed": 4})
    );
    assert_eq!(cancelled["output_file_id"], Value::Null);
    let errs = sdk
        .get_bytes(&format!(
            "/v1/files/{}/content",
            cancelled["error_file_id"].as_str().unwrap()
        ))
        .await;
    let errs = jsonl_of(&errs);
    assert_eq!(errs.len(), 4);
    assert!(
        errs.iter()
            .all(|l| l["error"]["code"] == "cancelled" && l["response"].is_null())
    );
    let jobs = sdk.get("/v1/jobs?state=cancelled").await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 4);
    // Cancelling again changes nothing.
    let (status, again) = sdk
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!((status, &again["status"]), (200, &json!("cancelled")));

    // No valid line: the batch fails, with every line's error.
    let bad = [chat_line("x1", "nope", "hi", None), "{not json".to_string()].join("\n");
    let file = sdk.upload("bad.jsonl", &bad).await;
    let (status, failed) = sdk
        .post(
            "/v1/batches",
            json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["failed_at"].as_i64().is_some());
    let data = failed["errors"]["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (data[0]["line"].clone(), data[1]["line"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(
        failed["request_counts"],
        json!({"total": 2, "completed": 0, "failed": 2})
    );
    let (status, e) = sdk
        .post(
            &format!("/v1/batches/{}/cancel", failed["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, &e["error"]["code"]),
        (409, &json!("batch_not_cancellable"))
    );
}
