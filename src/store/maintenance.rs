//! The queue's side of maintenance: retention (dropping the bodies and
//! results of finished, delivered jobs and the content of old uploads) and
//! WAL checkpoints. Used by `crate::daemon::cron`, on its schedule and by
//! `nightshift maintenance`.
//!
//! Retention works in short transactions: candidates are found on a
//! read-only connection (which does not block the writer) and purged at most
//! `batch` rows per write transaction, so the one writer connection is never
//! held for long.

use std::time::Duration;

use rusqlite::{TransactionBehavior, params};

use super::{Result, Sqlite};

/// Rows purged per write transaction by the daemon and the CLI.
pub const PURGE_BATCH: usize = 10_000;

/// What a retention pass purged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Jobs whose body, options and response were dropped.
    pub jobs: u64,
    /// Uploaded files whose content was dropped.
    pub files: u64,
    /// Write transactions it took.
    pub transactions: u64,
    /// Whether it stopped before the end because `keep_going` said so.
    pub interrupted: bool,
}

/// How hard a WAL checkpoint tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Copies what it can without waiting for readers or writers.
    Passive,
    /// Waits (briefly) for readers, copies every frame and truncates the WAL
    /// file to zero bytes.
    Truncate,
}

impl CheckpointMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::Passive => "PASSIVE",
            CheckpointMode::Truncate => "TRUNCATE",
        }
    }
}

/// What `PRAGMA wal_checkpoint` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub mode: CheckpointMode,
    /// A TRUNCATE checkpoint could not finish: a reader or writer held on
    /// for longer than it waits. Nothing is lost; the next one catches up.
    pub busy: bool,
    /// Frames in the WAL when it ran.
    pub log_frames: i64,
    /// Frames copied back into the database file.
    pub checkpointed_frames: i64,
}

/// Finished jobs past the cutoff, delivered, not purged yet, after an id:
/// a rowid range scan in id order (NOT INDEXED: the state index would make
/// every batch re-read and sort all finished jobs).
const JOB_CANDIDATES: &str = "SELECT j.id FROM jobs AS j NOT INDEXED LEFT JOIN sources AS s ON s.id = j.source_id
     WHERE j.id > ?1 AND j.state IN ('succeeded', 'failed', 'expired', 'cancelled') AND j.completed_at < ?2
       AND (s.origin IS NOT 'inbox' OR s.outbox_written_at IS NOT NULL)
       AND (j.body <> '' OR j.options IS NOT NULL OR j.response IS NOT NULL)
     ORDER BY j.id LIMIT ?3";

/// Purges one candidate. A finished job never changes state again and a
/// written outbox stays written, so re-checking state and age is enough.
const PURGE_JOB: &str = "UPDATE jobs SET body = '', options = NULL, response = NULL
     WHERE id = ?1 AND state IN ('succeeded', 'failed', 'expired', 'cancelled') AND completed_at < ?2";

/// How long a TRUNCATE checkpoint waits for readers: it holds the writer
/// connection meanwhile, so this bounds how long it can delay a write.
const TRUNCATE_WAIT: Duration = Duration::from_secs(1);
/// The writer connection's usual busy timeout (as `Store::open` sets it),
/// restored after a TRUNCATE checkpoint.
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl Sqlite {
    /// Drops the body, options and provider response of every finished job
    /// (succeeded, failed, expired, cancelled) that completed before
    /// `cutoff_ms` and whose results were delivered: for a file of the
    /// watched folder, once its outbox files are written; for API
    /// submissions and batches, age alone decides. `body` is NOT NULL, so it
    /// becomes `''`; `options` and `response` become NULL. Everything the
    /// accounting reads (state, provider, model, tokens, costs, timestamps,
    /// error code and message) is kept.
    ///
    /// Then drops the content of uploaded files (`/v1/files`) created before
    /// `cutoff_ms` that no open batch reads; their rows and sizes stay.
    ///
    /// At most `batch` jobs (and one file, which may be large) per write
    /// transaction; `keep_going` is asked before each, so a shutdown does
    /// not wait for the whole pass. Purged rows are not purged again.
    pub fn purge_before(
        &self,
        cutoff_ms: i64,
        batch: usize,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Purged> {
        let batch = batch.max(1);
        let mut out = Purged::default();
        let reader = self.reader()?;

        // Each batch of candidates is its own read, so no snapshot is held
        // across the writes.
        let mut candidates = reader.prepare(JOB_CANDIDATES)?;
        let mut after = 0i64;
        loop {
            if !keep_going() {
                out.interrupted = true;
                return Ok(out);
            }
            let ids = candidates
                .query_map(params![after, cutoff_ms, batch as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            let Some(&last) = ids.last() else { break };
            after = last;
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut purge = tx.prepare_cached(PURGE_JOB)?;
                for id in &ids {
                    out.jobs += purge.execute(params![id, cutoff_ms])? as u64;
                }
            }
            tx.commit()?;
            out.transactions += 1;
            if ids.len() < batch {
                break;
            }
        }

        let mut files = reader.prepare(
            "SELECT id FROM files WHERE kind = 'input' AND content IS NOT NULL AND created_at < ?1
             ORDER BY id",
        )?;
        let ids = files
            .query_map([cutoff_ms], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        for id in ids {
            if !keep_going() {
                out.interrupted = true;
                return Ok(out);
            }
            // The open-batch check is in the write: a batch created from this
            // file meanwhile keeps it.
            let n = self.conn().execute(
                "UPDATE files SET content = NULL
                 WHERE id = ?1 AND content IS NOT NULL AND created_at < ?2
                   AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file_id = files.id
                                   AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling'))",
                params![id, cutoff_ms],
            )?;
            out.files += n as u64;
            out.transactions += 1;
        }
        Ok(out)
    }

    /// Runs `PRAGMA wal_checkpoint` on the writer connection. A TRUNCATE
    /// checkpoint waits at most `TRUNCATE_WAIT` for readers, then reports
    /// `busy` instead.
    pub fn wal_checkpoint(&self, mode: CheckpointMode) -> Result<Checkpoint> {
        let conn = self.conn();
        let pragma = |mode: CheckpointMode| {
            conn.query_row(
                &format!("PRAGMA wal_checkpoint({})", mode.as_str()),
                [],
                |r| {
                    Ok(Checkpoint {
                        mode,
                        busy: r.get::<_, i64>(0)? != 0,
                        log_frames: r.get(1)?,
                        checkpointed_frames: r.get(2)?,
                    })
                },
            )
        };
        // The copying is done by a PASSIVE pass, which never waits: a
        // completed TRUNCATE reports 0 and 0 (it has reset the WAL), so the
        // frames reported are this pass's.
        let passive = pragma(CheckpointMode::Passive)?;
        if mode == CheckpointMode::Passive {
            return Ok(passive);
        }
        conn.busy_timeout(TRUNCATE_WAIT)?;
        let truncate = pragma(CheckpointMode::Truncate);
        conn.busy_timeout(WRITER_BUSY_TIMEOUT)?;
        Ok(Checkpoint {
            mode,
            busy: truncate?.busy,
            ..passive
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::domain::job::{self, JobContext};
    use crate::store::{Finish, JobState, LineOutcome, NewSource, Origin, SpendBy, Start};
    use chrono::{DateTime, Utc};

    const OWNER: &str = "test-owner";
    const DAY: i64 = 86_400_000;

    fn line(id: &str, deadline: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"cheap-chat","messages":[{{"role":"user","content":"secret text of {id}"}}],"max_tokens":16}},"nightshift":{{"deadline":"{deadline}"}}}}"#
        )
    }

    /// Queues `ids` as one source submitted at `at_ms`; returns the source
    /// id and the job ids in order.
    fn ingest(
        store: &Sqlite,
        config: &Config,
        origin: Origin,
        stem: &str,
        ids: &[(&str, &str)],
        at_ms: i64,
    ) -> (i64, Vec<i64>) {
        let ctx = JobContext {
            catalog: &config.catalog,
            now: DateTime::<Utc>::from_timestamp_millis(at_ms).unwrap(),
            default_deadline: Duration::from_secs(86_400),
        };
        let lines: Vec<String> = ids.iter().map(|(id, d)| line(id, d)).collect();
        let source = NewSource {
            origin,
            name: stem,
            stem,
            sha256: None,
            now_ms: at_ms,
        };
        let summary = store
            .ingest(
                &source,
                lines.iter().enumerate().map(|(i, l)| {
                    Ok(LineOutcome {
                        line: i as u64 + 1,
                        job: job::parse_line(l, &ctx),
                    })
                }),
            )
            .unwrap();
        assert_eq!(summary.queued as usize, ids.len());
        let jobs = store
            .job_ids_of(summary.source_id)
            .unwrap()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        (summary.source_id, jobs)
    }

    fn start(store: &Sqlite, id: i64, at_ms: i64) {
        let started = store
            .start_attempts(
                &[Start {
                    job_id: id,
                    provider: "deepseek".into(),
                    provider_model: "deepseek-flash".into(),
                    channel: "sync",
                    tokens: 0,
                }],
                at_ms,
                at_ms + 60_000,
                OWNER,
            )
            .unwrap();
        assert_eq!(started, [id]);
    }

    fn succeed(store: &Sqlite, id: i64, at_ms: i64) {
        start(store, id, at_ms - 1_000);
        let f = Finish {
            succeeded: true,
            completed_at: at_ms,
            status_code: Some(200),
            request_id: Some("req_1".into()),
            response: Some(r#"{"choices":[{"message":{"content":"secret answer"}}]}"#.into()),
            input_tokens: Some(30),
            output_tokens: Some(5),
            cost_usd: Some(0.001),
            list_cost_usd: Some(0.002),
            ..Finish::default()
        };
        assert!(store.finish(id, OWNER, &f).unwrap());
    }

    /// (body, options, response) as stored.
    fn payload(store: &Sqlite, id: i64) -> (String, Option<String>, Option<String>) {
        store
            .conn()
            .query_row(
                "SELECT body, options, response FROM jobs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    }

    fn purged(store: &Sqlite, id: i64) -> bool {
        payload(store, id) == (String::new(), None, None)
    }

    #[test]
    fn retention_purges_only_finished_delivered_jobs_older_than_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
        let config = Config::embedded_default();
        let now = Utc::now().timestamp_millis();
        let old = now - 40 * DAY;
        let cutoff = now - 30 * DAY;

        // A watched-folder file, delivered: every state, old and new.
        let (inbox, j) = ingest(
            &store,
            &config,
            Origin::Inbox,
            "delivered",
            &[
                ("ok-old", "100d"),
                ("failed-old", "100d"),
                ("queued", "100d"),
                ("running", "100d"),
                ("ok-new", "100d"),
            ],
            old - DAY,
        );
        succeed(&store, j[0], old);
        assert!(
            store
                .fail_queued(j[1], old, "max_cost_exceeded", "too dear")
                .unwrap()
        );
        start(&store, j[3], now);
        succeed(&store, j[4], now - DAY);
        store.mark_outbox_written(inbox, now).unwrap();

        // A watched-folder file whose outbox is not written yet.
        let (_, undelivered) = ingest(
            &store,
            &config,
            Origin::Inbox,
            "pending",
            &[("ok-old-undelivered", "100d")],
            old - DAY,
        );
        succeed(&store, undelivered[0], old);

        // API submissions: cancelled and expired long ago; age alone decides.
        let (_, api) = ingest(
            &store,
            &config,
            Origin::Api,
            "api",
            &[("cancelled", "100d"), ("expired", "1h")],
            old - DAY,
        );
        assert_eq!(
            store.cancel_job(api[0], old).unwrap(),
            crate::store::CancelOutcome::Cancelled
        );
        assert_eq!(
            store.expire_overdue(old).unwrap(),
            [(api[1], "expired".to_string())]
        );

        let before = (
            store.spend(0, SpendBy::Provider).unwrap(),
            store.queue_stats().unwrap(),
            store.counts().unwrap(),
        );
        let keep = |id: i64| payload(&store, id);
        let untouched = [j[2], j[3], j[4], undelivered[0]].map(|id| (id, keep(id)));

        // Two jobs per transaction: four purged jobs take two transactions,
        // plus the empty read that ends the pass.
        let p = store.purge_before(cutoff, 2, &|| true).unwrap();
        assert_eq!(
            (p.jobs, p.files, p.transactions, p.interrupted),
            (4, 0, 2, false),
            "{p:?}"
        );
        for id in [j[0], j[1], api[0], api[1]] {
            assert!(purged(&store, id), "job {id}: {:?}", payload(&store, id));
        }
        for (id, was) in untouched {
            assert_eq!(payload(&store, id), was, "job {id} must be untouched");
            assert!(!purged(&store, id));
        }

        // Accounting is unchanged: spend, per-state totals, counts.
        let after = (
            store.spend(0, SpendBy::Provider).unwrap(),
            store.queue_stats().unwrap(),
            store.counts().unwrap(),
        );
        assert_eq!(before, after);
        let ok = store.job(j[0]).unwrap().unwrap();
        assert_eq!(ok.state, JobState::Succeeded);
        assert_eq!(
            (
                ok.provider.as_deref(),
                ok.provider_model.as_deref(),
                ok.input_tokens,
                ok.output_tokens,
                ok.cost_usd,
                ok.list_cost_usd,
                ok.completed_at,
                ok.status_code,
            ),
            (
                Some("deepseek"),
                Some("deepseek-flash"),
                Some(30),
                Some(5),
                Some(0.001),
                Some(0.002),
                Some(old),
                Some(200)
            )
        );
        let failed = store.job(j[1]).unwrap().unwrap();
        assert_eq!(failed.error_code.as_deref(), Some("max_cost_exceeded"));

        // A second pass finds nothing; delivery makes the pending file's job
        // eligible.
        assert_eq!(store.purge_before(cutoff, 2, &|| true).unwrap().jobs, 0);
        let pending = store.sources_ready_for_outbox().unwrap();
        assert_eq!(pending.len(), 1);
        store.mark_outbox_written(pending[0].id, now).unwrap();
        let p = store.purge_before(cutoff, PURGE_BATCH, &|| true).unwrap();
        assert_eq!((p.jobs, p.transactions), (1, 1));
        assert!(purged(&store, undelivered[0]));
    }

    #[test]
    fn retention_stops_between_batches_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
        let config = Config::embedded_default();
        let now = Utc::now().timestamp_millis();
        let ids: Vec<(String, &str)> = (0..5).map(|i| (format!("c{i}"), "100d")).collect();
        let refs: Vec<(&str, &str)> = ids.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let (_, jobs) = ingest(&store, &config, Origin::Api, "api", &refs, now - 3 * DAY);
        for &id in &jobs {
            store.cancel_job(id, now - 2 * DAY).unwrap();
        }
        let asked = std::cell::Cell::new(0);
        let p = store
            .purge_before(now - DAY, 2, &|| {
                asked.set(asked.get() + 1);
                asked.get() <= 1
            })
            .unwrap();
        assert_eq!((p.jobs, p.transactions, p.interrupted), (2, 1, true));
        let p = store.purge_before(now - DAY, 2, &|| true).unwrap();
        assert_eq!((p.jobs, p.interrupted), (3, false));
    }

    #[test]
    fn old_uploads_lose_their_content_unless_an_open_batch_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
        let now = Utc::now().timestamp_millis();
        let old = now - 40 * DAY;
        let content = b"{\"custom_id\":\"a\"}\n".as_slice();
        let stale = store
            .insert_file("batch", "old.jsonl", content, old)
            .unwrap();
        let in_use = store
            .insert_file("batch", "used.jsonl", content, old)
            .unwrap();
        let fresh = store
            .insert_file("batch", "new.jsonl", content, now)
            .unwrap();
        store
            .create_batch(&crate::store::NewBatch {
                input_file_id: in_use.id,
                endpoint: "/v1/chat/completions",
                completion_window: "24h",
                metadata: None,
                now_ms: old,
                expires_at: old + DAY,
            })
            .unwrap();
        let read = |id: i64| {
            let mut v = Vec::new();
            store
                .file_content(id, 4, |c| {
                    v.extend(c);
                    Ok(())
                })
                .unwrap();
            v
        };

        let p = store
            .purge_before(now - 30 * DAY, PURGE_BATCH, &|| true)
            .unwrap();
        assert_eq!((p.jobs, p.files), (0, 1), "{p:?}");
        assert!(read(stale.id).is_empty());
        assert_eq!(read(in_use.id), content);
        assert_eq!(read(fresh.id), content);
        // The row and its size stay.
        assert_eq!(store.file(stale.id).unwrap().unwrap(), stale);
    }

    #[test]
    fn the_candidate_scan_walks_job_ids_not_the_state_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
        let plan: Vec<String> = store
            .conn()
            .prepare(&format!("EXPLAIN QUERY PLAN {JOB_CANDIDATES}"))
            .unwrap()
            .query_map(params![0, 0, 1], |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let text = plan.join("\n");
        assert!(text.contains("rowid>?"), "{text}");
        assert!(!text.contains("TEMP B-TREE"), "{text}");
    }

    #[test]
    fn checkpoints_report_frames_and_truncate_empties_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let store = Sqlite::open(&path).unwrap();
        let config = Config::embedded_default();
        let now = Utc::now().timestamp_millis();
        ingest(&store, &config, Origin::Api, "a", &[("x", "1d")], now);
        let c = store.wal_checkpoint(CheckpointMode::Passive).unwrap();
        assert!(!c.busy);
        assert!(c.log_frames > 0, "{c:?}");
        assert_eq!(c.checkpointed_frames, c.log_frames, "{c:?}");

        ingest(&store, &config, Origin::Api, "b", &[("y", "1d")], now);
        let wal = dir.path().join("q.db-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        let c = store.wal_checkpoint(CheckpointMode::Truncate).unwrap();
        assert!(!c.busy, "{c:?}");
        assert!(c.log_frames > 0, "{c:?}");
        assert_eq!(c.checkpointed_frames, c.log_frames, "{c:?}");
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        assert_eq!(c.mode, CheckpointMode::Truncate);
        // The store still works after the busy timeout was changed and restored.
        ingest(&store, &config, Origin::Api, "c", &[("z", "1d")], now);
        assert_eq!(store.counts().unwrap()[&JobState::Queued], 3);
    }

    #[test]
    fn a_truncate_checkpoint_behind_a_reader_gives_up_within_its_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let store = Sqlite::open(&path).unwrap();
        let config = Config::embedded_default();
        let now = Utc::now().timestamp_millis();
        ingest(&store, &config, Origin::Api, "a", &[("x", "1d")], now);
        // A reader holding a snapshot that includes the WAL's frames.
        let reader = rusqlite::Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        ingest(&store, &config, Origin::Api, "b", &[("y", "1d")], now);

        let t = std::time::Instant::now();
        let c = store.wal_checkpoint(CheckpointMode::Truncate).unwrap();
        assert!(c.busy, "{c:?}");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        reader.execute_batch("COMMIT").unwrap();
        let c = store.wal_checkpoint(CheckpointMode::Truncate).unwrap();
        assert!(!c.busy, "{c:?}");
    }
}
