//! The queue's side of the local HTTP API: job lookups and listings,
//! cancellation, statistics, and the files and batches of the
//! OpenAI-compatible surface. Every state change is one transaction, as in
//! the parent module; long reads use a read-only connection.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{FinishedJob, JobState, Origin, Result, SELECT_FINISHED, Sqlite, finished_from_row};

/// What a file of the OpenAI-compatible API holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Uploaded; its content is stored.
    Input,
    /// A finished batch's successful results, produced from the jobs.
    Output,
    /// A finished batch's failures and invalid lines, produced from the jobs.
    Errors,
}

impl FileKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FileKind::Input => "input",
            FileKind::Output => "output",
            FileKind::Errors => "errors",
        }
    }
    pub(crate) fn parse(s: &str) -> FileKind {
        match s {
            "output" => FileKind::Output,
            "errors" => FileKind::Errors,
            _ => FileKind::Input,
        }
    }
}

/// A file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub id: i64,
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
    pub created_at: i64,
    pub kind: FileKind,
    /// Output and error files: their batch.
    pub batch_id: Option<i64>,
}

/// A batch as stored (times in Unix ms).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchRow {
    pub id: i64,
    pub input_file_id: i64,
    pub source_id: Option<i64>,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<String>,
    pub status: String,
    /// JSON array of OpenAI batch errors.
    pub errors: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub output_file_id: Option<i64>,
    pub error_file_id: Option<i64>,
}

/// A batch about to be created.
#[derive(Debug, Clone)]
pub struct NewBatch<'a> {
    pub input_file_id: i64,
    pub endpoint: &'a str,
    pub completion_window: &'a str,
    pub metadata: Option<&'a str>,
    pub now_ms: i64,
    pub expires_at: i64,
}

/// How a finished batch is closed.
#[derive(Debug, Clone)]
pub struct BatchClose {
    /// 'completed', 'expired' or 'cancelled'.
    pub status: &'static str,
    /// When its last job became final.
    pub at: i64,
    /// (file name, bytes) of the output and error files, when not empty.
    pub output: Option<(String, u64)>,
    pub errors: Option<(String, u64)>,
}

/// An open batch whose jobs are all final: ready to be closed.
#[derive(Debug, Clone)]
pub struct DoneBatch {
    pub id: i64,
    pub source_id: i64,
    pub status: String,
    pub any_expired: bool,
    /// The latest `completed_at` of its jobs.
    pub last_completed_at: Option<i64>,
}

/// Jobs of one source by state, and its invalid lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceCounts {
    pub states: BTreeMap<JobState, u64>,
    pub invalid_lines: u64,
}

impl SourceCounts {
    pub fn jobs(&self) -> u64 {
        self.states.values().sum()
    }
    pub fn count(&self, s: JobState) -> u64 {
        self.states.get(&s).copied().unwrap_or(0)
    }
    /// Jobs not yet final.
    pub fn open(&self) -> u64 {
        self.count(JobState::Queued) + self.count(JobState::Running)
    }
}

/// A source (a dropped file, an API submission, a batch) and its jobs' states.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceInfo {
    pub id: i64,
    pub origin: String,
    pub name: String,
    pub stem: String,
    pub ingested_at: i64,
    pub counts: SourceCounts,
}

/// One job with everything the API shows about it.
#[derive(Debug, Clone)]
pub struct JobDetail {
    /// State and result (`response` is `None` in listings).
    pub job: FinishedJob,
    pub source_id: Option<i64>,
    pub endpoint: String,
    pub model: String,
    pub route_key: String,
    pub priority: i64,
    pub submitted_at: i64,
    pub deadline: i64,
    pub not_before: i64,
    /// The estimates the planner and the rate limits charge it.
    pub est_input_tokens: u64,
    pub est_output_tokens: u64,
}

/// Which jobs a listing (`GET /v1/jobs`) shows: all of the filters given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub source: Option<SourceFilter>,
    /// Exactly this `custom_id`.
    pub custom_id: Option<String>,
}

/// Where the jobs of a listing came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFilter {
    /// Every source of one origin: files from the watched folder
    /// ([`Origin::Inbox`]), API submissions ([`Origin::Api`]), batches
    /// ([`Origin::Upload`]).
    Origin(Origin),
    /// One source (`sub_N`: a dropped file, a submission or a batch's jobs).
    Source(i64),
    /// One batch (`batch_N`), through the source holding its jobs.
    Batch(i64),
}

/// The statement of [`Store::list_jobs`] for `filter`. Parameters: ?1 the
/// job id to start after, ?2 the state, ?3 the source (origin or id), ?4
/// the custom_id, ?5 the limit (those the filter does not use are bound
/// and unused).
///
/// Each filter rides an index that yields its jobs in id order, so a page
/// reads about the rows it returns, however many jobs there are:
/// - `custom_id`: `jobs_custom_id` (custom_id, id).
/// - a source or an origin: `jobs_source_state` (source_id, state, id),
///   one range per (source, state) — all six states when none is asked
///   for — each read only as far as the page needs. An origin's sources
///   come from `sources_origin`; a page of one costs an index probe per
///   source of that origin and state, on top of the rows it returns.
/// - neither: the primary key, as before (`state` alone is checked on the
///   way, not looked up: no index has the jobs of one state in id order).
pub(crate) fn list_jobs_sql(filter: &JobFilter) -> String {
    let index = match (&filter.custom_id, &filter.source) {
        (Some(_), _) => " INDEXED BY jobs_custom_id",
        (None, Some(_)) => " INDEXED BY jobs_source_state",
        (None, None) => "",
    };
    let mut sql = format!("{}{index} WHERE id > ?1", detail_select(false));
    match (filter.state, &filter.source, &filter.custom_id) {
        (Some(_), Some(_), None) => sql.push_str(" AND state = ?2"),
        (Some(_), _, _) => sql.push_str(" AND +state = ?2"),
        (None, Some(_), None) => {
            let all: Vec<String> = JobState::ALL
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            sql.push_str(&format!(" AND state IN ({})", all.join(", ")));
        }
        (None, _, _) => {}
    }
    sql.push_str(match filter.source {
        None => "",
        Some(SourceFilter::Origin(_)) => {
            " AND source_id IN (SELECT id FROM sources INDEXED BY sources_origin WHERE origin = ?3)"
        }
        Some(SourceFilter::Source(_)) => " AND source_id = ?3",
        Some(SourceFilter::Batch(_)) => {
            " AND source_id = (SELECT source_id FROM batches WHERE id = ?3)"
        }
    });
    if filter.custom_id.is_some() {
        sql.push_str(" AND custom_id = ?4");
    }
    // ?5 is the highest parameter, so all five are bound, used or not.
    sql.push_str(" ORDER BY id LIMIT ?5");
    sql
}

/// What cancelling a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled,
    NotFound,
    /// Not queued (running, or already final): left alone.
    NotQueued(JobState),
}

/// Jobs and money per (state, provider).
#[derive(Debug, Clone, PartialEq)]
pub struct StateProviderRow {
    pub state: JobState,
    /// The provider of the last attempt; `None` if never dispatched.
    pub provider: Option<String>,
    pub jobs: u64,
    pub cost_usd: f64,
    pub list_cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Totals over the whole queue.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueStats {
    pub rows: Vec<StateProviderRow>,
    /// Paid for answers that were not the result (at-least-once duplicates).
    pub late_cost_usd: f64,
    pub late_answers: u64,
}

/// What recently finished jobs say about a provider.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RecentOutcomes {
    pub succeeded: u64,
    pub failed: u64,
    /// The latest failure: (completed_at, error code or HTTP status, message).
    pub last_failure: Option<(i64, String, Option<String>)>,
}

pub(crate) const BATCH_COLUMNS: &str =
    "id, input_file_id, source_id, endpoint, completion_window, metadata, status, errors,
    created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, expired_at,
    cancelling_at, cancelled_at, output_file_id, error_file_id";

fn batch_from_row(r: &rusqlite::Row) -> rusqlite::Result<BatchRow> {
    Ok(BatchRow {
        id: r.get(0)?,
        input_file_id: r.get(1)?,
        source_id: r.get(2)?,
        endpoint: r.get(3)?,
        completion_window: r.get(4)?,
        metadata: r.get(5)?,
        status: r.get(6)?,
        errors: r.get(7)?,
        created_at: r.get(8)?,
        in_progress_at: r.get(9)?,
        expires_at: r.get(10)?,
        finalizing_at: r.get(11)?,
        completed_at: r.get(12)?,
        failed_at: r.get(13)?,
        expired_at: r.get(14)?,
        cancelling_at: r.get(15)?,
        cancelled_at: r.get(16)?,
        output_file_id: r.get(17)?,
        error_file_id: r.get(18)?,
    })
}

pub(crate) const FILE_COLUMNS: &str = "id, purpose, filename, bytes, created_at, kind, batch_id";

fn file_from_row(r: &rusqlite::Row) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: r.get(0)?,
        purpose: r.get(1)?,
        filename: r.get(2)?,
        bytes: r.get::<_, i64>(3)? as u64,
        created_at: r.get(4)?,
        kind: FileKind::parse(&r.get::<_, String>(5)?),
        batch_id: r.get(6)?,
    })
}

/// The columns of [`SELECT_FINISHED`] followed by the detail columns.
pub(crate) fn detail_select(with_response: bool) -> String {
    let base = if with_response {
        SELECT_FINISHED.to_string()
    } else {
        SELECT_FINISHED.replace("response,", "NULL,")
    };
    base.replace(
        " FROM jobs",
        ", source_id, endpoint, model, (SELECT key FROM routes WHERE routes.id = jobs.route_id), priority,
           submitted_at, deadline, not_before, est_input_tokens, est_output_tokens FROM jobs",
    )
}

fn detail_from_row(r: &rusqlite::Row) -> rusqlite::Result<JobDetail> {
    Ok(JobDetail {
        job: finished_from_row(r)?,
        source_id: r.get(20)?,
        endpoint: r.get(21)?,
        model: r.get(22)?,
        route_key: r.get::<_, Option<String>>(23)?.unwrap_or_default(),
        priority: r.get(24)?,
        submitted_at: r.get(25)?,
        deadline: r.get(26)?,
        not_before: r.get(27)?,
        est_input_tokens: r.get::<_, i64>(28)?.max(0) as u64,
        est_output_tokens: r.get::<_, i64>(29)?.max(0) as u64,
    })
}

fn source_counts(conn: &Connection, source_id: i64) -> rusqlite::Result<SourceCounts> {
    let mut states: BTreeMap<JobState, u64> = JobState::ALL.iter().map(|&s| (s, 0)).collect();
    let mut stmt = conn
        .prepare_cached("SELECT state, COUNT(*) FROM jobs WHERE source_id = ?1 GROUP BY state")?;
    let rows = stmt.query_map([source_id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    for row in rows {
        let (s, n) = row?;
        if let Some(s) = JobState::parse(&s) {
            states.insert(s, n as u64);
        }
    }
    let invalid_lines: i64 = conn
        .query_row(
            "SELECT invalid_lines FROM sources WHERE id = ?1",
            [source_id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    Ok(SourceCounts {
        states,
        invalid_lines: invalid_lines as u64,
    })
}

/// The queue statistics' reads (see [`Store::queue_stats`]).
pub(super) const STATS_QUEUED: &str =
    "SELECT COUNT(*) FROM jobs INDEXED BY jobs_due WHERE state = 'queued'";
/// Running jobs are counted only: their cost and tokens are booked when
/// they finish, so the index that lists them stays small (every start
/// writes it, every finish deletes from it).
pub(super) const STATS_RUNNING: &str = "SELECT state, provider, COUNT(*), 0.0, 0.0, 0.0, 0.0
 FROM jobs INDEXED BY jobs_running WHERE state = 'running' GROUP BY provider";
pub(super) const STATS_FINAL: &str =
    "SELECT state, provider, COUNT(*), TOTAL(cost_usd), TOTAL(list_cost_usd),
        TOTAL(input_tokens), TOTAL(output_tokens)
 FROM jobs INDEXED BY jobs_final
 WHERE state IN ('succeeded', 'failed', 'expired', 'cancelled')
 GROUP BY state, provider";
pub(super) const STATS_LATE: &str = "SELECT TOTAL(late_cost_usd), COALESCE(SUM(late_answers), 0)
 FROM jobs INDEXED BY jobs_late WHERE late_answers > 0";

impl Sqlite {
    /// One job with its route, deadline and result.
    pub fn job_detail(&self, id: i64) -> Result<Option<JobDetail>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("{} WHERE id = ?1", detail_select(true)))?;
        Ok(stmt.query_row([id], detail_from_row).optional()?)
    }

    /// A job's request body as it was queued (verbatim JSON).
    pub fn job_body(&self, id: i64) -> Result<Option<String>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached("SELECT body FROM jobs WHERE id = ?1")?;
        Ok(stmt.query_row([id], |r| r.get(0)).optional()?)
    }

    /// Jobs in id order after `after` that pass `filter`; at most `limit`
    /// (without their response bodies). Each filter is answered from an
    /// index (see [`list_jobs_sql`]).
    pub fn list_jobs(
        &self,
        filter: &JobFilter,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobDetail>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(&list_jobs_sql(filter))?;
        let source = match filter.source {
            None => rusqlite::types::Value::Null,
            Some(SourceFilter::Origin(o)) => o.as_str().to_string().into(),
            Some(SourceFilter::Source(id) | SourceFilter::Batch(id)) => id.into(),
        };
        let rows = stmt.query_map(
            params![
                after,
                filter.state.map(JobState::as_str),
                source,
                filter.custom_id,
                limit as i64
            ],
            detail_from_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The (id, custom_id, deadline) of a source's jobs in line order.
    pub fn job_ids_of(&self, source_id: i64) -> Result<Vec<(i64, String, i64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, custom_id, deadline FROM jobs WHERE source_id = ?1 ORDER BY line, id",
        )?;
        let rows = stmt.query_map([source_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Cancels a queued job (one transaction; a running or final job is left
    /// alone and its state returned).
    pub fn cancel_job(&self, id: i64, now_ms: i64) -> Result<CancelOutcome> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE jobs SET state = 'cancelled', completed_at = ?2, error_code = 'cancelled',
                    error_message = 'cancelled by request before it was dispatched'
             WHERE id = ?1 AND state = 'queued'",
            params![id, now_ms],
        )?;
        let outcome = if n == 1 {
            CancelOutcome::Cancelled
        } else {
            match tx
                .query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?
            {
                None => CancelOutcome::NotFound,
                Some(s) => {
                    CancelOutcome::NotQueued(JobState::parse(&s).unwrap_or(JobState::Failed))
                }
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// A source and its jobs' states.
    pub fn source_info(&self, id: i64) -> Result<Option<SourceInfo>> {
        let conn = self.reader()?;
        let row = conn
            .query_row(
                "SELECT id, origin, name, stem, ingested_at FROM sources WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, origin, name, stem, ingested_at)) = row else {
            return Ok(None);
        };
        Ok(Some(SourceInfo {
            id,
            origin,
            name,
            stem,
            ingested_at,
            counts: source_counts(&conn, id)?,
        }))
    }

    /// The newest sources (files, submissions, batches) before `before`
    /// (an id; all if `None`), newest first, each with its jobs' states.
    pub fn list_sources(&self, before: Option<i64>, limit: usize) -> Result<Vec<SourceInfo>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, origin, name, stem, ingested_at FROM sources
             WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![before.unwrap_or(i64::MAX), limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, origin, name, stem, ingested_at)| {
                Ok(SourceInfo {
                    id,
                    origin,
                    name,
                    stem,
                    ingested_at,
                    counts: source_counts(&conn, id)?,
                })
            })
            .collect()
    }

    /// Jobs and money per (state, provider), and late answers, over the
    /// whole queue (a read connection: it scans the jobs table).
    pub fn queue_stats(&self) -> Result<QueueStats> {
        let conn = self.reader()?;
        // Three reads, each along an index that covers it, so that none
        // reads the table (whose rows hold the bodies): queued jobs along
        // jobs_due, running ones along jobs_running, final ones along
        // jobs_final (see schema.sql, version 6).
        let queued: i64 = conn.query_row(STATS_QUEUED, [], |r| r.get(0))?;
        let mut rows = Vec::new();
        if queued > 0 {
            rows.push(StateProviderRow {
                state: JobState::Queued,
                provider: None,
                jobs: queued as u64,
                cost_usd: 0.0,
                list_cost_usd: 0.0,
                input_tokens: 0,
                output_tokens: 0,
            });
        }
        let row = |r: &rusqlite::Row| {
            Ok(StateProviderRow {
                state: JobState::parse(&r.get::<_, String>(0)?).unwrap_or(JobState::Failed),
                provider: r.get(1)?,
                jobs: r.get::<_, i64>(2)? as u64,
                cost_usd: r.get(3)?,
                list_cost_usd: r.get(4)?,
                input_tokens: r.get::<_, f64>(5)? as u64,
                output_tokens: r.get::<_, f64>(6)? as u64,
            })
        };
        for sql in [STATS_RUNNING, STATS_FINAL] {
            let mut stmt = conn.prepare_cached(sql)?;
            for r in stmt.query_map([], row)? {
                rows.push(r?);
            }
        }
        rows.sort_by(|a, b| (a.state, &a.provider).cmp(&(b.state, &b.provider)));
        let (late_cost_usd, late_answers): (f64, i64) =
            conn.query_row(STATS_LATE, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(QueueStats {
            rows,
            late_cost_usd,
            late_answers: late_answers as u64,
        })
    }

    /// Per provider: jobs that succeeded and failed since `since_ms`, and
    /// the latest failure (the provider's health as the queue saw it).
    pub fn recent_outcomes(&self, since_ms: i64) -> Result<BTreeMap<String, RecentOutcomes>> {
        let conn = self.reader()?;
        let mut out: BTreeMap<String, RecentOutcomes> = BTreeMap::new();
        let mut stmt = conn.prepare(
            "SELECT provider, state, COUNT(*) FROM jobs
             WHERE completed_at > ?1 AND provider IS NOT NULL AND state IN ('succeeded', 'failed')
             GROUP BY provider, state",
        )?;
        let rows = stmt.query_map([since_ms], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (provider, state, n) = row?;
            let e = out.entry(provider).or_default();
            if state == "succeeded" {
                e.succeeded = n as u64;
            } else {
                e.failed = n as u64;
            }
        }
        let mut stmt = conn.prepare(
            "SELECT provider, completed_at, COALESCE(error_code, 'http_' || status_code), error_message
             FROM jobs j
             WHERE state = 'failed' AND provider IS NOT NULL AND completed_at > ?1
               AND completed_at = (SELECT MAX(completed_at) FROM jobs k
                                   WHERE k.provider = j.provider AND k.state = 'failed' AND k.completed_at > ?1)
             GROUP BY provider",
        )?;
        let rows = stmt.query_map([since_ms], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        for row in rows {
            let (provider, at, code, message) = row?;
            out.entry(provider).or_default().last_failure =
                Some((at, code.unwrap_or_else(|| "failed".into()), message));
        }
        Ok(out)
    }

    // ---- files --------------------------------------------------------

    /// Stores an uploaded file (one transaction).
    pub fn insert_file(
        &self,
        purpose: &str,
        filename: &str,
        content: &[u8],
        now_ms: i64,
    ) -> Result<FileRow> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO files (purpose, filename, bytes, created_at, content, kind) VALUES (?1, ?2, ?3, ?4, ?5, 'input')",
            params![purpose, filename, content.len() as i64, now_ms, content],
        )?;
        Ok(FileRow {
            id: conn.last_insert_rowid(),
            purpose: purpose.to_string(),
            filename: filename.to_string(),
            bytes: content.len() as u64,
            created_at: now_ms,
            kind: FileKind::Input,
            batch_id: None,
        })
    }

    /// A file's metadata.
    pub fn file(&self, id: i64) -> Result<Option<FileRow>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1"))?;
        Ok(stmt.query_row([id], file_from_row).optional()?)
    }

    /// An uploaded file's content, in pieces of at most `chunk` bytes, on a
    /// read connection.
    pub fn file_content(
        &self,
        id: i64,
        chunk: usize,
        mut on_chunk: impl FnMut(Vec<u8>) -> std::io::Result<()>,
    ) -> Result<()> {
        let conn = self.reader()?;
        let len: i64 = conn.query_row(
            "SELECT COALESCE(length(content), 0) FROM files WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare("SELECT substr(content, ?2, ?3) FROM files WHERE id = ?1")?;
        let mut at = 1i64;
        while at <= len {
            let piece: Vec<u8> = stmt.query_row(params![id, at, chunk as i64], |r| r.get(0))?;
            if piece.is_empty() {
                break;
            }
            at += piece.len() as i64;
            on_chunk(piece)?;
        }
        Ok(())
    }

    // ---- batches ------------------------------------------------------

    /// Records a new batch in status `validating`.
    pub fn create_batch(&self, b: &NewBatch) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO batches (input_file_id, endpoint, completion_window, metadata, status, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, 'validating', ?5, ?6)",
            params![
                b.input_file_id,
                b.endpoint,
                b.completion_window,
                b.metadata,
                b.now_ms,
                b.expires_at
            ],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Links a validated batch to the source holding its jobs: `in_progress`,
    /// or `failed` if no line could be queued. `errors` is the JSON array of
    /// its invalid lines.
    pub fn start_batch(
        &self,
        batch_id: i64,
        source_id: Option<i64>,
        failed: bool,
        errors: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        let sql = if failed {
            "UPDATE batches SET source_id = ?2, status = 'failed', failed_at = ?3, errors = ?4
             WHERE id = ?1 AND status = 'validating'"
        } else {
            "UPDATE batches SET source_id = ?2, status = 'in_progress', in_progress_at = ?3, errors = ?4
             WHERE id = ?1 AND status = 'validating'"
        };
        self.conn()
            .execute(sql, params![batch_id, source_id, now_ms, errors])?;
        Ok(())
    }

    /// Queues a batch's lines as a source and records it on the batch in the
    /// same transaction.
    pub fn ingest_batch(
        &self,
        batch_id: i64,
        source: &super::NewSource,
        lines: impl Iterator<Item = std::io::Result<super::LineOutcome>>,
    ) -> Result<super::IngestSummary> {
        self.ingest_linked(source, lines, |tx, source_id| {
            tx.execute(
                "UPDATE batches SET source_id = ?2 WHERE id = ?1",
                params![batch_id, source_id],
            )
            .map(|_| ())
        })
    }

    /// Batches left in `validating` by a crash, with the id of the source
    /// their jobs went to, if that transaction committed.
    pub fn validating_batches(&self) -> Result<Vec<(BatchRow, Option<i64>)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {BATCH_COLUMNS}, b.source_id FROM batches b WHERE status = 'validating' ORDER BY id"
        ))?;
        let rows = stmt.query_map([], |r| Ok((batch_from_row(r)?, r.get(19)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One batch.
    pub fn batch(&self, id: i64) -> Result<Option<BatchRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"
        ))?;
        Ok(stmt.query_row([id], batch_from_row).optional()?)
    }

    /// Batches newest first, older than `before` (a batch id; `None`: from
    /// the newest), at most `limit`.
    pub fn list_batches(&self, before: Option<i64>, limit: usize) -> Result<Vec<BatchRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![before, limit as i64], batch_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A batch's jobs by state, and its invalid lines.
    pub fn batch_counts(&self, source_id: i64) -> Result<SourceCounts> {
        Ok(source_counts(&self.conn(), source_id)?)
    }

    /// Open batches (`in_progress`, `cancelling`) none of whose jobs is
    /// queued or running any more.
    pub fn done_batches(&self) -> Result<Vec<DoneBatch>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT b.id, b.source_id, b.status,
                    EXISTS (SELECT 1 FROM jobs j WHERE j.source_id = b.source_id AND j.state = 'expired'),
                    (SELECT MAX(completed_at) FROM jobs j WHERE j.source_id = b.source_id)
             FROM batches b
             WHERE b.status IN ('in_progress', 'finalizing', 'cancelling') AND b.source_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source_id = b.source_id
                               AND j.state IN ('queued', 'running'))",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DoneBatch {
                id: r.get(0)?,
                source_id: r.get(1)?,
                status: r.get(2)?,
                any_expired: r.get(3)?,
                last_completed_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Closes a batch whose jobs are all final: its status and timestamps,
    /// and its output and error files, in one transaction. Returns false if
    /// someone else closed it first.
    pub fn close_batch(&self, batch_id: i64, close: &BatchClose) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let open: Option<String> = tx
            .query_row(
                "SELECT status FROM batches WHERE id = ?1 AND status IN ('in_progress', 'finalizing', 'cancelling')",
                [batch_id],
                |r| r.get(0),
            )
            .optional()?;
        if open.is_none() {
            return Ok(false);
        }
        let file = |f: &Option<(String, u64)>, kind: FileKind| -> Result<Option<i64>> {
            Ok(match f {
                None => None,
                Some((name, bytes)) => {
                    tx.execute(
                        "INSERT INTO files (purpose, filename, bytes, created_at, batch_id, kind)
                         VALUES ('batch_output', ?1, ?2, ?3, ?4, ?5)",
                        params![name, *bytes as i64, close.at, batch_id, kind.as_str()],
                    )?;
                    Some(tx.last_insert_rowid())
                }
            })
        };
        let output = file(&close.output, FileKind::Output)?;
        let errors = file(&close.errors, FileKind::Errors)?;
        let column = match close.status {
            "expired" => "expired_at",
            "cancelled" => "cancelled_at",
            _ => "completed_at",
        };
        tx.execute(
            &format!(
                "UPDATE batches SET status = ?2, finalizing_at = COALESCE(finalizing_at, ?3), {column} = ?3,
                        output_file_id = ?4, error_file_id = ?5 WHERE id = ?1"
            ),
            params![batch_id, close.status, close.at, output, errors],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Cancels a batch: every queued job of it is cancelled and the batch
    /// becomes `cancelling` (one transaction). Returns the jobs cancelled, or
    /// `None` if the batch is not open.
    pub fn cancel_batch(&self, batch_id: i64, now_ms: i64) -> Result<Option<usize>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let source: Option<Option<i64>> = tx
            .query_row(
                "SELECT source_id FROM batches WHERE id = ?1 AND status IN ('in_progress', 'finalizing')",
                [batch_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(source) = source else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = ?2 WHERE id = ?1",
            params![batch_id, now_ms],
        )?;
        let n = match source {
            Some(source_id) => tx.execute(
                "UPDATE jobs SET state = 'cancelled', completed_at = ?2, error_code = 'cancelled',
                        error_message = 'the batch was cancelled before this request was dispatched'
                 WHERE source_id = ?1 AND state = 'queued'",
                params![source_id, now_ms],
            )?,
            None => 0,
        };
        tx.commit()?;
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{NewSource, Origin, Sqlite};
    use super::NewBatch;

    /// A crash after a batch's jobs are committed but before the batch is
    /// started must not queue them again: the link is in the same
    /// transaction, whatever stem the source got (an inbox file may already
    /// hold `batch_<id>`).
    #[test]
    fn a_batch_is_linked_to_its_source_in_the_ingest_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
        let taken = NewSource {
            origin: Origin::Inbox,
            name: "batch_1.jsonl",
            stem: "batch_1",
            sha256: Some("x"),
            now_ms: 0,
        };
        store.ingest(&taken, std::iter::empty()).unwrap();
        let file = store.insert_file("batch", "in.jsonl", b"{}", 0).unwrap();
        let batch = NewBatch {
            input_file_id: file.id,
            endpoint: "/v1/chat/completions",
            completion_window: "24h",
            metadata: None,
            now_ms: 0,
            expires_at: 1,
        };
        let id = store.create_batch(&batch).unwrap();
        assert_eq!(id, 1);
        let source = NewSource {
            origin: Origin::Upload,
            name: "in.jsonl",
            stem: "batch_1",
            sha256: None,
            now_ms: 0,
        };
        let summary = store.ingest_batch(id, &source, std::iter::empty()).unwrap();
        assert_eq!(summary.stem, "batch_1.2", "the inbox file kept the stem");
        // Still `validating` (the "crash"): recovery sees the source and will not ingest again.
        let open = store.validating_batches().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].1, Some(summary.source_id));
    }
}
