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
use super::queue::{finished_from_row, ingest_in};
use crate::store::api::*;
use crate::store::*;

type PgResult<T> = std::result::Result<T, postgres::Error>;

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
            let summary = ingest_in(&mut tx, &self.node, source, lines)?;
            let source_id = summary.source_id;
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

/// Conformance: the same steps on SQLite and on PostgreSQL through the
/// [`Store`] facade, and the same answers (compared as their `Debug` text,
/// ids included: both number rows from 1 in a fresh database).
#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use crate::config::Config;
    use crate::domain::job::{JobContext, parse_line};
    use crate::store::backend::Backend;
    use crate::store::pg::testing::backends;
    use crate::store::*;

    const T0: i64 = 1_800_000_000_000;
    const CHAT: &str = "/v1/chat/completions";

    fn line(custom_id: &str) -> String {
        format!(
            r#"{{"custom_id":"{custom_id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"cheap-chat","messages":[{{"role":"user","content":"hi {custom_id}"}}],"max_tokens":10}}}}"#
        )
    }

    /// Parsed lines, numbered from 1 (a line that is not JSON is invalid).
    fn outcomes(lines: &[String]) -> impl Iterator<Item = std::io::Result<LineOutcome>> + '_ {
        let config = Config::embedded_default();
        let parsed: Vec<_> = lines
            .iter()
            .map(|l| {
                let ctx = JobContext {
                    catalog: &config.catalog,
                    now: DateTime::<Utc>::from_timestamp_millis(T0).unwrap(),
                    default_deadline: std::time::Duration::from_secs(3600),
                };
                parse_line(l, &ctx)
            })
            .collect();
        parsed.into_iter().enumerate().map(|(i, job)| {
            Ok(LineOutcome {
                line: i as u64 + 1,
                job,
            })
        })
    }

    fn lines(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| line(id)).collect()
    }

    /// Queues a source: `Store::ingest` on SQLite; on PostgreSQL (whose
    /// `ingest` is ported elsewhere) the same ingest `ingest_batch` runs.
    fn ingest(store: &Store, source: &NewSource, lines: &[String]) -> IngestSummary {
        match store.backend() {
            Backend::Sqlite(s) => s.ingest(source, outcomes(lines)).unwrap(),
            Backend::Postgres(p) => p
                .run(|c| {
                    let mut tx = c.transaction()?;
                    let summary = super::ingest_in(&mut tx, &p.node, source, outcomes(lines))?;
                    tx.commit()?;
                    Ok(summary)
                })
                .unwrap(),
        }
    }

    /// Runs statements valid on both backends (setting jobs' states the
    /// dispatcher's methods, ported elsewhere, would set).
    fn exec(store: &Store, sql: &str) {
        match store.backend() {
            Backend::Sqlite(s) => s.conn().execute_batch(sql).unwrap(),
            Backend::Postgres(p) => p
                .run(|c| {
                    c.batch_execute(sql)?;
                    Ok(())
                })
                .unwrap(),
        }
    }

    fn source<'a>(origin: Origin, name: &'a str, stem: &'a str) -> NewSource<'a> {
        NewSource {
            origin,
            name,
            stem,
            sha256: (origin == Origin::Inbox).then_some(stem),
            now_ms: T0,
        }
    }

    /// Runs `steps` on each backend; their transcripts must be equal.
    /// Returns SQLite's.
    fn conform(steps: impl Fn(&Store) -> Vec<String>) -> Vec<String> {
        let stores = backends();
        let transcripts: Vec<(&str, Vec<String>)> =
            stores.iter().map(|(s, _)| (s.kind(), steps(s))).collect();
        let (kind0, first) = &transcripts[0];
        for (kind, t) in &transcripts[1..] {
            for (i, (a, b)) in first.iter().zip(t).enumerate() {
                assert_eq!(a, b, "step {i}: {kind0} and {kind} differ");
            }
            assert_eq!(first.len(), t.len(), "{kind0} and {kind}: steps");
        }
        first.clone()
    }

    fn new_batch(file: i64) -> NewBatch<'static> {
        NewBatch {
            input_file_id: file,
            endpoint: CHAT,
            completion_window: "24h",
            metadata: Some(r#"{"k":"v"}"#),
            now_ms: T0,
            expires_at: T0 + 86_400_000,
        }
    }

    #[test]
    fn files_are_stored_and_streamed_in_chunks_alike() {
        conform(|store| {
            let mut t = Vec::new();
            let content: Vec<u8> = (0..50u8).collect();
            let f = store
                .insert_file("batch", "in.jsonl", &content, T0)
                .unwrap();
            assert_eq!((f.id, f.bytes, f.kind), (1, 50, FileKind::Input));
            assert_eq!(store.file(f.id).unwrap().as_ref(), Some(&f));
            t.push(format!("{f:?}"));
            assert_eq!(store.file(99).unwrap(), None);
            let mut pieces = Vec::new();
            store
                .file_content(f.id, 7, |p| {
                    pieces.push(p);
                    Ok(())
                })
                .unwrap();
            let sizes: Vec<usize> = pieces.iter().map(Vec::len).collect();
            assert_eq!(sizes, [7, 7, 7, 7, 7, 7, 7, 1]);
            assert_eq!(pieces.concat(), content);
            t.push(format!("{pieces:?}"));
            // Empty: no chunk at all.
            let empty = store.insert_file("batch", "empty.jsonl", b"", T0).unwrap();
            let mut calls = 0;
            store
                .file_content(empty.id, 7, |_| {
                    calls += 1;
                    Ok(())
                })
                .unwrap();
            assert_eq!(calls, 0);
            t.push(format!("{:?}", store.file(empty.id).unwrap()));
            // Missing: an error; a failing reader stops the stream with its error.
            assert!(store.file_content(99, 7, |_| Ok(())).is_err());
            let mut calls = 0;
            let err = store
                .file_content(f.id, 7, |_| {
                    calls += 1;
                    Err(std::io::Error::other("client gone"))
                })
                .unwrap_err();
            assert!(matches!(err, QueueError::Read(_)), "{err}");
            assert_eq!(calls, 1);
            // Megabyte chunks of a file of several.
            let big: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
            let b = store.insert_file("batch", "big.jsonl", &big, T0).unwrap();
            let mut read = Vec::new();
            let mut sizes = Vec::new();
            store
                .file_content(b.id, 1 << 20, |p| {
                    sizes.push(p.len());
                    read.extend_from_slice(&p);
                    Ok(())
                })
                .unwrap();
            assert_eq!(sizes, [1 << 20, 1 << 20, 1 << 20, 5]);
            assert!(read == big, "the big file reads back as stored");
            t.push(format!("{sizes:?} {:?}", store.file(b.id).unwrap()));
            if let Backend::Postgres(p) = store.backend() {
                let storage: i8 = p
                    .run(|c| {
                        Ok(c.query_one(
                            "SELECT attstorage FROM pg_attribute
                             WHERE attrelid = 'files'::regclass AND attname = 'content'",
                            &[],
                        )?
                        .get(0))
                    })
                    .unwrap();
                assert_eq!(storage as u8, b'e', "files.content is STORAGE EXTERNAL");
            }
            t
        });
    }

    #[test]
    fn a_batch_is_created_started_ingested_counted_done_and_closed_alike() {
        conform(|store| {
            let mut t = Vec::new();
            let f = store.insert_file("batch", "in.jsonl", b"{}", T0).unwrap();
            let id = store.create_batch(&new_batch(f.id)).unwrap();
            assert_eq!(id, 1);
            t.push(format!("{:?}", store.batch(id).unwrap()));
            t.push(format!("{:?}", store.validating_batches().unwrap()));
            // Two valid lines, one not JSON, one repeating a custom_id.
            let mut input = lines(&["r1", "r2"]);
            input.insert(1, "not json".into());
            input.push(line("r1"));
            let summary = store
                .ingest_batch(
                    id,
                    &source(Origin::Upload, "in.jsonl", "batch_1"),
                    outcomes(&input),
                )
                .unwrap();
            assert_eq!(
                (summary.total_lines, summary.queued, summary.invalid),
                (4, 2, 2)
            );
            t.push(format!("{summary:?}"));
            // Linked in the ingest's transaction: recovery sees the source.
            let open = store.validating_batches().unwrap();
            assert_eq!(open.len(), 1);
            assert_eq!(open[0].1, Some(summary.source_id));
            t.push(format!("{open:?}"));
            store
                .start_batch(id, Some(summary.source_id), false, Some("[]"), T0 + 1)
                .unwrap();
            // Only a validating batch starts.
            store.start_batch(id, None, true, None, T0 + 2).unwrap();
            let b = store.batch(id).unwrap().unwrap();
            assert_eq!(
                (b.status.as_str(), b.in_progress_at, b.source_id),
                ("in_progress", Some(T0 + 1), Some(summary.source_id))
            );
            t.push(format!("{b:?}"));
            let counts = store.batch_counts(summary.source_id).unwrap();
            assert_eq!(
                (counts.count(JobState::Queued), counts.invalid_lines),
                (2, 2)
            );
            t.push(format!("{counts:?}"));
            assert!(store.done_batches().unwrap().is_empty(), "jobs are queued");
            t.push(format!(
                "{:?}",
                store.job_ids_of(summary.source_id).unwrap()
            ));
            exec(
                store,
                &format!(
                    "UPDATE jobs SET state = 'succeeded', completed_at = {} WHERE custom_id = 'r1';
                     UPDATE jobs SET state = 'expired', completed_at = {} WHERE custom_id = 'r2';",
                    T0 + 10,
                    T0 + 20
                ),
            );
            let done = store.done_batches().unwrap();
            assert_eq!(done.len(), 1);
            assert!(done[0].any_expired);
            assert_eq!(done[0].last_completed_at, Some(T0 + 20));
            t.push(format!("{done:?}"));
            t.push(format!(
                "{:?}",
                store.batch_counts(summary.source_id).unwrap()
            ));
            let close = BatchClose {
                status: "completed",
                at: T0 + 20,
                output: Some(("batch_1_output.jsonl".into(), 123)),
                errors: Some(("batch_1_errors.jsonl".into(), 45)),
            };
            assert!(store.close_batch(id, &close).unwrap());
            assert!(!store.close_batch(id, &close).unwrap(), "closed once");
            let b = store.batch(id).unwrap().unwrap();
            assert_eq!(
                (b.status.as_str(), b.completed_at, b.finalizing_at),
                ("completed", Some(T0 + 20), Some(T0 + 20))
            );
            t.push(format!("{b:?}"));
            for file in [b.output_file_id.unwrap(), b.error_file_id.unwrap()] {
                let row = store.file(file).unwrap().unwrap();
                assert_eq!(row.batch_id, Some(id));
                // Produced from the jobs, not stored: no content to stream.
                store
                    .file_content(file, 7, |_| panic!("an output file has no stored content"))
                    .unwrap();
                t.push(format!("{row:?}"));
            }
            assert!(store.done_batches().unwrap().is_empty());
            assert_eq!(store.cancel_batch(id, T0 + 30).unwrap(), None, "closed");

            // A batch cancelled with queued jobs, then closed as cancelled.
            let id2 = store.create_batch(&new_batch(f.id)).unwrap();
            let s2 = store
                .ingest_batch(
                    id2,
                    &source(Origin::Upload, "in.jsonl", "batch_2"),
                    outcomes(&lines(&["c1", "c2", "c3"])),
                )
                .unwrap();
            store
                .start_batch(id2, Some(s2.source_id), false, None, T0 + 1)
                .unwrap();
            exec(
                store,
                "UPDATE jobs SET state = 'running', provider = 'deepseek', attempts = 1 WHERE custom_id = 'c2'",
            );
            assert_eq!(store.cancel_batch(id2, T0 + 40).unwrap(), Some(2));
            assert_eq!(
                store.cancel_batch(id2, T0 + 41).unwrap(),
                None,
                "cancelling"
            );
            t.push(format!("{:?}", store.batch(id2).unwrap()));
            t.push(format!("{:?}", store.batch_counts(s2.source_id).unwrap()));
            assert!(store.done_batches().unwrap().is_empty(), "c2 is running");
            exec(
                store,
                &format!(
                    "UPDATE jobs SET state = 'failed', completed_at = {} WHERE custom_id = 'c2'",
                    T0 + 50
                ),
            );
            let done = store.done_batches().unwrap();
            assert_eq!((done.len(), done[0].status.as_str()), (1, "cancelling"));
            t.push(format!("{done:?}"));
            let close = BatchClose {
                status: "cancelled",
                at: T0 + 50,
                output: None,
                errors: Some(("batch_2_errors.jsonl".into(), 9)),
            };
            assert!(store.close_batch(id2, &close).unwrap());
            let b = store.batch(id2).unwrap().unwrap();
            assert_eq!(
                (b.status.as_str(), b.cancelled_at, b.output_file_id),
                ("cancelled", Some(T0 + 50), None)
            );
            t.push(format!("{b:?}"));

            // A batch with no valid line fails; it was never in progress.
            let id3 = store.create_batch(&new_batch(f.id)).unwrap();
            let s3 = store
                .ingest_batch(
                    id3,
                    &source(Origin::Upload, "in.jsonl", "batch_3"),
                    outcomes(&["{".to_string()]),
                )
                .unwrap();
            assert_eq!(s3.queued, 0);
            store
                .start_batch(
                    id3,
                    Some(s3.source_id),
                    true,
                    Some(r#"[{"line":1}]"#),
                    T0 + 3,
                )
                .unwrap();
            let b = store.batch(id3).unwrap().unwrap();
            assert_eq!((b.status.as_str(), b.failed_at), ("failed", Some(T0 + 3)));
            assert_eq!(store.cancel_batch(id3, T0 + 4).unwrap(), None);
            t.push(format!("{b:?}"));

            // Listing: newest first, paged by id.
            let ids = |v: Vec<BatchRow>| v.into_iter().map(|b| b.id).collect::<Vec<_>>();
            assert_eq!(ids(store.list_batches(None, 10).unwrap()), [3, 2, 1]);
            assert_eq!(ids(store.list_batches(None, 2).unwrap()), [3, 2]);
            assert_eq!(ids(store.list_batches(Some(2), 10).unwrap()), [1]);
            assert!(store.list_batches(Some(1), 10).unwrap().is_empty());
            t.push(format!("{:?}", store.list_batches(None, 10).unwrap()));
            assert!(store.validating_batches().unwrap().is_empty());
            t
        });
    }

    /// A taken stem (an inbox file named `batch_1`) moves the batch's source
    /// to `batch_1.2`, still linked in the ingest's transaction; sources the
    /// PostgreSQL backend inserts carry its node.
    #[test]
    fn a_batch_source_takes_the_next_free_stem_alike() {
        conform(|store| {
            let taken = ingest(
                store,
                &source(Origin::Inbox, "batch_1.jsonl", "batch_1"),
                &[],
            );
            let f = store.insert_file("batch", "in.jsonl", b"{}", T0).unwrap();
            let id = store.create_batch(&new_batch(f.id)).unwrap();
            let s = store
                .ingest_batch(
                    id,
                    &source(Origin::Upload, "in.jsonl", "batch_1"),
                    std::iter::empty(),
                )
                .unwrap();
            assert_eq!(s.stem, "batch_1.2");
            assert_eq!(store.validating_batches().unwrap()[0].1, Some(s.source_id));
            if let Backend::Postgres(p) = store.backend() {
                let nodes: Vec<String> = p
                    .run(|c| {
                        Ok(c.query("SELECT node FROM sources ORDER BY id", &[])?
                            .iter()
                            .map(|r| r.get(0))
                            .collect())
                    })
                    .unwrap();
                assert_eq!(nodes, ["test-node", "test-node"]);
            }
            vec![format!("{taken:?}"), format!("{s:?}")]
        });
    }

    /// Three sources of the three origins (ids 1 inbox, 2 api, 3 a batch's
    /// upload) with jobs 1-3, 4-5 and 6-7, in several states.
    fn three_sources(store: &Store) -> Vec<String> {
        let mut t = Vec::new();
        t.push(format!(
            "{:?}",
            ingest(
                store,
                &source(Origin::Inbox, "a.jsonl", "a"),
                &lines(&["a1", "a2", "same"])
            )
        ));
        t.push(format!(
            "{:?}",
            ingest(
                store,
                &source(Origin::Api, "sub", "sub_b"),
                &lines(&["b1", "same"])
            )
        ));
        let f = store.insert_file("batch", "c.jsonl", b"{}", T0).unwrap();
        let batch = store.create_batch(&new_batch(f.id)).unwrap();
        t.push(format!(
            "{:?}",
            store
                .ingest_batch(
                    batch,
                    &source(Origin::Upload, "c.jsonl", "batch_1"),
                    outcomes(&lines(&["c1", "c2"]))
                )
                .unwrap()
        ));
        exec(
            store,
            &format!(
                "UPDATE jobs SET state = 'running', provider = 'deepseek', provider_model = 'deepseek-flash',
                        attempts = 1, dispatched_at = {t1}, lease_owner = 'me', lease_until = {t2},
                        provider_channel = 'sync' WHERE id IN (2, 6);
                 UPDATE jobs SET state = 'succeeded', provider = 'deepseek', provider_model = 'deepseek-flash',
                        attempts = 1, dispatched_at = {t1}, completed_at = {t3}, status_code = 200,
                        request_id = 'req-3', response = '{{\"ok\":true}}', input_tokens = 7,
                        output_tokens = 5, cost_usd = 0.25, list_cost_usd = 0.5,
                        provider_channel = 'flex' WHERE id = 3;
                 UPDATE jobs SET state = 'failed', provider = 'openai', provider_model = 'gpt-mini',
                        attempts = 2, dispatched_at = {t1}, completed_at = {t4}, status_code = 500,
                        error_message = 'upstream', input_tokens = 3, output_tokens = 0,
                        cost_usd = 0.125, list_cost_usd = 0.125 WHERE id = 5;
                 UPDATE jobs SET state = 'cancelled', completed_at = {t3}, error_code = 'cancelled'
                 WHERE id = 7;",
                t1 = T0 + 100,
                t2 = T0 + 60_100,
                t3 = T0 + 200,
                t4 = T0 + 300,
            ),
        );
        t
    }

    fn listed(store: &Store, filter: &JobFilter, after: i64, limit: usize) -> Vec<i64> {
        store
            .list_jobs(filter, after, limit)
            .unwrap()
            .iter()
            .map(|d| d.job.id)
            .collect()
    }

    #[test]
    fn job_listings_filter_and_page_alike() {
        conform(|store| {
            let mut t = three_sources(store);
            let all = JobFilter::default();
            assert_eq!(listed(store, &all, 0, 100), [1, 2, 3, 4, 5, 6, 7]);
            assert_eq!(listed(store, &all, 0, 3), [1, 2, 3]);
            assert_eq!(listed(store, &all, 3, 3), [4, 5, 6]);
            assert_eq!(listed(store, &all, 6, 3), [7]);
            assert!(listed(store, &all, 7, 3).is_empty());
            let filter = |state, source, custom_id: Option<&str>| JobFilter {
                state,
                source,
                custom_id: custom_id.map(str::to_string),
            };
            let cases: Vec<(JobFilter, Vec<i64>)> = vec![
                (filter(Some(JobState::Queued), None, None), vec![1, 4]),
                (filter(Some(JobState::Running), None, None), vec![2, 6]),
                (filter(Some(JobState::Failed), None, None), vec![5]),
                (
                    filter(None, Some(SourceFilter::Origin(Origin::Inbox)), None),
                    vec![1, 2, 3],
                ),
                (
                    filter(None, Some(SourceFilter::Origin(Origin::Api)), None),
                    vec![4, 5],
                ),
                (
                    filter(None, Some(SourceFilter::Origin(Origin::Upload)), None),
                    vec![6, 7],
                ),
                (
                    filter(None, Some(SourceFilter::Source(2)), None),
                    vec![4, 5],
                ),
                (filter(None, Some(SourceFilter::Source(9)), None), vec![]),
                (filter(None, Some(SourceFilter::Batch(1)), None), vec![6, 7]),
                (filter(None, Some(SourceFilter::Batch(2)), None), vec![]),
                (filter(None, None, Some("same")), vec![3, 5]),
                (filter(None, None, Some("nope")), vec![]),
                (
                    filter(
                        Some(JobState::Running),
                        Some(SourceFilter::Origin(Origin::Inbox)),
                        None,
                    ),
                    vec![2],
                ),
                (
                    filter(
                        Some(JobState::Cancelled),
                        Some(SourceFilter::Batch(1)),
                        None,
                    ),
                    vec![7],
                ),
                (
                    filter(Some(JobState::Succeeded), None, Some("same")),
                    vec![3],
                ),
                (
                    filter(None, Some(SourceFilter::Source(1)), Some("same")),
                    vec![3],
                ),
                (
                    filter(
                        Some(JobState::Failed),
                        Some(SourceFilter::Origin(Origin::Api)),
                        Some("same"),
                    ),
                    vec![5],
                ),
                (
                    filter(
                        Some(JobState::Queued),
                        Some(SourceFilter::Source(1)),
                        Some("same"),
                    ),
                    vec![],
                ),
            ];
            for (f, want) in &cases {
                assert_eq!(&listed(store, f, 0, 100), want, "{f:?}");
                // Paged one at a time, the same jobs.
                let mut paged = Vec::new();
                let mut after = 0;
                while let [id] = listed(store, f, after, 1)[..] {
                    paged.push(id);
                    after = id;
                }
                assert_eq!(&paged, want, "{f:?} paged");
            }
            // Listings carry no response body; everything else is the detail's.
            for d in store.list_jobs(&all, 0, 100).unwrap() {
                assert_eq!(d.job.response, None);
                let full = store.job_detail(d.job.id).unwrap().unwrap();
                assert_eq!(
                    format!("{d:?}"),
                    format!(
                        "{:?}",
                        JobDetail {
                            job: FinishedJob {
                                response: None,
                                ..full.job.clone()
                            },
                            ..full
                        }
                    )
                );
                t.push(format!("{d:?}"));
            }
            t
        });
    }

    #[test]
    fn job_details_bodies_and_sources_read_alike() {
        conform(|store| {
            let mut t = three_sources(store);
            let d = store.job_detail(3).unwrap().unwrap();
            assert_eq!(d.job.state, JobState::Succeeded);
            assert_eq!(d.job.response.as_deref(), Some(r#"{"ok":true}"#));
            assert_eq!((d.source_id, d.endpoint.as_str()), (Some(1), CHAT));
            assert!(!d.route_key.is_empty());
            assert_eq!(d.submitted_at, T0);
            assert_eq!(d.deadline, T0 + 3_600_000);
            for id in 1..=8 {
                t.push(format!("{:?}", store.job_detail(id).unwrap()));
                t.push(format!("{:?}", store.job_body(id).unwrap()));
            }
            assert!(store.job_detail(8).unwrap().is_none());
            assert!(store.job_body(8).unwrap().is_none());
            // The body verbatim, as the line carried it.
            let body = store.job_body(1).unwrap().unwrap();
            assert!(
                line("a1").contains(&format!(r#""body":{body}}}"#)),
                "{body}"
            );
            for s in 1..=3 {
                t.push(format!("{:?}", store.job_ids_of(s).unwrap()));
            }
            let ids: Vec<i64> = store.job_ids_of(1).unwrap().iter().map(|j| j.0).collect();
            assert_eq!(ids, [1, 2, 3]);

            let info = store.source_info(1).unwrap().unwrap();
            assert_eq!((info.origin.as_str(), info.stem.as_str()), ("inbox", "a"));
            assert_eq!(
                (
                    info.counts.count(JobState::Queued),
                    info.counts.count(JobState::Running)
                ),
                (1, 1)
            );
            assert_eq!(info.counts.jobs(), 3);
            assert_eq!(store.source_info(9).unwrap(), None);
            for s in 1..=3 {
                t.push(format!("{:?}", store.source_info(s).unwrap()));
            }
            let ids = |v: Vec<SourceInfo>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
            assert_eq!(ids(store.list_sources(None, 10).unwrap()), [3, 2, 1]);
            assert_eq!(ids(store.list_sources(None, 1).unwrap()), [3]);
            assert_eq!(ids(store.list_sources(Some(3), 10).unwrap()), [2, 1]);
            assert_eq!(ids(store.list_sources(Some(2), 1).unwrap()), [1]);
            assert!(store.list_sources(Some(1), 10).unwrap().is_empty());
            assert_eq!(store.list_sources(None, 10).unwrap()[2], info);
            t.push(format!("{:?}", store.list_sources(None, 10).unwrap()));
            t
        });
    }

    #[test]
    fn cancelling_a_job_answers_alike() {
        conform(|store| {
            let mut t = three_sources(store);
            assert_eq!(
                store.cancel_job(1, T0 + 500).unwrap(),
                CancelOutcome::Cancelled
            );
            assert_eq!(
                store.cancel_job(1, T0 + 501).unwrap(),
                CancelOutcome::NotQueued(JobState::Cancelled)
            );
            assert_eq!(
                store.cancel_job(2, T0 + 501).unwrap(),
                CancelOutcome::NotQueued(JobState::Running)
            );
            assert_eq!(
                store.cancel_job(3, T0 + 501).unwrap(),
                CancelOutcome::NotQueued(JobState::Succeeded)
            );
            assert_eq!(
                store.cancel_job(99, T0 + 501).unwrap(),
                CancelOutcome::NotFound
            );
            let d = store.job_detail(1).unwrap().unwrap();
            assert_eq!(
                (d.job.state, d.job.completed_at, d.job.error_code.as_deref()),
                (JobState::Cancelled, Some(T0 + 500), Some("cancelled"))
            );
            t.push(format!("{d:?}"));
            t.push(format!("{:?}", store.job_detail(2).unwrap()));
            t
        });
    }

    #[test]
    fn queue_statistics_sum_alike() {
        let t = conform(|store| {
            let mut t = vec![format!("{:?}", store.queue_stats().unwrap())];
            assert_eq!(store.queue_stats().unwrap(), QueueStats::default());
            t.extend(three_sources(store));
            exec(
                store,
                "UPDATE jobs SET late_answers = 2, late_cost_usd = 0.0625 WHERE id = 3;
                 UPDATE jobs SET late_answers = 1, late_cost_usd = 0.03125 WHERE id = 5;",
            );
            let stats = store.queue_stats().unwrap();
            let row = |state, provider: Option<&str>| {
                stats
                    .rows
                    .iter()
                    .find(|r| r.state == state && r.provider.as_deref() == provider)
                    .cloned()
                    .unwrap_or_else(|| panic!("{state:?} {provider:?}: {stats:?}"))
            };
            assert_eq!(stats.rows.len(), 5);
            assert_eq!(row(JobState::Queued, None).jobs, 2);
            assert_eq!(row(JobState::Running, Some("deepseek")).jobs, 2);
            let s = row(JobState::Succeeded, Some("deepseek"));
            assert_eq!(
                (
                    s.jobs,
                    s.cost_usd,
                    s.list_cost_usd,
                    s.input_tokens,
                    s.output_tokens
                ),
                (1, 0.25, 0.5, 7, 5)
            );
            let f = row(JobState::Failed, Some("openai"));
            assert_eq!((f.jobs, f.cost_usd, f.input_tokens), (1, 0.125, 3));
            let c = row(JobState::Cancelled, None);
            assert_eq!((c.jobs, c.cost_usd, c.input_tokens), (1, 0.0, 0));
            assert_eq!((stats.late_cost_usd, stats.late_answers), (0.09375, 3));
            t.push(format!("{stats:?}"));
            t
        });
        assert!(t.last().unwrap().contains("late_answers: 3"));
    }

    #[test]
    fn recent_outcomes_per_provider_alike() {
        conform(|store| {
            let mut t = three_sources(store);
            assert!(store.recent_outcomes(T0 + 1_000).unwrap().is_empty());
            // Another failure on openai, later, with an error code; and one
            // on deepseek with neither code nor status.
            exec(
                store,
                &format!(
                    "UPDATE jobs SET state = 'failed', provider = 'openai', completed_at = {a},
                            error_code = 'rate_limited', error_message = 'slow down' WHERE id = 1;
                     UPDATE jobs SET state = 'failed', provider = 'deepseek', completed_at = {b},
                            status_code = NULL, lease_owner = NULL WHERE id = 6;",
                    a = T0 + 400,
                    b = T0 + 150,
                ),
            );
            let all = store.recent_outcomes(0).unwrap();
            assert_eq!(all.len(), 2);
            let o = &all["openai"];
            assert_eq!((o.succeeded, o.failed), (0, 2));
            assert_eq!(
                o.last_failure,
                Some((T0 + 400, "rate_limited".into(), Some("slow down".into())))
            );
            let d = &all["deepseek"];
            assert_eq!((d.succeeded, d.failed), (1, 1));
            assert_eq!(d.last_failure, Some((T0 + 150, "failed".into(), None)));
            t.push(format!("{all:?}"));
            // Since after the deepseek failure: its success remains; openai's
            // older failure (an HTTP status) is the latest before T0 + 350.
            let later = store.recent_outcomes(T0 + 160).unwrap();
            assert_eq!(later["deepseek"].last_failure, None);
            assert_eq!(later["deepseek"].succeeded, 1);
            assert_eq!(later["openai"].failed, 2);
            t.push(format!("{later:?}"));
            exec(
                store,
                &format!("UPDATE jobs SET completed_at = {} WHERE id = 1", T0 + 250),
            );
            let swapped = store.recent_outcomes(0).unwrap();
            assert_eq!(
                swapped["openai"].last_failure,
                Some((T0 + 300, "http_500".into(), Some("upstream".into())))
            );
            t.push(format!("{swapped:?}"));
            t
        });
    }

    /// A read error while a batch's lines are ingested rolls everything
    /// back: no source, no jobs, the batch still unlinked.
    #[test]
    fn a_failed_batch_ingest_leaves_nothing_alike() {
        conform(|store| {
            let f = store.insert_file("batch", "in.jsonl", b"{}", T0).unwrap();
            let id = store.create_batch(&new_batch(f.id)).unwrap();
            let good = lines(&["x1"]);
            let failing = outcomes(&good).chain(std::iter::once(Err(std::io::Error::other(
                "the disk went away",
            ))));
            let err = store
                .ingest_batch(id, &source(Origin::Upload, "in.jsonl", "batch_1"), failing)
                .unwrap_err();
            assert!(matches!(err, QueueError::Read(_)), "{err}");
            assert!(store.list_sources(None, 10).unwrap().is_empty());
            assert!(
                store
                    .list_jobs(&JobFilter::default(), 0, 10)
                    .unwrap()
                    .is_empty()
            );
            let open = store.validating_batches().unwrap();
            assert_eq!(open[0].1, None);
            vec![format!("{open:?}")]
        });
    }

    /// Daemons closing (or cancelling) the same batch at once: one does,
    /// the others find it closed, and only one set of files is written.
    #[test]
    fn a_batch_closed_by_several_daemons_at_once_is_closed_once() {
        let stores = backends();
        let (store, _) = &stores[1];
        assert_eq!(store.kind(), "postgresql");
        let f = store.insert_file("batch", "in.jsonl", b"{}", T0).unwrap();
        let id = store.create_batch(&new_batch(f.id)).unwrap();
        let s = store
            .ingest_batch(
                id,
                &source(Origin::Upload, "in.jsonl", "batch_1"),
                outcomes(&lines(&["z1", "z2"])),
            )
            .unwrap();
        store
            .start_batch(id, Some(s.source_id), false, None, T0)
            .unwrap();
        let cancelled: Vec<Option<usize>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|i| sc.spawn(move || store.cancel_batch(id, T0 + i).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut cancelled: Vec<_> = cancelled.into_iter().flatten().collect();
        cancelled.sort();
        assert_eq!(cancelled, [2], "one cancel, of both queued jobs");
        let close = BatchClose {
            status: "cancelled",
            at: T0 + 10,
            output: None,
            errors: Some(("e.jsonl".into(), 1)),
        };
        let closed: Vec<bool> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|_| sc.spawn(|| store.close_batch(id, &close).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(closed.iter().filter(|&&c| c).count(), 1, "{closed:?}");
        let Backend::Postgres(p) = store.backend() else {
            unreachable!()
        };
        let files: i64 = p
            .run(|c| {
                Ok(
                    c.query_one("SELECT COUNT(*) FROM files WHERE batch_id = $1", &[&id])?
                        .get(0),
                )
            })
            .unwrap();
        assert_eq!(files, 1);
        let b = store.batch(id).unwrap().unwrap();
        assert_eq!(b.status, "cancelled");
        assert_eq!(b.error_file_id.map(|_| ()), Some(()));
    }
}
