//! Provider Batch APIs (IO): OpenAI's files + batches (also Groq, Together,
//! xAI), Anthropic's Message Batches, and the simulated providers' batches.
//!
//! This module only speaks the wire: upload, create, look up, cancel and
//! download. What to do with a batch and when (the deadline guard, what a
//! line's outcome means for its job) is decided by the dispatcher's batch
//! runner (`dispatch::batches`), and by the simulator with the same rules.
//!
//! Every line carries a `custom_id` chosen by nightshift (`ns<batch>_<job>`,
//! which also meets Anthropic's `[A-Za-z0-9_-]{1,64}`), so results are joined
//! on it, in any order. An OpenAI batch is tagged in its `metadata`
//! (`{"nightshift_batch": tag}`) so that a daemon killed between "create"
//! and recording the provider's id finds it again ([`ProviderClient::batch_find`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::config::Secret;
use crate::dispatch::provider::{
    self, Answer, MAX_RESPONSE_BYTES, ProviderClient, answer_head, no_answer, read_body, truncated,
};
use crate::dispatch::reliability::Outcome;
use crate::domain::anthropic;
use crate::domain::pricing::{Endpoint, Wire};

mod anthropic_wire;
mod openai_wire;
mod simulated;

pub use simulated::SimBatch;

/// One request of a batch (defined beside the client, which keeps a
/// simulated batch's lines).
pub use crate::dispatch::provider::BatchLine;

/// What a provider says about one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteBatch {
    /// The provider's batch id.
    pub id: String,
    pub state: RemoteState,
    /// The provider's own status word (`in_progress`, `ended`, ...), for logs
    /// and `/v1/providers`.
    pub status: String,
    /// Requests the provider counts in the batch, and how many are finished
    /// (succeeded or failed); for progress only.
    pub total: u64,
    pub finished: u64,
}

/// Where a batch is in its lifecycle, as far as nightshift acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteState {
    /// Accepted and not ended: OpenAI `validating`, `in_progress`,
    /// `finalizing`; Anthropic `in_progress`.
    Running,
    /// A cancel was asked for and the batch has not ended yet (OpenAI
    /// `cancelling`, Anthropic `canceling`).
    Cancelling,
    /// Ended: results can be downloaded (OpenAI `completed`, `expired`,
    /// `cancelled`; Anthropic `ended`). `output` and `errors` locate them:
    /// OpenAI's output and error file ids, Anthropic's `results_url` in
    /// `output` (and `errors` `None`).
    Ended {
        output: Option<String>,
        errors: Option<String>,
    },
    /// The provider rejected the batch as a whole (OpenAI `failed`:
    /// validation); none of its lines ran. `message` says why.
    Failed { message: String },
}

/// The result of one line of an ended batch.
#[derive(Debug, Clone, PartialEq)]
pub struct LineResult {
    pub custom_id: String,
    /// `None`: the line was not run (expired, cancelled) and is not billed.
    /// `Some`: its answer, as a synchronous request's would be: OpenAI's
    /// `response {status_code, request_id, body}` (a 2xx is `Success` with
    /// its usage, any other status `HttpError`); an Anthropic `succeeded`
    /// message translated to a `chat.completion` body (as the synchronous
    /// Messages client does); an Anthropic `errored` line an `HttpError`
    /// with the status its error type implies and the error body; a line
    /// with an `error` and no response a `NoAnswer`.
    pub outcome: Option<Outcome>,
}

/// Why a batch call did not succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// 429: too many batch creations, or the provider's batch queue is full.
    /// Batch creation pauses for this provider; its synchronous channel is
    /// unaffected.
    #[error("rate limited by the provider's batch API")]
    RateLimited { retry_after: Option<Duration> },
    /// The provider refused the request for good (4xx other than 404, 408
    /// and 429): retrying the same call cannot succeed.
    #[error("refused by the provider ({status}): {message}")]
    Refused { status: u16, message: String },
    /// The batch (or file) does not exist at the provider (404), e.g. a
    /// simulated batch after a restart.
    #[error("not found at the provider")]
    NotFound,
    /// A connection failure, timeout, 5xx, or a malformed answer: try again
    /// later.
    #[error("{0}")]
    Transient(String),
}

/// Upper bound on the results of one batch that are downloaded (OpenAI's
/// output and error files together, or Anthropic's results): far above
/// what nightshift's batch sizes produce, so only a hostile or broken
/// provider reaches it. Lines are parsed as they arrive.
pub const MAX_RESULTS_BYTES: usize = 256 * 1024 * 1024;

/// Upper bound on one result line: a synchronous answer's bound plus room
/// for the envelope around it. A longer line is skipped.
pub const MAX_LINE_BYTES: usize = MAX_RESPONSE_BYTES + 64 * 1024;

/// Time allowed for an upload, an Anthropic create (the requests are
/// inline) or a results download: the client's request timeout is sized
/// for one answer, these move up to hundreds of MB.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(15 * 60);

impl ProviderClient {
    /// Whether this provider's batch API needs an upload before the create
    /// (OpenAI: yes; Anthropic and simulated: no).
    pub fn batch_uploads(&self) -> bool {
        matches!(
            self,
            ProviderClient::Http {
                wire: Wire::OpenAi,
                ..
            }
        )
    }

    /// Uploads `lines` as a batch input file (`POST {base}/files`, multipart,
    /// `purpose=batch`, file name `nightshift-{tag}.jsonl`; each line
    /// `{custom_id, method: "POST", url: endpoint, body}` with the body's
    /// `model` set to `model`). Returns the file id. Only called where
    /// [`ProviderClient::batch_uploads`]; elsewhere it is `Refused`. A body
    /// that is not a JSON object is `Refused` (400) before anything is sent.
    pub async fn batch_upload(
        &self,
        tag: &str,
        endpoint: Endpoint,
        model: &str,
        lines: &[BatchLine],
    ) -> Result<String, BatchError> {
        match self.channel() {
            Channel::OpenAi(http) => openai_wire::upload(&http, tag, endpoint, model, lines).await,
            Channel::Anthropic(_) | Channel::Simulated(_) => Err(BatchError::Refused {
                status: 400,
                message: "this provider's batch API takes no upload".into(),
            }),
        }
    }

    /// Creates the batch: OpenAI `POST {base}/batches {input_file_id,
    /// endpoint, completion_window, metadata: {nightshift_batch: tag}}`
    /// (`file` is the uploaded file's id); Anthropic `POST
    /// {base}/v1/messages/batches {requests: [{custom_id, params}]}` with
    /// each body translated by `domain::anthropic::request` (`lines` and
    /// `model` are used; `file` is `None`); simulated: in memory.
    ///
    /// A body that cannot be translated (or is not a JSON object), an
    /// endpoint Anthropic does not serve, or an OpenAI create without a
    /// `file` is `Refused` (400) before anything is sent.
    pub async fn batch_create(
        &self,
        tag: &str,
        file: Option<&str>,
        endpoint: Endpoint,
        model: &str,
        lines: &[BatchLine],
        completion_window: &str,
    ) -> Result<RemoteBatch, BatchError> {
        match self.channel() {
            Channel::OpenAi(http) => {
                openai_wire::create(&http, tag, file, endpoint, completion_window).await
            }
            Channel::Anthropic(http) => anthropic_wire::create(&http, endpoint, model, lines).await,
            Channel::Simulated(sim) => Ok(sim.create(endpoint, model, lines)),
        }
    }

    /// The batch this daemon created with `tag`, if the provider has one:
    /// for a daemon killed after "create" and before it recorded the id.
    /// OpenAI: `GET {base}/batches?limit=100` (and `after=` pages while
    /// `has_more`, stopping at batches created before `since`) matched on
    /// `metadata.nightshift_batch`. Anthropic has no metadata: `GET
    /// /v1/messages/batches?limit=100` pages, the first batch created at or
    /// after `since` whose request count (the sum of `request_counts`)
    /// equals `requests`, and that is not in `taken` (ids already recorded
    /// for other batches). Simulated: `None` (a restart forgets them).
    ///
    /// "First" is the earliest such batch: the one created right after
    /// `since`. At most [`MAX_FIND_PAGES`] pages are read.
    pub async fn batch_find(
        &self,
        tag: &str,
        since: DateTime<Utc>,
        requests: u64,
        taken: &[String],
    ) -> Result<Option<RemoteBatch>, BatchError> {
        match self.channel() {
            Channel::OpenAi(http) => openai_wire::find(&http, tag, since).await,
            Channel::Anthropic(http) => anthropic_wire::find(&http, since, requests, taken).await,
            Channel::Simulated(_) => Ok(None),
        }
    }

    /// The batch's status now (OpenAI `GET {base}/batches/{id}`, Anthropic
    /// `GET /v1/messages/batches/{id}`).
    pub async fn batch_get(&self, id: &str) -> Result<RemoteBatch, BatchError> {
        match self.channel() {
            Channel::OpenAi(http) => openai_wire::get(&http, id).await,
            Channel::Anthropic(http) => anthropic_wire::get(&http, id).await,
            Channel::Simulated(sim) => sim.get(id),
        }
    }

    /// Asks the provider to cancel the batch (`POST .../{id}/cancel`);
    /// returns its status after the call. Cancelling an ended batch is not
    /// an error: its status is returned.
    pub async fn batch_cancel(&self, id: &str) -> Result<RemoteBatch, BatchError> {
        match self.channel() {
            Channel::OpenAi(http) | Channel::Anthropic(http) => {
                let url = match http.wire {
                    Wire::OpenAi => format!("{}/batches/{}/cancel", http.base_url, segment(id)),
                    Wire::Anthropic => format!(
                        "{}/v1/messages/batches/{}/cancel",
                        http.base_url,
                        segment(id)
                    ),
                };
                let a = answer(http.post(&url), &url).await?;
                if is_success(a.status) {
                    return http.remote(&json_of(&a, &url)?, &url);
                }
                // OpenAI answers 400 (or 409) for a batch that has ended;
                // then its status is the answer.
                if matches!(a.status, 400 | 409) {
                    let batch = self.batch_get(id).await?;
                    if batch.state != RemoteState::Running {
                        return Ok(batch);
                    }
                }
                Err(refusal(&a, &url))
            }
            Channel::Simulated(sim) => sim.cancel(id),
        }
    }

    /// Every line result of an ended batch: OpenAI's output and error files
    /// (`GET {base}/files/{id}/content`, JSONL), Anthropic's `results_url`
    /// (JSONL, with the same headers). A line that cannot be parsed is
    /// skipped with a warning naming the batch and line number (its job is
    /// then treated as not run). Bodies are bounded as synchronous answers
    /// are.
    ///
    /// A line of the batch that is in neither file (OpenAI leaves out lines
    /// a cancel stopped) has no result here: like a `None` outcome, it was
    /// not run. A `Failed` batch has no results (`Ok` and empty); one that
    /// has not ended is `Transient`. All results together are at most
    /// [`MAX_RESULTS_BYTES`] (beyond: `Transient`), one line at most
    /// [`MAX_LINE_BYTES`] (beyond: skipped). Anthropic's `results_url` is
    /// only followed (with the API key) on the configured `base_url`; any
    /// other is replaced by `{base}/v1/messages/batches/{id}/results`.
    pub async fn batch_results(&self, batch: &RemoteBatch) -> Result<Vec<LineResult>, BatchError> {
        let output = match &batch.state {
            RemoteState::Ended { output, errors } => (output.clone(), errors.clone()),
            RemoteState::Failed { .. } => return Ok(Vec::new()),
            RemoteState::Running | RemoteState::Cancelling => {
                return Err(BatchError::Transient(format!(
                    "batch {} has not ended (status {})",
                    batch.id, batch.status
                )));
            }
        };
        match self.channel() {
            Channel::OpenAi(http) => openai_wire::results(&http, &batch.id, output).await,
            Channel::Anthropic(http) => anthropic_wire::results(&http, &batch.id, output.0).await,
            Channel::Simulated(sim) => sim.results(&batch.id),
        }
    }

    fn channel(&self) -> Channel<'_> {
        match self {
            ProviderClient::Http {
                wire,
                base_url,
                api_key,
                client,
            } => {
                let http = Http {
                    wire: *wire,
                    base_url,
                    api_key,
                    client,
                };
                match wire {
                    Wire::OpenAi => Channel::OpenAi(http),
                    Wire::Anthropic => Channel::Anthropic(http),
                }
            }
            ProviderClient::Simulated {
                name,
                failure_rate,
                batch_turnaround,
                batch_expire_fraction,
                batches,
                ..
            } => Channel::Simulated(simulated::Sim {
                name,
                failure_rate: *failure_rate,
                turnaround: *batch_turnaround,
                expire_fraction: *batch_expire_fraction,
                batches,
            }),
        }
    }
}

/// At most this many pages of 100 batches are read by
/// [`ProviderClient::batch_find`].
pub const MAX_FIND_PAGES: usize = 50;

/// The batch API a client speaks.
enum Channel<'a> {
    OpenAi(Http<'a>),
    Anthropic(Http<'a>),
    Simulated(simulated::Sim<'a>),
}

/// An HTTP provider: where it is and how requests are signed.
struct Http<'a> {
    wire: Wire,
    base_url: &'a str,
    api_key: &'a Secret,
    client: &'a reqwest::Client,
}

impl Http<'_> {
    fn signed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.wire {
            Wire::OpenAi => request.bearer_auth(self.api_key.expose()),
            Wire::Anthropic => request
                .header("x-api-key", self.api_key.expose())
                .header("anthropic-version", anthropic::API_VERSION),
        }
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.signed(self.client.get(url))
    }

    fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.signed(self.client.post(url))
    }

    /// A batch object of this wire as a [`RemoteBatch`].
    fn remote(&self, v: &Value, url: &str) -> Result<RemoteBatch, BatchError> {
        match self.wire {
            Wire::OpenAi => openai_wire::remote(v),
            Wire::Anthropic => anthropic_wire::remote(v),
        }
        .ok_or_else(|| BatchError::Transient(format!("{url}: the answer is not a batch object")))
    }

    /// `GET url` answered with JSON.
    async fn get_json(&self, url: &str) -> Result<Value, BatchError> {
        let a = answer(self.get(url), url).await?;
        checked_json(&a, url)
    }

    /// The batch object at `url`.
    async fn get_batch(&self, url: &str) -> Result<RemoteBatch, BatchError> {
        let v = self.get_json(url).await?;
        self.remote(&v, url)
    }
}

fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// A path segment with everything but RFC 3986's unreserved characters
/// percent-encoded: ids come from the provider and must not reshape the URL.
fn segment(id: &str) -> String {
    let mut s = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A call that got no usable answer.
fn transient(o: Outcome) -> BatchError {
    match o {
        Outcome::NoAnswer { message, .. } => BatchError::Transient(message),
        other => BatchError::Transient(format!("unexpected outcome {other:?}")),
    }
}

/// Sends `request` and reads its answer (bounded as synchronous answers).
async fn answer(request: reqwest::RequestBuilder, url: &str) -> Result<Answer, BatchError> {
    provider::send_http(request, url).await.map_err(transient)
}

/// A 2xx answer's JSON body; any other answer as its [`refusal`].
fn checked_json(a: &Answer, url: &str) -> Result<Value, BatchError> {
    if !is_success(a.status) {
        return Err(refusal(a, url));
    }
    json_of(a, url)
}

fn json_of(a: &Answer, url: &str) -> Result<Value, BatchError> {
    serde_json::from_str(&a.body).map_err(|e| {
        BatchError::Transient(format!(
            "{url}: HTTP {} with a malformed JSON body: {e}",
            a.status
        ))
    })
}

/// What a non-2xx answer means for a batch call: 429 a rate limit (with
/// the provider's Retry-After), 404 not found, 408, 409 and 5xx transient,
/// any other 4xx a refusal with the provider's message.
fn refusal(a: &Answer, url: &str) -> BatchError {
    let message = error_message(&a.body);
    match a.status {
        429 => BatchError::RateLimited {
            retry_after: a.signals.retry_after,
        },
        404 => BatchError::NotFound,
        400..=499 if !matches!(a.status, 408 | 409) => BatchError::Refused {
            status: a.status,
            message,
        },
        status => BatchError::Transient(format!("{url}: HTTP {status}: {message}")),
    }
}

/// The message of an error body (OpenAI's and Anthropic's both carry
/// `error.message`), or the start of the body.
fn error_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if let Some(m) = v["error"]["message"].as_str().or(v["message"].as_str()) {
        return m.to_string();
    }
    let body = body.trim();
    if body.is_empty() {
        return "(no body)".into();
    }
    let mut end = body.len().min(300);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    body[..end].to_string()
}

/// Downloads a JSONL document (results) and hands each non-blank line to
/// `each` with its number (from 1), as the lines arrive. At most `budget`
/// bytes are read (it is decreased by what was); a line longer than
/// [`MAX_LINE_BYTES`] is skipped with a warning naming `batch`.
async fn download_lines(
    request: reqwest::RequestBuilder,
    url: &str,
    batch: &str,
    budget: &mut usize,
    mut each: impl FnMut(usize, &[u8]),
) -> Result<(), BatchError> {
    let mut response = request
        .timeout(TRANSFER_TIMEOUT)
        .send()
        .await
        .map_err(|e| transient(no_answer(&e, url)))?;
    let (status, request_id, signals) = answer_head(&response);
    if !is_success(status) {
        let body = read_body(&mut response, url, MAX_RESPONSE_BYTES)
            .await
            .map_err(transient)?;
        let a = Answer {
            status,
            request_id,
            body: String::from_utf8_lossy(&body).into_owned(),
            signals,
        };
        return Err(refusal(&a, url));
    }
    let mut number = 0;
    let mut pending: Vec<u8> = Vec::new();
    // Inside a line too long to keep: dropped up to its newline.
    let mut oversized = false;
    let mut line_done = |number: usize, line: &[u8], oversized: bool| {
        if oversized {
            tracing::warn!(
                batch,
                line = number,
                limit = MAX_LINE_BYTES,
                "batch result line skipped: longer than the limit"
            );
        } else if !line.trim_ascii().is_empty() {
            each(number, line.trim_ascii());
        }
    };
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err(transient(truncated(&e, url))),
        };
        if chunk.len() > *budget {
            return Err(BatchError::Transient(format!(
                "{url}: batch {batch}'s results exceed {MAX_RESULTS_BYTES} bytes"
            )));
        }
        *budget -= chunk.len();
        let mut rest = &chunk[..];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            number += 1;
            if pending.is_empty() {
                line_done(number, &rest[..i], oversized);
            } else {
                pending.extend_from_slice(&rest[..i]);
                line_done(number, &pending, oversized);
                pending.clear();
            }
            oversized = false;
            rest = &rest[i + 1..];
        }
        if !oversized {
            pending.extend_from_slice(rest);
            if pending.len() > MAX_LINE_BYTES {
                oversized = true;
                pending = Vec::new();
            }
        }
    }
    if !pending.is_empty() || oversized {
        line_done(number + 1, &pending, oversized);
    }
    Ok(())
}
