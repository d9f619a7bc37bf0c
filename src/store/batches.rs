//! Batches nightshift sends to a provider's Batch API (the batch channel),
//! as opposed to the batches clients submit to nightshift's own OpenAI
//! Batch API (`store::api`).
//!
//! A provider batch is recorded, with its jobs, *before* anything is
//! uploaded, and each step at the provider is recorded right after it
//! happens, so that a daemon killed at any point resumes the batch where
//! it was and never creates it twice:
//!
//! ```text
//! prepared ──upload──▶ creating ──create──▶ submitted ──ended──▶ done
//!     │ (no upload step: Anthropic,            │
//!     └──── simulated) ─▶ creating             └─deadline guard─▶ cancelling ─ended─▶ done
//! ```
//!
//! In `creating` the provider may or may not have the batch (the daemon may
//! have died after "create" and before recording its id): it is looked up
//! by its tag before it is created again. A batch's jobs are `running` with
//! `provider_batch_id` set and no lease: lease recovery leaves them alone.
//! All of an ended batch's results are applied in one transaction that also
//! marks it done, so a crash while downloading applies them once, later.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Finish, Result, Sqlite, finish_columns};

/// Version 8: provider batches and their jobs (see schema.sql).
pub(super) const PROVIDER_BATCHES_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS provider_batches (
    id            INTEGER PRIMARY KEY,
    provider      TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    endpoint      TEXT    NOT NULL,
    state         TEXT    NOT NULL DEFAULT 'prepared'
                  CHECK (state IN ('prepared', 'creating', 'submitted', 'cancelling', 'done')),
    requests      INTEGER NOT NULL,
    tag           TEXT    NOT NULL,
    file_id       TEXT,
    remote_id     TEXT,
    remote_status TEXT,
    created_at    INTEGER NOT NULL,
    submitted_at  INTEGER,
    fallback_at   INTEGER NOT NULL,
    ended_at      INTEGER,
    succeeded     INTEGER NOT NULL DEFAULT 0,
    failed        INTEGER NOT NULL DEFAULT 0,
    requeued      INTEGER NOT NULL DEFAULT 0,
    late          INTEGER NOT NULL DEFAULT 0,
    error         TEXT
);
CREATE INDEX IF NOT EXISTS provider_batches_open ON provider_batches (state) WHERE state <> 'done';
ALTER TABLE jobs ADD COLUMN provider_batch_id INTEGER;
DROP INDEX IF EXISTS jobs_running;
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (provider_batch_id, lease_until, lease_owner, provider) WHERE state = 'running';";

/// Where a provider batch is (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStage {
    Prepared,
    Creating,
    Submitted,
    Cancelling,
    Done,
}

impl BatchStage {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStage::Prepared => "prepared",
            BatchStage::Creating => "creating",
            BatchStage::Submitted => "submitted",
            BatchStage::Cancelling => "cancelling",
            BatchStage::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<BatchStage> {
        Some(match s {
            "prepared" => BatchStage::Prepared,
            "creating" => BatchStage::Creating,
            "submitted" => BatchStage::Submitted,
            "cancelling" => BatchStage::Cancelling,
            "done" => BatchStage::Done,
            _ => return None,
        })
    }
}

/// A provider batch as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderBatch {
    pub id: i64,
    pub provider: String,
    /// The provider's model name.
    pub model: String,
    pub endpoint: String,
    pub stage: BatchStage,
    pub requests: u64,
    /// Tags the batch at the provider (`metadata.nightshift_batch`).
    pub tag: String,
    pub file_id: Option<String>,
    pub remote_id: Option<String>,
    pub remote_status: Option<String>,
    pub created_at: i64,
    pub submitted_at: Option<i64>,
    /// The deadline guard: not ended by then, it is cancelled and its jobs
    /// run synchronously.
    pub fallback_at: i64,
    pub ended_at: Option<i64>,
    pub succeeded: u64,
    pub failed: u64,
    pub requeued: u64,
    pub late: u64,
    pub error: Option<String>,
}

/// A job of a provider batch, as the batch's upload and results need it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchJob {
    pub id: i64,
    pub custom_id: String,
    pub endpoint: String,
    /// As requested: class, model or provider/model.
    pub model: String,
    pub body: String,
    pub est_input_tokens: u64,
    pub est_output_tokens: u64,
    pub submitted_at: i64,
    pub deadline: i64,
    pub attempts: u32,
}

/// A new provider batch.
#[derive(Debug, Clone)]
pub struct NewProviderBatch<'a> {
    pub provider: &'a str,
    pub model: &'a str,
    pub endpoint: &'a str,
    pub fallback_at: i64,
    pub now_ms: i64,
}

/// What one line of an ended batch does to its job.
#[derive(Debug, Clone)]
pub enum LineEffect {
    /// Final: succeeded, or failed for good.
    Finish(Finish),
    /// Back to the queue (a retryable error), not before `not_before`;
    /// the attempt stays counted.
    Retry { not_before: i64, last: Finish },
    /// Not run (expired, cancelled): back to the queue, the attempt not
    /// counted.
    NotRun,
}

/// One line's effect, with what it cost (for a late answer).
#[derive(Debug, Clone)]
pub struct LineRecord {
    pub job_id: i64,
    pub effect: LineEffect,
    pub cost_usd: f64,
}

/// What applying an ended batch's results did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub succeeded: u64,
    pub failed: u64,
    /// Back to the queue: retryable errors, lines not run, jobs the
    /// provider returned nothing for.
    pub requeued: u64,
    /// Answers for jobs that had been re-run elsewhere meanwhile (cost
    /// counted, result not replaced).
    pub late: u64,
}

const SELECT_BATCH: &str = "SELECT id, provider, model, endpoint, state, requests, tag, file_id, remote_id,
        remote_status, created_at, submitted_at, fallback_at, ended_at, succeeded, failed, requeued, late, error
 FROM provider_batches";

fn batch_from_row(r: &rusqlite::Row) -> rusqlite::Result<ProviderBatch> {
    let stage: String = r.get(4)?;
    let n = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
    Ok(ProviderBatch {
        id: r.get(0)?,
        provider: r.get(1)?,
        model: r.get(2)?,
        endpoint: r.get(3)?,
        stage: BatchStage::parse(&stage).unwrap_or(BatchStage::Done),
        requests: n(5)?,
        tag: r.get(6)?,
        file_id: r.get(7)?,
        remote_id: r.get(8)?,
        remote_status: r.get(9)?,
        created_at: r.get(10)?,
        submitted_at: r.get(11)?,
        fallback_at: r.get(12)?,
        ended_at: r.get(13)?,
        succeeded: n(14)?,
        failed: n(15)?,
        requeued: n(16)?,
        late: n(17)?,
        error: r.get(18)?,
    })
}

const SELECT_BATCH_JOB: &str = "SELECT id, custom_id, endpoint, model, body, est_input_tokens,
        est_output_tokens, submitted_at, deadline, attempts FROM jobs";

fn batch_job_from_row(r: &rusqlite::Row) -> rusqlite::Result<BatchJob> {
    Ok(BatchJob {
        id: r.get(0)?,
        custom_id: r.get(1)?,
        endpoint: r.get(2)?,
        model: r.get(3)?,
        body: r.get(4)?,
        est_input_tokens: r.get::<_, i64>(5)?.max(0) as u64,
        est_output_tokens: r.get::<_, i64>(6)?.max(0) as u64,
        submitted_at: r.get(7)?,
        deadline: r.get(8)?,
        attempts: r.get::<_, i64>(9)?.max(0) as u32,
    })
}

/// Running jobs of a batch back to the queue; `uncount` takes back the
/// attempt (nothing ran).
const REQUEUE_BATCH_JOBS: &str = "UPDATE jobs SET state = 'queued', provider_batch_id = NULL,
        attempts = CASE WHEN ?2 THEN MAX(attempts - 1, 0) ELSE attempts END
 WHERE state = 'running' AND provider_batch_id = ?1";

impl Sqlite {
    /// Records a provider batch and moves its jobs from queued to running
    /// in it, counting an attempt, in one transaction (before anything is
    /// uploaded). Returns the batch id and the jobs that were still queued;
    /// `None` if none was (nothing is recorded then).
    pub fn create_provider_batch(
        &self,
        b: &NewProviderBatch,
        job_ids: &[i64],
    ) -> Result<Option<(i64, Vec<i64>)>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO provider_batches (provider, model, endpoint, requests, tag, created_at, fallback_at)
             VALUES (?1, ?2, ?3, 0, '', ?4, ?5)",
            params![b.provider, b.model, b.endpoint, b.now_ms, b.fallback_at],
        )?;
        let id = tx.last_insert_rowid();
        let mut started = Vec::with_capacity(job_ids.len());
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = NULL,
                        lease_until = NULL, provider = ?2, provider_model = ?3, dispatched_at = ?4,
                        provider_channel = 'batch', provider_batch_id = ?5
                 WHERE id = ?1 AND state = 'queued'",
            )?;
            for &job in job_ids {
                if stmt.execute(params![job, b.provider, b.model, b.now_ms, id])? == 1 {
                    started.push(job);
                }
            }
        }
        if started.is_empty() {
            // Dropped with the transaction.
            return Ok(None);
        }
        // The tag names the batch uniquely even if the database is replaced
        // (ids start again at 1): its creation time is part of it.
        tx.execute(
            "UPDATE provider_batches SET requests = ?2, tag = ?3 WHERE id = ?1",
            params![
                id,
                started.len() as i64,
                format!("nightshift-{id}-{}", b.now_ms)
            ],
        )?;
        tx.commit()?;
        Ok(Some((id, started)))
    }

    /// The provider batches not done yet, oldest first.
    pub fn open_provider_batches(&self) -> Result<Vec<ProviderBatch>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("{SELECT_BATCH} WHERE state <> 'done' ORDER BY id"))?;
        let rows = stmt.query_map([], batch_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One provider batch.
    pub fn provider_batch(&self, id: i64) -> Result<Option<ProviderBatch>> {
        Ok(self
            .conn()
            .query_row(
                &format!("{SELECT_BATCH} WHERE id = ?1"),
                [id],
                batch_from_row,
            )
            .optional()?)
    }

    /// The most recent provider batches, newest first.
    pub fn recent_provider_batches(&self, limit: usize) -> Result<Vec<ProviderBatch>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("{SELECT_BATCH} ORDER BY id DESC LIMIT ?1"))?;
        let rows = stmt.query_map([limit.min(10_000) as i64], batch_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Provider batches by stage (for metrics).
    pub fn provider_batch_counts(&self) -> Result<Vec<(String, String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT provider, CASE WHEN state = 'done' AND error IS NOT NULL THEN 'failed' ELSE state END,
                    COUNT(*)
             FROM provider_batches GROUP BY 1, 2",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The jobs still running in a batch, in id order.
    pub fn provider_batch_jobs(&self, batch: i64) -> Result<Vec<BatchJob>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SELECT_BATCH_JOB} WHERE state = 'running' AND provider_batch_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([batch], batch_job_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// These jobs, whatever their state (lines of a batch whose jobs the
    /// deadline guard re-queued).
    pub fn batch_jobs_by_id(&self, ids: &[i64]) -> Result<Vec<BatchJob>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("{SELECT_BATCH_JOB} WHERE id = ?1"))?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(j) = stmt.query_row([id], batch_job_from_row).optional()? {
                out.push(j);
            }
        }
        Ok(out)
    }

    /// The batch's input file was uploaded (`file_id`), or, where there is
    /// no upload (`None`), it is about to be created: from here the
    /// provider may have it.
    pub fn provider_batch_creating(&self, batch: i64, file_id: Option<&str>) -> Result<()> {
        self.conn().execute(
            "UPDATE provider_batches SET state = 'creating', file_id = COALESCE(?2, file_id)
             WHERE id = ?1 AND state IN ('prepared', 'creating')",
            params![batch, file_id],
        )?;
        Ok(())
    }

    /// The provider created the batch as `remote_id`.
    pub fn provider_batch_submitted(
        &self,
        batch: i64,
        remote_id: &str,
        status: &str,
        now_ms: i64,
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE provider_batches SET state = 'submitted', remote_id = ?2, remote_status = ?3,
                    submitted_at = COALESCE(submitted_at, ?4)
             WHERE id = ?1 AND state IN ('prepared', 'creating')",
            params![batch, remote_id, status, now_ms],
        )?;
        Ok(())
    }

    /// The provider's status word for the batch, as last polled.
    pub fn provider_batch_status(&self, batch: i64, status: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE provider_batches SET remote_status = ?2 WHERE id = ?1",
            params![batch, status],
        )?;
        Ok(())
    }

    /// The deadline guard: the batch is being cancelled at the provider and
    /// its jobs go back to the queue now, to run synchronously (attempt not
    /// counted). Answers that the cancelled batch still returns are kept
    /// for jobs not re-run by then, late otherwise. Returns the jobs
    /// re-queued.
    pub fn provider_batch_cancelling(&self, batch: i64, status: &str) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(REQUEUE_BATCH_JOBS, params![batch, true])? as u64;
        tx.execute(
            "UPDATE provider_batches SET state = 'cancelling', remote_status = ?2, requeued = requeued + ?3
             WHERE id = ?1 AND state <> 'done'",
            params![batch, status, n as i64],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// The batch will not run (refused at creation, rejected as a whole,
    /// unknown to the provider, or its provider is gone): its jobs go back
    /// to the queue with the attempt not counted, and it is done with
    /// `error`. Returns the jobs re-queued.
    pub fn provider_batch_abandoned(&self, batch: i64, error: &str, now_ms: i64) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(REQUEUE_BATCH_JOBS, params![batch, true])? as u64;
        tx.execute(
            "UPDATE provider_batches SET state = 'done', error = ?2, ended_at = ?3, requeued = requeued + ?4
             WHERE id = ?1",
            params![batch, error, now_ms, n as i64],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Applies an ended batch's results and marks it done, in one
    /// transaction. A line for a job still running in this batch, or
    /// re-queued by the deadline guard and not re-run yet, is its result;
    /// for a job re-run elsewhere meanwhile it is a late answer (cost
    /// counted); for a job this batch already finished, nothing (results
    /// applied twice apply once). Jobs of the batch that no line names go
    /// back to the queue (nothing ran).
    pub fn apply_provider_batch(
        &self,
        batch: &ProviderBatch,
        lines: &[LineRecord],
        status: &str,
        now_ms: i64,
    ) -> Result<Applied> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let still_done: bool = tx.query_row(
            "SELECT state = 'done' FROM provider_batches WHERE id = ?1",
            [batch.id],
            |r| r.get(0),
        )?;
        if still_done {
            return Ok(Applied::default());
        }
        let mut applied = Applied::default();
        {
            let mut finish = tx.prepare_cached(&format!(
                "UPDATE jobs SET state = ?3, {finish_columns}, lease_owner = NULL, lease_until = NULL,
                        provider = ?14, provider_model = ?15, provider_channel = 'batch',
                        provider_batch_id = ?2, dispatched_at = COALESCE(dispatched_at, ?16)
                 WHERE id = ?1 AND ((state = 'running' AND provider_batch_id = ?2) OR state = 'queued')",
                finish_columns = finish_columns()
            ))?;
            let mut retry = tx.prepare_cached(
                "UPDATE jobs SET state = 'queued', not_before = ?3, provider_batch_id = NULL,
                        status_code = ?4, request_id = ?5, response = ?6, error_code = ?7, error_message = ?8
                 WHERE id = ?1 AND state = 'running' AND provider_batch_id = ?2",
            )?;
            let mut not_run = tx.prepare_cached(
                "UPDATE jobs SET state = 'queued', provider_batch_id = NULL, attempts = MAX(attempts - 1, 0)
                 WHERE id = ?1 AND state = 'running' AND provider_batch_id = ?2",
            )?;
            let mut owner =
                tx.prepare_cached("SELECT state, provider_batch_id IS ?2 FROM jobs WHERE id = ?1")?;
            let mut late = tx.prepare_cached(
                "UPDATE jobs SET late_answers = late_answers + 1, late_cost_usd = late_cost_usd + ?2 WHERE id = ?1",
            )?;
            for line in lines {
                let changed = match &line.effect {
                    LineEffect::Finish(f) => {
                        let n = finish.execute(params![
                            line.job_id,
                            batch.id,
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
                            batch.provider,
                            batch.model,
                            batch.submitted_at.unwrap_or(batch.created_at),
                        ])?;
                        if n == 1 {
                            if f.succeeded {
                                applied.succeeded += 1;
                            } else {
                                applied.failed += 1;
                            }
                        }
                        n == 1
                    }
                    LineEffect::Retry { not_before, last } => {
                        let n = retry.execute(params![
                            line.job_id,
                            batch.id,
                            not_before,
                            last.status_code,
                            last.request_id,
                            last.response,
                            last.error_code,
                            last.error_message
                        ])?;
                        applied.requeued += n as u64;
                        n == 1
                    }
                    LineEffect::NotRun => {
                        let n = not_run.execute(params![line.job_id, batch.id])?;
                        applied.requeued += n as u64;
                        // Nothing ran, nothing was billed: never late.
                        true
                    }
                };
                if changed {
                    continue;
                }
                let state: Option<(String, bool)> = owner
                    .query_row(params![line.job_id, batch.id], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                match state {
                    // This batch finished it already (results applied twice).
                    Some((s, true)) if s != "running" && s != "queued" => {}
                    // Re-run (or running) elsewhere: paid for, not the result.
                    Some(_) if line.cost_usd > 0.0 => {
                        late.execute(params![line.job_id, line.cost_usd])?;
                        applied.late += 1;
                    }
                    _ => {}
                }
            }
        }
        // Jobs the provider returned nothing for: nothing ran.
        let missing = tx.execute(REQUEUE_BATCH_JOBS, params![batch.id, true])? as u64;
        applied.requeued += missing;
        tx.execute(
            "UPDATE provider_batches SET state = 'done', remote_status = ?2, ended_at = ?3,
                    succeeded = succeeded + ?4, failed = failed + ?5, requeued = requeued + ?6, late = late + ?7
             WHERE id = ?1",
            params![
                batch.id,
                status,
                now_ms,
                applied.succeeded as i64,
                applied.failed as i64,
                applied.requeued as i64,
                applied.late as i64
            ],
        )?;
        tx.commit()?;
        Ok(applied)
    }
}
