//! The durable queue. [`Store`] is its one interface over two backends
//! ([`backend`]): this module's [`Sqlite`], the embedded default, and
//! [`pg::Postgres`], for several daemons on one queue.
//!
//! SQLite allows one writer, so the store has one connection behind a mutex
//! and every state change is one short transaction (`BEGIN IMMEDIATE` where
//! it reads before it writes). Long reads — streaming a finished file's
//! results to the outbox — use a separate read-only connection, which WAL
//! lets run beside the writer.
//!
//! Times are Unix milliseconds (UTC).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::domain::job::{LineError, NewJob};

mod api;
pub use api::*;
mod backend;
pub mod coord;
pub use backend::{Backend, Store};
mod batches;
pub mod pg;
pub use batches::*;
pub mod maintenance;

/// The newest schema version; `schema.sql` describes it.
pub const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;
const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// A group's queued jobs (one route and size bin) in dispatch order (most
/// urgent first), read along `jobs_due` so that only the rows taken are read.
const QUEUED_IN_ROUTE: &str =
    "SELECT id, custom_id, endpoint, model, body, options, est_input_tokens, est_output_tokens,
        submitted_at, deadline, attempts
 FROM jobs INDEXED BY jobs_due
 WHERE state = 'queued' AND route_id = (SELECT id FROM routes WHERE key = ?1)
   AND size_bin = ?6 AND deadline >= ?2 AND deadline < ?3 AND not_before <= ?5
 ORDER BY deadline, priority DESC, id LIMIT ?4";

/// The upgrade steps of an existing database: `MIGRATIONS[i]` takes version
/// `i + 1` to `i + 2`. A new database gets `schema.sql`, which includes every
/// step verbatim (a test checks that both end with the same schema).
const MIGRATIONS: &[&str] = &[
    // 2: indexes for the per-pass expiry and spend queries.
    "CREATE INDEX IF NOT EXISTS jobs_queued_deadline ON jobs (state, deadline) WHERE state = 'queued';
     CREATE INDEX IF NOT EXISTS jobs_completed ON jobs (completed_at, provider, cost_usd, late_cost_usd) WHERE completed_at IS NOT NULL;",
    // 3: one index of the queued jobs in dispatch order replaces jobs_route
    // and jobs_queued_deadline (see schema.sql).
    "DROP INDEX IF EXISTS jobs_route;
     DROP INDEX IF EXISTS jobs_queued_deadline;
     CREATE INDEX IF NOT EXISTS jobs_due ON jobs (route_id, deadline, priority DESC, id, est_input_tokens, est_output_tokens, state) WHERE state = 'queued';",
    // 4: the requests sent in the last 24 hours, for the rate limits of a
    // restarted daemon (see schema.sql).
    SENDS_SCHEMA,
    // 5: the job listing's filters by custom_id and by origin (see schema.sql).
    LISTING_INDEXES,
    // 6: indexes that cover the queue statistics and lease recovery, so that
    // neither reads the table at a million jobs (see schema.sql).
    STATS_INDEXES,
    // 7: the channel a job ran on (sync, flex), for result lines and
    // `report --by channel` (see schema.sql).
    "ALTER TABLE jobs ADD COLUMN provider_channel TEXT;",
    // 8: batches sent to providers' Batch APIs, and their jobs (see
    // schema.sql and `store::batches`).
    batches::PROVIDER_BATCHES_SCHEMA,
    // 9: each job's size bin, and jobs_due by route, size bin and deadline
    // (see schema.sql and `domain::estimate::size_bin`).
    SIZE_BINS_SCHEMA,
];

/// Version 9, as in schema.sql. The CASE is `domain::estimate::size_bin`
/// (a test checks the two agree at every boundary); only jobs that may
/// still be dispatched need their bin.
const SIZE_BINS_SCHEMA: &str = "ALTER TABLE jobs ADD COLUMN size_bin INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET size_bin = CASE
    WHEN est_output_tokens < 1 THEN 0 WHEN est_output_tokens < 4 THEN 1
    WHEN est_output_tokens < 16 THEN 2 WHEN est_output_tokens < 64 THEN 3
    WHEN est_output_tokens < 256 THEN 4 WHEN est_output_tokens < 1024 THEN 5
    WHEN est_output_tokens < 4096 THEN 6 ELSE 7 END
  WHERE state IN ('queued', 'running');
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (route_id, size_bin, deadline, priority DESC, id, est_input_tokens, est_output_tokens, state) WHERE state = 'queued';";

/// Version 5's indexes, as in schema.sql.
const LISTING_INDEXES: &str = "CREATE INDEX IF NOT EXISTS jobs_custom_id ON jobs (custom_id);
CREATE INDEX IF NOT EXISTS sources_origin ON sources (origin);";

/// Running jobs whose lease expired or that another daemon instance left:
/// back to the queue. Reads jobs_running, not the table.
/// A job in a provider batch has no lease (its batch is resumed instead).
const RECOVER_LEASES: &str =
    "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL
 WHERE state = 'running' AND provider_batch_id IS NULL AND (lease_until <= ?1 OR lease_owner IS NOT ?2)";

/// Version 6's indexes, as in schema.sql.
const STATS_INDEXES: &str = "CREATE INDEX IF NOT EXISTS jobs_running ON jobs (lease_until, lease_owner, provider) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_final ON jobs (state, provider, cost_usd, list_cost_usd, input_tokens, output_tokens) WHERE state IN ('succeeded', 'failed', 'expired', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_late ON jobs (late_answers, late_cost_usd) WHERE late_answers > 0;";

/// Version 4's table of recent sends, as in schema.sql.
const SENDS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sends (
    at_ms    INTEGER NOT NULL,
    provider TEXT    NOT NULL,
    model    TEXT    NOT NULL,
    tokens   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_at ON sends (at_ms, provider, model, tokens);";

/// How long sends are kept: the longest rate-limit window (rpd).
/// (`dispatch::limits::DAY_MS`; a test there keeps the two equal: the store
/// stands below the dispatcher and imports nothing from it.)
pub const SENDS_KEPT_MS: i64 = 24 * 60 * 60 * 1000;

/// Errors from the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database {path}: {message}")]
    Setup { path: String, message: String },
    #[error("reading the source: {0}")]
    Read(#[from] std::io::Error),
    /// A fault injected by a test (see [`crate::faults`]).
    #[error("injected fault: {0}")]
    Injected(&'static str),
    #[error("database: {0}")]
    Postgres(#[from] postgres::Error),
    /// No connection could be had from the pool in time (the database is
    /// down or unreachable); the caller retries.
    #[error("database unavailable: {0}")]
    Pool(String),
    /// What this backend cannot do.
    #[error("not supported on this database backend: {0}")]
    Unsupported(&'static str),
}

impl QueueError {
    /// The database could not be reached (no connection in time, a
    /// connection lost, the server shutting down): the same call may
    /// succeed once it is back. A statement the database refused is not.
    pub fn is_unavailable(&self) -> bool {
        match self {
            QueueError::Pool(_) => true,
            QueueError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        // 08: connection exception; 57P: operator intervention
                        // (admin shutdown, crash shutdown, cannot connect now).
                        c.code().starts_with("08") || c.code().starts_with("57P")
                    })
            }
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, QueueError>;

/// The lifecycle states of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Expired,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Expired => "expired",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether the job has its one final result.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// Where a batch of jobs came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Inbox,
    Upload,
    Api,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Inbox => "inbox",
            Origin::Upload => "upload",
            Origin::Api => "api",
        }
    }
}

/// A source about to be ingested.
#[derive(Debug, Clone)]
pub struct NewSource<'a> {
    pub origin: Origin,
    pub name: &'a str,
    /// Preferred outbox stem; made unique with a numeric suffix if taken.
    pub stem: &'a str,
    pub sha256: Option<&'a str>,
    pub now_ms: i64,
}

/// One line of a source, after validation.
pub struct LineOutcome {
    pub line: u64,
    pub job: std::result::Result<NewJob, LineError>,
}

/// What ingesting a source did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSummary {
    pub source_id: i64,
    pub stem: String,
    pub total_lines: u64,
    pub queued: u64,
    pub invalid: u64,
}

/// A queued job that is due, with what dispatch needs.
#[derive(Debug, Clone)]
pub struct DueJob {
    pub id: i64,
    pub custom_id: String,
    pub endpoint: String,
    pub model: String,
    pub body: String,
    pub options: Option<String>,
    pub est_input_tokens: u64,
    pub est_output_tokens: u64,
    pub submitted_at: i64,
    pub deadline: i64,
    pub attempts: u32,
}

/// A dispatch decision to record: the job now runs on this provider and model.
#[derive(Debug, Clone)]
pub struct Start {
    pub job_id: i64,
    pub provider: String,
    pub provider_model: String,
    /// The channel it is sent on: "sync" or "flex".
    pub channel: &'static str,
    /// The tokens the rate limits charged it (the estimate).
    pub tokens: u64,
}

/// Requests sent to one provider model at one instant (or, older than a
/// minute, within one second, stamped with the latest), as
/// [`Store::recent_sends`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentGroup {
    pub provider: String,
    pub model: String,
    pub at_ms: i64,
    pub requests: u64,
    pub tokens: u64,
}

/// The final outcome of a job.
#[derive(Debug, Clone, Default)]
pub struct Finish {
    pub succeeded: bool,
    pub completed_at: i64,
    pub status_code: Option<u16>,
    pub request_id: Option<String>,
    pub response: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub list_cost_usd: Option<f64>,
    /// The channel that answered, where it is not the one the attempt
    /// started on (a refused flex request answered on the standard channel).
    pub channel: Option<&'static str>,
}

/// One attempt's outcome to record: final, or back to the queue until
/// `retry_at` (Unix ms).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub job_id: i64,
    pub retry_at: Option<i64>,
    pub finish: Finish,
}

/// The columns a final outcome sets, from parameters ?4 to ?13 in the
/// order of [`Finish`]'s fields (the state is ?3).
fn finish_columns() -> &'static str {
    "completed_at = ?4, status_code = ?5, request_id = ?6, response = ?7,
     error_code = ?8, error_message = ?9, input_tokens = ?10, output_tokens = ?11,
     cost_usd = ?12, list_cost_usd = ?13"
}

fn finish_on(conn: &Connection, job_id: i64, owner: &str, f: &Finish) -> Result<bool> {
    let n = conn
        .prepare_cached(&format!(
            "UPDATE jobs SET state = ?3, {}, lease_owner = NULL, lease_until = NULL,
                    provider_channel = COALESCE(?14, provider_channel)
             WHERE id = ?1 AND state = 'running' AND lease_owner = ?2",
            finish_columns()
        ))?
        .execute(params![
            job_id,
            owner,
            if f.succeeded { "succeeded" } else { "failed" },
            f.completed_at,
            f.status_code,
            f.request_id,
            f.response,
            f.error_code,
            f.error_message,
            f.input_tokens.map(|x| x as i64),
            f.output_tokens.map(|x| x as i64),
            f.cost_usd,
            f.list_cost_usd,
            f.channel,
        ])?;
    Ok(n == 1)
}

fn retry_on(
    conn: &Connection,
    job_id: i64,
    owner: &str,
    not_before: i64,
    last: &Finish,
) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE jobs SET state = 'queued', not_before = ?3, lease_owner = NULL, lease_until = NULL,
                    status_code = ?4, request_id = ?5, response = ?6, error_code = ?7, error_message = ?8
             WHERE id = ?1 AND state = 'running' AND lease_owner = ?2",
        )?
        .execute(params![
            job_id,
            owner,
            not_before,
            last.status_code,
            last.request_id,
            last.response,
            last.error_code,
            last.error_message
        ])?;
    Ok(n == 1)
}

/// A source whose jobs are all final and whose outbox files are not written yet.
#[derive(Debug, Clone)]
pub struct SourceRow {
    pub id: i64,
    pub origin: String,
    pub name: String,
    pub stem: String,
}

/// A finished job, as the results writer needs it.
#[derive(Debug, Clone)]
pub struct FinishedJob {
    pub id: i64,
    pub line: Option<u64>,
    pub custom_id: String,
    pub state: JobState,
    pub attempts: u32,
    pub provider: Option<String>,
    pub provider_model: Option<String>,
    /// "sync" or "flex" (`None`: never dispatched, or before schema 7).
    pub channel: Option<String>,
    pub dispatched_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub status_code: Option<u16>,
    pub request_id: Option<String>,
    pub response: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub list_cost_usd: Option<f64>,
    /// The provider's id of the batch that answered it (batch channel).
    pub provider_batch: Option<String>,
}

impl FinishedJob {
    /// The channel it ran on: "sync" or "flex"; `None` if never dispatched
    /// (a job dispatched before schema 7 ran on "sync").
    pub fn channel(&self) -> Option<&str> {
        self.channel
            .as_deref()
            .or(self.provider.as_ref().map(|_| "sync"))
    }
}

/// An invalid line of an accepted source.
#[derive(Debug, Clone)]
pub struct StoredLineError {
    pub line: u64,
    pub custom_id: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

/// The SQLite-backed job queue.
pub struct Sqlite {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn setup_err(path: &Path, message: impl Into<String>) -> QueueError {
    QueueError::Setup {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path`, asserts its pragmas
    /// and migrates it to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Sqlite> {
        owner_only(path)
            .map_err(|e| setup_err(path, format!("making it owner-only (0600): {e}")))?;
        let mut conn = Connection::open(path)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(setup_err(
                path,
                format!("journal_mode is '{mode}', WAL is required"),
            ));
        }
        // NORMAL in WAL mode: a commit survives a process crash (SIGKILL); only an
        // OS crash or power loss may lose the last transactions.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
        if sync != 1 {
            return Err(setup_err(
                path,
                format!("synchronous is {sync}, expected 1 (NORMAL)"),
            ));
        }
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn, path)?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a transaction half-applied
        // (it rolls back on drop), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A read-only connection for long reads beside the writer.
    fn reader(&self) -> Result<Connection> {
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(c)
    }

    /// The inbox source with this content hash, if it was ingested before.
    pub fn inbox_source_by_hash(&self, sha256: &str) -> Result<Option<(i64, String)>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name FROM sources WHERE origin = 'inbox' AND sha256 = ?1",
                [sha256],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Queues every valid line of a source and records every invalid one, in
    /// one transaction. A valid line whose `custom_id` repeats an earlier one
    /// becomes an invalid line. A read error rolls everything back.
    pub fn ingest(
        &self,
        source: &NewSource,
        lines: impl Iterator<Item = std::io::Result<LineOutcome>>,
    ) -> Result<IngestSummary> {
        self.ingest_linked(source, lines, |_, _| Ok(()))
    }

    /// [`Store::ingest`], running `link(tx, source_id)` in the same
    /// transaction (a batch records its source, so a crash cannot separate them).
    pub(crate) fn ingest_linked(
        &self,
        source: &NewSource,
        lines: impl Iterator<Item = std::io::Result<LineOutcome>>,
        link: impl FnOnce(&Connection, i64) -> rusqlite::Result<()>,
    ) -> Result<IngestSummary> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stem = unique_stem(&tx, source.stem)?;
        tx.execute(
            "INSERT INTO sources (origin, name, stem, sha256, ingested_at, total_lines, valid_jobs, invalid_lines)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, 0)",
            params![source.origin.as_str(), source.name, stem, source.sha256, source.now_ms],
        )?;
        let source_id = tx.last_insert_rowid();
        let (mut total, mut queued, mut invalid) = (0u64, 0u64, 0u64);
        {
            let mut insert_job = tx.prepare_cached(INSERT_JOB)?;
            let mut insert_error = tx.prepare_cached(
                "INSERT INTO line_errors (source_id, line, custom_id, field, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut first_line =
                tx.prepare_cached("SELECT line FROM jobs WHERE source_id = ?1 AND custom_id = ?2")?;
            let mut routes = RouteIds::new(&tx)?;
            for outcome in lines {
                let LineOutcome { line, job } = outcome?;
                total += 1;
                let error = match job {
                    Ok(job) => match insert_job.execute(params![
                        source_id,
                        line as i64,
                        job.custom_id,
                        job.endpoint.as_url(),
                        job.model,
                        job.body,
                        job.options,
                        job.priority,
                        job.estimate.input as i64,
                        job.estimate.output as i64,
                        source.now_ms,
                        job.deadline.timestamp_millis(),
                        routes.id(&job.route_key)?,
                        crate::domain::estimate::size_bin(job.estimate.output)
                    ]) {
                        Ok(_) => {
                            queued += 1;
                            tracing::debug!(job = tx.last_insert_rowid(), custom_id = %crate::domain::units::escaped(&job.custom_id), "job queued");
                            continue;
                        }
                        Err(rusqlite::Error::SqliteFailure(e, _))
                            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                        {
                            let first: Option<i64> = first_line
                                .query_row(params![source_id, job.custom_id], |r| r.get(0))
                                .optional()?;
                            LineError {
                                custom_id: Some(job.custom_id),
                                field: Some("custom_id".into()),
                                message: match first {
                                    Some(l) => {
                                        format!("duplicate custom_id (first used on line {l})")
                                    }
                                    None => "duplicate custom_id".into(),
                                },
                            }
                        }
                        Err(e) => return Err(e.into()),
                    },
                    Err(e) => e,
                };
                invalid += 1;
                insert_error.execute(params![
                    source_id,
                    line as i64,
                    error.custom_id,
                    error.field,
                    error.message
                ])?;
            }
        }
        tx.execute(
            "UPDATE sources SET total_lines = ?2, valid_jobs = ?3, invalid_lines = ?4 WHERE id = ?1",
            params![source_id, total as i64, queued as i64, invalid as i64],
        )?;
        link(&tx, source_id)?;
        tx.commit()?;
        Ok(IngestSummary {
            source_id,
            stem,
            total_lines: total,
            queued,
            invalid,
        })
    }

    /// What finished jobs of the last `days` days say about token estimates:
    /// per provider, reported input tokens ÷ estimated; per route key,
    /// reported output tokens ÷ expected.
    #[allow(clippy::type_complexity)]
    pub fn learned_token_ratios(
        &self,
        days: i64,
    ) -> Result<(Vec<(String, f64)>, Vec<(String, f64)>)> {
        let conn = self.reader()?;
        let since = chrono::Utc::now().timestamp_millis() - days * 86_400_000;
        let mut stmt = conn.prepare(
            "SELECT provider, TOTAL(input_tokens), TOTAL(est_input_tokens) FROM jobs
             WHERE state = 'succeeded' AND completed_at > ?1 GROUP BY provider",
        )?;
        // TOTAL (a float) never overflows, whatever a row holds.
        let ratio = |actual: Option<f64>, estimated: Option<f64>| match (actual, estimated) {
            (Some(a), Some(e)) if e > 0.0 => Some(a / e),
            _ => None,
        };
        let inputs = stmt
            .query_map([since], |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get(1)?, r.get(2)?))
            })?
            .filter_map(|row| row.ok())
            .filter_map(|(p, a, e)| Some((p?, ratio(a, e)?)))
            .collect();
        let mut stmt = conn.prepare(
            "SELECT r.key, TOTAL(j.output_tokens), TOTAL(j.est_output_tokens) FROM jobs j JOIN routes r ON r.id = j.route_id
             WHERE j.state = 'succeeded' AND j.completed_at > ?1 GROUP BY j.route_id",
        )?;
        let outputs = stmt
            .query_map([since], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?))
            })?
            .filter_map(|row| row.ok())
            .filter_map(|(k, a, e)| Some((k, ratio(a, e)?)))
            .collect();
        Ok((inputs, outputs))
    }

    /// Queued jobs per route key (an index-only scan), for metrics.
    pub fn queued_by_route(&self) -> Result<Vec<(String, u64)>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(
            "SELECT r.key, q.n FROM (SELECT route_id, COUNT(*) AS n FROM jobs WHERE state = 'queued' GROUP BY route_id) AS q
             JOIN routes r ON r.id = q.route_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Queued jobs by route, size bin and deadline bucket: the planner's
    /// input. Runs on a read connection, so it never holds up the writer.
    ///
    /// SQLite groups by `(route_id, size_bin, deadline)`, the order of
    /// `jobs_due`, so it walks that covering index once with no temporary
    /// B-tree; deadlines are folded into [`crate::plan::BUCKET_MS`] buckets
    /// here (grouping by `deadline / bucket` in SQL sorted every queued job
    /// first: four times slower at 100k queued), by route id, and route keys
    /// are looked up once per bucket. Token sums are `TOTAL()`
    /// (floating point: a sum of integers never fails with "integer
    /// overflow", whatever the rows hold) and saturate as `u64`.
    pub fn queued_buckets(&self) -> Result<Vec<crate::plan::QueuedBucket>> {
        let conn = self.reader()?;
        let keys: HashMap<i64, String> = conn
            .prepare_cached("SELECT id, key FROM routes")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut stmt = conn.prepare_cached(QUEUED_BUCKETS)?;
        let bucket = crate::plan::BUCKET_MS;
        let mut out: Vec<crate::plan::QueuedBucket> = Vec::new();
        // Rows come in index order, so a bucket's rows are consecutive; the
        // map only catches an order the query planner might choose instead.
        // Keys are integers: no string is read or copied per row.
        let mut at: HashMap<(i64, i64, i64), usize> = HashMap::new();
        let mut last: Option<((i64, i64, i64), usize)> = None;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let route_id: i64 = r.get(0)?;
            let size_bin: i64 = r.get(1)?;
            let deadline: i64 = r.get(2)?;
            let jobs = r.get::<_, i64>(3)?.max(0) as u64;
            // `as` saturates (and maps NaN to 0).
            let input = r.get::<_, f64>(4)? as u64;
            let output = r.get::<_, f64>(5)? as u64;
            let from = deadline.div_euclid(bucket) * bucket;
            let id = (route_id, size_bin, from);
            let found = match last {
                Some((k, i)) if k == id => Some(i),
                _ => at.get(&id).copied(),
            };
            match found {
                Some(i) => {
                    let b = &mut out[i];
                    b.jobs += jobs;
                    b.input_tokens = b.input_tokens.saturating_add(input);
                    b.output_tokens = b.output_tokens.saturating_add(output);
                    b.min_deadline = b.min_deadline.min(deadline);
                    last = Some((id, i));
                }
                None => {
                    let Some(key) = keys.get(&route_id) else {
                        continue;
                    };
                    at.insert(id, out.len());
                    last = Some((id, out.len()));
                    out.push(crate::plan::QueuedBucket {
                        route_key: key.clone(),
                        size_bin,
                        deadline_from: from,
                        deadline_to: from + bucket,
                        jobs,
                        input_tokens: input,
                        output_tokens: output,
                        min_deadline: deadline,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The most urgent queued jobs of one route and size bin with deadlines
    /// in `[from, to)`. Only jobs whose `not_before` (retry backoff) has
    /// passed at `now_ms`.
    pub fn queued_in_route(
        &self,
        route_key: &str,
        size_bin: i64,
        from: i64,
        to: i64,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<DueJob>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(QUEUED_IN_ROUTE)?;
        let rows = stmt.query_map(
            params![route_key, from, to, limit as i64, now_ms, size_bin],
            due_from_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Fails every queued job of a route (its models are gone from the config).
    pub fn fail_route(
        &self,
        route_key: &str,
        now_ms: i64,
        code: &str,
        message: &str,
    ) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE jobs SET state = 'failed', completed_at = ?2, error_code = ?3, error_message = ?4
             WHERE state = 'queued' AND route_id = (SELECT id FROM routes WHERE key = ?1)",
            params![route_key, now_ms, code, message],
        )?)
    }

    /// Moves these jobs from queued to running under a lease held by `owner`,
    /// counting an attempt. Returns the ids that were still queued (a job
    /// cancelled meanwhile is skipped).
    pub fn start_attempts(
        &self,
        starts: &[Start],
        now_ms: i64,
        lease_until: i64,
        owner: &str,
    ) -> Result<Vec<i64>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut started = Vec::with_capacity(starts.len());
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?2, lease_until = ?3,
                        provider = ?4, provider_model = ?5, dispatched_at = ?6, provider_channel = ?7
                 WHERE id = ?1 AND state = 'queued'",
            )?;
            for s in starts {
                if stmt.execute(params![
                    s.job_id,
                    owner,
                    lease_until,
                    s.provider,
                    s.provider_model,
                    now_ms,
                    s.channel
                ])? == 1
                {
                    started.push(s.job_id);
                }
            }
        }
        let sent: std::collections::HashSet<i64> = started.iter().copied().collect();
        // Stamped when the write holds the lock (the requests leave right
        // after the commit), not when the pass took them: never early. The
        // commit itself and the sending come after this stamp; the limiter's
        // margin (`ARRIVAL_MARGIN_MS`) covers that for a restart seeded here.
        let sent_ms = now_ms.max(chrono::Utc::now().timestamp_millis());
        record_sends(
            &tx,
            starts.iter().filter(|s| sent.contains(&s.job_id)),
            sent_ms,
        )?;
        tx.commit()?;
        Ok(started)
    }

    /// The requests sent in the last [`SENDS_KEPT_MS`] before `now_ms`, in
    /// time order, for seeding the rate limits: one row per instant in the
    /// last `minute_held` ms (the per-minute windows and the limiter's
    /// margin, which count them to the millisecond: the dispatcher, which
    /// owns those windows, says how long), one per second before that (rpd
    /// only needs the count).
    pub fn recent_sends(&self, now_ms: i64, minute_held: i64) -> Result<Vec<SentGroup>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(RECENT_SENDS)?;
        let rows = stmt.query_map(params![now_ms, SENDS_KEPT_MS, minute_held], |r| {
            Ok(SentGroup {
                provider: r.get(0)?,
                model: r.get(1)?,
                at_ms: r.get(2)?,
                requests: r.get::<_, i64>(3)?.max(0) as u64,
                tokens: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records the final outcome of a running job held by `owner`. Returns
    /// false (and changes nothing) if the job is no longer this owner's to
    /// finish: its lease was recovered and it may have finished elsewhere.
    pub fn finish(&self, job_id: i64, owner: &str, f: &Finish) -> Result<bool> {
        finish_on(&self.conn(), job_id, owner, f)
    }

    /// Returns a running job held by `owner` to the queue after a failed
    /// attempt, not to be sent before `not_before`; the failure is kept in the
    /// job's error columns until a later attempt replaces it.
    pub fn retry_later(
        &self,
        job_id: i64,
        owner: &str,
        not_before: i64,
        last: &Finish,
    ) -> Result<bool> {
        retry_on(&self.conn(), job_id, owner, not_before, last)
    }

    /// Records many attempts' outcomes in one transaction: each a final
    /// result ([`Store::finish`]) or, with `retry_at`, a retry
    /// ([`Store::retry_later`]). Returns, in order, whether each job was
    /// still this owner's.
    pub fn record_attempts(&self, owner: &str, attempts: &[Recorded]) -> Result<Vec<bool>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(attempts.len());
        for a in attempts {
            out.push(match a.retry_at {
                Some(at) => retry_on(&tx, a.job_id, owner, at, &a.finish)?,
                None => finish_on(&tx, a.job_id, owner, &a.finish)?,
            });
        }
        tx.commit()?;
        Ok(out)
    }

    /// Counts an answer that came after the job's lease was recovered.
    pub fn record_late_answer(&self, job_id: i64, cost_usd: f64) -> Result<()> {
        self.conn().execute(
            "UPDATE jobs SET late_answers = late_answers + 1, late_cost_usd = late_cost_usd + ?2 WHERE id = ?1",
            params![job_id, cost_usd],
        )?;
        Ok(())
    }

    /// Fails a queued job without sending it (e.g. no provider within its
    /// `max_cost_usd`). Returns false if it was no longer queued.
    pub fn fail_queued(&self, job_id: i64, now_ms: i64, code: &str, message: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE jobs SET state = 'failed', completed_at = ?2, error_code = ?3, error_message = ?4
             WHERE id = ?1 AND state = 'queued'",
            params![job_id, now_ms, code, message],
        )?;
        Ok(n == 1)
    }

    /// Marks queued jobs whose deadline has passed as expired.
    /// Returns the expired jobs' ids and custom_ids.
    pub fn expire_overdue(&self, now_ms: i64) -> Result<Vec<(i64, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(EXPIRE_OVERDUE)?;
        let rows = stmt.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The earliest deadline of a queued job (Unix ms), if any is queued.
    pub fn earliest_queued_deadline(&self) -> Result<Option<i64>> {
        Ok(self.conn().query_row(
            "SELECT MIN(deadline) FROM jobs WHERE state = 'queued'",
            [],
            |r| r.get(0),
        )?)
    }

    /// Re-queues running jobs whose lease has expired, or that belong to
    /// another instance (the caller holds the instance lock, so such an owner
    /// is dead). The attempt stays counted.
    pub fn recover_leases(&self, now_ms: i64, owner: &str) -> Result<usize> {
        Ok(self
            .conn()
            .execute(RECOVER_LEASES, params![now_ms, owner])?)
    }

    /// Returns one running job of this owner to the queue (its request task
    /// died without an answer). The attempt stays counted. Returns false if
    /// the job was no longer this owner's running job.
    pub fn requeue_running(&self, job_id: i64, owner: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL
             WHERE id = ?1 AND state = 'running' AND lease_owner = ?2",
            params![job_id, owner],
        )? == 1)
    }

    /// Returns this owner's running jobs to the queue (graceful shutdown).
    pub fn release_running(&self, owner: &str) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL
             WHERE state = 'running' AND lease_owner = ?1",
            [owner],
        )?)
    }

    /// Sources whose jobs are all final and whose outbox is not yet written.
    pub fn sources_ready_for_outbox(&self) -> Result<Vec<SourceRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT s.id, s.origin, s.name, s.stem FROM sources s
             WHERE s.origin = 'inbox' AND s.outbox_written_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source_id = s.id AND j.state IN ('queued', 'running'))
             ORDER BY s.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SourceRow {
                id: r.get(0)?,
                origin: r.get(1)?,
                name: r.get(2)?,
                stem: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Calls `on_job` with every job of a source in line order, on a separate
    /// read connection (does not block the writer).
    pub fn for_each_job_of(
        &self,
        source_id: i64,
        mut on_job: impl FnMut(FinishedJob) -> std::io::Result<()>,
    ) -> std::result::Result<(), ResultsError> {
        let conn = self.reader().map_err(|e| match e {
            QueueError::Sqlite(e) => ResultsError::Sqlite(e),
            other => ResultsError::Io(std::io::Error::other(other.to_string())),
        })?;
        let mut stmt = conn.prepare(&format!(
            "{SELECT_FINISHED} WHERE source_id = ?1 ORDER BY line, id"
        ))?;
        let mut rows = stmt.query([source_id])?;
        while let Some(r) = rows.next()? {
            on_job(finished_from_row(r)?)?;
        }
        Ok(())
    }

    /// The invalid lines of a source, in line order.
    pub fn line_errors_of(&self, source_id: i64) -> Result<Vec<StoredLineError>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT line, custom_id, field, message FROM line_errors WHERE source_id = ?1 ORDER BY line",
        )?;
        let rows = stmt.query_map([source_id], |r| {
            Ok(StoredLineError {
                line: r.get::<_, i64>(0)? as u64,
                custom_id: r.get(1)?,
                field: r.get(2)?,
                message: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records that a source's outbox files exist.
    pub fn mark_outbox_written(&self, source_id: i64, now_ms: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE sources SET outbox_written_at = ?2 WHERE id = ?1",
            params![source_id, now_ms],
        )?;
        Ok(())
    }

    /// Number of jobs in each state.
    /// What jobs finished since `since_ms` cost (late duplicates included),
    /// on one provider or all. Runs on a read connection.
    pub fn spent_since(&self, provider: Option<&str>, since_ms: i64) -> Result<f64> {
        let conn = self.reader()?;
        Ok(conn.query_row(SPENT_SINCE, params![since_ms, provider], |r| r.get(0))?)
    }

    /// Spend of finished jobs since `since_ms`, grouped by `by`: jobs, input
    /// and output tokens, actual cost, list cost, and the cost of late
    /// (duplicate) answers. Runs on a read connection.
    pub fn spend(&self, since_ms: i64, by: SpendBy) -> Result<Vec<SpendRow>> {
        let key = match by {
            SpendBy::Provider => "provider",
            SpendBy::Class => "model",
            SpendBy::Day => "strftime('%Y-%m-%d', completed_at / 1000, 'unixepoch')",
            // Jobs finished before schema 7 ran on the standard channel.
            SpendBy::Channel => "COALESCE(provider_channel, 'sync')",
        };
        let conn = self.reader()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {key}, COUNT(*), CAST(TOTAL(input_tokens) AS INTEGER), CAST(TOTAL(output_tokens) AS INTEGER),
                    COALESCE(SUM(cost_usd), 0), COALESCE(SUM(list_cost_usd), 0), COALESCE(SUM(late_cost_usd), 0)
             FROM jobs WHERE state = 'succeeded' AND completed_at >= ?1 GROUP BY 1 ORDER BY 1"
        ))?;
        let rows = stmt.query_map([since_ms], |r| {
            Ok(SpendRow {
                key: r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                jobs: r.get::<_, i64>(1)? as u64,
                input_tokens: r.get::<_, i64>(2)? as u64,
                output_tokens: r.get::<_, i64>(3)? as u64,
                cost_usd: r.get(4)?,
                list_cost_usd: r.get(5)?,
                late_cost_usd: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn counts(&self) -> Result<BTreeMap<JobState, u64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let mut out: BTreeMap<JobState, u64> = JobState::ALL.iter().map(|&s| (s, 0)).collect();
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            if let Some(s) = JobState::parse(&state) {
                out.insert(s, n as u64);
            }
        }
        Ok(out)
    }

    /// One job by id, final or not (`state` tells).
    pub fn job(&self, id: i64) -> Result<Option<FinishedJob>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("{SELECT_FINISHED} WHERE id = ?1"))?;
        Ok(stmt.query_row([id], finished_from_row).optional()?)
    }
}

/// How `Store::spend` groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendBy {
    Provider,
    /// The model or class the jobs asked for.
    Class,
    /// The UTC day they completed.
    Day,
    /// The channel that answered: sync, flex.
    Channel,
}

/// One group of [`Store::spend`].
#[derive(Debug, Clone, PartialEq)]
pub struct SpendRow {
    pub key: String,
    pub jobs: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub list_cost_usd: f64,
    pub late_cost_usd: f64,
}

/// Errors while streaming results to a writer.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("writing results: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Queue(#[from] QueueError),
}

const INSERT_JOB: &str =
    "INSERT INTO jobs (source_id, line, custom_id, endpoint, model, body, options, priority,
        est_input_tokens, est_output_tokens, submitted_at, deadline, route_id, size_bin)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

fn due_from_row(r: &rusqlite::Row) -> rusqlite::Result<DueJob> {
    Ok(DueJob {
        id: r.get(0)?,
        custom_id: r.get(1)?,
        endpoint: r.get(2)?,
        model: r.get(3)?,
        body: r.get(4)?,
        options: r.get(5)?,
        est_input_tokens: r.get::<_, i64>(6)? as u64,
        est_output_tokens: r.get::<_, i64>(7)? as u64,
        submitted_at: r.get(8)?,
        deadline: r.get(9)?,
        attempts: r.get::<_, i64>(10)? as u32,
    })
}

const SELECT_FINISHED: &str = "SELECT id, line, custom_id, state, attempts, provider, provider_model, dispatched_at,
        completed_at, status_code, request_id, response, error_code, error_message, input_tokens, output_tokens,
        cost_usd, list_cost_usd, provider_channel,
        (SELECT remote_id FROM provider_batches WHERE id = jobs.provider_batch_id) FROM jobs";

fn finished_from_row(r: &rusqlite::Row) -> rusqlite::Result<FinishedJob> {
    let state: String = r.get(3)?;
    Ok(FinishedJob {
        id: r.get(0)?,
        line: r.get::<_, Option<i64>>(1)?.map(|l| l as u64),
        custom_id: r.get(2)?,
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        attempts: r.get::<_, i64>(4)? as u32,
        provider: r.get(5)?,
        provider_model: r.get(6)?,
        dispatched_at: r.get(7)?,
        completed_at: r.get(8)?,
        status_code: r.get::<_, Option<i64>>(9)?.map(|s| s as u16),
        request_id: r.get(10)?,
        response: r.get(11)?,
        error_code: r.get(12)?,
        error_message: r.get(13)?,
        input_tokens: r.get::<_, Option<i64>>(14)?.map(|x| x as u64),
        output_tokens: r.get::<_, Option<i64>>(15)?.map(|x| x as u64),
        cost_usd: r.get(16)?,
        list_cost_usd: r.get(17)?,
        channel: r.get(18)?,
        provider_batch: r.get(19)?,
    })
}

/// Route keys to `routes.id`, inserting new ones; cached for one ingest.
struct RouteIds<'c> {
    add: rusqlite::CachedStatement<'c>,
    get: rusqlite::CachedStatement<'c>,
    cache: std::collections::HashMap<String, i64>,
}

impl<'c> RouteIds<'c> {
    fn new(conn: &'c Connection) -> rusqlite::Result<RouteIds<'c>> {
        Ok(RouteIds {
            add: conn.prepare_cached(
                "INSERT INTO routes (key) VALUES (?1) ON CONFLICT (key) DO NOTHING",
            )?,
            get: conn.prepare_cached("SELECT id FROM routes WHERE key = ?1")?,
            cache: std::collections::HashMap::new(),
        })
    }

    fn id(&mut self, key: &str) -> rusqlite::Result<i64> {
        if let Some(&id) = self.cache.get(key) {
            return Ok(id);
        }
        self.add.execute([key])?;
        let id: i64 = self.get.query_row([key], |r| r.get(0))?;
        self.cache.insert(key.to_string(), id);
        Ok(id)
    }
}

/// The database file and its `-wal` and `-shm` companions are owner-only
/// (0600) whatever the umask: the file is created so before SQLite opens it
/// (SQLite gives the companions the mode of the database file), and ones an
/// earlier version left readable by others are tightened.
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mut wal = path.as_os_str().to_os_string();
    wal.push("-wal");
    let mut shm = path.as_os_str().to_os_string();
    shm.push("-shm");
    for p in [path, Path::new(&wal), Path::new(&shm)] {
        match std::fs::metadata(p) {
            Ok(m) if m.permissions().mode() & 0o777 != 0o600 => {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn unique_stem(conn: &Connection, wanted: &str) -> rusqlite::Result<String> {
    let taken = |s: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sources WHERE stem = ?1)",
            [s],
            |r| r.get(0),
        )
    };
    if !taken(wanted)? {
        return Ok(wanted.to_string());
    }
    for n in 2.. {
        let candidate = format!("{wanted}.{n}");
        if !taken(&candidate)? {
            return Ok(candidate);
        }
    }
    unreachable!("the loop returns")
}

/// [`Store::queued_buckets`]: `jobs_due` in its own order, covered.
const QUEUED_BUCKETS: &str =
    "SELECT route_id, size_bin, deadline, COUNT(*), TOTAL(est_input_tokens), TOTAL(est_output_tokens)
     FROM jobs INDEXED BY jobs_due WHERE state = 'queued'
     GROUP BY route_id, size_bin, deadline";

/// [`Store::expire_overdue`]: a range on `jobs_due` per route and size bin
/// (every bin of `domain::estimate::size_bin` is listed), so a pass reads
/// only the overdue jobs, however deep the queue.
const EXPIRE_OVERDUE: &str =
    "UPDATE jobs SET state = 'expired', completed_at = ?1, error_code = 'expired',
        error_message = 'the deadline passed before the job could be dispatched'
     WHERE state = 'queued' AND route_id IN (SELECT id FROM routes)
       AND size_bin IN (0, 1, 2, 3, 4, 5, 6, 7) AND deadline <= ?1
     RETURNING id, custom_id";

/// [`Store::spent_since`]: a range on `jobs_completed`, which covers it, so
/// it reads only the jobs finished in the period.
const SPENT_SINCE: &str = "SELECT COALESCE(SUM(COALESCE(cost_usd, 0) + late_cost_usd), 0) FROM jobs
     WHERE completed_at >= ?1 AND (?2 IS NULL OR provider = ?2)";

/// [`Store::recent_sends`]: a range on `sends_at`, which covers it. Sends
/// the per-minute windows still count (`?3`: a minute and the limiter's
/// margin) are read to the millisecond, older ones by second.
const RECENT_SENDS: &str = "SELECT provider, model, MAX(at_ms), COUNT(*), SUM(tokens) FROM sends
     WHERE at_ms > ?1 - ?2
     GROUP BY provider, model, CASE WHEN at_ms > ?1 - ?3 THEN at_ms ELSE -1 - at_ms / 1000 END
     ORDER BY 3";

/// Logs the sends of a dispatch batch (in its transaction) and forgets
/// those older than [`SENDS_KEPT_MS`]: each pass deletes only what aged out
/// since the last, a range on `sends_at`.
fn record_sends<'a>(
    tx: &rusqlite::Transaction,
    starts: impl Iterator<Item = &'a Start>,
    now_ms: i64,
) -> Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO sends (at_ms, provider, model, tokens) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for s in starts {
        insert.execute(params![
            now_ms,
            s.provider,
            s.provider_model,
            s.tokens.min(i64::MAX as u64) as i64
        ])?;
    }
    tx.prepare_cached("DELETE FROM sends WHERE at_ms <= ?1")?
        .execute(params![now_ms - SENDS_KEPT_MS])?;
    Ok(())
}

/// Applies `schema.sql` to a new database, and the [`MIGRATIONS`] it lacks
/// to an older one, in one transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let newer = |version: i64| {
        setup_err(
            path,
            format!(
                "schema version {version} is newer than this nightshift understands ({SCHEMA_VERSION}); upgrade nightshift"
            ),
        )
    };
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(newer(version));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have upgraded it meanwhile.
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(newer(version));
    }
    if version < 1 {
        tx.execute_batch(SCHEMA_SQL)?;
    } else {
        for step in &MIGRATIONS[(version - 1) as usize..] {
            tx.execute_batch(step)?;
        }
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// The statement ingest uses to insert a job (14 parameters, the last two
/// the job's `routes.id` and size bin), for benchmarks that compare against a bare insert
/// into the same table.
pub fn bare_insert_statement() -> &'static str {
    INSERT_JOB
}

#[cfg(test)]
mod tests;

/// The schema and its query plans.
#[cfg(test)]
mod schema_tests {
    use super::*;

    /// Migration 9's CASE gives every job the bin ingest would give it.
    #[test]
    fn the_migrations_size_bins_are_the_ingest_size_bins() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE jobs (est_output_tokens INTEGER NOT NULL, state TEXT NOT NULL)",
        )
        .unwrap();
        let mut values: Vec<u64> = vec![0, 1, 1_000_000, i64::MAX as u64];
        for b in 0..20 {
            let p = 1u64 << b;
            values.extend([p - 1, p, p + 1]);
        }
        for v in &values {
            conn.execute(
                "INSERT INTO jobs VALUES (?1, 'queued')",
                params![(*v).min(i64::MAX as u64) as i64],
            )
            .unwrap();
        }
        // The migration minus its index (there is no jobs_due here).
        let steps = SIZE_BINS_SCHEMA.split("DROP INDEX").next().unwrap();
        conn.execute_batch(steps).unwrap();
        let mut stmt = conn
            .prepare("SELECT est_output_tokens, size_bin FROM jobs")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .unwrap();
        let mut n = 0;
        for row in rows {
            let (tokens, bin) = row.unwrap();
            assert_eq!(
                bin,
                crate::domain::estimate::size_bin(tokens as u64),
                "{tokens} tokens"
            );
            n += 1;
        }
        assert_eq!(n, values.len());
    }

    /// `EXPLAIN QUERY PLAN` of `sql`, one line per step.
    fn plan_of(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let nulls = std::iter::repeat_n(rusqlite::types::Null, stmt.parameter_count());
        let rows = stmt
            .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap();
        rows.join("\n")
    }

    /// The statistics and lease recovery read indexes only: no table rows
    /// (the bodies), whatever the queue holds.
    #[test]
    fn statistics_and_lease_recovery_never_read_the_table() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA_SQL).unwrap();
        for (sql, index) in [
            (api::STATS_QUEUED, "jobs_due"),
            (api::STATS_RUNNING, "jobs_running"),
            (api::STATS_FINAL, "jobs_final"),
            (api::STATS_LATE, "jobs_late"),
        ] {
            let plan = plan_of(&conn, sql);
            assert!(
                plan.contains(&format!("USING COVERING INDEX {index}")),
                "{sql}\nplan:\n{plan}"
            );
            // Running jobs are at most daemon.max_in_flight: they may be sorted.
            if index != "jobs_running" {
                assert!(!plan.contains("TEMP B-TREE"), "{sql}\nplan:\n{plan}");
            }
        }
        let plan = plan_of(&conn, RECOVER_LEASES);
        assert!(plan.contains("USING INDEX jobs_running"), "plan:\n{plan}");
    }

    /// Both per-pass statements seek an index range instead of scanning jobs.
    fn assert_indexed(conn: &Connection) {
        for (sql, index, range) in [
            (EXPIRE_OVERDUE, "jobs_due", "deadline<?"),
            (SPENT_SINCE, "jobs_completed", "completed_at>?"),
        ] {
            let plan = plan_of(conn, sql);
            // A range on the column compared, not every row of a state.
            assert!(plan.contains(range), "{sql}\nplan:\n{plan}");
            assert!(
                plan.contains(&format!("USING INDEX {index}"))
                    || plan.contains(&format!("USING COVERING INDEX {index}")),
                "{sql}\nplan:\n{plan}"
            );
            assert!(!plan.contains("SCAN jobs"), "{sql}\nplan:\n{plan}");
        }
        // Seeding the rate limits reads a day of sends from the index alone,
        // and pruning them deletes a range.
        let plan = plan_of(conn, RECENT_SENDS);
        assert!(
            plan.contains("USING COVERING INDEX sends_at (at_ms>?)"),
            "plan:\n{plan}"
        );
        let plan = plan_of(conn, "DELETE FROM sends WHERE at_ms <= ?1");
        assert!(plan.contains("sends_at (at_ms<?)"), "plan:\n{plan}");
        // A dispatch pass reads a group's jobs in index order: no sort of
        // the whole group before the LIMIT.
        let plan = plan_of(conn, QUEUED_IN_ROUTE);
        assert!(plan.contains("USING INDEX jobs_due"), "plan:\n{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "plan:\n{plan}");
        // The planner's summary walks the index in its GROUP BY order.
        let plan = plan_of(conn, QUEUED_BUCKETS);
        assert!(
            plan.contains("USING COVERING INDEX jobs_due"),
            "plan:\n{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "plan:\n{plan}");
    }

    fn schema_of(conn: &Connection) -> Vec<(String, String, Option<String>)> {
        let mut stmt = conn
            .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn expire_overdue_and_spent_since_use_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
        assert_indexed(&store.conn());
        // And they still do what they did.
        assert_eq!(store.expire_overdue(i64::MAX).unwrap(), []);
        assert_eq!(store.spent_since(None, 0).unwrap(), 0.0);
        assert_eq!(store.spent_since(Some("openai"), 0).unwrap(), 0.0);
    }

    #[test]
    fn a_version_1_database_is_upgraded_to_the_current_schema() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = Sqlite::open(&dir.path().join("fresh.db")).unwrap();
        let fresh_schema = schema_of(&fresh.conn());

        // Version 1: jobs_route instead of the per-pass indexes.
        let old = dir.path().join("old.db");
        {
            let store = Sqlite::open(&old).unwrap();
            let conn = store.conn();
            conn.execute_batch(
                "DROP INDEX jobs_completed; DROP INDEX jobs_due;
                 DROP INDEX jobs_custom_id; DROP INDEX sources_origin;
                 CREATE INDEX jobs_route ON jobs (state, route_id, deadline, est_input_tokens, est_output_tokens);
                 ALTER TABLE jobs DROP COLUMN provider_channel;
                 DROP INDEX jobs_running; DROP INDEX provider_batches_open;
                 DROP TABLE provider_batches;
                 ALTER TABLE jobs DROP COLUMN provider_batch_id;
                 ALTER TABLE jobs DROP COLUMN size_bin;
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let store = Sqlite::open(&old).unwrap();
        let conn = store.conn();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert!(version > 1, "an upgrade from 1 to {version}");
        assert_eq!(schema_of(&conn), fresh_schema);
        assert_indexed(&conn);
    }

    /// Every filter of the job listing reads an index range in id order:
    /// no statement scans the jobs table, and a custom_id or a source is
    /// looked up, not checked row by row along the primary key.
    #[test]
    fn every_job_listing_filter_reads_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
        let conn = store.conn();
        let sources = [
            None,
            Some(SourceFilter::Origin(Origin::Inbox)),
            Some(SourceFilter::Origin(Origin::Api)),
            Some(SourceFilter::Origin(Origin::Upload)),
            Some(SourceFilter::Source(1)),
            Some(SourceFilter::Batch(1)),
        ];
        for state in [None, Some(JobState::Queued), Some(JobState::Succeeded)] {
            for source in sources {
                for custom_id in [None, Some("ticket-1".to_string())] {
                    let filter = JobFilter {
                        state,
                        source,
                        custom_id,
                    };
                    let sql = list_jobs_sql(&filter);
                    let plan = plan_of(&conn, &sql);
                    let why = format!("{filter:?}\n{sql}\nplan:\n{plan}");
                    assert!(!plan.contains("SCAN jobs"), "{why}");
                    if filter.custom_id.is_some() {
                        assert!(
                            plan.contains("USING INDEX jobs_custom_id (custom_id=? AND rowid>?)"),
                            "{why}"
                        );
                        // Already in id order: no sort.
                        assert!(!plan.contains("TEMP B-TREE"), "{why}");
                    } else if filter.source.is_some() {
                        assert!(
                            plan.contains(
                                "USING INDEX jobs_source_state (source_id=? AND state=? AND rowid>?)"
                            ),
                            "{why}"
                        );
                    } else {
                        assert!(
                            plan.contains("USING INTEGER PRIMARY KEY (rowid>?)"),
                            "{why}"
                        );
                    }
                    if let Some(SourceFilter::Origin(_)) = filter.source {
                        assert!(
                            plan.contains("sources USING COVERING INDEX sources_origin (origin=?)"),
                            "{why}"
                        );
                    }
                    if let Some(SourceFilter::Batch(_)) = filter.source {
                        assert!(
                            plan.contains("batches USING INTEGER PRIMARY KEY (rowid=?)"),
                            "{why}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        {
            let store = Sqlite::open(&path).unwrap();
            store
                .conn()
                .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let e = Sqlite::open(&path)
            .err()
            .expect("a newer schema is refused");
        assert!(e.to_string().contains("newer"), "{e}");
    }
}
