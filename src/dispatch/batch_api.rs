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

use crate::dispatch::provider::ProviderClient;
use crate::dispatch::reliability::Outcome;
use crate::domain::pricing::Endpoint;

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLine {
    /// `ns<batch>_<job>`.
    pub custom_id: String,
    /// The job's request body, verbatim; its `model` is replaced by the
    /// batch's wire model (and for Anthropic translated to Messages params).
    pub body: String,
}

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

impl ProviderClient {
    /// Whether this provider's batch API needs an upload before the create
    /// (OpenAI: yes; Anthropic and simulated: no).
    pub fn batch_uploads(&self) -> bool {
        todo!("batch_api: implemented by the batch wire work")
    }

    /// Uploads `lines` as a batch input file (`POST {base}/files`, multipart,
    /// `purpose=batch`, file name `nightshift-{tag}.jsonl`; each line
    /// `{custom_id, method: "POST", url: endpoint, body}` with the body's
    /// `model` set to `model`). Returns the file id. Only called where
    /// [`ProviderClient::batch_uploads`].
    pub async fn batch_upload(
        &self,
        _tag: &str,
        _endpoint: Endpoint,
        _model: &str,
        _lines: &[BatchLine],
    ) -> Result<String, BatchError> {
        todo!("batch_api")
    }

    /// Creates the batch: OpenAI `POST {base}/batches {input_file_id,
    /// endpoint, completion_window, metadata: {nightshift_batch: tag}}`
    /// (`file` is the uploaded file's id); Anthropic `POST
    /// {base}/v1/messages/batches {requests: [{custom_id, params}]}` with
    /// each body translated by `domain::anthropic::request` (`lines` and
    /// `model` are used; `file` is `None`); simulated: in memory.
    pub async fn batch_create(
        &self,
        _tag: &str,
        _file: Option<&str>,
        _endpoint: Endpoint,
        _model: &str,
        _lines: &[BatchLine],
        _completion_window: &str,
    ) -> Result<RemoteBatch, BatchError> {
        todo!("batch_api")
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
    pub async fn batch_find(
        &self,
        _tag: &str,
        _since: DateTime<Utc>,
        _requests: u64,
        _taken: &[String],
    ) -> Result<Option<RemoteBatch>, BatchError> {
        todo!("batch_api")
    }

    /// The batch's status now (OpenAI `GET {base}/batches/{id}`, Anthropic
    /// `GET /v1/messages/batches/{id}`).
    pub async fn batch_get(&self, _id: &str) -> Result<RemoteBatch, BatchError> {
        todo!("batch_api")
    }

    /// Asks the provider to cancel the batch (`POST .../{id}/cancel`);
    /// returns its status after the call. Cancelling an ended batch is not
    /// an error: its status is returned.
    pub async fn batch_cancel(&self, _id: &str) -> Result<RemoteBatch, BatchError> {
        todo!("batch_api")
    }

    /// Every line result of an ended batch: OpenAI's output and error files
    /// (`GET {base}/files/{id}/content`, JSONL), Anthropic's `results_url`
    /// (JSONL, with the same headers). A line that cannot be parsed is
    /// skipped with a warning naming the batch and line number (its job is
    /// then treated as not run). Bodies are bounded as synchronous answers
    /// are.
    pub async fn batch_results(&self, _batch: &RemoteBatch) -> Result<Vec<LineResult>, BatchError> {
        todo!("batch_api")
    }
}
