//! PostgreSQL: provider batches, retention and the (absent) WAL checkpoint:
//! the same methods as the SQLite store's (`store::batches`,
//! `store::maintenance`), with the same meaning and results.
//!
//! What several daemons sharing the database change:
//!
//! - [`Postgres::create_provider_batch`] claims its jobs with `FOR UPDATE
//!   SKIP LOCKED`: a job another daemon is claiming at that moment is left
//!   out, as a job no longer queued is, so no job is ever in two batches
//!   (or in a batch and a lease). The batch's `owner` is this daemon's node.
//! - Every other state change locks the batch's row first (then its jobs,
//!   in id order), and moves it only from the states it may move from, so
//!   two daemons acting on one batch at once serialise and the second finds
//!   the work done (nothing re-queued twice, results applied once).

use std::collections::{HashMap, HashSet};

use postgres::Row;

use super::{Conn, Postgres};
use crate::store::batches::*;
use crate::store::maintenance::{Checkpoint, CheckpointMode, Purged};
use crate::store::*;

const SELECT_BATCH: &str = "SELECT id, provider, model, endpoint, state, requests, tag, file_id, remote_id,
        remote_status, created_at, submitted_at, fallback_at, ended_at, succeeded, failed, requeued, late, error
 FROM provider_batches";

fn batch_from_row(r: &Row) -> ProviderBatch {
    let stage: String = r.get(4);
    let n = |i: usize| r.get::<_, i64>(i).max(0) as u64;
    ProviderBatch {
        id: r.get(0),
        provider: r.get(1),
        model: r.get(2),
        endpoint: r.get(3),
        stage: BatchStage::parse(&stage).unwrap_or(BatchStage::Done),
        requests: n(5),
        tag: r.get(6),
        file_id: r.get(7),
        remote_id: r.get(8),
        remote_status: r.get(9),
        created_at: r.get(10),
        submitted_at: r.get(11),
        fallback_at: r.get(12),
        ended_at: r.get(13),
        succeeded: n(14),
        failed: n(15),
        requeued: n(16),
        late: n(17),
        error: r.get(18),
    }
}

const SELECT_BATCH_JOB: &str = "SELECT id, custom_id, endpoint, model, body, est_input_tokens,
        est_output_tokens, submitted_at, deadline, attempts FROM jobs";

fn batch_job_from_row(r: &Row) -> BatchJob {
    BatchJob {
        id: r.get(0),
        custom_id: r.get(1),
        endpoint: r.get(2),
        model: r.get(3),
        body: r.get(4),
        est_input_tokens: r.get::<_, i64>(5).max(0) as u64,
        est_output_tokens: r.get::<_, i64>(6).max(0) as u64,
        submitted_at: r.get(7),
        deadline: r.get(8),
        attempts: r.get::<_, i64>(9).max(0) as u32,
    }
}

/// Running jobs of a batch back to the queue, the attempt taken back
/// (nothing ran).
const REQUEUE_BATCH_JOBS: &str = "UPDATE jobs SET state = 'queued', provider_batch_id = NULL,
        attempts = GREATEST(attempts - 1, 0)
 WHERE state = 'running' AND provider_batch_id = $1";

/// Locks a batch's row for the rest of the transaction and returns its
/// state (`None`: no such batch). Every change to a batch takes this lock
/// before its jobs', so two daemons acting on one batch serialise here.
fn lock_batch(tx: &mut postgres::Transaction, batch: i64) -> Result<Option<String>> {
    Ok(tx
        .query_opt(
            "SELECT state FROM provider_batches WHERE id = $1 FOR UPDATE",
            &[&batch],
        )?
        .map(|r| r.get(0)))
}

/// What retention purges (see `store::maintenance`): finished jobs past the
/// cutoff, delivered, not purged yet, after an id, in id order. Rows
/// another transaction holds are skipped (the next pass takes them).
const PURGE_JOBS: &str = "WITH c AS (
     SELECT j.id FROM jobs AS j LEFT JOIN sources AS s ON s.id = j.source_id
     WHERE j.id > $1 AND j.state IN ('succeeded', 'failed', 'expired', 'cancelled') AND j.completed_at < $2
       AND (s.origin IS DISTINCT FROM 'inbox' OR s.outbox_written_at IS NOT NULL)
       AND (j.body <> '' OR j.options IS NOT NULL OR j.response IS NOT NULL)
     ORDER BY j.id LIMIT $3
     FOR UPDATE OF j SKIP LOCKED)
 UPDATE jobs SET body = '', options = NULL, response = NULL FROM c
 WHERE jobs.id = c.id
 RETURNING jobs.id";

impl Postgres {
    /// Records a provider batch owned by this daemon (`owner` = its node)
    /// and moves its jobs from queued to running in it, counting an
    /// attempt, in one transaction (before anything is uploaded). The jobs
    /// are claimed `FOR UPDATE SKIP LOCKED`: one being claimed by another
    /// daemon at the same moment is left out, like one no longer queued.
    /// Returns the batch id and the jobs claimed, in the order given;
    /// `None` if none was (nothing is recorded then).
    pub fn create_provider_batch(
        &self,
        b: &NewProviderBatch,
        job_ids: &[i64],
    ) -> Result<Option<(i64, Vec<i64>)>> {
        self.run(|c: &mut Conn| {
            let mut tx = c.transaction()?;
            // Claimed first, so that a batch with no jobs takes no id (as
            // SQLite's rolled-back insert does not).
            let claimed: HashSet<i64> = tx
                .query(
                    "SELECT id FROM jobs WHERE id = ANY($1) AND state = 'queued'
                     ORDER BY id FOR UPDATE SKIP LOCKED",
                    &[&job_ids],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // In the order given, each once (as SQLite's one-by-one updates).
            let mut seen = HashSet::with_capacity(claimed.len());
            let started: Vec<i64> = job_ids
                .iter()
                .copied()
                .filter(|j| claimed.contains(j) && seen.insert(*j))
                .collect();
            if started.is_empty() {
                return Ok(None);
            }
            let id: i64 = tx
                .query_one(
                    "SELECT nextval(pg_get_serial_sequence('provider_batches', 'id'))",
                    &[],
                )?
                .get(0);
            // The tag names the batch uniquely even if the database is
            // replaced (ids start again at 1): its creation time is part of it.
            tx.execute(
                "INSERT INTO provider_batches (id, provider, model, endpoint, requests, tag, created_at,
                                               fallback_at, owner)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &id,
                    &b.provider,
                    &b.model,
                    &b.endpoint,
                    &(started.len() as i64),
                    &format!("nightshift-{id}-{}", b.now_ms),
                    &b.now_ms,
                    &b.fallback_at,
                    &self.node,
                ],
            )?;
            let n = tx.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = NULL,
                        lease_until = NULL, provider = $2, provider_model = $3, dispatched_at = $4,
                        provider_channel = 'batch', provider_batch_id = $5
                 WHERE id = ANY($1) AND state = 'queued'",
                &[&started, &b.provider, &b.model, &b.now_ms, &id],
            )?;
            // The rows are ours since the claim: none can have moved.
            debug_assert_eq!(n as usize, started.len());
            tx.commit()?;
            Ok(Some((id, started)))
        })
    }

    /// The provider batches not done yet, oldest first: every daemon's (any
    /// daemon may poll a batch; its `owner` created it), as SQLite's one
    /// daemon sees all of its own.
    pub fn open_provider_batches(&self) -> Result<Vec<ProviderBatch>> {
        self.run(|c| {
            Ok(c.query(
                &format!("{SELECT_BATCH} WHERE state <> 'done' ORDER BY id"),
                &[],
            )?
            .iter()
            .map(batch_from_row)
            .collect())
        })
    }

    /// One provider batch.
    pub fn provider_batch(&self, id: i64) -> Result<Option<ProviderBatch>> {
        self.run(|c| {
            Ok(
                c.query_opt(&format!("{SELECT_BATCH} WHERE id = $1"), &[&id])?
                    .as_ref()
                    .map(batch_from_row),
            )
        })
    }

    /// The most recent provider batches, newest first.
    pub fn recent_provider_batches(&self, limit: usize) -> Result<Vec<ProviderBatch>> {
        let limit = limit.min(10_000) as i64;
        self.run(|c| {
            Ok(c.query(
                &format!("{SELECT_BATCH} ORDER BY id DESC LIMIT $1"),
                &[&limit],
            )?
            .iter()
            .map(batch_from_row)
            .collect())
        })
    }

    /// Provider batches by stage (for metrics).
    pub fn provider_batch_counts(&self) -> Result<Vec<(String, String, u64)>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT provider, CASE WHEN state = 'done' AND error IS NOT NULL THEN 'failed' ELSE state END,
                        COUNT(*)
                 FROM provider_batches GROUP BY 1, 2",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2).max(0) as u64))
            .collect())
        })
    }

    /// The jobs still running in a batch, in id order.
    pub fn provider_batch_jobs(&self, batch: i64) -> Result<Vec<BatchJob>> {
        self.run(|c| {
            Ok(c.query(
                &format!(
                    "{SELECT_BATCH_JOB} WHERE state = 'running' AND provider_batch_id = $1 ORDER BY id"
                ),
                &[&batch],
            )?
            .iter()
            .map(batch_job_from_row)
            .collect())
        })
    }

    /// These jobs, whatever their state, in the order given (lines of a
    /// batch whose jobs the deadline guard re-queued).
    pub fn batch_jobs_by_id(&self, ids: &[i64]) -> Result<Vec<BatchJob>> {
        let found: HashMap<i64, BatchJob> = self.run(|c| {
            Ok(
                c.query(&format!("{SELECT_BATCH_JOB} WHERE id = ANY($1)"), &[&ids])?
                    .iter()
                    .map(|r| {
                        let j = batch_job_from_row(r);
                        (j.id, j)
                    })
                    .collect(),
            )
        })?;
        Ok(ids.iter().filter_map(|id| found.get(id).cloned()).collect())
    }

    /// The batch's input file was uploaded (`file_id`), or, where there is
    /// no upload (`None`), it is about to be created: from here the
    /// provider may have it.
    pub fn provider_batch_creating(&self, batch: i64, file_id: Option<&str>) -> Result<()> {
        self.run(|c| {
            c.execute(
                "UPDATE provider_batches SET state = 'creating', file_id = COALESCE($2::TEXT, file_id)
                 WHERE id = $1 AND state IN ('prepared', 'creating')",
                &[&batch, &file_id],
            )?;
            Ok(())
        })
    }

    /// The provider created the batch as `remote_id`.
    pub fn provider_batch_submitted(
        &self,
        batch: i64,
        remote_id: &str,
        status: &str,
        now_ms: i64,
    ) -> Result<()> {
        self.run(|c| {
            c.execute(
                "UPDATE provider_batches SET state = 'submitted', remote_id = $2, remote_status = $3,
                        submitted_at = COALESCE(submitted_at, $4)
                 WHERE id = $1 AND state IN ('prepared', 'creating')",
                &[&batch, &remote_id, &status, &now_ms],
            )?;
            Ok(())
        })
    }

    /// The provider's status word for the batch, as last polled.
    pub fn provider_batch_status(&self, batch: i64, status: &str) -> Result<()> {
        self.run(|c| {
            c.execute(
                "UPDATE provider_batches SET remote_status = $2 WHERE id = $1",
                &[&batch, &status],
            )?;
            Ok(())
        })
    }

    /// The deadline guard: the batch is being cancelled at the provider and
    /// its jobs go back to the queue now, to run synchronously (attempt not
    /// counted). Returns the jobs re-queued (0 for a second daemon doing the
    /// same: it waits on the batch's row and finds them re-queued).
    pub fn provider_batch_cancelling(&self, batch: i64, status: &str) -> Result<u64> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            lock_batch(&mut tx, batch)?;
            let n = tx.execute(REQUEUE_BATCH_JOBS, &[&batch])?;
            tx.execute(
                "UPDATE provider_batches SET state = 'cancelling', remote_status = $2, requeued = requeued + $3
                 WHERE id = $1 AND state <> 'done'",
                &[&batch, &status, &(n as i64)],
            )?;
            tx.commit()?;
            Ok(n)
        })
    }

    /// The batch will not run: its jobs go back to the queue with the
    /// attempt not counted, and it is done with `error`. Returns the jobs
    /// re-queued. A batch already done (another daemon applied or abandoned
    /// it meanwhile) keeps its outcome: nothing changes and 0 is returned.
    pub fn provider_batch_abandoned(&self, batch: i64, error: &str, now_ms: i64) -> Result<u64> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            if lock_batch(&mut tx, batch)?.as_deref() == Some("done") {
                return Ok(0);
            }
            let n = tx.execute(REQUEUE_BATCH_JOBS, &[&batch])?;
            tx.execute(
                "UPDATE provider_batches SET state = 'done', error = $2, ended_at = $3, requeued = requeued + $4
                 WHERE id = $1",
                &[&batch, &error, &now_ms, &(n as i64)],
            )?;
            tx.commit()?;
            Ok(n)
        })
    }

    /// Applies an ended batch's results and marks it done, in one
    /// transaction (see the SQLite store's for what each line does). The
    /// batch's row is locked first: a second daemon applying the same batch
    /// waits, finds it done and applies nothing. Then every job the lines
    /// name or the batch holds is locked in id order, so two transactions
    /// over the same jobs cannot deadlock.
    pub fn apply_provider_batch(
        &self,
        batch: &ProviderBatch,
        lines: &[LineRecord],
        status: &str,
        now_ms: i64,
    ) -> Result<Applied> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            // No such batch is an error, as in SQLite.
            let state: String = tx
                .query_one(
                    "SELECT state FROM provider_batches WHERE id = $1 FOR UPDATE",
                    &[&batch.id],
                )?
                .get(0);
            if state == "done" {
                return Ok(Applied::default());
            }
            let named: Vec<i64> = lines.iter().map(|l| l.job_id).collect();
            tx.execute(
                "SELECT id FROM jobs
                 WHERE id = ANY($1) OR (state = 'running' AND provider_batch_id = $2)
                 ORDER BY id FOR UPDATE",
                &[&named, &batch.id],
            )?;
            let finish = tx.prepare(
                "UPDATE jobs SET state = $3, completed_at = $4, status_code = $5, request_id = $6,
                        response = $7, error_code = $8, error_message = $9, input_tokens = $10,
                        output_tokens = $11, cost_usd = $12, list_cost_usd = $13,
                        lease_owner = NULL, lease_until = NULL,
                        provider = $14, provider_model = $15, provider_channel = 'batch',
                        provider_batch_id = $2, dispatched_at = COALESCE(dispatched_at, $16)
                 WHERE id = $1 AND ((state = 'running' AND provider_batch_id = $2) OR state = 'queued')",
            )?;
            let retry = tx.prepare(
                "UPDATE jobs SET state = 'queued', not_before = $3, provider_batch_id = NULL,
                        status_code = $4, request_id = $5, response = $6, error_code = $7, error_message = $8
                 WHERE id = $1 AND state = 'running' AND provider_batch_id = $2",
            )?;
            let not_run = tx.prepare(
                "UPDATE jobs SET state = 'queued', provider_batch_id = NULL, attempts = GREATEST(attempts - 1, 0)
                 WHERE id = $1 AND state = 'running' AND provider_batch_id = $2",
            )?;
            let owner = tx.prepare(
                "SELECT state, provider_batch_id IS NOT DISTINCT FROM $2 FROM jobs WHERE id = $1",
            )?;
            let late = tx.prepare(
                "UPDATE jobs SET late_answers = late_answers + 1, late_cost_usd = late_cost_usd + $2
                 WHERE id = $1",
            )?;
            let dispatched = batch.submitted_at.unwrap_or(batch.created_at);
            let mut applied = Applied::default();
            for line in lines {
                let changed = match &line.effect {
                    LineEffect::Finish(f) => {
                        let n = tx.execute(
                            &finish,
                            &[
                                &line.job_id,
                                &batch.id,
                                &if f.succeeded { "succeeded" } else { "failed" },
                                &f.completed_at,
                                &f.status_code.map(i64::from),
                                &f.request_id,
                                &f.response,
                                &f.error_code,
                                &f.error_message,
                                &f.input_tokens.map(|x| x as i64),
                                &f.output_tokens.map(|x| x as i64),
                                &f.cost_usd,
                                &f.list_cost_usd,
                                &batch.provider,
                                &batch.model,
                                &dispatched,
                            ],
                        )?;
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
                        let n = tx.execute(
                            &retry,
                            &[
                                &line.job_id,
                                &batch.id,
                                not_before,
                                &last.status_code.map(i64::from),
                                &last.request_id,
                                &last.response,
                                &last.error_code,
                                &last.error_message,
                            ],
                        )?;
                        applied.requeued += n;
                        n == 1
                    }
                    LineEffect::NotRun => {
                        let n = tx.execute(&not_run, &[&line.job_id, &batch.id])?;
                        applied.requeued += n;
                        // Nothing ran, nothing was billed: never late.
                        true
                    }
                };
                if changed {
                    continue;
                }
                let state: Option<(String, bool)> = tx
                    .query_opt(&owner, &[&line.job_id, &batch.id])?
                    .map(|r| (r.get(0), r.get(1)));
                match state {
                    // This batch finished it already (results applied twice).
                    Some((s, true)) if s != "running" && s != "queued" => {}
                    // Re-run (or running) elsewhere: paid for, not the result.
                    Some(_) if line.cost_usd > 0.0 => {
                        tx.execute(&late, &[&line.job_id, &line.cost_usd])?;
                        applied.late += 1;
                    }
                    _ => {}
                }
            }
            // Jobs the provider returned nothing for: nothing ran.
            applied.requeued += tx.execute(REQUEUE_BATCH_JOBS, &[&batch.id])?;
            tx.execute(
                "UPDATE provider_batches SET state = 'done', remote_status = $2, ended_at = $3,
                        succeeded = succeeded + $4, failed = failed + $5, requeued = requeued + $6,
                        late = late + $7
                 WHERE id = $1",
                &[
                    &batch.id,
                    &status,
                    &now_ms,
                    &(applied.succeeded as i64),
                    &(applied.failed as i64),
                    &(applied.requeued as i64),
                    &(applied.late as i64),
                ],
            )?;
            tx.commit()?;
            Ok(applied)
        })
    }

    /// Retention, as the SQLite store's `purge_before`: drops the body,
    /// options and response of finished, delivered jobs completed before
    /// `cutoff_ms`, then the content of old uploads no open batch reads.
    /// At most `batch` jobs per transaction (one statement that finds and
    /// purges them), `keep_going` asked before each; rows another daemon
    /// holds locked are skipped rather than waited for (a later pass
    /// purges them), and a job another daemon purged meanwhile is not
    /// counted twice.
    pub fn purge_before(
        &self,
        cutoff_ms: i64,
        batch: usize,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Purged> {
        let batch = batch.max(1);
        let limit = batch as i64;
        let mut out = Purged::default();
        let mut after = 0i64;
        loop {
            if !keep_going() {
                out.interrupted = true;
                return Ok(out);
            }
            let ids: Vec<i64> = self.run(|c| {
                Ok(c.query(PURGE_JOBS, &[&after, &cutoff_ms, &limit])?
                    .iter()
                    .map(|r| r.get(0))
                    .collect())
            })?;
            let Some(&last) = ids.iter().max() else { break };
            after = last;
            out.jobs += ids.len() as u64;
            out.transactions += 1;
            if ids.len() < batch {
                break;
            }
        }

        let files: Vec<i64> = self.run(|c| {
            Ok(c.query(
                "SELECT id FROM files WHERE kind = 'input' AND content IS NOT NULL AND created_at < $1
                 ORDER BY id",
                &[&cutoff_ms],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })?;
        for id in files {
            if !keep_going() {
                out.interrupted = true;
                return Ok(out);
            }
            let n = self.run(|c| {
                let mut tx = c.transaction()?;
                // FOR UPDATE conflicts with the key-share lock a batch being
                // created from this file holds (its foreign key): that batch
                // is committed, and seen by the check below, before this
                // goes on; one created after finds the content gone, as in
                // SQLite when the purge commits first.
                tx.execute("SELECT 1 FROM files WHERE id = $1 FOR UPDATE", &[&id])?;
                let n = tx.execute(
                    "UPDATE files SET content = NULL
                     WHERE id = $1 AND content IS NOT NULL AND created_at < $2
                       AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file_id = files.id
                                       AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling'))",
                    &[&id, &cutoff_ms],
                )?;
                tx.commit()?;
                Ok(n)
            })?;
            out.files += n;
            out.transactions += 1;
        }
        Ok(out)
    }

    /// PostgreSQL has no WAL checkpoint for nightshift to run (its own
    /// checkpointer does this): reports nothing done, never busy.
    pub fn wal_checkpoint(&self, mode: CheckpointMode) -> Result<Checkpoint> {
        Ok(Checkpoint {
            mode,
            busy: false,
            log_frames: 0,
            checkpointed_frames: 0,
        })
    }
}
