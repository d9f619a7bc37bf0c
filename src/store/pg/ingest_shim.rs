//! PostgreSQL: a straightforward ingest of one source, so that
//! `Postgres::ingest_batch` (in `api`) and its tests run on this branch.
//!
//! Replaced by queue::ingest_in at merge (the queue's own `ingest` is ported
//! in `queue.rs`; this file and its `mod` line go away then).
//!
//! It mirrors `Sqlite::ingest_linked`: the source row (with this daemon's
//! node), its valid lines as queued jobs, its invalid lines (and repeated
//! `custom_id`s) as line errors, the source's totals, all inside the
//! caller's transaction. Nothing here consumes an identity value it does not
//! keep (no `INSERT .. ON CONFLICT DO NOTHING` on the common path), so a
//! fresh database numbers sources, jobs and routes as SQLite does.

use std::collections::HashMap;

use postgres::Transaction;

use crate::domain::job::LineError;
use crate::store::{IngestSummary, LineOutcome, NewSource, Result};

/// Ingests `lines` as a new source in `tx` (not committed). Returns the
/// source's id and what was ingested.
pub(crate) fn ingest_in(
    tx: &mut Transaction<'_>,
    node: &str,
    source: &NewSource,
    lines: impl Iterator<Item = std::io::Result<LineOutcome>>,
) -> Result<(i64, IngestSummary)> {
    let (source_id, stem) = insert_source(tx, node, source)?;
    let insert_job = tx.prepare(
        "INSERT INTO jobs (source_id, line, custom_id, endpoint, model, body, options, priority,
            est_input_tokens, est_output_tokens, submitted_at, deadline, route_id, size_bin)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id",
    )?;
    let insert_error = tx.prepare(
        "INSERT INTO line_errors (source_id, line, custom_id, field, message) VALUES ($1, $2, $3, $4, $5)",
    )?;
    let get_route = tx.prepare("SELECT id FROM routes WHERE key = $1")?;
    let add_route = tx.prepare(
        "INSERT INTO routes (key) VALUES ($1) ON CONFLICT (key) DO NOTHING RETURNING id",
    )?;
    let mut routes: HashMap<String, i64> = HashMap::new();
    // The source is new and uncommitted: every job of it is inserted here,
    // so a repeated custom_id is known without asking the database.
    let mut first_line: HashMap<String, i64> = HashMap::new();
    let (mut total, mut queued, mut invalid) = (0u64, 0u64, 0u64);
    for outcome in lines {
        let LineOutcome { line, job } = outcome?;
        total += 1;
        let error = match job {
            Ok(job) => match first_line.get(&job.custom_id) {
                Some(&l) => LineError {
                    custom_id: Some(job.custom_id),
                    field: Some("custom_id".into()),
                    message: format!("duplicate custom_id (first used on line {l})"),
                },
                None => {
                    let route_id = match routes.get(&job.route_key) {
                        Some(&id) => id,
                        None => {
                            let id = match tx.query_opt(&get_route, &[&job.route_key])? {
                                Some(r) => r.try_get(0)?,
                                None => match tx.query_opt(&add_route, &[&job.route_key])? {
                                    Some(r) => r.try_get(0)?,
                                    // Another daemon added it meanwhile.
                                    None => {
                                        tx.query_one(&get_route, &[&job.route_key])?.try_get(0)?
                                    }
                                },
                            };
                            routes.insert(job.route_key.clone(), id);
                            id
                        }
                    };
                    let id: i64 = tx
                        .query_one(
                            &insert_job,
                            &[
                                &source_id,
                                &(line as i64),
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
                                &route_id,
                                &crate::domain::estimate::size_bin(job.estimate.output),
                            ],
                        )?
                        .try_get(0)?;
                    queued += 1;
                    tracing::debug!(job = id, custom_id = %crate::domain::units::escaped(&job.custom_id), "job queued");
                    first_line.insert(job.custom_id, line as i64);
                    continue;
                }
            },
            Err(e) => e,
        };
        invalid += 1;
        tx.execute(
            &insert_error,
            &[
                &source_id,
                &(line as i64),
                &error.custom_id,
                &error.field,
                &error.message,
            ],
        )?;
    }
    tx.execute(
        "UPDATE sources SET total_lines = $2, valid_jobs = $3, invalid_lines = $4 WHERE id = $1",
        &[
            &source_id,
            &(total as i64),
            &(queued as i64),
            &(invalid as i64),
        ],
    )?;
    Ok((
        source_id,
        IngestSummary {
            source_id,
            stem,
            total_lines: total,
            queued,
            invalid,
        },
    ))
}

/// Inserts the source under the first free stem of `wanted`, `wanted.2`,
/// `wanted.3`, ... (as SQLite's `unique_stem`); a stem another daemon takes
/// between the check and the insert moves on to the next.
fn insert_source(
    tx: &mut Transaction<'_>,
    node: &str,
    source: &NewSource,
) -> Result<(i64, String)> {
    let taken = tx.prepare("SELECT EXISTS (SELECT 1 FROM sources WHERE stem = $1)")?;
    let insert = tx.prepare(
        "INSERT INTO sources (origin, name, stem, sha256, ingested_at, total_lines, valid_jobs, invalid_lines, node)
         VALUES ($1, $2, $3, $4, $5, 0, 0, 0, $6) ON CONFLICT (stem) DO NOTHING RETURNING id",
    )?;
    for n in 1u64.. {
        let stem = if n == 1 {
            source.stem.to_string()
        } else {
            format!("{}.{n}", source.stem)
        };
        if tx.query_one(&taken, &[&stem])?.try_get::<_, bool>(0)? {
            continue;
        }
        if let Some(r) = tx.query_opt(
            &insert,
            &[
                &source.origin.as_str(),
                &source.name,
                &stem,
                &source.sha256,
                &source.now_ms,
                &node,
            ],
        )? {
            return Ok((r.try_get(0)?, stem));
        }
    }
    unreachable!("the loop returns")
}
