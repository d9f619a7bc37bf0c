//! Loopback Batch API servers: OpenAI's files + batches and Anthropic's
//! Message Batches, with their synchronous endpoints beside them (so a
//! daemon can fall back to sync on the same provider), on `127.0.0.1:0`.
//!
//! A batch lives by the wall clock from its creation: OpenAI's `validating`
//! (the first tenth of [`BatchBehaviour::turnaround`]), `in_progress` (to
//! eight tenths; its lines run one after another over that stretch),
//! `finalizing`, then `completed` (or `expired` if a line's fate is to
//! expire); Anthropic's `in_progress` then `ended`. A cancel makes it
//! `cancelling` / `canceling` for [`BatchBehaviour::cancel_delay`], then it
//! ends with the lines that had not run left out (OpenAI) or `canceled`
//! (Anthropic).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::common::{TEST_KEY, anthropic_error, openai_error};

/// What becomes of one line of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFate {
    /// A 200 with a completion and usage.
    Succeed,
    /// This HTTP status with an error body (OpenAI: in the error file;
    /// Anthropic: an `errored` result with the status's error type).
    Fail(u16),
    /// Not run before the batch expired (OpenAI `batch_expired` in the
    /// error file, and the batch ends `expired`; Anthropic `expired`).
    Expire,
}

/// Decides each line's fate from its `custom_id` and body (OpenAI's line
/// `body`, Anthropic's `params`).
pub type Fate = Arc<dyn Fn(&str, &Value) -> LineFate + Send + Sync>;

/// How the loopback batch server behaves.
#[derive(Clone)]
pub struct BatchBehaviour {
    /// From creation to the end of a batch.
    pub turnaround: Duration,
    /// Batches stay in progress until cancelled.
    pub never_end: bool,
    /// The first this many batches stay in progress until cancelled; the
    /// later ones end as `turnaround` says.
    pub never_end_first: usize,
    /// From a cancel to the batch's end.
    pub cancel_delay: Duration,
    pub fate: Fate,
    /// The first this many creates answer 429 (`retry-after: 1`).
    pub create_429s: usize,
    /// A list page holds at most this many batches, whatever `limit` asks.
    pub list_page_cap: usize,
    /// Usage of each completion. OpenAI: `prompt_tokens`,
    /// `completion_tokens` and `prompt_tokens_details.cached_tokens`.
    /// Anthropic (whose `input_tokens` excludes the cache): `input_tokens`
    /// = `prompt_tokens`, `cache_read_input_tokens` = `cached_tokens`,
    /// `cache_creation_input_tokens` = `cache_write_tokens`,
    /// `output_tokens` = `completion_tokens`.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
}

impl Default for BatchBehaviour {
    fn default() -> Self {
        BatchBehaviour {
            turnaround: Duration::from_millis(300),
            never_end: false,
            never_end_first: 0,
            cancel_delay: Duration::from_millis(100),
            fate: Arc::new(|_, _| LineFate::Succeed),
            create_429s: 0,
            list_page_cap: 100,
            prompt_tokens: 100,
            completion_tokens: 10,
            cached_tokens: 0,
            cache_write_tokens: 0,
        }
    }
}

/// A batch as the tests see it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchInfo {
    pub id: String,
    /// OpenAI `status`, Anthropic `processing_status`, as last computed.
    pub status: String,
    pub requests: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
}

/// One line of a batch.
struct Line {
    custom_id: String,
    body: Value,
    fate: LineFate,
}

struct Batch {
    id: String,
    created: Instant,
    created_at: DateTime<Utc>,
    endpoint: String,
    completion_window: String,
    input_file_id: String,
    metadata: Value,
    lines: Vec<Line>,
    /// Why the whole batch failed validation (OpenAI `failed`).
    failed: Option<Vec<Value>>,
    cancelled: Option<(Instant, DateTime<Utc>)>,
    /// Stays in progress until cancelled (`never_end`, `never_end_first`).
    stuck: bool,
    /// Once ended: the output and error file ids (OpenAI) or the results
    /// (Anthropic), and when.
    ended: Option<Ended>,
}

struct Ended {
    at: DateTime<Utc>,
    status: &'static str,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    results: Vec<u8>,
    /// Lines that ran (succeeded or failed) and that expired.
    completed: usize,
    failed: usize,
    expired: usize,
    cancelled: usize,
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, Vec<u8>>,
    /// Oldest first.
    batches: Vec<Batch>,
    uploads: usize,
    creates: usize,
    create_attempts: usize,
    cancels: usize,
    sync_calls: usize,
    lines_seen: Vec<Value>,
    next_id: usize,
}

#[derive(Clone)]
struct Server {
    wire: Wire,
    addr: SocketAddr,
    behaviour: BatchBehaviour,
    inner: Arc<Mutex<Inner>>,
}

/// A running loopback batch server.
pub struct LoopbackBatchProvider {
    server: Server,
}

impl LoopbackBatchProvider {
    /// OpenAI's files + batches and chat completions under `/v1`.
    pub async fn openai(behaviour: BatchBehaviour) -> LoopbackBatchProvider {
        LoopbackBatchProvider::start(Wire::OpenAi, behaviour).await
    }

    /// Anthropic's Message Batches and Messages under `/v1`.
    pub async fn anthropic(behaviour: BatchBehaviour) -> LoopbackBatchProvider {
        LoopbackBatchProvider::start(Wire::Anthropic, behaviour).await
    }

    async fn start(wire: Wire, behaviour: BatchBehaviour) -> LoopbackBatchProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Server {
            wire,
            addr: listener.local_addr().unwrap(),
            behaviour,
            inner: Default::default(),
        };
        let app = match wire {
            Wire::OpenAi => Router::new()
                .route("/v1/files", post(openai_upload))
                .route("/v1/files/{id}/content", get(openai_file_content))
                .route("/v1/batches", post(openai_create).get(openai_list))
                .route("/v1/batches/{id}", get(openai_get))
                .route("/v1/batches/{id}/cancel", post(openai_cancel))
                .route("/v1/chat/completions", post(openai_sync)),
            Wire::Anthropic => Router::new()
                .route(
                    "/v1/messages/batches",
                    post(anthropic_create).get(anthropic_list),
                )
                .route("/v1/messages/batches/{id}", get(anthropic_get))
                .route("/v1/messages/batches/{id}/cancel", post(anthropic_cancel))
                .route("/v1/messages/batches/{id}/results", get(anthropic_results))
                .route("/v1/messages", post(anthropic_sync)),
        }
        .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        LoopbackBatchProvider { server }
    }

    /// OpenAI: `http://127.0.0.1:PORT/v1`; Anthropic: without `/v1`.
    pub fn base_url(&self) -> String {
        match self.server.wire {
            Wire::OpenAi => format!("http://{}/v1", self.server.addr),
            Wire::Anthropic => format!("http://{}", self.server.addr),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.server.inner.lock().unwrap()
    }

    /// Files uploaded (accepted).
    pub fn uploads(&self) -> usize {
        self.inner().uploads
    }

    /// Batches created (accepted; a 429 is not one).
    pub fn creates(&self) -> usize {
        self.inner().creates
    }

    /// Create calls, refused ones included.
    pub fn create_attempts(&self) -> usize {
        self.inner().create_attempts
    }

    pub fn cancels(&self) -> usize {
        self.inner().cancels
    }

    /// Synchronous completions answered.
    pub fn sync_calls(&self) -> usize {
        self.inner().sync_calls
    }

    /// Every batch, oldest first, with its status now.
    pub fn batches(&self) -> Vec<BatchInfo> {
        let mut inner = self.inner();
        let now = Instant::now();
        let mut out = Vec::new();
        for i in 0..inner.batches.len() {
            let status = self.server.settle(&mut inner, i, now);
            let status = match (self.server.wire, status) {
                (Wire::OpenAi, s) | (Wire::Anthropic, s @ ("in_progress" | "canceling")) => s,
                (Wire::Anthropic, _) => "ended",
            };
            let b = &inner.batches[i];
            out.push(BatchInfo {
                id: b.id.clone(),
                status: status.to_string(),
                requests: b.lines.len(),
            });
        }
        out
    }

    /// Every line received in an upload (OpenAI) or a create (Anthropic's
    /// `{custom_id, params}`), in order.
    pub fn lines_seen(&self) -> Vec<Value> {
        self.inner().lines_seen.clone()
    }
}

// ---- shared ---------------------------------------------------------------

fn json_reply(status: u16, body: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The text of the last message of a chat body.
fn last_text(body: &Value) -> String {
    let last = body["messages"].as_array().and_then(|m| m.last());
    match last.map(|m| &m["content"]) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Anthropic's error type for an HTTP status.
fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

impl Server {
    fn openai_completion(&self, n: usize, body: &Value) -> Value {
        let b = &self.behaviour;
        let model = body["model"].as_str().unwrap_or_default();
        json!({
            "id": format!("chatcmpl-loopback-{n}"),
            "object": "chat.completion",
            "created": Utc::now().timestamp(),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                         "content": format!("batch echo: {}", last_text(body))},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": b.prompt_tokens, "completion_tokens": b.completion_tokens,
                      "total_tokens": b.prompt_tokens + b.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": b.cached_tokens}}
        })
    }

    fn anthropic_message(&self, n: usize, params: &Value) -> Value {
        let b = &self.behaviour;
        json!({
            "id": format!("msg_loopback_{n}"), "type": "message", "role": "assistant",
            "model": params["model"],
            "content": [{"type": "text", "text": format!("batch echo: {}", last_text(params))}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": b.prompt_tokens, "output_tokens": b.completion_tokens,
                      "cache_read_input_tokens": b.cached_tokens,
                      "cache_creation_input_tokens": b.cache_write_tokens}
        })
    }

    fn next_id(inner: &mut Inner, prefix: &str) -> String {
        inner.next_id += 1;
        format!("{prefix}{:06}", inner.next_id)
    }

    /// How many of a batch's lines have run by `t` (they run one after
    /// another between a tenth and eight tenths of the turnaround).
    fn ran_by(&self, b: &Batch, t: Instant) -> usize {
        if b.stuck || b.failed.is_some() {
            return 0;
        }
        let turnaround = self.behaviour.turnaround.as_secs_f64();
        let elapsed = t.saturating_duration_since(b.created).as_secs_f64();
        let frac = if turnaround == 0.0 {
            1.0
        } else {
            ((elapsed / turnaround - 0.1) / 0.7).clamp(0.0, 1.0)
        };
        (b.lines.len() as f64 * frac).floor() as usize
    }

    /// The status of batch `i` at `now`, ending it (writing its results)
    /// if its time has come.
    fn settle(&self, inner: &mut Inner, i: usize, now: Instant) -> &'static str {
        let b = &inner.batches[i];
        if let Some(e) = &b.ended {
            return e.status;
        }
        let t = self.behaviour.turnaround;
        let elapsed = now.saturating_duration_since(b.created);
        let (status, ran) = if b.failed.is_some() {
            ("failed", 0)
        } else if let Some((at, _)) = b.cancelled {
            if now < at + self.behaviour.cancel_delay {
                return match self.wire {
                    Wire::OpenAi => "cancelling",
                    Wire::Anthropic => "canceling",
                };
            }
            ("cancelled", self.ran_by(b, at))
        } else if b.stuck || elapsed < t {
            return match self.wire {
                Wire::Anthropic => "in_progress",
                Wire::OpenAi if b.stuck => "in_progress",
                Wire::OpenAi if elapsed < t.mul_f64(0.1) => "validating",
                Wire::OpenAi if elapsed < t.mul_f64(0.8) => "in_progress",
                Wire::OpenAi => "finalizing",
            };
        } else if b.lines.iter().any(|l| l.fate == LineFate::Expire) {
            ("expired", b.lines.len())
        } else {
            ("completed", b.lines.len())
        };
        let ended = self.finish(inner, i, status, ran);
        inner.batches[i].ended = Some(ended);
        status
    }

    /// Writes the results of batch `i`, which ends `status` with its first
    /// `ran` lines run.
    fn finish(&self, inner: &mut Inner, i: usize, status: &'static str, ran: usize) -> Ended {
        let (mut output, mut errors, mut results) = (Vec::new(), Vec::new(), Vec::new());
        let (mut completed, mut failed, mut expired, mut cancelled) = (0, 0, 0, 0);
        let id = inner.batches[i].id.clone();
        for (k, line) in inner.batches[i].lines.iter().enumerate() {
            let n = k + 1;
            let request_id = format!("req_{id}_{n}");
            let run = k < ran && status != "failed";
            let (openai, anthropic) = match (run, line.fate) {
                (false, _) => {
                    cancelled += 1;
                    // OpenAI leaves out what a cancel stopped.
                    (None, json!({"type": "canceled"}))
                }
                (true, LineFate::Succeed) => {
                    completed += 1;
                    let body = match self.wire {
                        Wire::OpenAi => self.openai_completion(n, &line.body),
                        Wire::Anthropic => Value::Null,
                    };
                    (
                        Some((
                            true,
                            json!({"id": format!("batch_req_{n}"), "custom_id": line.custom_id,
                            "response": {"status_code": 200, "request_id": request_id, "body": body},
                            "error": null}),
                        )),
                        json!({"type": "succeeded", "message": self.anthropic_message(n, &line.body)}),
                    )
                }
                (true, LineFate::Fail(code)) => {
                    failed += 1;
                    let body = if code == 400 {
                        openai_error(
                            "Invalid value for 'max_tokens'.",
                            "invalid_request_error",
                            None,
                        )
                    } else {
                        openai_error(
                            "The server had an error while processing your request.",
                            "server_error",
                            None,
                        )
                    };
                    (
                        Some((
                            false,
                            json!({"id": format!("batch_req_{n}"), "custom_id": line.custom_id,
                            "response": {"status_code": code, "request_id": request_id, "body": body},
                            "error": null}),
                        )),
                        json!({"type": "errored", "error": anthropic_error(
                            anthropic_error_type(code), "The line failed (loopback).")}),
                    )
                }
                (true, LineFate::Expire) => {
                    expired += 1;
                    (
                        Some((
                            false,
                            json!({"id": format!("batch_req_{n}"), "custom_id": line.custom_id,
                            "response": null,
                            "error": {"code": "batch_expired",
                                      "message": "This request could not be executed before the completion window expired."}}),
                        )),
                        json!({"type": "expired"}),
                    )
                }
            };
            if let Some((ok, l)) = openai {
                let file = if ok { &mut output } else { &mut errors };
                file.extend_from_slice(l.to_string().as_bytes());
                file.push(b'\n');
            }
            let r = json!({"custom_id": line.custom_id, "result": anthropic});
            results.extend_from_slice(r.to_string().as_bytes());
            results.push(b'\n');
        }
        let mut file = |bytes: Vec<u8>| {
            (!bytes.is_empty()).then(|| {
                let fid = Server::next_id(inner, "file-out");
                inner.files.insert(fid.clone(), bytes);
                fid
            })
        };
        let (output_file_id, error_file_id) = match self.wire {
            Wire::OpenAi => (file(output), file(errors)),
            Wire::Anthropic => (None, None),
        };
        Ended {
            at: Utc::now(),
            status,
            output_file_id,
            error_file_id,
            results,
            completed,
            failed,
            expired,
            cancelled,
        }
    }

    fn openai_batch(&self, inner: &mut Inner, i: usize) -> Value {
        let status = self.settle(inner, i, Instant::now());
        let b = &inner.batches[i];
        let now = Instant::now();
        let ran = self.ran_by(b, b.cancelled.map_or(now, |c| c.0.min(now)));
        let (completed, failed) = match &b.ended {
            Some(e) => (e.completed, e.failed + e.expired),
            None => {
                let done = &b.lines[..ran.min(b.lines.len())];
                let failed = done.iter().filter(|l| l.fate != LineFate::Succeed).count();
                (done.len() - failed, failed)
            }
        };
        let ts = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp());
        let ended_at = b.ended.as_ref().map(|e| e.at);
        json!({
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": b.failed.as_ref().map(|data| json!({"object": "list", "data": data})),
            "input_file_id": b.input_file_id,
            "completion_window": b.completion_window,
            "status": status,
            "output_file_id": b.ended.as_ref().and_then(|e| e.output_file_id.clone()),
            "error_file_id": b.ended.as_ref().and_then(|e| e.error_file_id.clone()),
            "created_at": b.created_at.timestamp(),
            "in_progress_at": b.created_at.timestamp(),
            "expires_at": b.created_at.timestamp() + 86_400,
            "completed_at": if status == "completed" { ts(ended_at) } else { None },
            "expired_at": if status == "expired" { ts(ended_at) } else { None },
            "failed_at": if status == "failed" { ts(ended_at) } else { None },
            "cancelling_at": ts(b.cancelled.map(|c| c.1)),
            "cancelled_at": if status == "cancelled" { ts(ended_at) } else { None },
            "request_counts": {"total": b.lines.len(), "completed": completed, "failed": failed},
            "metadata": b.metadata,
        })
    }

    fn anthropic_batch(&self, inner: &mut Inner, i: usize) -> Value {
        let status = match self.settle(inner, i, Instant::now()) {
            "in_progress" => "in_progress",
            "canceling" => "canceling",
            _ => "ended",
        };
        let b = &inner.batches[i];
        let counts = match &b.ended {
            Some(e) => json!({"processing": 0, "succeeded": e.completed, "errored": e.failed,
                              "canceled": e.cancelled, "expired": e.expired}),
            None => json!({"processing": b.lines.len(), "succeeded": 0, "errored": 0,
                           "canceled": 0, "expired": 0}),
        };
        json!({
            "id": b.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": b.ended.as_ref().map(|e| rfc3339(e.at)),
            "created_at": rfc3339(b.created_at),
            "expires_at": rfc3339(b.created_at + chrono::Duration::hours(24)),
            "archived_at": null,
            "cancel_initiated_at": b.cancelled.map(|c| rfc3339(c.1)),
            "results_url": b.ended.as_ref().map(|_| format!(
                "http://{}/v1/messages/batches/{}/results", self.addr, b.id)),
        })
    }

    fn find(inner: &Inner, id: &str) -> Option<usize> {
        inner.batches.iter().position(|b| b.id == id)
    }

    /// A newest-first page after `after`, of at most `limit` (capped).
    fn page(&self, inner: &Inner, after: Option<&str>, limit: usize) -> (Vec<usize>, bool) {
        let order: Vec<usize> = (0..inner.batches.len()).rev().collect();
        let start = match after {
            Some(a) => match order.iter().position(|&i| inner.batches[i].id == a) {
                Some(p) => p + 1,
                None => order.len(),
            },
            None => 0,
        };
        let limit = limit.clamp(1, self.behaviour.list_page_cap.max(1));
        let page: Vec<usize> = order[start..].iter().copied().take(limit).collect();
        let has_more = start + page.len() < order.len();
        (page, has_more)
    }
}

// ---- OpenAI ---------------------------------------------------------------

/// The 401 for a request without the test key's bearer, if it has none.
fn openai_unauthorised(headers: &HeaderMap) -> Option<Response> {
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TEST_KEY}"));
    (!ok).then(|| {
        json_reply(
            401,
            openai_error(
                "Incorrect API key provided.",
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
        )
    })
}

fn openai_bad(message: &str) -> Response {
    json_reply(400, openai_error(message, "invalid_request_error", None))
}

fn openai_not_found(what: &str) -> Response {
    json_reply(
        404,
        openai_error(&format!("No such {what}"), "invalid_request_error", None),
    )
}

async fn openai_upload(
    State(s): State<Server>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Response {
    if let Some(r) = openai_unauthorised(&headers) {
        return r;
    }
    let (mut purpose, mut file) = (None, None);
    loop {
        match form.next_field().await {
            Ok(Some(field)) => match field.name() {
                Some("purpose") => purpose = field.text().await.ok(),
                Some("file") => file = field.bytes().await.ok(),
                _ => {}
            },
            Ok(None) => break,
            Err(e) => return openai_bad(&format!("malformed multipart body: {e}")),
        }
    }
    if purpose.as_deref() != Some("batch") {
        return openai_bad("purpose must be 'batch'");
    }
    let Some(file) = file else {
        return openai_bad("missing required parameter: 'file'");
    };
    let text = match std::str::from_utf8(&file) {
        Ok(t) => t,
        Err(_) => return openai_bad("the file is not UTF-8"),
    };
    let mut lines = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => return openai_bad(&format!("line {}: not JSON", n + 1)),
        };
        let ok = v["custom_id"].is_string()
            && v["method"] == "POST"
            && v["url"].is_string()
            && v["body"].is_object();
        if !ok {
            return openai_bad(&format!(
                "line {}: needs custom_id, method POST, url and body",
                n + 1
            ));
        }
        if !ids.insert(v["custom_id"].as_str().unwrap().to_string()) {
            return openai_bad(&format!("line {}: duplicate custom_id", n + 1));
        }
        lines.push(v);
    }
    if lines.is_empty() {
        return openai_bad("the file has no requests");
    }
    let mut inner = s.inner.lock().unwrap();
    inner.uploads += 1;
    inner.lines_seen.extend(lines);
    let id = Server::next_id(&mut inner, "file-in");
    inner.files.insert(id.clone(), file.to_vec());
    json_reply(
        200,
        json!({"id": id, "object": "file", "bytes": file.len(), "created_at": Utc::now().timestamp(),
               "filename": "input.jsonl", "purpose": "batch"}),
    )
}

async fn openai_file_content(
    State(s): State<Server>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = openai_unauthorised(&headers) {
        return r;
    }
    let inner = s.inner.lock().unwrap();
    match inner.files.get(&id) {
        Some(bytes) => (StatusCode::OK, bytes.clone()).into_response(),
        None => openai_not_found("file"),
    }
}

async fn openai_create(
    State(s): State<Server>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(r) = openai_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    inner.create_attempts += 1;
    if inner.create_attempts <= s.behaviour.create_429s {
        let mut r = json_reply(
            429,
            openai_error(
                "Too many batch creations. Please try again in 1s.",
                "requests",
                Some("rate_limit_exceeded"),
            ),
        );
        r.headers_mut().insert("retry-after", "1".parse().unwrap());
        return r;
    }
    let Some(file_id) = body["input_file_id"].as_str() else {
        return openai_bad("missing required parameter: 'input_file_id'");
    };
    let Some(bytes) = inner.files.get(file_id).cloned() else {
        return openai_bad(&format!("Invalid input_file_id: '{file_id}'"));
    };
    let endpoint = body["endpoint"].as_str().unwrap_or_default().to_string();
    if !matches!(
        endpoint.as_str(),
        "/v1/chat/completions" | "/v1/embeddings" | "/v1/responses"
    ) {
        return openai_bad(&format!("Invalid endpoint: '{endpoint}'"));
    }
    let window = body["completion_window"].as_str().unwrap_or_default();
    if window != "24h" {
        return openai_bad("completion_window must be '24h'");
    }
    let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
    if metadata.as_object().is_some_and(|m| m.len() > 16) {
        return openai_bad("metadata holds at most 16 pairs");
    }
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    let mut model: Option<String> = None;
    for (n, l) in String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
    {
        let v: Value = serde_json::from_str(l).unwrap();
        if v["url"] != endpoint.as_str() {
            failed.push(
                json!({"code": "mismatched_endpoint", "line": n + 1, "param": "url",
                "message": "The line's url does not match the batch's endpoint."}),
            );
        }
        let m = v["body"]["model"].as_str().unwrap_or_default().to_string();
        if model.get_or_insert_with(|| m.clone()) != &m {
            failed.push(
                json!({"code": "mismatched_model", "line": n + 1, "param": "body.model",
                "message": "A batch takes one model."}),
            );
        }
        let custom_id = v["custom_id"].as_str().unwrap().to_string();
        let fate = (s.behaviour.fate)(&custom_id, &v["body"]);
        lines.push(Line {
            custom_id,
            body: v["body"].clone(),
            fate,
        });
    }
    inner.creates += 1;
    let id = Server::next_id(&mut inner, "batch_");
    let stuck = s.behaviour.never_end || inner.batches.len() < s.behaviour.never_end_first;
    inner.batches.push(Batch {
        stuck,
        id,
        created: Instant::now(),
        created_at: Utc::now(),
        endpoint,
        completion_window: window.to_string(),
        input_file_id: file_id.to_string(),
        metadata,
        lines,
        failed: (!failed.is_empty()).then_some(failed),
        cancelled: None,
        ended: None,
    });
    let i = inner.batches.len() - 1;
    json_reply(200, s.openai_batch(&mut inner, i))
}

async fn openai_get(
    State(s): State<Server>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = openai_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    match Server::find(&inner, &id) {
        Some(i) => json_reply(200, s.openai_batch(&mut inner, i)),
        None => openai_not_found("batch"),
    }
}

#[derive(serde::Deserialize)]
struct ListQuery {
    after: Option<String>,
    after_id: Option<String>,
    limit: Option<usize>,
}

async fn openai_list(
    State(s): State<Server>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Some(r) = openai_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    let (page, has_more) = s.page(&inner, q.after.as_deref(), q.limit.unwrap_or(20));
    let data: Vec<Value> = page
        .iter()
        .map(|&i| s.openai_batch(&mut inner, i))
        .collect();
    json_reply(
        200,
        json!({"object": "list", "first_id": data.first().map(|b| b["id"].clone()),
               "last_id": data.last().map(|b| b["id"].clone()), "has_more": has_more, "data": data}),
    )
}

async fn openai_cancel(
    State(s): State<Server>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = openai_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    inner.cancels += 1;
    let Some(i) = Server::find(&inner, &id) else {
        return openai_not_found("batch");
    };
    let status = s.settle(&mut inner, i, Instant::now());
    match status {
        "validating" | "in_progress" | "finalizing" => {
            inner.batches[i].cancelled = Some((Instant::now(), Utc::now()));
        }
        "cancelling" => {}
        ended => {
            return openai_bad(&format!("Cannot cancel a batch with status '{ended}'."));
        }
    }
    json_reply(200, s.openai_batch(&mut inner, i))
}

async fn openai_sync(
    State(s): State<Server>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(r) = openai_unauthorised(&headers) {
        return r;
    }
    let n = {
        let mut inner = s.inner.lock().unwrap();
        inner.sync_calls += 1;
        inner.sync_calls
    };
    let mut r = json_reply(200, s.openai_completion(n, &body));
    r.headers_mut()
        .insert("x-request-id", "req_loopback_sync".parse().unwrap());
    r
}

// ---- Anthropic ------------------------------------------------------------

/// The 401 for a request without `x-api-key` (the test key) and
/// `anthropic-version`, if it lacks them.
fn anthropic_unauthorised(headers: &HeaderMap) -> Option<Response> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let ok = header("x-api-key") == Some(TEST_KEY) && header("anthropic-version").is_some();
    (!ok).then(|| {
        json_reply(
            401,
            anthropic_error("authentication_error", "invalid x-api-key"),
        )
    })
}

fn anthropic_bad(message: &str) -> Response {
    json_reply(400, anthropic_error("invalid_request_error", message))
}

fn anthropic_not_found() -> Response {
    json_reply(
        404,
        anthropic_error("not_found_error", "No such message batch."),
    )
}

fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

async fn anthropic_create(
    State(s): State<Server>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(r) = anthropic_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    inner.create_attempts += 1;
    if inner.create_attempts <= s.behaviour.create_429s {
        let mut r = json_reply(
            429,
            anthropic_error("rate_limit_error", "Too many batch creations."),
        );
        r.headers_mut().insert("retry-after", "1".parse().unwrap());
        return r;
    }
    let Some(requests) = body["requests"].as_array().filter(|r| !r.is_empty()) else {
        return anthropic_bad("requests: a non-empty array is required");
    };
    let mut ids = std::collections::HashSet::new();
    let mut lines = Vec::new();
    for (k, r) in requests.iter().enumerate() {
        let custom_id = r["custom_id"].as_str().unwrap_or_default();
        if !valid_custom_id(custom_id) {
            return anthropic_bad(&format!(
                "requests.{k}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            ));
        }
        if !ids.insert(custom_id.to_string()) {
            return anthropic_bad(&format!("requests.{k}.custom_id: duplicate"));
        }
        let p = &r["params"];
        for (field, ok) in [
            ("model", p["model"].is_string()),
            ("max_tokens", p["max_tokens"].is_u64()),
            ("messages", p["messages"].is_array()),
        ] {
            if !ok {
                return anthropic_bad(&format!("requests.{k}.params.{field}: Field required"));
            }
        }
        let fate = (s.behaviour.fate)(custom_id, p);
        lines.push(Line {
            custom_id: custom_id.to_string(),
            body: p.clone(),
            fate,
        });
    }
    inner.lines_seen.extend(requests.iter().cloned());
    inner.creates += 1;
    let id = Server::next_id(&mut inner, "msgbatch_");
    let stuck = s.behaviour.never_end || inner.batches.len() < s.behaviour.never_end_first;
    inner.batches.push(Batch {
        stuck,
        id,
        created: Instant::now(),
        created_at: Utc::now(),
        endpoint: "/v1/messages".into(),
        completion_window: "24h".into(),
        input_file_id: String::new(),
        metadata: Value::Null,
        lines,
        failed: None,
        cancelled: None,
        ended: None,
    });
    let i = inner.batches.len() - 1;
    json_reply(200, s.anthropic_batch(&mut inner, i))
}

async fn anthropic_get(
    State(s): State<Server>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = anthropic_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    match Server::find(&inner, &id) {
        Some(i) => json_reply(200, s.anthropic_batch(&mut inner, i)),
        None => anthropic_not_found(),
    }
}

async fn anthropic_list(
    State(s): State<Server>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Some(r) = anthropic_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    let (page, has_more) = s.page(&inner, q.after_id.as_deref(), q.limit.unwrap_or(20));
    let data: Vec<Value> = page
        .iter()
        .map(|&i| s.anthropic_batch(&mut inner, i))
        .collect();
    json_reply(
        200,
        json!({"data": data.clone(), "has_more": has_more,
               "first_id": data.first().map(|b| b["id"].clone()),
               "last_id": data.last().map(|b| b["id"].clone())}),
    )
}

async fn anthropic_cancel(
    State(s): State<Server>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = anthropic_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    inner.cancels += 1;
    let Some(i) = Server::find(&inner, &id) else {
        return anthropic_not_found();
    };
    if s.settle(&mut inner, i, Instant::now()) == "in_progress" {
        inner.batches[i].cancelled = Some((Instant::now(), Utc::now()));
    }
    json_reply(200, s.anthropic_batch(&mut inner, i))
}

async fn anthropic_results(
    State(s): State<Server>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = anthropic_unauthorised(&headers) {
        return r;
    }
    let mut inner = s.inner.lock().unwrap();
    let Some(i) = Server::find(&inner, &id) else {
        return anthropic_not_found();
    };
    s.settle(&mut inner, i, Instant::now());
    match &inner.batches[i].ended {
        Some(e) => (StatusCode::OK, e.results.clone()).into_response(),
        None => anthropic_bad("The message batch is still processing."),
    }
}

async fn anthropic_sync(
    State(s): State<Server>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(r) = anthropic_unauthorised(&headers) {
        return r;
    }
    let n = {
        let mut inner = s.inner.lock().unwrap();
        inner.sync_calls += 1;
        inner.sync_calls
    };
    let mut r = json_reply(200, s.anthropic_message(n, &body));
    r.headers_mut()
        .insert("request-id", "req_loopback_sync".parse().unwrap());
    r
}
