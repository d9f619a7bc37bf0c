//! PostgreSQL: the HTTP API's store methods (job lookups and listings,
//! cancellation, statistics, the OpenAI-compatible files and batches), with
//! the same meaning and results as SQLite's (`store::api`).
//!
//! What differs from SQLite: `$N` parameters (a statement binds only those
//! it uses: PostgreSQL infers each one's type from where it appears), sums of
//! BIGINT are NUMERIC (cast back), rows that several daemons may close or
//! cancel at once are locked (`FOR UPDATE`) before they are checked, and a
//! file's content is read one `substring` per chunk, each on a connection
//! taken for that chunk only (a slow reader holds no pooled connection, and
//! `files.content` is stored uncompressed, `STORAGE EXTERNAL`, so a chunk
//! reads only its own TOAST pages).

use std::collections::BTreeMap;

use postgres::types::ToSql;
use postgres::{GenericClient, IsolationLevel, Row};

use super::Postgres;
// At merge: `super::queue::ingest_in` (the queue's port) replaces the shim.
use super::ingest_shim::ingest_in;
use crate::store::api::*;
use crate::store::*;

type PgResult<T> = std::result::Result<T, postgres::Error>;

fn finished_from_row(r: &Row) -> PgResult<FinishedJob> {
    let state: String = r.try_get(3)?;
    Ok(FinishedJob {
        id: r.try_get(0)?,
        line: r.try_get::<_, Option<i64>>(1)?.map(|l| l as u64),
        custom_id: r.try_get(2)?,
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        attempts: r.try_get::<_, i64>(4)? as u32,
        provider: r.try_get(5)?,
        provider_model: r.try_get(6)?,
        dispatched_at: r.try_get(7)?,
        completed_at: r.try_get(8)?,
        status_code: r.try_get::<_, Option<i64>>(9)?.map(|s| s as u16),
        request_id: r.try_get(10)?,
        response: r.try_get(11)?,
        error_code: r.try_get(12)?,
        error_message: r.try_get(13)?,
        input_tokens: r.try_get::<_, Option<i64>>(14)?.map(|x| x as u64),
        output_tokens: r.try_get::<_, Option<i64>>(15)?.map(|x| x as u64),
        cost_usd: r.try_get(16)?,
        list_cost_usd: r.try_get(17)?,
        channel: r.try_get(18)?,
        provider_batch: r.try_get(19)?,
    })
}

fn detail_from_row(r: &Row) -> PgResult<JobDetail> {
    Ok(JobDetail {
        job: finished_from_row(r)?,
        source_id: r.try_get(20)?,
        endpoint: r.try_get(21)?,
        model: r.try_get(22)?,
        route_key: r.try_get::<_, Option<String>>(23)?.unwrap_or_default(),
        priority: r.try_get(24)?,
        submitted_at: r.try_get(25)?,
        deadline: r.try_get(26)?,
        not_before: r.try_get(27)?,
        est_input_tokens: r.try_get::<_, i64>(28)?.max(0) as u64,
        est_output_tokens: r.try_get::<_, i64>(29)?.max(0) as u64,
    })
}

fn batch_from_row(r: &Row) -> PgResult<BatchRow> {
    Ok(BatchRow {
        id: r.try_get(0)?,
        input_file_id: r.try_get(1)?,
        source_id: r.try_get(2)?,
        endpoint: r.try_get(3)?,
        completion_window: r.try_get(4)?,
        metadata: r.try_get(5)?,
        status: r.try_get(6)?,
        errors: r.try_get(7)?,
        created_at: r.try_get(8)?,
        in_progress_at: r.try_get(9)?,
        expires_at: r.try_get(10)?,
        finalizing_at: r.try_get(11)?,
        completed_at: r.try_get(12)?,
        failed_at: r.try_get(13)?,
        expired_at: r.try_get(14)?,
        cancelling_at: r.try_get(15)?,
        cancelled_at: r.try_get(16)?,
        output_file_id: r.try_get(17)?,
        error_file_id: r.try_get(18)?,
    })
}

fn file_from_row(r: &Row) -> PgResult<FileRow> {
    Ok(FileRow {
        id: r.try_get(0)?,
        purpose: r.try_get(1)?,
        filename: r.try_get(2)?,
        bytes: r.try_get::<_, i64>(3)? as u64,
        created_at: r.try_get(4)?,
        kind: FileKind::parse(&r.try_get::<_, String>(5)?),
        batch_id: r.try_get(6)?,
    })
}

fn source_from_row(c: &mut impl GenericClient, r: &Row) -> PgResult<SourceInfo> {
    let id: i64 = r.try_get(0)?;
    Ok(SourceInfo {
        id,
        origin: r.try_get(1)?,
        name: r.try_get(2)?,
        stem: r.try_get(3)?,
        ingested_at: r.try_get(4)?,
        counts: source_counts(c, id)?,
    })
}

fn source_counts(c: &mut impl GenericClient, source_id: i64) -> PgResult<SourceCounts> {
    let mut states: BTreeMap<JobState, u64> = JobState::ALL.iter().map(|&s| (s, 0)).collect();
    for r in c.query(
        "SELECT state, COUNT(*) FROM jobs WHERE source_id = $1 GROUP BY state",
        &[&source_id],
    )? {
        if let Some(s) = JobState::parse(r.try_get(0)?) {
            states.insert(s, r.try_get::<_, i64>(1)? as u64);
        }
    }
    let invalid_lines: i64 = c
        .query_opt(
            "SELECT invalid_lines FROM sources WHERE id = $1",
            &[&source_id],
        )?
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or(0);
    Ok(SourceCounts {
        states,
        invalid_lines: invalid_lines as u64,
    })
}

/// The statement of [`Postgres::list_jobs`] for `filter` and the
/// parameters it binds (only those it uses: PostgreSQL types a parameter
/// from where it appears, and refuses one that appears nowhere).
fn list_jobs_sql<'a>(
    filter: &'a JobFilter,
    after: &'a i64,
    limit: &'a i64,
    state: &'a Option<&'static str>,
    origin: &'a Option<&'static str>,
) -> (String, Vec<&'a (dyn ToSql + Sync)>) {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![after];
    let mut sql = format!("{} WHERE id > $1", detail_select(false));
    let mut bind = |sql: &mut String, clause: &str, p: &'a (dyn ToSql + Sync)| {
        params.push(p);
        sql.push_str(&clause.replace("$?", &format!("${}", params.len())));
    };
    if state.is_some() {
        bind(&mut sql, " AND state = $?", state);
    }
    match &filter.source {
        None => {}
        Some(SourceFilter::Origin(_)) => bind(
            &mut sql,
            " AND source_id IN (SELECT id FROM sources WHERE origin = $?)",
            origin,
        ),
        Some(SourceFilter::Source(id)) => bind(&mut sql, " AND source_id = $?", id),
        Some(SourceFilter::Batch(id)) => bind(
            &mut sql,
            " AND source_id = (SELECT source_id FROM batches WHERE id = $?)",
            id,
        ),
    }
    if let Some(c) = &filter.custom_id {
        bind(&mut sql, " AND custom_id = $?", c);
    }
    bind(&mut sql, " ORDER BY id LIMIT $?", limit);
    (sql, params)
}

/// The queue statistics' reads (see `Store::queue_stats`); sums come back
/// as DOUBLE PRECISION, as SQLite's `TOTAL()` does.
const STATS_QUEUED: &str = "SELECT COUNT(*) FROM jobs WHERE state = 'queued'";
const STATS_RUNNING: &str = "SELECT state, provider, COUNT(*), 0.0::DOUBLE PRECISION,
        0.0::DOUBLE PRECISION, 0.0::DOUBLE PRECISION, 0.0::DOUBLE PRECISION
 FROM jobs WHERE state = 'running' GROUP BY state, provider";
const STATS_FINAL: &str = "SELECT state, provider, COUNT(*),
        COALESCE(SUM(cost_usd), 0)::DOUBLE PRECISION, COALESCE(SUM(list_cost_usd), 0)::DOUBLE PRECISION,
        COALESCE(SUM(input_tokens), 0)::DOUBLE PRECISION, COALESCE(SUM(output_tokens), 0)::DOUBLE PRECISION
 FROM jobs
 WHERE state IN ('succeeded', 'failed', 'expired', 'cancelled')
 GROUP BY state, provider";
const STATS_LATE: &str = "SELECT COALESCE(SUM(late_cost_usd), 0)::DOUBLE PRECISION,
        COALESCE(SUM(late_answers), 0)::BIGINT
 FROM jobs WHERE late_answers > 0";

impl Postgres {
    /// A read-only transaction on one snapshot, for reads of several
    /// statements that must agree (a source and its counts, the stats).
    fn read<T>(&self, f: impl FnOnce(&mut postgres::Transaction<'_>) -> PgResult<T>) -> Result<T> {
        self.run(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    pub fn job_detail(&self, id: i64) -> Result<Option<JobDetail>> {
        self.run(|c| {
            let sql = format!("{} WHERE id = $1", detail_select(true));
            Ok(c.query_opt(&sql, &[&id])?
                .map(|r| detail_from_row(&r))
                .transpose()?)
        })
    }

    pub fn job_body(&self, id: i64) -> Result<Option<String>> {
        self.run(|c| {
            Ok(c.query_opt("SELECT body FROM jobs WHERE id = $1", &[&id])?
                .map(|r| r.try_get(0))
                .transpose()?)
        })
    }

    pub fn list_jobs(
        &self,
        filter: &JobFilter,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobDetail>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        let state = filter.state.map(JobState::as_str);
        let origin = match filter.source {
            Some(SourceFilter::Origin(o)) => Some(o.as_str()),
            _ => None,
        };
        let (sql, params) = list_jobs_sql(filter, &after, &limit, &state, &origin);
        self.run(|c| {
            Ok(c.query(&sql, &params)?
                .iter()
                .map(detail_from_row)
                .collect::<PgResult<_>>()?)
        })
    }

    pub fn job_ids_of(&self, source_id: i64) -> Result<Vec<(i64, String, i64)>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT id, custom_id, deadline FROM jobs WHERE source_id = $1
                 ORDER BY line NULLS FIRST, id",
                &[&source_id],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<PgResult<_>>()?)
        })
    }

    pub fn cancel_job(&self, id: i64, now_ms: i64) -> Result<CancelOutcome> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE jobs SET state = 'cancelled', completed_at = $2, error_code = 'cancelled',
                        error_message = 'cancelled by request before it was dispatched'
                 WHERE id = $1 AND state = 'queued'",
                &[&id, &now_ms],
            )?;
            let outcome = if n == 1 {
                CancelOutcome::Cancelled
            } else {
                match tx.query_opt("SELECT state FROM jobs WHERE id = $1", &[&id])? {
                    None => CancelOutcome::NotFound,
                    Some(r) => CancelOutcome::NotQueued(
                        JobState::parse(r.try_get(0)?).unwrap_or(JobState::Failed),
                    ),
                }
            };
            tx.commit()?;
            Ok(outcome)
        })
    }

    pub fn source_info(&self, id: i64) -> Result<Option<SourceInfo>> {
        self.read(|tx| {
            match tx.query_opt(
                "SELECT id, origin, name, stem, ingested_at FROM sources WHERE id = $1",
                &[&id],
            )? {
                None => Ok(None),
                Some(r) => Ok(Some(source_from_row(tx, &r)?)),
            }
        })
    }

    pub fn list_sources(&self, before: Option<i64>, limit: usize) -> Result<Vec<SourceInfo>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(|tx| {
            let rows = tx.query(
                "SELECT id, origin, name, stem, ingested_at FROM sources
                 WHERE id < $1 ORDER BY id DESC LIMIT $2",
                &[&before.unwrap_or(i64::MAX), &limit],
            )?;
            rows.iter().map(|r| source_from_row(tx, r)).collect()
        })
    }

    pub fn queue_stats(&self) -> Result<QueueStats> {
        self.read(|tx| {
            let queued: i64 = tx.query_one(STATS_QUEUED, &[])?.try_get(0)?;
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
            for sql in [STATS_RUNNING, STATS_FINAL] {
                for r in tx.query(sql, &[])? {
                    rows.push(StateProviderRow {
                        state: JobState::parse(r.try_get(0)?).unwrap_or(JobState::Failed),
                        provider: r.try_get(1)?,
                        jobs: r.try_get::<_, i64>(2)? as u64,
                        cost_usd: r.try_get(3)?,
                        list_cost_usd: r.try_get(4)?,
                        // `as` saturates, as SQLite's TOTAL() read back does.
                        input_tokens: r.try_get::<_, f64>(5)? as u64,
                        output_tokens: r.try_get::<_, f64>(6)? as u64,
                    });
                }
            }
            rows.sort_by(|a, b| (a.state, &a.provider).cmp(&(b.state, &b.provider)));
            let late = tx.query_one(STATS_LATE, &[])?;
            Ok(QueueStats {
                rows,
                late_cost_usd: late.try_get(0)?,
                late_answers: late.try_get::<_, i64>(1)? as u64,
            })
        })
    }

    pub fn recent_outcomes(&self, since_ms: i64) -> Result<BTreeMap<String, RecentOutcomes>> {
        self.read(|tx| {
            let mut out: BTreeMap<String, RecentOutcomes> = BTreeMap::new();
            for r in tx.query(
                "SELECT provider, state, COUNT(*) FROM jobs
                 WHERE completed_at > $1 AND provider IS NOT NULL AND state IN ('succeeded', 'failed')
                 GROUP BY provider, state",
                &[&since_ms],
            )? {
                let e = out.entry(r.try_get(0)?).or_default();
                let n = r.try_get::<_, i64>(2)? as u64;
                if r.try_get::<_, &str>(1)? == "succeeded" {
                    e.succeeded = n;
                } else {
                    e.failed = n;
                }
            }
            // Each provider's latest failure (the newest job of those that
            // failed at the same instant).
            for r in tx.query(
                "SELECT DISTINCT ON (provider)
                        provider, completed_at, COALESCE(error_code, 'http_' || status_code), error_message
                 FROM jobs
                 WHERE state = 'failed' AND provider IS NOT NULL AND completed_at > $1
                 ORDER BY provider, completed_at DESC, id DESC",
                &[&since_ms],
            )? {
                let code: Option<String> = r.try_get(2)?;
                out.entry(r.try_get(0)?).or_default().last_failure = Some((
                    r.try_get(1)?,
                    code.unwrap_or_else(|| "failed".into()),
                    r.try_get(3)?,
                ));
            }
            Ok(out)
        })
    }

    // ---- files --------------------------------------------------------

    pub fn insert_file(
        &self,
        purpose: &str,
        filename: &str,
        content: &[u8],
        now_ms: i64,
    ) -> Result<FileRow> {
        let bytes = content.len() as i64;
        let id: i64 = self.run(|c| {
            Ok(c.query_one(
                "INSERT INTO files (purpose, filename, bytes, created_at, content, kind)
                 VALUES ($1, $2, $3, $4, $5, 'input') RETURNING id",
                &[&purpose, &filename, &bytes, &now_ms, &content],
            )?
            .try_get(0)?)
        })?;
        Ok(FileRow {
            id,
            purpose: purpose.to_string(),
            filename: filename.to_string(),
            bytes: content.len() as u64,
            created_at: now_ms,
            kind: FileKind::Input,
            batch_id: None,
        })
    }

    pub fn file(&self, id: i64) -> Result<Option<FileRow>> {
        self.run(|c| {
            let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1");
            Ok(c.query_opt(&sql, &[&id])?
                .map(|r| file_from_row(&r))
                .transpose()?)
        })
    }

    /// An uploaded file's content, in pieces of at most `chunk` bytes: one
    /// `substring` per piece, each on a connection taken for it alone.
    pub fn file_content(
        &self,
        id: i64,
        chunk: usize,
        mut on_chunk: impl FnMut(Vec<u8>) -> std::io::Result<()>,
    ) -> Result<()> {
        // bytea holds at most 1 GB: a piece fits an INTEGER.
        let chunk = chunk.clamp(1, i32::MAX as usize) as i64;
        let len: i64 = self.run(|c| {
            Ok(c.query_one(
                "SELECT COALESCE(octet_length(content), 0)::BIGINT FROM files WHERE id = $1",
                &[&id],
            )?
            .try_get(0)?)
        })?;
        let mut at = 1i64;
        while at <= len {
            let piece: Vec<u8> = self.run(|c| {
                Ok(c.query_one(
                    "SELECT substring(content FROM $2::BIGINT::INTEGER FOR $3::BIGINT::INTEGER)
                     FROM files WHERE id = $1",
                    &[&id, &at, &chunk],
                )?
                .try_get::<_, Option<Vec<u8>>>(0)?
                .unwrap_or_default())
            })?;
            if piece.is_empty() {
                break;
            }
            at += piece.len() as i64;
            on_chunk(piece)?;
        }
        Ok(())
    }

    // ---- batches ------------------------------------------------------

    pub fn create_batch(&self, b: &NewBatch) -> Result<i64> {
        self.run(|c| {
            Ok(c.query_one(
                "INSERT INTO batches (input_file_id, endpoint, completion_window, metadata, status, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, 'validating', $5, $6) RETURNING id",
                &[
                    &b.input_file_id,
                    &b.endpoint,
                    &b.completion_window,
                    &b.metadata,
                    &b.now_ms,
                    &b.expires_at,
                ],
            )?
            .try_get(0)?)
        })
    }

    pub fn start_batch(
        &self,
        batch_id: i64,
        source_id: Option<i64>,
        failed: bool,
        errors: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        let sql = if failed {
            "UPDATE batches SET source_id = $2, status = 'failed', failed_at = $3, errors = $4
             WHERE id = $1 AND status = 'validating'"
        } else {
            "UPDATE batches SET source_id = $2, status = 'in_progress', in_progress_at = $3, errors = $4
             WHERE id = $1 AND status = 'validating'"
        };
        self.run(|c| {
            c.execute(sql, &[&batch_id, &source_id, &now_ms, &errors])?;
            Ok(())
        })
    }

    /// Queues a batch's lines as a source and records it on the batch in the
    /// same transaction.
    pub fn ingest_batch(
        &self,
        batch_id: i64,
        source: &NewSource,
        lines: impl Iterator<Item = std::io::Result<LineOutcome>>,
    ) -> Result<IngestSummary> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            let (source_id, summary) = ingest_in(&mut tx, &self.node, source, lines)?;
            tx.execute(
                "UPDATE batches SET source_id = $2 WHERE id = $1",
                &[&batch_id, &source_id],
            )?;
            tx.commit()?;
            Ok(summary)
        })
    }

    pub fn validating_batches(&self) -> Result<Vec<(BatchRow, Option<i64>)>> {
        self.run(|c| {
            let sql = format!(
                "SELECT {BATCH_COLUMNS}, b.source_id FROM batches b WHERE status = 'validating' ORDER BY id"
            );
            Ok(c.query(&sql, &[])?
                .iter()
                .map(|r| Ok((batch_from_row(r)?, r.try_get(19)?)))
                .collect::<PgResult<_>>()?)
        })
    }

    pub fn batch(&self, id: i64) -> Result<Option<BatchRow>> {
        self.run(|c| {
            let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1");
            Ok(c.query_opt(&sql, &[&id])?
                .map(|r| batch_from_row(&r))
                .transpose()?)
        })
    }

    pub fn list_batches(&self, before: Option<i64>, limit: usize) -> Result<Vec<BatchRow>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.run(|c| {
            let sql = format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE $1::BIGINT IS NULL OR id < $1
                 ORDER BY id DESC LIMIT $2"
            );
            Ok(c.query(&sql, &[&before, &limit])?
                .iter()
                .map(batch_from_row)
                .collect::<PgResult<_>>()?)
        })
    }

    pub fn batch_counts(&self, source_id: i64) -> Result<SourceCounts> {
        self.read(|tx| source_counts(tx, source_id))
    }

    pub fn done_batches(&self) -> Result<Vec<DoneBatch>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT b.id, b.source_id, b.status,
                        EXISTS (SELECT 1 FROM jobs j WHERE j.source_id = b.source_id AND j.state = 'expired'),
                        (SELECT MAX(completed_at) FROM jobs j WHERE j.source_id = b.source_id)
                 FROM batches b
                 WHERE b.status IN ('in_progress', 'finalizing', 'cancelling') AND b.source_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source_id = b.source_id
                                   AND j.state IN ('queued', 'running'))
                 ORDER BY b.id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(DoneBatch {
                    id: r.try_get(0)?,
                    source_id: r.try_get(1)?,
                    status: r.try_get(2)?,
                    any_expired: r.try_get(3)?,
                    last_completed_at: r.try_get(4)?,
                })
            })
            .collect::<PgResult<_>>()?)
        })
    }

    /// Closes a batch whose jobs are all final, in one transaction; the
    /// batch's row is locked first, so of daemons closing it at once one
    /// does and the others find it closed (false).
    pub fn close_batch(&self, batch_id: i64, close: &BatchClose) -> Result<bool> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            let open = tx.query_opt(
                "SELECT status FROM batches WHERE id = $1
                   AND status IN ('in_progress', 'finalizing', 'cancelling') FOR UPDATE",
                &[&batch_id],
            )?;
            if open.is_none() {
                return Ok(false);
            }
            let mut file = |f: &Option<(String, u64)>, kind: FileKind| -> PgResult<Option<i64>> {
                Ok(match f {
                    None => None,
                    Some((name, bytes)) => Some(
                        tx.query_one(
                            "INSERT INTO files (purpose, filename, bytes, created_at, batch_id, kind)
                             VALUES ('batch_output', $1, $2, $3, $4, $5) RETURNING id",
                            &[name, &(*bytes as i64), &close.at, &batch_id, &kind.as_str()],
                        )?
                        .try_get(0)?,
                    ),
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
                    "UPDATE batches SET status = $2, finalizing_at = COALESCE(finalizing_at, $3), {column} = $3,
                            output_file_id = $4, error_file_id = $5 WHERE id = $1"
                ),
                &[&batch_id, &close.status, &close.at, &output, &errors],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Cancels a batch: its queued jobs are cancelled and it becomes
    /// `cancelling`, in one transaction holding the batch's row.
    pub fn cancel_batch(&self, batch_id: i64, now_ms: i64) -> Result<Option<usize>> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            let Some(row) = tx.query_opt(
                "SELECT source_id FROM batches WHERE id = $1
                   AND status IN ('in_progress', 'finalizing') FOR UPDATE",
                &[&batch_id],
            )?
            else {
                return Ok(None);
            };
            let source: Option<i64> = row.try_get(0)?;
            tx.execute(
                "UPDATE batches SET status = 'cancelling', cancelling_at = $2 WHERE id = $1",
                &[&batch_id, &now_ms],
            )?;
            let n = match source {
                Some(source_id) => tx.execute(
                    "UPDATE jobs SET state = 'cancelled', completed_at = $2, error_code = 'cancelled',
                            error_message = 'the batch was cancelled before this request was dispatched'
                     WHERE source_id = $1 AND state = 'queued'",
                    &[&source_id, &now_ms],
                )?,
                None => 0,
            };
            tx.commit()?;
            Ok(Some(n as usize))
        })
    }
}
