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
//! - A step at the provider (`creating`, `submitted`) is one conditional
//!   UPDATE from the states it may follow. Cancelling, abandoning and
//!   applying lock the batch's row first (applying then locks every job it
//!   touches, in id order), so two daemons ending one batch at once
//!   serialise and the second finds the work done: nothing re-queued twice,
//!   results applied once.
//! - One difference from SQLite, where it cannot happen: abandoning a batch
//!   another daemon has already ended changes nothing (its outcome stays).

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

#[cfg(test)]
mod tests {
    //! The same steps on both backends through the `Store` facade, with the
    //! same answers; and what only a shared database needs (two daemons).

    use super::*;
    use crate::config::Config;
    use crate::config::database::{Database, Target};
    use crate::domain::job::{JobContext, NewJob, parse_line};
    use crate::store::pg::testing;
    use chrono::{DateTime, Utc};

    const T0: i64 = 1_800_000_000_000;
    const DAY: i64 = 86_400_000;
    const PROVIDER: &str = "openai";
    const MODEL: &str = "gpt-test";
    const CHAT: &str = "/v1/chat/completions";

    /// Valid jobs named `ids`, submitted at `at_ms`.
    fn new_jobs(ids: &[&str], at_ms: i64) -> Vec<NewJob> {
        let config = Config::embedded_default();
        let ctx = JobContext {
            catalog: &config.catalog,
            now: DateTime::<Utc>::from_timestamp_millis(at_ms).unwrap(),
            default_deadline: std::time::Duration::from_secs(86_400),
        };
        ids.iter()
            .map(|id| {
                parse_line(
                    &format!(
                        r#"{{"custom_id":"{id}","method":"POST","url":"{CHAT}","body":{{"model":"cheap-chat","messages":[{{"role":"user","content":"text of {id}"}}],"max_tokens":16}},"nightshift":{{"deadline":"100d"}}}}"#
                    ),
                    &ctx,
                )
                .unwrap()
            })
            .collect()
    }

    /// Queues `jobs` as one source: `Store::ingest` on SQLite; on
    /// PostgreSQL (whose `ingest` is ported elsewhere) the same rows written
    /// with plain SQL. Returns the source id and the job ids in line order.
    fn queue(
        store: &Store,
        origin: Origin,
        stem: &str,
        jobs: &[NewJob],
        at_ms: i64,
    ) -> (i64, Vec<i64>) {
        let source = NewSource {
            origin,
            name: stem,
            stem,
            sha256: None,
            now_ms: at_ms,
        };
        match store.backend() {
            Backend::Sqlite(s) => {
                let summary = s
                    .ingest(
                        &source,
                        jobs.iter().enumerate().map(|(i, j)| {
                            Ok(LineOutcome {
                                line: i as u64 + 1,
                                job: Ok(j.clone()),
                            })
                        }),
                    )
                    .unwrap();
                assert_eq!(summary.queued as usize, jobs.len());
                let ids = s
                    .job_ids_of(summary.source_id)
                    .unwrap()
                    .into_iter()
                    .map(|(id, _, _)| id)
                    .collect();
                (summary.source_id, ids)
            }
            Backend::Postgres(p) => pg_ingest(p, &source, jobs),
        }
    }

    /// What SQLite's `ingest` writes for valid lines, in PostgreSQL.
    fn pg_ingest(p: &Postgres, source: &NewSource, jobs: &[NewJob]) -> (i64, Vec<i64>) {
        p.run(|c| {
            let mut tx = c.transaction()?;
            let n = jobs.len() as i64;
            let source_id: i64 = tx
                .query_one(
                    "INSERT INTO sources (origin, name, stem, sha256, ingested_at, total_lines, valid_jobs,
                                          invalid_lines, node)
                     VALUES ($1, $2, $3, $4, $5, $6, $6, 0, $7) RETURNING id",
                    &[
                        &source.origin.as_str(),
                        &source.name,
                        &source.stem,
                        &source.sha256,
                        &source.now_ms,
                        &n,
                        &p.node,
                    ],
                )?
                .get(0);
            let mut ids = Vec::with_capacity(jobs.len());
            for (i, job) in jobs.iter().enumerate() {
                tx.execute(
                    "INSERT INTO routes (key) VALUES ($1) ON CONFLICT (key) DO NOTHING",
                    &[&job.route_key],
                )?;
                let route: i64 = tx
                    .query_one("SELECT id FROM routes WHERE key = $1", &[&job.route_key])?
                    .get(0);
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO jobs (source_id, line, custom_id, endpoint, model, body, options, priority,
                                           est_input_tokens, est_output_tokens, submitted_at, deadline,
                                           route_id, size_bin)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id",
                        &[
                            &source_id,
                            &(i as i64 + 1),
                            &job.custom_id,
                            &job.endpoint.as_url(),
                            &job.model,
                            &job.body,
                            &job.options,
                            &job.priority,
                            &(job.estimate.input as i64),
                            &(job.estimate.output as i64),
                            &source.now_ms,
                            &job.deadline.timestamp_millis(),
                            &route,
                            &crate::domain::estimate::size_bin(job.estimate.output),
                        ],
                    )?
                    .get(0);
                ids.push(id);
            }
            tx.commit()?;
            Ok((source_id, ids))
        })
        .unwrap()
    }

    /// Runs one statement of the tests' own SQL (written to mean the same
    /// on both backends).
    fn exec(store: &Store, sql: &str) {
        match store.backend() {
            Backend::Sqlite(s) => {
                s.conn().execute_batch(sql).unwrap();
            }
            Backend::Postgres(p) => p
                .run(|c| {
                    c.batch_execute(sql)?;
                    Ok(())
                })
                .unwrap(),
        }
    }

    /// One BIGINT answer.
    fn int(store: &Store, sql: &str) -> Option<i64> {
        match store.backend() {
            Backend::Sqlite(s) => s.conn().query_row(sql, [], |r| r.get(0)).unwrap(),
            Backend::Postgres(p) => p.run(|c| Ok(c.query_one(sql, &[])?.get(0))).unwrap(),
        }
    }

    /// A job's row, as far as batches touch it.
    #[derive(Debug, Clone, PartialEq)]
    struct Snap {
        state: String,
        attempts: i64,
        batch: Option<i64>,
        provider: Option<String>,
        provider_model: Option<String>,
        channel: Option<String>,
        lease_owner: Option<String>,
        dispatched_at: Option<i64>,
        not_before: i64,
        completed_at: Option<i64>,
        status_code: Option<i64>,
        request_id: Option<String>,
        error_code: Option<String>,
        input_tokens: Option<i64>,
        output_tokens: Option<i64>,
        cost_usd: Option<f64>,
        late_answers: i64,
        late_cost_usd: f64,
        body: String,
        options: Option<String>,
        response: Option<String>,
    }

    const SNAP: &str = "SELECT state, attempts, provider_batch_id, provider, provider_model, provider_channel,
            lease_owner, dispatched_at, not_before, completed_at, status_code, request_id, error_code,
            input_tokens, output_tokens, cost_usd, late_answers, late_cost_usd, body, options, response
     FROM jobs WHERE id = ";

    fn snap(store: &Store, id: i64) -> Snap {
        let sql = format!("{SNAP}{id}");
        macro_rules! snap_of {
            ($r:expr, $get:ident) => {
                Snap {
                    state: $r.$get(0),
                    attempts: $r.$get(1),
                    batch: $r.$get(2),
                    provider: $r.$get(3),
                    provider_model: $r.$get(4),
                    channel: $r.$get(5),
                    lease_owner: $r.$get(6),
                    dispatched_at: $r.$get(7),
                    not_before: $r.$get(8),
                    completed_at: $r.$get(9),
                    status_code: $r.$get(10),
                    request_id: $r.$get(11),
                    error_code: $r.$get(12),
                    input_tokens: $r.$get(13),
                    output_tokens: $r.$get(14),
                    cost_usd: $r.$get(15),
                    late_answers: $r.$get(16),
                    late_cost_usd: $r.$get(17),
                    body: $r.$get(18),
                    options: $r.$get(19),
                    response: $r.$get(20),
                }
            };
        }
        match store.backend() {
            Backend::Sqlite(s) => s
                .conn()
                .query_row(&sql, [], |r| {
                    trait Get {
                        fn g<T: rusqlite::types::FromSql>(&self, i: usize) -> T;
                    }
                    impl Get for rusqlite::Row<'_> {
                        fn g<T: rusqlite::types::FromSql>(&self, i: usize) -> T {
                            self.get(i).unwrap()
                        }
                    }
                    Ok(snap_of!(r, g))
                })
                .unwrap(),
            Backend::Postgres(p) => p
                .run(|c| {
                    let r = c.query_one(&sql, &[])?;
                    Ok(snap_of!(r, get))
                })
                .unwrap(),
        }
    }

    fn new_batch(now_ms: i64) -> NewProviderBatch<'static> {
        NewProviderBatch {
            provider: PROVIDER,
            model: MODEL,
            endpoint: CHAT,
            fallback_at: now_ms + DAY,
            now_ms,
        }
    }

    fn ok(at_ms: i64, cost: f64) -> Finish {
        Finish {
            succeeded: true,
            completed_at: at_ms,
            status_code: Some(200),
            request_id: Some("req".into()),
            response: Some(r#"{"choices":[]}"#.into()),
            input_tokens: Some(30),
            output_tokens: Some(5),
            cost_usd: Some(cost),
            list_cost_usd: Some(2.0 * cost),
            ..Finish::default()
        }
    }

    fn line(job_id: i64, effect: LineEffect, cost_usd: f64) -> LineRecord {
        LineRecord {
            job_id,
            effect,
            cost_usd,
        }
    }

    fn ids(jobs: &[BatchJob]) -> Vec<i64> {
        jobs.iter().map(|j| j.id).collect()
    }

    fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
        v.sort();
        v
    }

    /// Runs `steps` on each backend and checks that both observed the same.
    fn on_both<T: PartialEq + std::fmt::Debug>(steps: impl Fn(&Store) -> T) {
        let seen: Vec<(&'static str, T)> = testing::backends()
            .iter()
            .map(|(store, _dir)| (store.kind(), steps(store)))
            .collect();
        assert_eq!(seen[0].0, "sqlite");
        assert_eq!(seen[1].0, "postgresql");
        assert_eq!(seen[0].1, seen[1].1, "the backends disagree");
    }

    #[test]
    fn a_provider_batch_lives_from_creation_to_its_applied_results_alike_on_both_backends() {
        on_both(|store| {
            let (_, j) = queue(
                store,
                Origin::Api,
                "api",
                &new_jobs(&["a", "b", "c", "d", "e", "f"], T0),
                T0,
            );
            let mut seen = Vec::new();
            // One job no longer queued: left out, like one that does not exist.
            exec(
                store,
                &format!("UPDATE jobs SET state = 'cancelled' WHERE id = {}", j[5]),
            );
            let asked = [j[0], j[1], j[2], j[3], j[4], j[5], 999, j[0]];
            let (id, started) = store
                .create_provider_batch(&new_batch(T0), &asked)
                .unwrap()
                .expect("a batch");
            assert_eq!(started, j[..5]);
            // None of them queued any more: nothing is recorded.
            assert_eq!(
                store
                    .create_provider_batch(&new_batch(T0), &j[..2])
                    .unwrap(),
                None
            );
            assert_eq!(
                store.create_provider_batch(&new_batch(T0), &[]).unwrap(),
                None
            );

            let b = store.provider_batch(id).unwrap().unwrap();
            assert_eq!(
                (
                    b.stage,
                    b.requests,
                    b.tag.as_str(),
                    b.created_at,
                    b.fallback_at
                ),
                (
                    BatchStage::Prepared,
                    5,
                    format!("nightshift-{id}-{T0}").as_str(),
                    T0,
                    T0 + DAY
                )
            );
            assert_eq!(
                store.open_provider_batches().unwrap(),
                std::slice::from_ref(&b)
            );
            assert_eq!(store.provider_batch(id + 1).unwrap(), None);
            let s = snap(store, j[0]);
            assert_eq!(
                (
                    s.state.as_str(),
                    s.attempts,
                    s.batch,
                    s.channel.as_deref(),
                    s.dispatched_at
                ),
                ("running", 1, Some(id), Some("batch"), Some(T0))
            );
            let jobs = store.provider_batch_jobs(id).unwrap();
            assert_eq!(ids(&jobs), j[..5]);
            assert!(jobs.iter().all(|x| x.attempts == 1 && x.endpoint == CHAT));
            // By id: in the order asked, repeats repeated, unknown ids left out.
            assert_eq!(
                ids(&store
                    .batch_jobs_by_id(&[j[2], j[0], 999, j[2], j[5]])
                    .unwrap()),
                [j[2], j[0], j[2], j[5]]
            );
            seen.push(format!("{jobs:?}"));

            store.provider_batch_creating(id, Some("file-1")).unwrap();
            store.provider_batch_creating(id, None).unwrap();
            let b = store.provider_batch(id).unwrap().unwrap();
            assert_eq!(
                (b.stage, b.file_id.as_deref()),
                (BatchStage::Creating, Some("file-1"))
            );
            store
                .provider_batch_submitted(id, "remote-1", "validating", T0 + 1_000)
                .unwrap();
            // Once submitted, a second "submitted" (or "creating") changes nothing.
            store
                .provider_batch_submitted(id, "remote-2", "validating", T0 + 2_000)
                .unwrap();
            store.provider_batch_creating(id, Some("file-2")).unwrap();
            store.provider_batch_status(id, "in_progress").unwrap();
            let b = store.provider_batch(id).unwrap().unwrap();
            assert_eq!(
                (
                    b.stage,
                    b.remote_id.as_deref(),
                    b.remote_status.as_deref(),
                    b.submitted_at,
                    b.file_id.as_deref()
                ),
                (
                    BatchStage::Submitted,
                    Some("remote-1"),
                    Some("in_progress"),
                    Some(T0 + 1_000),
                    Some("file-1")
                )
            );
            seen.push(format!("{:?}", store.provider_batch_counts().unwrap()));

            let failed = Finish {
                succeeded: false,
                completed_at: T0 + 3_000,
                status_code: Some(400),
                error_code: Some("invalid_request".into()),
                error_message: Some("bad".into()),
                ..Finish::default()
            };
            let retry = Finish {
                completed_at: T0 + 3_000,
                status_code: Some(500),
                error_code: Some("server_error".into()),
                ..Finish::default()
            };
            let lines = [
                line(j[0], LineEffect::Finish(ok(T0 + 3_000, 0.01)), 0.01),
                line(j[1], LineEffect::Finish(failed), 0.0),
                line(
                    j[2],
                    LineEffect::Retry {
                        not_before: T0 + 5_000,
                        last: retry,
                    },
                    0.0,
                ),
                line(j[3], LineEffect::NotRun, 0.0),
                // j[4]: no line (nothing ran). j[5] was never this batch's:
                // an answer for it is late; an unknown job's is nothing.
                line(j[5], LineEffect::Finish(ok(T0 + 3_000, 0.02)), 0.02),
                line(999, LineEffect::Finish(ok(T0 + 3_000, 0.02)), 0.02),
            ];
            let applied = store
                .apply_provider_batch(&b, &lines, "completed", T0 + 4_000)
                .unwrap();
            assert_eq!(
                applied,
                Applied {
                    succeeded: 1,
                    failed: 1,
                    requeued: 3,
                    late: 1
                }
            );
            let s = snap(store, j[0]);
            assert_eq!(
                (
                    s.state.as_str(),
                    s.attempts,
                    s.batch,
                    s.completed_at,
                    s.status_code,
                    s.input_tokens,
                    s.cost_usd,
                    s.provider.as_deref(),
                    s.provider_model.as_deref(),
                    s.channel.as_deref()
                ),
                (
                    "succeeded",
                    1,
                    Some(id),
                    Some(T0 + 3_000),
                    Some(200),
                    Some(30),
                    Some(0.01),
                    Some(PROVIDER),
                    Some(MODEL),
                    Some("batch")
                )
            );
            let s = snap(store, j[1]);
            assert_eq!(
                (s.state.as_str(), s.error_code.as_deref(), s.status_code),
                ("failed", Some("invalid_request"), Some(400))
            );
            let s = snap(store, j[2]);
            assert_eq!(
                (
                    s.state.as_str(),
                    s.attempts,
                    s.batch,
                    s.not_before,
                    s.status_code
                ),
                ("queued", 1, None, T0 + 5_000, Some(500))
            );
            for k in [3, 4] {
                let s = snap(store, j[k]);
                assert_eq!((s.state.as_str(), s.attempts, s.batch), ("queued", 0, None));
            }
            let s = snap(store, j[5]);
            assert_eq!(
                (s.state.as_str(), s.late_answers, s.late_cost_usd),
                ("cancelled", 1, 0.02)
            );
            let done = store.provider_batch(id).unwrap().unwrap();
            assert_eq!(
                (
                    done.stage,
                    done.remote_status.as_deref(),
                    done.ended_at,
                    done.succeeded,
                    done.failed,
                    done.requeued,
                    done.late
                ),
                (
                    BatchStage::Done,
                    Some("completed"),
                    Some(T0 + 4_000),
                    1,
                    1,
                    3,
                    1
                )
            );
            // Applied twice, applied once.
            assert_eq!(
                store
                    .apply_provider_batch(&b, &lines, "completed", T0 + 9_000)
                    .unwrap(),
                Applied::default()
            );
            assert_eq!(store.provider_batch(id).unwrap().unwrap(), done);
            assert!(store.provider_batch_jobs(id).unwrap().is_empty());
            assert!(store.open_provider_batches().unwrap().is_empty());
            assert_eq!(
                store.provider_batch_counts().unwrap(),
                [(PROVIDER.to_string(), "done".to_string(), 1)]
            );
            seen.push(format!("{done:?}"));
            seen.extend(j.iter().map(|&x| format!("{:?}", snap(store, x))));
            seen
        });
    }

    #[test]
    fn cancelling_and_abandoning_requeue_their_jobs_and_listings_agree_on_both_backends() {
        on_both(|store| {
            let (_, j) = queue(
                store,
                Origin::Api,
                "api",
                &new_jobs(&["a", "b", "c", "d", "e"], T0),
                T0,
            );
            let (a, _) = store
                .create_provider_batch(&new_batch(T0), &j[..2])
                .unwrap()
                .unwrap();
            let (b, _) = store
                .create_provider_batch(&new_batch(T0 + 1), &j[2..4])
                .unwrap()
                .unwrap();
            store.provider_batch_creating(a, None).unwrap();
            store
                .provider_batch_submitted(a, "ra", "in_progress", T0 + 10)
                .unwrap();
            let open = || -> Vec<i64> {
                store
                    .open_provider_batches()
                    .unwrap()
                    .iter()
                    .map(|x| x.id)
                    .collect()
            };
            assert_eq!(open(), [a, b]);

            // The deadline guard: A's jobs back to the queue, attempt not counted.
            assert_eq!(store.provider_batch_cancelling(a, "cancelling").unwrap(), 2);
            assert_eq!(store.provider_batch_cancelling(a, "cancelling").unwrap(), 0);
            for &x in &j[..2] {
                let s = snap(store, x);
                assert_eq!((s.state.as_str(), s.attempts, s.batch), ("queued", 0, None));
            }
            let pa = store.provider_batch(a).unwrap().unwrap();
            assert_eq!(
                (pa.stage, pa.requeued, pa.remote_status.as_deref()),
                (BatchStage::Cancelling, 2, Some("cancelling"))
            );
            // B untouched.
            assert_eq!(ids(&store.provider_batch_jobs(b).unwrap()), j[2..4]);

            // j[1] is re-run meanwhile (in batch C); the cancelled batch's
            // answers still arrive: j[0]'s is its result, j[1]'s is late.
            let (c, _) = store
                .create_provider_batch(&new_batch(T0 + 2), &[j[1], j[4]])
                .unwrap()
                .unwrap();
            let applied = store
                .apply_provider_batch(
                    &pa,
                    &[
                        line(j[0], LineEffect::Finish(ok(T0 + 50, 0.01)), 0.01),
                        line(j[1], LineEffect::Finish(ok(T0 + 50, 0.03)), 0.03),
                    ],
                    "cancelled",
                    T0 + 60,
                )
                .unwrap();
            assert_eq!(
                applied,
                Applied {
                    succeeded: 1,
                    failed: 0,
                    requeued: 0,
                    late: 1
                }
            );
            let s = snap(store, j[0]);
            assert_eq!(
                (s.state.as_str(), s.attempts, s.batch, s.dispatched_at),
                ("succeeded", 0, Some(a), Some(T0))
            );
            let s = snap(store, j[1]);
            assert_eq!(
                (s.state.as_str(), s.batch, s.late_answers, s.late_cost_usd),
                ("running", Some(c), 1, 0.03)
            );

            // B will not run: its jobs back, it is done with the error.
            assert_eq!(
                store
                    .provider_batch_abandoned(b, "refused", T0 + 70)
                    .unwrap(),
                2
            );
            assert_eq!(
                store
                    .provider_batch_abandoned(b, "refused", T0 + 70)
                    .unwrap(),
                0
            );
            for &x in &j[2..4] {
                let s = snap(store, x);
                assert_eq!((s.state.as_str(), s.attempts, s.batch), ("queued", 0, None));
            }
            let pb = store.provider_batch(b).unwrap().unwrap();
            assert_eq!(
                (pb.stage, pb.error.as_deref(), pb.ended_at, pb.requeued),
                (BatchStage::Done, Some("refused"), Some(T0 + 70), 2)
            );

            let recent = |n| -> Vec<i64> {
                store
                    .recent_provider_batches(n)
                    .unwrap()
                    .iter()
                    .map(|x| x.id)
                    .collect()
            };
            assert_eq!(recent(2), [c, b]);
            assert_eq!(recent(10), [c, b, a]);
            assert_eq!(open(), [c]);
            let p = PROVIDER.to_string();
            assert_eq!(
                sorted(store.provider_batch_counts().unwrap()),
                [
                    (p.clone(), "done".to_string(), 1),
                    (p.clone(), "failed".to_string(), 1),
                    (p, "prepared".to_string(), 1)
                ]
            );
            (
                store.recent_provider_batches(10).unwrap(),
                j.iter().map(|&x| snap(store, x)).collect::<Vec<_>>(),
            )
        });
    }

    #[test]
    fn retention_purges_exactly_the_old_delivered_jobs_in_bounded_batches_on_both_backends() {
        on_both(|store| {
            let now = T0 + 60 * DAY;
            let old = now - 40 * DAY;
            let cutoff = now - 30 * DAY;
            let (_, api) = queue(
                store,
                Origin::Api,
                "api",
                &new_jobs(
                    &["a-ok", "a-failed", "a-new", "a-retry", "a-queued"],
                    old - DAY,
                ),
                old - DAY,
            );
            let (inbox, ib) = queue(
                store,
                Origin::Inbox,
                "inbox",
                &new_jobs(&["i-1", "i-2"], old - DAY),
                old - DAY,
            );
            let mut started = api[..4].to_vec();
            started.extend(&ib);
            let (id, _) = store
                .create_provider_batch(&new_batch(old - DAY), &started)
                .unwrap()
                .unwrap();
            let b = store.provider_batch(id).unwrap().unwrap();
            let failed = Finish {
                succeeded: false,
                completed_at: old,
                error_code: Some("x".into()),
                response: Some("{}".into()),
                ..Finish::default()
            };
            let lines = [
                line(api[0], LineEffect::Finish(ok(old, 0.01)), 0.01),
                line(api[1], LineEffect::Finish(failed), 0.0),
                line(api[2], LineEffect::Finish(ok(now - DAY, 0.01)), 0.01),
                line(
                    api[3],
                    LineEffect::Retry {
                        not_before: old,
                        last: Finish::default(),
                    },
                    0.0,
                ),
                line(ib[0], LineEffect::Finish(ok(old, 0.01)), 0.01),
                line(ib[1], LineEffect::Finish(ok(old, 0.01)), 0.01),
            ];
            store
                .apply_provider_batch(&b, &lines, "completed", old)
                .unwrap();
            // Uploads: an old one, an old one an open batch reads, a new one.
            for (name, at) in [("stale", old), ("in-use", old), ("fresh", now)] {
                exec(
                    store,
                    &format!(
                        "INSERT INTO files (purpose, filename, bytes, created_at, content)
                         VALUES ('batch', '{name}', 3, {at}, 'abc')"
                    ),
                );
            }
            exec(
                store,
                &format!(
                    "INSERT INTO batches (input_file_id, endpoint, completion_window, created_at, expires_at)
                     VALUES (2, '{CHAT}', '24h', {old}, {})",
                    old + DAY
                ),
            );
            let before: Vec<Snap> = api.iter().chain(&ib).map(|&x| snap(store, x)).collect();
            let purged = |x: i64| {
                let s = snap(store, x);
                (s.body.as_str(), s.options.as_deref(), s.response.as_deref()) == ("", None, None)
            };

            // One job per transaction: two old API jobs, two transactions;
            // the inbox's are not delivered yet.
            let p = store.purge_before(cutoff, 1, &|| true).unwrap();
            assert_eq!(
                (p.jobs, p.files, p.transactions, p.interrupted),
                (2, 1, 4, false),
                "{p:?}"
            );
            let content_gone = |file: i64| {
                int(
                    store,
                    &format!(
                        "SELECT CAST(CASE WHEN content IS NULL THEN 1 ELSE 0 END AS BIGINT) FROM files WHERE id = {file}"
                    ),
                )
            };
            assert_eq!([1, 2, 3].map(content_gone), [Some(1), Some(0), Some(0)]);
            assert!(purged(api[0]) && purged(api[1]));
            for (k, &x) in api.iter().chain(&ib).enumerate().skip(2) {
                assert_eq!(snap(store, x), before[k], "job {x} untouched");
            }
            // Everything but the payload kept.
            let s = snap(store, api[0]);
            assert_eq!(
                (s.state.as_str(), s.cost_usd, s.completed_at, s.input_tokens),
                ("succeeded", Some(0.01), Some(old), Some(30))
            );

            // Delivered: the inbox's jobs are purged too; a shutdown asked
            // for after the first batch stops the pass there.
            exec(
                store,
                &format!("UPDATE sources SET outbox_written_at = {now} WHERE id = {inbox}"),
            );
            let asked = std::cell::Cell::new(0);
            let p = store
                .purge_before(cutoff, 1, &|| {
                    asked.set(asked.get() + 1);
                    asked.get() <= 1
                })
                .unwrap();
            assert_eq!(
                (p.jobs, p.transactions, p.interrupted),
                (1, 1, true),
                "{p:?}"
            );
            assert!(purged(ib[0]) && !purged(ib[1]));
            let p = store.purge_before(cutoff, 10, &|| true).unwrap();
            assert_eq!(
                (p.jobs, p.files, p.transactions, p.interrupted),
                (1, 0, 2, false)
            );
            assert!(purged(ib[1]));
            let p = store.purge_before(cutoff, 10, &|| true).unwrap();
            // (The upload an open batch reads is looked at again: one transaction.)
            assert_eq!((p.jobs, p.files, p.transactions), (0, 0, 1));
            for &x in &api[2..] {
                assert!(!purged(x), "job {x}");
            }
            api.iter()
                .chain(&ib)
                .map(|&x| snap(store, x))
                .collect::<Vec<_>>()
        });
    }

    #[test]
    fn postgresql_reports_a_checkpoint_that_did_nothing() {
        let backends = testing::backends();
        let pg = &backends[1].0;
        for mode in [CheckpointMode::Passive, CheckpointMode::Truncate] {
            assert_eq!(
                pg.wal_checkpoint(mode).unwrap(),
                Checkpoint {
                    mode,
                    busy: false,
                    log_frames: 0,
                    checkpointed_frames: 0
                }
            );
        }
    }

    fn two_daemons() -> (Store, Store) {
        let url = testing::fresh_database();
        let open = |node: &str| {
            Store::open_database(
                &Database::Postgres(Box::new(Target::parse(&url, None).unwrap())),
                node,
            )
            .unwrap()
        };
        (open("nodeA"), open("nodeB"))
    }

    fn pg(store: &Store) -> &Postgres {
        match store.backend() {
            Backend::Postgres(p) => p,
            Backend::Sqlite(_) => unreachable!(),
        }
    }

    #[test]
    fn two_daemons_batching_the_same_jobs_at_once_put_each_job_in_exactly_one_batch() {
        let (a, b) = two_daemons();
        let names: Vec<String> = (0..400).map(|i| format!("j{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (_, jobs) = pg_ingest(
            pg(&a),
            &NewSource {
                origin: Origin::Api,
                name: "many",
                stem: "many",
                sha256: None,
                now_ms: T0,
            },
            &new_jobs(&refs, T0),
        );
        // Both walk the same jobs at once, A in batches of 25 and B of 40:
        // where they meet, each claims what the other has not locked.
        let barrier = std::sync::Barrier::new(2);
        let run = |store: &Store, chunk: usize| {
            barrier.wait();
            let mut made = Vec::new();
            for chunk in jobs.chunks(chunk) {
                if let Some((id, started)) =
                    store.create_provider_batch(&new_batch(T0), chunk).unwrap()
                {
                    made.push((id, started));
                }
            }
            made
        };
        let (made_a, made_b) = std::thread::scope(|s| {
            let ta = s.spawn(|| run(&a, 25));
            let tb = s.spawn(|| run(&b, 40));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let mut in_batch = std::collections::BTreeMap::new();
        for (node, made) in [("nodeA", &made_a), ("nodeB", &made_b)] {
            for (id, started) in made {
                assert!(!started.is_empty());
                let batch = a.provider_batch(*id).unwrap().unwrap();
                assert_eq!(batch.requests as usize, started.len());
                let owner: Option<String> = pg(&a)
                    .run(|c| {
                        Ok(
                            c.query_one("SELECT owner FROM provider_batches WHERE id = $1", &[id])?
                                .get(0),
                        )
                    })
                    .unwrap();
                assert_eq!(owner.as_deref(), Some(node));
                assert_eq!(
                    sorted(ids(&a.provider_batch_jobs(*id).unwrap())),
                    sorted(started.clone())
                );
                for &j in started {
                    assert_eq!(in_batch.insert(j, *id), None, "job {j} is in two batches");
                }
            }
        }
        assert_eq!(
            in_batch.keys().copied().collect::<Vec<_>>(),
            jobs,
            "every job in a batch"
        );
        for (&j, &id) in &in_batch {
            let s = snap(&a, j);
            assert_eq!(
                (s.state.as_str(), s.attempts, s.batch),
                ("running", 1, Some(id))
            );
        }
        // Every batch recorded has jobs.
        assert_eq!(
            int(&a, "SELECT COUNT(*) FROM provider_batches"),
            Some((made_a.len() + made_b.len()) as i64)
        );
        // Every daemon polls every open batch.
        assert_eq!(
            a.open_provider_batches().unwrap(),
            b.open_provider_batches().unwrap()
        );
        assert_eq!(
            a.open_provider_batches().unwrap().len(),
            made_a.len() + made_b.len()
        );
    }

    #[test]
    fn a_job_another_daemon_is_claiming_is_left_out_not_waited_for() {
        let (a, _b) = two_daemons();
        let (_, jobs) = pg_ingest(
            pg(&a),
            &NewSource {
                origin: Origin::Api,
                name: "x",
                stem: "x",
                sha256: None,
                now_ms: T0,
            },
            &new_jobs(&["x", "y", "z"], T0),
        );
        pg(&a)
            .run(|c| {
                // Another daemon's claim in progress: y's row locked.
                let mut tx = c.transaction()?;
                tx.execute("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", &[&jobs[1]])?;
                let (first, started) = a
                    .create_provider_batch(&new_batch(T0), &jobs)
                    .unwrap()
                    .unwrap();
                assert_eq!(started, [jobs[0], jobs[2]]);
                // Only the locked one: nothing recorded (and no id taken).
                assert_eq!(
                    a.create_provider_batch(&new_batch(T0), &jobs[1..2])
                        .unwrap(),
                    None
                );
                tx.rollback()?;
                // Released, still queued: the next batch has it.
                let (second, started) = a
                    .create_provider_batch(&new_batch(T0), &jobs)
                    .unwrap()
                    .unwrap();
                assert_eq!((second, started), (first + 1, vec![jobs[1]]));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn two_daemons_ending_one_batch_at_once_end_it_once() {
        let (a, b) = two_daemons();
        let names: Vec<String> = (0..50).map(|i| format!("j{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let source = |stem| NewSource {
            origin: Origin::Api,
            name: stem,
            stem,
            sha256: None,
            now_ms: T0,
        };
        let (_, jobs) = pg_ingest(pg(&a), &source("x"), &new_jobs(&refs, T0));
        let (id, _) = a
            .create_provider_batch(&new_batch(T0), &jobs)
            .unwrap()
            .unwrap();
        let batch = a.provider_batch(id).unwrap().unwrap();
        let lines: Vec<LineRecord> = jobs[..40]
            .iter()
            .map(|&j| line(j, LineEffect::Finish(ok(T0 + 1, 0.01)), 0.01))
            .collect();
        // Both apply the same results together: once in all.
        let barrier = std::sync::Barrier::new(2);
        let apply = |s: &Store| {
            barrier.wait();
            s.apply_provider_batch(&batch, &lines, "completed", T0 + 2)
                .unwrap()
        };
        let (x, y) = std::thread::scope(|s| {
            let ta = s.spawn(|| apply(&a));
            let tb = s.spawn(|| apply(&b));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let once = Applied {
            succeeded: 40,
            failed: 0,
            requeued: 10,
            late: 0,
        };
        assert!(
            (x, y) == (once, Applied::default()) || (x, y) == (Applied::default(), once),
            "{x:?} {y:?}"
        );
        let done = a.provider_batch(id).unwrap().unwrap();
        assert_eq!((done.succeeded, done.requeued, done.late), (40, 10, 0));
        assert!(jobs[..40].iter().all(|&j| snap(&a, j).late_answers == 0));

        // Cancelling and abandoning one batch together: its jobs re-queued once.
        let (id, _) = a
            .create_provider_batch(&new_batch(T0), &jobs[40..])
            .unwrap()
            .unwrap();
        let (x, y) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                barrier.wait();
                a.provider_batch_cancelling(id, "cancelling").unwrap()
            });
            let tb = s.spawn(|| {
                barrier.wait();
                b.provider_batch_abandoned(id, "gone", T0 + 3).unwrap()
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        assert_eq!(x + y, 10, "{x} {y}");
        let ended = a.provider_batch(id).unwrap().unwrap();
        assert_eq!((ended.stage, ended.requeued), (BatchStage::Done, 10));
        assert!(jobs[40..].iter().all(|&j| {
            let s = snap(&a, j);
            (s.state.as_str(), s.attempts) == ("queued", 0)
        }));
        // Abandoning a batch another daemon already ended changes nothing.
        assert_eq!(b.provider_batch_abandoned(id, "again", T0 + 4).unwrap(), 0);
        assert_eq!(a.provider_batch(id).unwrap().unwrap(), ended);
    }
}
