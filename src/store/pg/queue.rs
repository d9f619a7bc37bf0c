//! PostgreSQL: queue (the same methods as the SQLite store's, see `store::backend`).
//!
//! The statements are the SQLite store's (`store/mod.rs`), translated, with
//! what several daemons on one database change: a source belongs to the node
//! whose inbox received it (`sources.node`), claims and recoveries pick rows
//! with `FOR UPDATE SKIP LOCKED` (two daemons never wait on each other's
//! rows, so they neither deadlock nor claim one job twice), and a running
//! job of another owner is recovered only once that daemon is gone.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};

use super::Postgres;
use crate::domain::job::{LineError, NewJob};
use crate::store::*;

/// Rows buffered before one `COPY` into `jobs` (or `line_errors`).
const INGEST_CHUNK: usize = 8192;

/// The transaction lock taken before a transaction inserts route keys, so
/// two ingests adding the same new keys in different orders cannot deadlock
/// on the unique index ("routes" in ASCII).
const ROUTES_LOCK: i64 = 0x726f_7574_6573;

/// The `jobs` columns a `COPY` during ingest fills, and their types.
const COPY_JOBS: &str =
    "COPY jobs (source_id, line, custom_id, endpoint, model, body, options, priority,
        est_input_tokens, est_output_tokens, submitted_at, deadline, route_id, size_bin)
     FROM STDIN BINARY";
const COPY_JOBS_TYPES: [Type; 14] = [
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
];
const COPY_ERRORS: &str =
    "COPY line_errors (source_id, line, custom_id, field, message) FROM STDIN BINARY";
const COPY_ERRORS_TYPES: [Type; 5] = [Type::INT8, Type::INT8, Type::TEXT, Type::TEXT, Type::TEXT];

/// [`Postgres::queued_in_route`]: along `jobs_due`, in its order.
const QUEUED_IN_ROUTE: &str =
    "SELECT id, custom_id, endpoint, model, body, options, est_input_tokens, est_output_tokens,
        submitted_at, deadline, attempts
 FROM jobs
 WHERE state = 'queued' AND route_id = (SELECT id FROM routes WHERE key = $1)
   AND size_bin = $6 AND deadline >= $2 AND deadline < $3 AND not_before <= $5
 ORDER BY deadline, priority DESC, id LIMIT $4";

/// [`Postgres::queued_buckets`]: folded into [`crate::plan::BUCKET_MS`]
/// buckets by the server (a hash aggregate; SQLite folds them in Rust to
/// avoid a sort), sums in floating point (never an overflow), in the order
/// SQLite's walk of `jobs_due` gives them.
const QUEUED_BUCKETS: &str =
    "SELECT r.key, b.size_bin, b.deadline_from, b.n, b.input, b.output, b.min_deadline
     FROM (SELECT route_id, size_bin, deadline - ((deadline % $1) + $1) % $1 AS deadline_from,
                  COUNT(*) AS n, COALESCE(SUM(est_input_tokens::DOUBLE PRECISION), 0) AS input,
                  COALESCE(SUM(est_output_tokens::DOUBLE PRECISION), 0) AS output,
                  MIN(deadline) AS min_deadline
           FROM jobs WHERE state = 'queued'
           GROUP BY 1, 2, 3) AS b
     JOIN routes r ON r.id = b.route_id
     ORDER BY b.route_id, b.size_bin, b.deadline_from";

/// [`Postgres::expire_overdue`]: a range on `jobs_due` per route and size
/// bin; rows another transaction holds (a claim under way) are left to the
/// next pass.
const EXPIRE_OVERDUE: &str = "WITH due AS (
        SELECT id FROM jobs
        WHERE state = 'queued' AND route_id IN (SELECT id FROM routes)
          AND size_bin = ANY($2) AND deadline <= $1
        FOR UPDATE OF jobs SKIP LOCKED),
    expired AS (
        UPDATE jobs j SET state = 'expired', completed_at = $1, error_code = 'expired',
            error_message = 'the deadline passed before the job could be dispatched'
        FROM due WHERE j.id = due.id AND j.state = 'queued'
        RETURNING j.id, j.custom_id)
    SELECT id, custom_id FROM expired ORDER BY id";

/// [`Postgres::earliest_queued_deadline`]: the first entry of `jobs_due`
/// for each route and size bin (an index probe each), not a scan of every
/// queued job.
const EARLIEST_QUEUED_DEADLINE: &str = "SELECT MIN(d.deadline) FROM routes r
     CROSS JOIN UNNEST($1::BIGINT[]) AS b(bin)
     CROSS JOIN LATERAL (SELECT deadline FROM jobs
                         WHERE state = 'queued' AND route_id = r.id AND size_bin = b.bin
                         ORDER BY deadline LIMIT 1) AS d";

/// [`Postgres::recover_leases`]; see there for the rule.
const RECOVER_LEASES: &str = "WITH gone AS (
        SELECT id FROM jobs j
        WHERE state = 'running' AND provider_batch_id IS NULL
          AND (lease_until <= $1
               OR (lease_owner IS DISTINCT FROM $2
                   AND NOT EXISTS (SELECT 1 FROM daemons d
                                   WHERE d.owner = j.lease_owner AND d.heartbeat_at >= $1 - $3)))
        FOR UPDATE OF j SKIP LOCKED)
    UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL
    FROM gone WHERE jobs.id = gone.id AND jobs.state = 'running'";

/// [`Postgres::recent_sends`]: as SQLite's `RECENT_SENDS` (ties in time in
/// a fixed order).
const RECENT_SENDS: &str =
    "SELECT provider, model, MAX(at_ms), COUNT(*), SUM(tokens)::BIGINT FROM sends
     WHERE at_ms > $1::BIGINT - $2::BIGINT
     GROUP BY provider, model,
              CASE WHEN at_ms > $1::BIGINT - $3::BIGINT THEN at_ms ELSE -1 - at_ms / 1000 END
     ORDER BY 3, provider COLLATE \"C\", model COLLATE \"C\"";

/// [`Postgres::spent_since`]: a range on `jobs_completed`.
const SPENT_SINCE: &str =
    "SELECT COALESCE(SUM(COALESCE(cost_usd, 0) + late_cost_usd), 0)::DOUBLE PRECISION FROM jobs
     WHERE completed_at >= $1 AND ($2::TEXT IS NULL OR provider = $2)";

/// The final outcome's update (SQLite's `finish_on`): state `$3`, the
/// columns of [`Finish`] `$4` to `$13`, the channel `$14`.
const FINISH: &str =
    "UPDATE jobs SET state = $3, completed_at = $4, status_code = $5, request_id = $6,
        response = $7, error_code = $8, error_message = $9, input_tokens = $10, output_tokens = $11,
        cost_usd = $12, list_cost_usd = $13, lease_owner = NULL, lease_until = NULL,
        provider_channel = COALESCE($14, provider_channel)
     WHERE id = $1 AND state = 'running' AND lease_owner = $2";

/// A retry's update (SQLite's `retry_on`).
const RETRY: &str =
    "UPDATE jobs SET state = 'queued', not_before = $3, lease_owner = NULL, lease_until = NULL,
        status_code = $4, request_id = $5, response = $6, error_code = $7, error_message = $8
     WHERE id = $1 AND state = 'running' AND lease_owner = $2";

/// The columns of a [`FinishedJob`], as SQLite's `SELECT_FINISHED`.
const SELECT_FINISHED: &str = "SELECT id, line, custom_id, state, attempts, provider, provider_model, dispatched_at,
        completed_at, status_code, request_id, response, error_code, error_message, input_tokens, output_tokens,
        cost_usd, list_cost_usd, provider_channel,
        (SELECT remote_id FROM provider_batches WHERE id = jobs.provider_batch_id) FROM jobs";

/// A [`FinishedJob`] from a row of [`SELECT_FINISHED`]'s columns (the API's
/// job detail reads the same 20 first).
pub(super) fn finished_from_row(
    r: &postgres::Row,
) -> std::result::Result<FinishedJob, postgres::Error> {
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

fn due_from_row(r: &postgres::Row) -> DueJob {
    DueJob {
        id: r.get(0),
        custom_id: r.get(1),
        endpoint: r.get(2),
        model: r.get(3),
        body: r.get(4),
        options: r.get(5),
        est_input_tokens: r.get::<_, i64>(6) as u64,
        est_output_tokens: r.get::<_, i64>(7) as u64,
        submitted_at: r.get(8),
        deadline: r.get(9),
        attempts: r.get::<_, i64>(10) as u32,
    }
}

fn sat_i64(x: u64) -> i64 {
    x.min(i64::MAX as u64) as i64
}

/// PostgreSQL's text cannot hold NUL: one in a line error's text is replaced.
fn no_nul(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}").into()
    } else {
        s.into()
    }
}

/// Inserts the source row under a unique stem (`stem`, `stem.2`, ...),
/// owned by `node`. A stem another transaction takes meanwhile is skipped.
fn insert_source(
    tx: &mut postgres::Transaction<'_>,
    node: &str,
    source: &NewSource,
) -> Result<(i64, String)> {
    let taken = tx.prepare("SELECT EXISTS (SELECT 1 FROM sources WHERE stem = $1)")?;
    let insert = tx.prepare(
        "INSERT INTO sources (origin, name, stem, sha256, ingested_at, total_lines, valid_jobs, invalid_lines, node)
         VALUES ($1, $2, $3, $4, $5, 0, 0, 0, $6)
         ON CONFLICT (stem) DO NOTHING RETURNING id",
    )?;
    for n in 1u64.. {
        let candidate = if n == 1 {
            source.stem.to_string()
        } else {
            format!("{}.{n}", source.stem)
        };
        if tx.query_one(&taken, &[&candidate])?.get::<_, bool>(0) {
            continue;
        }
        if let Some(row) = tx.query_opt(
            &insert,
            &[
                &source.origin.as_str(),
                &source.name,
                &candidate,
                &source.sha256,
                &source.now_ms,
                &node,
            ],
        )? {
            return Ok((row.get(0), candidate));
        }
    }
    unreachable!("the loop returns")
}

/// Route keys to `routes.id` for one ingest, inserting new ones.
#[derive(Default)]
struct RouteIds {
    cache: HashMap<String, i64>,
    locked: bool,
}

impl RouteIds {
    /// Makes every key of `jobs` known.
    fn resolve(
        &mut self,
        tx: &mut postgres::Transaction<'_>,
        jobs: &[(i64, NewJob)],
    ) -> Result<()> {
        let mut missing: Vec<&str> = jobs
            .iter()
            .map(|(_, j)| j.route_key.as_str())
            .filter(|k| !self.cache.contains_key(*k))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        let select = "SELECT key, id FROM routes WHERE key = ANY($1)";
        for r in tx.query(select, &[&missing])? {
            self.cache.insert(r.get(0), r.get(1));
        }
        missing.retain(|k| !self.cache.contains_key(*k));
        if missing.is_empty() {
            return Ok(());
        }
        if !self.locked {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ROUTES_LOCK])?;
            self.locked = true;
        }
        tx.execute(
            "INSERT INTO routes (key) SELECT k FROM UNNEST($1::TEXT[]) AS u(k) ORDER BY k
             ON CONFLICT (key) DO NOTHING",
            &[&missing],
        )?;
        for r in tx.query(select, &[&missing])? {
            self.cache.insert(r.get(0), r.get(1));
        }
        Ok(())
    }
}

/// Copies the buffered jobs into `jobs`.
fn flush_jobs(
    tx: &mut postgres::Transaction<'_>,
    source_id: i64,
    now_ms: i64,
    routes: &mut RouteIds,
    jobs: &mut Vec<(i64, NewJob)>,
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    routes.resolve(tx, jobs)?;
    let mut w = BinaryCopyInWriter::new(tx.copy_in(COPY_JOBS)?, &COPY_JOBS_TYPES);
    for (line, job) in jobs.iter() {
        let route_id = routes.cache[&job.route_key];
        w.write(&[
            &source_id,
            line,
            &job.custom_id,
            &job.endpoint.as_url(),
            &job.model,
            &job.body,
            &job.options,
            &job.priority,
            &sat_i64(job.estimate.input),
            &sat_i64(job.estimate.output),
            &now_ms,
            &job.deadline.timestamp_millis(),
            &route_id,
            &crate::domain::estimate::size_bin(job.estimate.output),
        ])?;
    }
    w.finish()?;
    jobs.clear();
    Ok(())
}

/// Copies the buffered invalid lines into `line_errors`.
fn flush_errors(
    tx: &mut postgres::Transaction<'_>,
    source_id: i64,
    errors: &mut Vec<(i64, LineError)>,
) -> Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    let mut w = BinaryCopyInWriter::new(tx.copy_in(COPY_ERRORS)?, &COPY_ERRORS_TYPES);
    for (line, e) in errors.iter() {
        w.write(&[
            &source_id,
            line,
            &e.custom_id.as_deref().map(no_nul),
            &e.field.as_deref().map(no_nul),
            &no_nul(&e.message),
        ])?;
    }
    w.finish()?;
    errors.clear();
    Ok(())
}

/// Ingest in the caller's transaction (an API batch links its source in
/// the same one): the source (owned by `node`), its valid lines `COPY`ed
/// into `jobs` in chunks, its invalid ones into `line_errors`. As SQLite's,
/// a valid line whose `custom_id` repeats an earlier valid one becomes an
/// invalid line ("duplicate custom_id (first used on line N)"); the repeats
/// are found in memory (a hash per job, confirmed against the rows), so a
/// `COPY` never meets the unique index's violation. A valid line whose
/// `custom_id` holds a NUL character, which PostgreSQL's text cannot store,
/// is an invalid line here.
pub(super) fn ingest_in(
    tx: &mut postgres::Transaction<'_>,
    node: &str,
    source: &NewSource,
    lines: impl Iterator<Item = std::io::Result<LineOutcome>>,
) -> Result<IngestSummary> {
    let (source_id, stem) = insert_source(tx, node, source)?;
    let (mut total, mut queued, mut invalid) = (0u64, 0u64, 0u64);
    let mut routes = RouteIds::default();
    let hasher = std::collections::hash_map::RandomState::new();
    // custom_id's hash → the line of the first valid job with that hash.
    let mut first_line: HashMap<u64, i64> = HashMap::new();
    let mut jobs: Vec<(i64, NewJob)> = Vec::with_capacity(INGEST_CHUNK);
    let mut errors: Vec<(i64, LineError)> = Vec::new();
    let lookup = tx.prepare("SELECT line FROM jobs WHERE source_id = $1 AND custom_id = $2")?;
    for outcome in lines {
        let LineOutcome { line, job } = outcome?;
        total += 1;
        let line = line as i64;
        let error = match job {
            Ok(job) if job.custom_id.contains('\0') => LineError {
                custom_id: Some(job.custom_id),
                field: Some("custom_id".into()),
                message: "the custom_id holds a NUL character, which the database cannot store"
                    .into(),
            },
            Ok(job) => {
                let h = hasher.hash_one(&job.custom_id);
                let first = match first_line.entry(h) {
                    Entry::Vacant(v) => {
                        v.insert(line);
                        None
                    }
                    // The same hash: the same custom_id, unless (rarely) two
                    // collide. The rows say which.
                    Entry::Occupied(_) => {
                        match jobs.iter().find(|(_, j)| j.custom_id == job.custom_id) {
                            Some((l, _)) => Some(*l),
                            None => tx
                                .query_opt(&lookup, &[&source_id, &job.custom_id])?
                                .map(|r| r.get::<_, Option<i64>>(0).unwrap_or_default()),
                        }
                    }
                };
                match first {
                    None => {
                        queued += 1;
                        jobs.push((line, job));
                        if jobs.len() >= INGEST_CHUNK {
                            flush_jobs(tx, source_id, source.now_ms, &mut routes, &mut jobs)?;
                        }
                        continue;
                    }
                    Some(l) => LineError {
                        custom_id: Some(job.custom_id),
                        field: Some("custom_id".into()),
                        message: format!("duplicate custom_id (first used on line {l})"),
                    },
                }
            }
            Err(e) => e,
        };
        invalid += 1;
        errors.push((line, error));
        if errors.len() >= INGEST_CHUNK {
            flush_errors(tx, source_id, &mut errors)?;
        }
    }
    flush_jobs(tx, source_id, source.now_ms, &mut routes, &mut jobs)?;
    flush_errors(tx, source_id, &mut errors)?;
    tx.execute(
        "UPDATE sources SET total_lines = $2, valid_jobs = $3, invalid_lines = $4 WHERE id = $1",
        &[
            &source_id,
            &(total as i64),
            &(queued as i64),
            &(invalid as i64),
        ],
    )?;
    tracing::debug!(source = source_id, queued, invalid, "jobs queued");
    Ok(IngestSummary {
        source_id,
        stem,
        total_lines: total,
        queued,
        invalid,
    })
}

/// Claims the queued jobs of `starts` for `owner` in the caller's
/// transaction, and logs their sends: the rows are locked with `FOR UPDATE
/// SKIP LOCKED`, so a job another daemon is claiming at the same moment is
/// neither waited for nor claimed twice (it is simply not returned), and
/// one no longer queued is skipped. Returns the ids claimed, in the order
/// of `starts` (a job listed twice is claimed once). The sends (table
/// `sends`, with `owner`) are stamped no earlier than the clock now, as
/// SQLite's; those older than [`SENDS_KEPT_MS`] of the providers sent to
/// are deleted (rows another transaction is deleting are skipped).
pub(super) fn start_attempts_in(
    tx: &mut postgres::Transaction<'_>,
    starts: &[Start],
    now_ms: i64,
    lease_until: i64,
    owner: &str,
) -> Result<Vec<i64>> {
    let mut seen = HashSet::with_capacity(starts.len());
    let starts: Vec<&Start> = starts.iter().filter(|s| seen.insert(s.job_id)).collect();
    if starts.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = starts.iter().map(|s| s.job_id).collect();
    let providers: Vec<&str> = starts.iter().map(|s| s.provider.as_str()).collect();
    let models: Vec<&str> = starts.iter().map(|s| s.provider_model.as_str()).collect();
    let channels: Vec<&str> = starts.iter().map(|s| s.channel).collect();
    let claimed: HashSet<i64> = tx
        .query(
            "WITH claimed AS (
                SELECT id FROM jobs WHERE id = ANY($1) AND state = 'queued'
                FOR UPDATE SKIP LOCKED)
             UPDATE jobs j SET state = 'running', attempts = j.attempts + 1, lease_owner = $2,
                    lease_until = $3, provider = u.provider, provider_model = u.model,
                    dispatched_at = $4, provider_channel = u.channel
             FROM claimed c, UNNEST($1::BIGINT[], $5::TEXT[], $6::TEXT[], $7::TEXT[])
                  AS u(id, provider, model, channel)
             WHERE j.id = c.id AND u.id = c.id
             RETURNING j.id",
            &[
                &ids,
                &owner,
                &lease_until,
                &now_ms,
                &providers,
                &models,
                &channels,
            ],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let started: Vec<&Start> = starts
        .into_iter()
        .filter(|s| claimed.contains(&s.job_id))
        .collect();
    if started.is_empty() {
        return Ok(Vec::new());
    }
    let sent_ms = now_ms.max(chrono::Utc::now().timestamp_millis());
    let providers: Vec<&str> = started.iter().map(|s| s.provider.as_str()).collect();
    let models: Vec<&str> = started.iter().map(|s| s.provider_model.as_str()).collect();
    let tokens: Vec<i64> = started.iter().map(|s| sat_i64(s.tokens)).collect();
    tx.execute(
        "INSERT INTO sends (at_ms, provider, model, tokens, owner)
         SELECT $1, u.provider, u.model, u.tokens, $5
         FROM UNNEST($2::TEXT[], $3::TEXT[], $4::BIGINT[]) AS u(provider, model, tokens)",
        &[&sent_ms, &providers, &models, &tokens, &owner],
    )?;
    let mut sent_to = providers.clone();
    sent_to.sort_unstable();
    sent_to.dedup();
    tx.execute(
        "DELETE FROM sends WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM sends WHERE provider = ANY($1) AND at_ms <= $2
             FOR UPDATE SKIP LOCKED))",
        &[&sent_to, &(sent_ms - SENDS_KEPT_MS)],
    )?;
    Ok(started.iter().map(|s| s.job_id).collect())
}

fn finish_in(
    tx: &mut impl postgres::GenericClient,
    stmt: &postgres::Statement,
    job_id: i64,
    owner: &str,
    f: &Finish,
) -> Result<bool> {
    let params: [&(dyn ToSql + Sync); 14] = [
        &job_id,
        &owner,
        &if f.succeeded { "succeeded" } else { "failed" },
        &f.completed_at,
        &f.status_code.map(i64::from),
        &f.request_id,
        &f.response,
        &f.error_code,
        &f.error_message,
        &f.input_tokens.map(sat_i64),
        &f.output_tokens.map(sat_i64),
        &f.cost_usd,
        &f.list_cost_usd,
        &f.channel,
    ];
    Ok(tx.execute(stmt, &params)? == 1)
}

fn retry_in(
    tx: &mut impl postgres::GenericClient,
    stmt: &postgres::Statement,
    job_id: i64,
    owner: &str,
    not_before: i64,
    last: &Finish,
) -> Result<bool> {
    let params: [&(dyn ToSql + Sync); 8] = [
        &job_id,
        &owner,
        &not_before,
        &last.status_code.map(i64::from),
        &last.request_id,
        &last.response,
        &last.error_code,
        &last.error_message,
    ];
    Ok(tx.execute(stmt, &params)? == 1)
}

impl Postgres {
    /// The inbox source with this content hash, if it was ingested before.
    pub fn inbox_source_by_hash(&self, sha256: &str) -> Result<Option<(i64, String)>> {
        self.run(|c| {
            Ok(c.query_opt(
                "SELECT id, name FROM sources WHERE origin = 'inbox' AND sha256 = $1",
                &[&sha256],
            )?
            .map(|r| (r.get(0), r.get(1))))
        })
    }

    /// Queues every valid line of a source and records every invalid one,
    /// in one transaction ([`ingest_in`]); the source is this node's.
    pub fn ingest(
        &self,
        source: &NewSource,
        lines: impl Iterator<Item = std::io::Result<LineOutcome>>,
    ) -> Result<IngestSummary> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            let summary = ingest_in(&mut tx, &self.node, source, lines)?;
            tx.commit()?;
            Ok(summary)
        })
    }

    /// Per provider, reported ÷ estimated input tokens; per route key,
    /// reported ÷ expected output tokens; of the jobs that succeeded in the
    /// last `days` days.
    #[allow(clippy::type_complexity)]
    pub fn learned_token_ratios(
        &self,
        days: i64,
    ) -> Result<(Vec<(String, f64)>, Vec<(String, f64)>)> {
        let since = chrono::Utc::now().timestamp_millis() - days * 86_400_000;
        let ratio = |a: f64, e: f64| (e > 0.0).then_some(a / e);
        self.run(|c| {
            let inputs = c
                .query(
                    "SELECT provider, COALESCE(SUM(input_tokens::DOUBLE PRECISION), 0),
                            COALESCE(SUM(est_input_tokens::DOUBLE PRECISION), 0)
                     FROM jobs WHERE state = 'succeeded' AND completed_at > $1
                     GROUP BY provider ORDER BY provider COLLATE \"C\"",
                    &[&since],
                )?
                .iter()
                .filter_map(|r| Some((r.get::<_, Option<String>>(0)?, ratio(r.get(1), r.get(2))?)))
                .collect();
            let outputs = c
                .query(
                    "SELECT r.key, COALESCE(SUM(j.output_tokens::DOUBLE PRECISION), 0),
                            COALESCE(SUM(j.est_output_tokens::DOUBLE PRECISION), 0)
                     FROM jobs j JOIN routes r ON r.id = j.route_id
                     WHERE j.state = 'succeeded' AND j.completed_at > $1
                     GROUP BY j.route_id, r.key ORDER BY j.route_id",
                    &[&since],
                )?
                .iter()
                .filter_map(|r| Some((r.get::<_, String>(0), ratio(r.get(1), r.get(2))?)))
                .collect();
            Ok((inputs, outputs))
        })
    }

    /// Queued jobs per route key, for metrics.
    pub fn queued_by_route(&self) -> Result<Vec<(String, u64)>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT r.key, q.n FROM (SELECT route_id, COUNT(*) AS n FROM jobs WHERE state = 'queued' GROUP BY route_id) AS q
                 JOIN routes r ON r.id = q.route_id ORDER BY q.route_id",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
        })
    }

    /// Queued jobs by route, size bin and deadline bucket: the planner's input.
    pub fn queued_buckets(&self) -> Result<Vec<crate::plan::QueuedBucket>> {
        let bucket = crate::plan::BUCKET_MS;
        self.run(|c| {
            Ok(c.query(QUEUED_BUCKETS, &[&bucket])?
                .iter()
                .map(|r| {
                    let from: i64 = r.get(2);
                    crate::plan::QueuedBucket {
                        route_key: r.get(0),
                        size_bin: r.get(1),
                        deadline_from: from,
                        deadline_to: from + bucket,
                        jobs: r.get::<_, i64>(3).max(0) as u64,
                        // `as` saturates (and maps NaN to 0).
                        input_tokens: r.get::<_, f64>(4) as u64,
                        output_tokens: r.get::<_, f64>(5) as u64,
                        min_deadline: r.get(6),
                    }
                })
                .collect())
        })
    }

    /// The most urgent queued jobs of one route and size bin with deadlines
    /// in `[from, to)` whose `not_before` has passed at `now_ms`.
    pub fn queued_in_route(
        &self,
        route_key: &str,
        size_bin: i64,
        from: i64,
        to: i64,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<DueJob>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.run(|c| {
            Ok(c.query(
                QUEUED_IN_ROUTE,
                &[&route_key, &from, &to, &limit, &now_ms, &size_bin],
            )?
            .iter()
            .map(due_from_row)
            .collect())
        })
    }

    /// Fails every queued job of a route (its models are gone from the config).
    pub fn fail_route(
        &self,
        route_key: &str,
        now_ms: i64,
        code: &str,
        message: &str,
    ) -> Result<usize> {
        self.run(|c| {
            Ok(c.execute(
                "UPDATE jobs SET state = 'failed', completed_at = $2, error_code = $3, error_message = $4
                 WHERE state = 'queued' AND route_id = (SELECT id FROM routes WHERE key = $1)",
                &[&route_key, &now_ms, &code, &message],
            )? as usize)
        })
    }

    /// Moves these jobs from queued to running under `owner`'s lease,
    /// counting an attempt, in one transaction ([`start_attempts_in`]).
    /// Returns the ids claimed: a job cancelled, or claimed by another
    /// daemon, meanwhile is skipped.
    pub fn start_attempts(
        &self,
        starts: &[Start],
        now_ms: i64,
        lease_until: i64,
        owner: &str,
    ) -> Result<Vec<i64>> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            // Only what every daemon's sends together leave room for
            // (`coord`); the rest stay queued.
            let admitted = super::coord::admit(&mut tx, &self.shares(), starts, now_ms)?;
            let started = start_attempts_in(&mut tx, &admitted, now_ms, lease_until, owner)?;
            tx.commit()?;
            Ok(started)
        })
    }

    /// The requests sent (by every daemon) in the last [`SENDS_KEPT_MS`]
    /// before `now_ms`, in time order: to the millisecond in the last
    /// `minute_held` ms, by second before.
    pub fn recent_sends(&self, now_ms: i64, minute_held: i64) -> Result<Vec<SentGroup>> {
        self.run(|c| {
            Ok(
                c.query(RECENT_SENDS, &[&now_ms, &SENDS_KEPT_MS, &minute_held])?
                    .iter()
                    .map(|r| SentGroup {
                        provider: r.get(0),
                        model: r.get(1),
                        at_ms: r.get(2),
                        requests: r.get::<_, i64>(3).max(0) as u64,
                        tokens: r.get::<_, Option<i64>>(4).unwrap_or(0).max(0) as u64,
                    })
                    .collect(),
            )
        })
    }

    /// Records the final outcome of a running job held by `owner`; false
    /// (nothing changed) if it is no longer this owner's.
    pub fn finish(&self, job_id: i64, owner: &str, f: &Finish) -> Result<bool> {
        self.run(|c| {
            let stmt = c.prepare(FINISH)?;
            finish_in(&mut **c, &stmt, job_id, owner, f)
        })
    }

    /// Returns a running job held by `owner` to the queue, not to be sent
    /// before `not_before`, keeping the failure in its error columns.
    pub fn retry_later(
        &self,
        job_id: i64,
        owner: &str,
        not_before: i64,
        last: &Finish,
    ) -> Result<bool> {
        self.run(|c| {
            let stmt = c.prepare(RETRY)?;
            retry_in(&mut **c, &stmt, job_id, owner, not_before, last)
        })
    }

    /// Records many attempts' outcomes in one transaction; returns, in
    /// order, whether each job was still this owner's.
    pub fn record_attempts(&self, owner: &str, attempts: &[Recorded]) -> Result<Vec<bool>> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            let finish = tx.prepare(FINISH)?;
            let retry = tx.prepare(RETRY)?;
            let mut out = Vec::with_capacity(attempts.len());
            for a in attempts {
                out.push(match a.retry_at {
                    Some(at) => retry_in(&mut tx, &retry, a.job_id, owner, at, &a.finish)?,
                    None => finish_in(&mut tx, &finish, a.job_id, owner, &a.finish)?,
                });
            }
            tx.commit()?;
            Ok(out)
        })
    }

    /// Counts an answer that came after the job's lease was recovered.
    pub fn record_late_answer(&self, job_id: i64, cost_usd: f64) -> Result<()> {
        self.run(|c| {
            c.execute(
                "UPDATE jobs SET late_answers = late_answers + 1, late_cost_usd = late_cost_usd + $2 WHERE id = $1",
                &[&job_id, &cost_usd],
            )?;
            Ok(())
        })
    }

    /// Fails a queued job without sending it; false if it was no longer queued.
    pub fn fail_queued(&self, job_id: i64, now_ms: i64, code: &str, message: &str) -> Result<bool> {
        self.run(|c| {
            Ok(c.execute(
                "UPDATE jobs SET state = 'failed', completed_at = $2, error_code = $3, error_message = $4
                 WHERE id = $1 AND state = 'queued'",
                &[&job_id, &now_ms, &code, &message],
            )? == 1)
        })
    }

    /// Marks queued jobs whose deadline has passed as expired; returns
    /// their ids and custom_ids, by id. A job another daemon is claiming at
    /// this moment is left to it (it runs, or the next pass expires it).
    pub fn expire_overdue(&self, now_ms: i64) -> Result<Vec<(i64, String)>> {
        let bins: Vec<i64> = (0..crate::domain::estimate::SIZE_BINS).collect();
        self.run(|c| {
            Ok(c.query(EXPIRE_OVERDUE, &[&now_ms, &bins])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    /// The earliest deadline of a queued job (Unix ms), if any is queued.
    pub fn earliest_queued_deadline(&self) -> Result<Option<i64>> {
        let bins: Vec<i64> = (0..crate::domain::estimate::SIZE_BINS).collect();
        self.run(|c| Ok(c.query_one(EARLIEST_QUEUED_DEADLINE, &[&bins])?.get(0)))
    }

    /// Re-queues the running jobs (not in a provider batch) whose lease has
    /// expired (`lease_until <= now_ms`), or whose owner is another daemon
    /// that is gone: one with no row in `daemons` whose `heartbeat_at` is
    /// at least `now_ms -` [`super::coord::DEAD_AFTER_MS`] (dead, or never
    /// registered). A live daemon's jobs are its own until their lease
    /// expires. Rows are picked with `FOR UPDATE SKIP LOCKED`, so daemons
    /// recovering at once neither deadlock nor wait on a claim under way.
    /// The attempt stays counted.
    pub fn recover_leases(&self, now_ms: i64, owner: &str) -> Result<usize> {
        self.run(|c| {
            Ok(c.execute(
                RECOVER_LEASES,
                &[&now_ms, &owner, &super::coord::DEAD_AFTER_MS],
            )? as usize)
        })
    }

    /// Returns one running job of this owner to the queue; false if it was
    /// no longer this owner's running job.
    pub fn requeue_running(&self, job_id: i64, owner: &str) -> Result<bool> {
        self.run(|c| {
            Ok(c.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL
                 WHERE id = $1 AND state = 'running' AND lease_owner = $2",
                &[&job_id, &owner],
            )? == 1)
        })
    }

    /// Returns this owner's running jobs to the queue (graceful shutdown).
    pub fn release_running(&self, owner: &str) -> Result<usize> {
        self.run(|c| {
            Ok(c.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL
                 WHERE state = 'running' AND lease_owner = $1",
                &[&owner],
            )? as usize)
        })
    }

    /// This node's inbox sources whose jobs are all final and whose outbox
    /// is not yet written (another node's inbox sources are its to write).
    pub fn sources_ready_for_outbox(&self) -> Result<Vec<SourceRow>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT s.id, s.origin, s.name, s.stem FROM sources s
                 WHERE s.origin = 'inbox' AND s.outbox_written_at IS NULL AND s.node = $1
                   AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source_id = s.id AND j.state IN ('queued', 'running'))
                 ORDER BY s.id",
                &[&self.node],
            )?
            .iter()
            .map(|r| SourceRow {
                id: r.get(0),
                origin: r.get(1),
                name: r.get(2),
                stem: r.get(3),
            })
            .collect())
        })
    }

    /// Calls `on_job` with every job of a source in line order, streaming
    /// the rows as the server sends them.
    pub fn for_each_job_of(
        &self,
        source_id: i64,
        mut on_job: impl FnMut(FinishedJob) -> std::io::Result<()>,
    ) -> std::result::Result<(), ResultsError> {
        use postgres::fallible_iterator::FallibleIterator;
        self.run(|c| {
            let sql = format!("{SELECT_FINISHED} WHERE source_id = $1 ORDER BY line, id");
            let mut rows = c.query_raw(sql.as_str(), [&source_id as &(dyn ToSql + Sync)])?;
            let streamed = (|| -> std::result::Result<(), ResultsError> {
                while let Some(r) = rows.next().map_err(QueueError::from)? {
                    on_job(finished_from_row(&r).map_err(QueueError::from)?)?;
                }
                Ok(())
            })();
            Ok(streamed)
        })?
    }

    /// The invalid lines of a source, in line order.
    pub fn line_errors_of(&self, source_id: i64) -> Result<Vec<StoredLineError>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT line, custom_id, field, message FROM line_errors WHERE source_id = $1 ORDER BY line",
                &[&source_id],
            )?
            .iter()
            .map(|r| StoredLineError {
                line: r.get::<_, i64>(0) as u64,
                custom_id: r.get(1),
                field: r.get(2),
                message: r.get(3),
            })
            .collect())
        })
    }

    /// Records that a source's outbox files exist.
    pub fn mark_outbox_written(&self, source_id: i64, now_ms: i64) -> Result<()> {
        self.run(|c| {
            c.execute(
                "UPDATE sources SET outbox_written_at = $2 WHERE id = $1",
                &[&source_id, &now_ms],
            )?;
            Ok(())
        })
    }

    /// What jobs finished since `since_ms` cost (late duplicates included),
    /// on one provider or all.
    pub fn spent_since(&self, provider: Option<&str>, since_ms: i64) -> Result<f64> {
        self.run(|c| Ok(c.query_one(SPENT_SINCE, &[&since_ms, &provider])?.get(0)))
    }

    /// Spend of succeeded jobs since `since_ms`, grouped by `by`, in key
    /// order (bytewise, as SQLite's).
    pub fn spend(&self, since_ms: i64, by: SpendBy) -> Result<Vec<SpendRow>> {
        let key = match by {
            SpendBy::Provider => "provider",
            SpendBy::Class => "model",
            SpendBy::Day => {
                "to_char(to_timestamp((completed_at / 1000)::DOUBLE PRECISION) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
            SpendBy::Channel => "COALESCE(provider_channel, 'sync')",
        };
        self.run(|c| {
            Ok(c.query(
                &format!(
                    "SELECT {key}, COUNT(*), COALESCE(SUM(input_tokens::DOUBLE PRECISION), 0),
                            COALESCE(SUM(output_tokens::DOUBLE PRECISION), 0),
                            COALESCE(SUM(cost_usd), 0)::DOUBLE PRECISION,
                            COALESCE(SUM(list_cost_usd), 0)::DOUBLE PRECISION,
                            COALESCE(SUM(late_cost_usd), 0)::DOUBLE PRECISION
                     FROM jobs WHERE state = 'succeeded' AND completed_at >= $1
                     GROUP BY 1 ORDER BY {key} COLLATE \"C\" NULLS FIRST"
                ),
                &[&since_ms],
            )?
            .iter()
            .map(|r| SpendRow {
                key: r.get::<_, Option<String>>(0).unwrap_or_default(),
                jobs: r.get::<_, i64>(1) as u64,
                input_tokens: r.get::<_, f64>(2) as u64,
                output_tokens: r.get::<_, f64>(3) as u64,
                cost_usd: r.get(4),
                list_cost_usd: r.get(5),
                late_cost_usd: r.get(6),
            })
            .collect())
        })
    }

    /// Number of jobs in each state.
    pub fn counts(&self) -> Result<BTreeMap<JobState, u64>> {
        self.run(|c| {
            let mut out: BTreeMap<JobState, u64> = JobState::ALL.iter().map(|&s| (s, 0)).collect();
            for r in c.query("SELECT state, COUNT(*) FROM jobs GROUP BY state", &[])? {
                if let Some(s) = JobState::parse(r.get(0)) {
                    out.insert(s, r.get::<_, i64>(1) as u64);
                }
            }
            Ok(out)
        })
    }

    /// One job by id, final or not (`state` tells).
    pub fn job(&self, id: i64) -> Result<Option<FinishedJob>> {
        self.run(|c| {
            Ok(
                c.query_opt(&format!("{SELECT_FINISHED} WHERE id = $1"), &[&id])?
                    .map(|r| finished_from_row(&r))
                    .transpose()?,
            )
        })
    }
}

/// The same steps on both backends through the [`Store`] facade, and the
/// same answers; then what only a shared queue does.
#[cfg(test)]
pub(super) mod tests {
    use std::fmt::Debug;

    use chrono::{DateTime, Utc};

    use crate::config::Config;
    use crate::config::database::{Database, Target};
    use crate::domain::job::{JobContext, parse_line};
    use crate::store::pg::testing;
    use crate::store::*;

    pub(crate) const T0: i64 = 1_800_000_000_000;
    const OWNER: &str = "me";
    const MINUTE_HELD: i64 =
        crate::dispatch::limits::MINUTE_MS + crate::dispatch::limits::ARRIVAL_MARGIN_MS;

    /// A chat request line.
    fn chat(id: &str, class: &str, deadline: &str, max_tokens: u32, words: usize) -> String {
        let text = "word ".repeat(words);
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{class}","messages":[{{"role":"user","content":"{text}"}}],"max_tokens":{max_tokens}}},"nightshift":{{"deadline":"{deadline}"}}}}"#
        )
    }

    /// `n` cheap-chat lines j1..jn, due in an hour.
    pub(crate) fn plain(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| chat(&format!("j{i}"), "cheap-chat", "1h", 10, 1))
            .collect()
    }

    fn ingest_as(
        store: &Store,
        origin: Origin,
        lines: &[String],
        stem: &str,
        sha: &str,
    ) -> IngestSummary {
        let config = Config::embedded_default();
        let ctx = JobContext {
            catalog: &config.catalog,
            now: DateTime::<Utc>::from_timestamp_millis(T0).unwrap(),
            default_deadline: std::time::Duration::from_secs(3600),
        };
        let outcomes = lines.iter().enumerate().map(|(i, l)| {
            Ok(LineOutcome {
                line: i as u64 + 1,
                job: parse_line(l, &ctx),
            })
        });
        let source = NewSource {
            origin,
            name: "t.jsonl",
            stem,
            sha256: (origin == Origin::Inbox).then_some(sha),
            now_ms: T0,
        };
        store.ingest(&source, outcomes).unwrap()
    }

    pub(crate) fn ingest(store: &Store, lines: &[String], stem: &str, sha: &str) -> IngestSummary {
        ingest_as(store, Origin::Inbox, lines, stem, sha)
    }

    pub(crate) fn start(job_id: i64, tokens: u64) -> Start {
        Start {
            job_id,
            provider: "deepseek".into(),
            provider_model: "deepseek-flash".into(),
            channel: "sync",
            tokens,
        }
    }

    pub(crate) fn starts(ids: &[i64]) -> Vec<Start> {
        ids.iter().map(|&id| start(id, 7)).collect()
    }

    fn succeeded(cost: f64) -> Finish {
        Finish {
            succeeded: true,
            completed_at: T0 + 1000,
            status_code: Some(200),
            request_id: Some("req".into()),
            response: Some("{}".into()),
            input_tokens: Some(5),
            output_tokens: Some(3),
            cost_usd: Some(cost),
            list_cost_usd: Some(2.0 * cost),
            channel: Some("flex"),
            ..Finish::default()
        }
    }

    fn failed(code: u16) -> Finish {
        Finish {
            completed_at: T0 + 500,
            status_code: Some(code),
            error_code: Some("server_error".into()),
            error_message: Some("boom".into()),
            ..Finish::default()
        }
    }

    fn jobs_of(store: &Store, source_id: i64) -> Vec<String> {
        let mut out = Vec::new();
        store
            .for_each_job_of(source_id, |j| {
                out.push(format!("{j:?}"));
                Ok(())
            })
            .unwrap();
        out
    }

    fn route_of(store: &Store) -> String {
        store.queued_by_route().unwrap()[0].0.clone()
    }

    /// Runs `steps` on SQLite and on PostgreSQL and asserts both return the
    /// same (each step's answer, formatted).
    fn conform(steps: impl Fn(&Store, &mut Vec<String>)) {
        let mut answers: Vec<Vec<String>> = Vec::new();
        for (store, _dir) in testing::backends() {
            let mut log = Vec::new();
            steps(&store, &mut log);
            answers.push(log);
        }
        let (sqlite, pg) = (&answers[0], &answers[1]);
        for (i, (a, b)) in sqlite.iter().zip(pg).enumerate() {
            assert_eq!(
                a, b,
                "step {i}: sqlite (left) and postgresql (right) differ"
            );
        }
        assert_eq!(sqlite.len(), pg.len());
        assert!(!sqlite.is_empty());
    }

    fn say(log: &mut Vec<String>, what: &str, x: impl Debug) {
        log.push(format!("{what}: {x:?}"));
    }

    #[test]
    fn ingest_and_the_queue_reads_agree() {
        conform(|store, log| {
            let mut lines = vec![
                chat("a", "cheap-chat", "1h", 10, 1),
                "{not json".to_string(),
                chat("b", "cheap-chat", "1h1m", 11, 40),
                chat("a", "cheap-chat", "1h", 10, 1),
                chat("c", "cheap-chat", "1h14m", 200, 80),
                chat("d", "cheap-chat", "1h16m", 5000, 120),
                chat("e", "budget-chat", "1h1m", 10, 160),
                chat("f", "budget-chat", "5h", 10, 200),
                chat("g", "no-such-class", "5h", 10, 1),
                chat("c", "budget-chat", "1h", 10, 1),
            ];
            lines.push(String::new());
            let a = ingest(store, &lines, "t", "sha-a");
            say(log, "ingest a", &a);
            // The same stem again: a numeric suffix.
            let b = ingest_as(store, Origin::Upload, &plain(2), "t", "");
            say(log, "ingest b", &b);
            say(log, "by hash", store.inbox_source_by_hash("sha-a").unwrap());
            say(log, "by hash", store.inbox_source_by_hash("nope").unwrap());
            say(
                log,
                "line errors",
                store.line_errors_of(a.source_id).unwrap(),
            );
            say(log, "jobs of a", jobs_of(store, a.source_id));
            say(log, "jobs of b", jobs_of(store, b.source_id));
            say(log, "job 1", store.job(1).unwrap());
            say(log, "job 99", store.job(99).unwrap());
            say(log, "counts", store.counts().unwrap());
            let mut by_route = store.queued_by_route().unwrap();
            by_route.sort();
            say(log, "by route", &by_route);
            let mut buckets = store.queued_buckets().unwrap();
            buckets.sort_by(|x, y| {
                (&x.route_key, x.size_bin, x.deadline_from).cmp(&(
                    &y.route_key,
                    y.size_bin,
                    y.deadline_from,
                ))
            });
            say(log, "buckets", &buckets);
            for b in &buckets {
                let due = store
                    .queued_in_route(&b.route_key, b.size_bin, 0, i64::MAX, T0, 100)
                    .unwrap();
                say(log, "due", format!("{due:?}"));
                let first = store
                    .queued_in_route(
                        &b.route_key,
                        b.size_bin,
                        b.deadline_from,
                        b.deadline_to,
                        T0,
                        1,
                    )
                    .unwrap();
                say(log, "first", format!("{first:?}"));
            }
            say(log, "earliest", store.earliest_queued_deadline().unwrap());
            say(log, "ratios", store.learned_token_ratios(7).unwrap());
        });
    }

    /// Enough lines for several `COPY` chunks, with repeats across them.
    #[test]
    fn a_large_ingest_with_repeats_across_chunks_agrees() {
        conform(|store, log| {
            let n = 2 * super::INGEST_CHUNK + 100;
            let mut lines = plain(n);
            for i in [1, 5_000, 8_200, 16_000] {
                lines.push(chat(&format!("j{i}"), "cheap-chat", "1h", 10, 1));
            }
            lines.push("[]".into());
            let s = ingest(store, &lines, "big", "sha-big");
            say(log, "ingest", &s);
            say(
                log,
                "line errors",
                store.line_errors_of(s.source_id).unwrap(),
            );
            say(log, "counts", store.counts().unwrap());
            let jobs = jobs_of(store, s.source_id);
            say(log, "jobs", jobs.len());
            say(log, "first and last", (&jobs[0], &jobs[jobs.len() - 1]));
        });
    }

    #[test]
    fn claims_outcomes_and_spend_agree() {
        conform(|store, log| {
            let s = ingest(store, &plain(8), "t", "sha");
            let route = route_of(store);
            let bin = crate::domain::estimate::size_bin(5);
            let due = |now| -> Vec<i64> {
                store
                    .queued_in_route(&route, bin, 0, i64::MAX, now, 100)
                    .unwrap()
                    .iter()
                    .map(|j| j.id)
                    .collect()
            };
            say(log, "due", due(T0));
            // A job listed twice is claimed once; a claimed job is not again.
            let claimed = store
                .start_attempts(&starts(&[3, 1, 2, 4, 1]), T0, T0 + 60_000, OWNER)
                .unwrap();
            say(log, "claimed", claimed);
            say(
                log,
                "again",
                store
                    .start_attempts(&starts(&[1]), T0, T0 + 60_000, OWNER)
                    .unwrap(),
            );
            say(log, "due", due(T0));
            say(
                log,
                "finish by another",
                store.finish(1, "other", &succeeded(0.5)).unwrap(),
            );
            say(
                log,
                "finish",
                store.finish(1, OWNER, &succeeded(0.5)).unwrap(),
            );
            say(
                log,
                "finish again",
                store.finish(1, OWNER, &succeeded(0.5)).unwrap(),
            );
            say(
                log,
                "retry",
                store
                    .retry_later(2, OWNER, T0 + 10_000, &failed(500))
                    .unwrap(),
            );
            say(log, "due before", due(T0 + 9_999));
            say(log, "due after", due(T0 + 10_000));
            let recorded = store
                .record_attempts(
                    OWNER,
                    &[
                        Recorded {
                            job_id: 3,
                            retry_at: None,
                            finish: failed(400),
                        },
                        Recorded {
                            job_id: 4,
                            retry_at: Some(T0 + 5_000),
                            finish: failed(503),
                        },
                        Recorded {
                            job_id: 5,
                            retry_at: None,
                            finish: succeeded(0.25),
                        },
                    ],
                )
                .unwrap();
            say(log, "recorded", recorded);
            store.record_late_answer(1, 0.25).unwrap();
            say(
                log,
                "claim 4, 5, 6",
                store
                    .start_attempts(&starts(&[4, 5, 6]), T0 + 6_000, T0 + 60_000, OWNER)
                    .unwrap(),
            );
            say(
                log,
                "finish 5",
                store.finish(5, OWNER, &succeeded(0.125)).unwrap(),
            );
            say(log, "requeue 6", store.requeue_running(6, OWNER).unwrap());
            say(
                log,
                "requeue 6 again",
                store.requeue_running(6, OWNER).unwrap(),
            );
            say(log, "release", store.release_running(OWNER).unwrap());
            say(log, "release again", store.release_running(OWNER).unwrap());
            say(
                log,
                "fail queued 6",
                store
                    .fail_queued(6, T0 + 7_000, "no_provider", "none fits")
                    .unwrap(),
            );
            say(
                log,
                "fail queued 6 again",
                store
                    .fail_queued(6, T0 + 7_000, "no_provider", "none fits")
                    .unwrap(),
            );
            say(log, "counts", store.counts().unwrap());
            say(log, "spent", store.spent_since(None, 0).unwrap());
            say(
                log,
                "spent deepseek",
                store.spent_since(Some("deepseek"), 0).unwrap(),
            );
            say(
                log,
                "spent other",
                store.spent_since(Some("other"), 0).unwrap(),
            );
            say(
                log,
                "spent later",
                store.spent_since(None, T0 + 2_000).unwrap(),
            );
            for by in [
                SpendBy::Provider,
                SpendBy::Class,
                SpendBy::Day,
                SpendBy::Channel,
            ] {
                say(log, "spend", store.spend(0, by).unwrap());
            }
            say(log, "ratios", store.learned_token_ratios(7).unwrap());
            say(log, "jobs", jobs_of(store, s.source_id));
            for id in 1..=8 {
                say(log, "job", store.job(id).unwrap());
            }
            say(
                log,
                "fail route",
                store
                    .fail_route(&route, T0 + 8_000, "gone", "no model")
                    .unwrap(),
            );
            say(log, "counts", store.counts().unwrap());
            say(log, "by route", store.queued_by_route().unwrap());
            say(log, "buckets", store.queued_buckets().unwrap());
        });
    }

    #[test]
    fn expiry_and_lease_recovery_agree() {
        conform(|store, log| {
            ingest(store, &plain(3), "t", "sha");
            let late = vec![
                chat("x", "cheap-chat", "5h", 10, 1),
                chat("y", "cheap-chat", "5h", 10, 1),
            ];
            ingest(store, &late, "u", "sha-u");
            let claim = |ids: &[i64], lease: i64, owner: &str| {
                store
                    .start_attempts(&starts(ids), T0, lease, owner)
                    .unwrap()
            };
            say(log, "claim", claim(&[1], T0 + 7_200_000, OWNER));
            say(log, "earliest", store.earliest_queued_deadline().unwrap());
            say(
                log,
                "expire early",
                store.expire_overdue(T0 + 3_599_999).unwrap(),
            );
            say(log, "expire", store.expire_overdue(T0 + 3_600_000).unwrap());
            say(
                log,
                "expire again",
                store.expire_overdue(T0 + 3_600_000).unwrap(),
            );
            say(log, "earliest", store.earliest_queued_deadline().unwrap());
            say(log, "counts", store.counts().unwrap());
            // Leases: an expired one and (on SQLite, another instance's; on
            // PostgreSQL, a daemon with no heartbeat) another owner's.
            say(log, "claim", claim(&[4], T0 + 60_000, OWNER));
            say(log, "claim", claim(&[5], T0 + 36_000_000, "vanished"));
            say(
                log,
                "recover early",
                store.recover_leases(T0 + 30_000, OWNER).unwrap(),
            );
            say(
                log,
                "recover",
                store.recover_leases(T0 + 60_000, OWNER).unwrap(),
            );
            say(
                log,
                "recover again",
                store.recover_leases(T0 + 60_000, OWNER).unwrap(),
            );
            for id in 1..=5 {
                say(log, "job", store.job(id).unwrap());
            }
            say(log, "earliest", store.earliest_queued_deadline().unwrap());
            say(log, "expire all", store.expire_overdue(i64::MAX).unwrap());
            say(log, "earliest", store.earliest_queued_deadline().unwrap());
            say(log, "counts", store.counts().unwrap());
        });
    }

    #[test]
    fn sends_are_recorded_read_back_and_pruned_alike() {
        conform(|store, log| {
            ingest(store, &plain(5), "t", "sha");
            let at = start;
            store
                .start_attempts(&[at(1, 10), at(2, 20)], T0, T0 + 60_000, OWNER)
                .unwrap();
            say(log, "release", store.release_running(OWNER).unwrap());
            store
                .start_attempts(&[at(1, 30)], T0 + 90_000, T0 + 150_000, OWNER)
                .unwrap();
            store
                .start_attempts(&[at(1, 99), at(3, 5)], T0 + 90_500, T0 + 150_000, OWNER)
                .unwrap();
            say(
                log,
                "sends",
                store.recent_sends(T0 + 100_000, MINUTE_HELD).unwrap(),
            );
            let day = crate::dispatch::limits::DAY_MS;
            say(
                log,
                "a day later",
                store.recent_sends(T0 + day, MINUTE_HELD).unwrap(),
            );
            store
                .start_attempts(&[at(4, 1)], T0 + day + 1, T0 + day + 60_000, OWNER)
                .unwrap();
            store
                .start_attempts(&[at(5, 1)], T0 + day + 90_501, T0 + day + 150_000, OWNER)
                .unwrap();
            say(
                log,
                "after",
                store.recent_sends(T0 + day + 90_501, MINUTE_HELD).unwrap(),
            );
        });
    }

    #[test]
    fn outbox_readiness_agrees() {
        conform(|store, log| {
            let a = ingest(store, &plain(2), "a", "sha-a");
            let b = ingest(store, &plain(1), "b", "sha-b");
            let up = ingest_as(store, Origin::Upload, &plain(1), "up", "");
            let ready = |store: &Store| -> Vec<String> {
                store
                    .sources_ready_for_outbox()
                    .unwrap()
                    .iter()
                    .map(|s| format!("{} {} {} {}", s.id, s.origin, s.name, s.stem))
                    .collect()
            };
            say(log, "ready", ready(store));
            store
                .start_attempts(&starts(&[1, 2]), T0, T0 + 60_000, OWNER)
                .unwrap();
            store.finish(1, OWNER, &succeeded(0.5)).unwrap();
            say(log, "one running", ready(store));
            store.finish(2, OWNER, &failed(400)).unwrap();
            store.fail_queued(4, T0, "x", "y").unwrap();
            say(log, "a done", ready(store));
            store.mark_outbox_written(a.source_id, T0 + 2_000).unwrap();
            say(log, "a written", ready(store));
            store.fail_queued(3, T0, "x", "y").unwrap();
            say(log, "b done", ready(store));
            say(log, "ids", (a.source_id, b.source_id, up.source_id));
        });
    }

    pub(crate) fn open(url: &str, node: &str) -> Store {
        Store::open_database(
            &Database::Postgres(Box::new(Target::parse(url, None).unwrap())),
            node,
        )
        .unwrap()
    }

    pub(crate) fn postgres(store: &Store) -> &super::Postgres {
        match store.backend() {
            Backend::Postgres(p) => p,
            Backend::Sqlite(_) => unreachable!("a PostgreSQL store"),
        }
    }

    /// Two daemons claiming the same jobs at the same moment, in opposite
    /// orders and overlapping chunks: each job is claimed exactly once, and
    /// neither fails (no deadlock).
    #[test]
    fn two_daemons_claim_each_job_exactly_once() {
        let url = testing::fresh_database();
        let (a, b) = (open(&url, "a"), open(&url, "b"));
        let n = 400;
        ingest(&a, &plain(n), "t", "sha");
        let ids: Vec<i64> = (1..=n as i64).collect();
        let barrier = std::sync::Barrier::new(2);
        let claim = |store: &Store, owner: &str, ids: Vec<i64>| -> Vec<i64> {
            barrier.wait();
            let mut got = Vec::new();
            for chunk in ids.chunks(37) {
                got.extend(
                    store
                        .start_attempts(&starts(chunk), T0, T0 + 60_000, owner)
                        .unwrap(),
                );
            }
            got
        };
        let (got_a, got_b) = std::thread::scope(|s| {
            let ha = s.spawn(|| claim(&a, "owner-a", ids.clone()));
            let hb = s.spawn(|| claim(&b, "owner-b", ids.iter().rev().copied().collect()));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        let mut all: Vec<i64> = got_a.iter().chain(&got_b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, ids, "every job claimed once, by one daemon");
        let counts = a.counts().unwrap();
        assert_eq!(counts[&JobState::Running], n as u64);
        for id in [1, n as i64 / 2, n as i64] {
            assert_eq!(a.job(id).unwrap().unwrap().attempts, 1);
        }
        // The sends ledger holds one send per claim, with its owner.
        let owners: Vec<(String, i64)> = postgres(&a)
            .run(|c| {
                Ok(c.query(
                    "SELECT owner, COUNT(*) FROM sends GROUP BY owner ORDER BY owner",
                    &[],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
            })
            .unwrap();
        let want: Vec<(String, i64)> = [("owner-a", got_a.len()), ("owner-b", got_b.len())]
            .into_iter()
            .filter(|(_, k)| *k > 0)
            .map(|(o, k)| (o.to_string(), k as i64))
            .collect();
        assert_eq!(owners, want);
    }

    /// Two daemons recovering a dead daemon's jobs, and expiring overdue
    /// ones, at the same moment: each job is taken once, by one of them,
    /// and neither waits for the other (no deadlock).
    #[test]
    fn two_daemons_recover_and_expire_each_job_once() {
        let url = testing::fresh_database();
        let (a, b) = (open(&url, "a"), open(&url, "b"));
        let n = 300;
        ingest(&a, &plain(2 * n), "t", "sha");
        let ids: Vec<i64> = (1..=n as i64).collect();
        for chunk in ids.chunks(50) {
            a.start_attempts(&starts(chunk), T0, T0 + 36_000_000, "dead")
                .unwrap();
        }
        let barrier = std::sync::Barrier::new(2);
        let run = |store: &Store, owner: &str| -> (usize, usize) {
            barrier.wait();
            let recovered = store.recover_leases(T0, owner).unwrap();
            barrier.wait();
            // The recovered jobs are queued again, and every queued job is
            // past its deadline.
            let expired = store.expire_overdue(T0 + 3_600_000).unwrap().len();
            (recovered, expired)
        };
        let ((ra, ea), (rb, eb)) = std::thread::scope(|s| {
            let ha = s.spawn(|| run(&a, "owner-a"));
            let hb = s.spawn(|| run(&b, "owner-b"));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        assert_eq!(ra + rb, n, "every dead lease recovered once");
        assert_eq!(ea + eb, 2 * n, "every overdue job expired once");
        assert_eq!(a.counts().unwrap()[&JobState::Expired], 2 * n as u64);
    }

    /// Another owner's running job is recovered only when that daemon's
    /// heartbeat is stale or missing; a live daemon's waits for its lease.
    #[test]
    fn recovery_spares_a_live_daemons_jobs() {
        let url = testing::fresh_database();
        let store = open(&url, "n");
        ingest(&store, &plain(4), "t", "sha");
        let lease = T0 + 36_000_000;
        for (id, owner) in [(1, "live"), (2, "stale"), (3, "unknown"), (4, "edge")] {
            assert_eq!(
                store
                    .start_attempts(&starts(&[id]), T0, lease, owner)
                    .unwrap(),
                vec![id]
            );
        }
        let dead_after = super::super::coord::DEAD_AFTER_MS;
        postgres(&store)
            .run(|c| {
                for (owner, beat) in [
                    ("live", T0 - 1_000),
                    ("stale", T0 - dead_after - 1),
                    ("edge", T0 - dead_after),
                ] {
                    c.execute(
                        "INSERT INTO daemons (owner, node, host, pid, version, started_at, heartbeat_at)
                         VALUES ($1, 'n', 'h', 1, 'v', 0, $2)",
                        &[&owner, &beat],
                    )?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(store.recover_leases(T0, OWNER).unwrap(), 2);
        let state = |id| store.job(id).unwrap().unwrap().state;
        assert_eq!(state(1), JobState::Running, "a live daemon's job");
        assert_eq!(state(2), JobState::Queued, "a stale heartbeat");
        assert_eq!(state(3), JobState::Queued, "no heartbeat row");
        assert_eq!(
            state(4),
            JobState::Running,
            "a heartbeat just within the limit"
        );
        assert_eq!(store.recover_leases(T0, OWNER).unwrap(), 0);
        // Once their leases expire, a live daemon's jobs are recovered too
        // (here by that daemon itself).
        assert_eq!(store.recover_leases(lease, "live").unwrap(), 2);
        assert_eq!(state(1), JobState::Queued);
        assert_eq!(state(4), JobState::Queued);
    }

    /// A source's outbox is written by the daemon whose inbox received it;
    /// every daemon sees every job.
    #[test]
    fn each_node_writes_the_outbox_of_the_sources_it_received() {
        let url = testing::fresh_database();
        let (a, b) = (open(&url, "nodeA"), open(&url, "nodeB"));
        let sa = ingest(&a, &plain(1), "a", "sha-a");
        let sb = ingest(&b, &plain(1), "b", "sha-b");
        for store in [&a, &b] {
            assert!(store.sources_ready_for_outbox().unwrap().is_empty());
        }
        // Node B answers both jobs.
        assert_eq!(
            b.start_attempts(&starts(&[1, 2]), T0, T0 + 60_000, "b")
                .unwrap(),
            vec![1, 2]
        );
        for id in [1, 2] {
            assert!(b.finish(id, "b", &succeeded(0.5)).unwrap());
        }
        let ready = |store: &Store| -> Vec<i64> {
            store
                .sources_ready_for_outbox()
                .unwrap()
                .iter()
                .map(|s| s.id)
                .collect()
        };
        assert_eq!(ready(&a), vec![sa.source_id]);
        assert_eq!(ready(&b), vec![sb.source_id]);
        assert_eq!(jobs_of(&b, sa.source_id), jobs_of(&a, sa.source_id));
        a.mark_outbox_written(sa.source_id, T0).unwrap();
        assert!(ready(&a).is_empty());
        assert_eq!(ready(&b), vec![sb.source_id]);
    }
}
