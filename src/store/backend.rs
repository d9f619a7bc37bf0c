//! The queue's one interface over its two backends.
//!
//! [`Store`] is what the daemon, the API and the tools hold. Every method is
//! one state change or one read, synchronous, and called off the async
//! threads (through `spawn_blocking`): SQLite ([`Sqlite`], the embedded
//! default, one writer on this host) and PostgreSQL ([`super::pg::Postgres`],
//! several daemons on one queue) implement the same methods with the same
//! meaning, so nothing above the store knows which one it runs on. What only
//! a shared database needs (daemons' heartbeats, the planner's lock, the
//! published plan, shared rate-limit admission) is in [`super::coord`], whose
//! SQLite side is the trivial single-daemon answer.

use std::collections::BTreeMap;

use super::batches::*;
use super::coord::{Beat, Coordination, DaemonRow, SendCursors, SharedPause, SharedPlan};
use super::maintenance::{Checkpoint, CheckpointMode, Purged};
use super::pg::Postgres;
use super::*;
use crate::config::database::Database;
use crate::domain::pricing::Catalog;

/// The durable queue, on whichever backend the configuration names.
pub struct Store {
    pub(super) backend: Backend,
}

/// The backend behind a [`Store`].
pub enum Backend {
    Sqlite(Sqlite),
    Postgres(Box<Postgres>),
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and migrates
    /// it to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store {
            backend: Backend::Sqlite(Sqlite::open(path)?),
        })
    }

    /// Opens the queue the configuration names: a PostgreSQL URL, or else a
    /// SQLite file.
    /// `node` names this daemon among those sharing a PostgreSQL queue.
    pub fn open_database(db: &Database, node: &str) -> Result<Store> {
        match db {
            Database::Sqlite(path) => Store::open(path),
            Database::Postgres(target) => Ok(Store {
                backend: Backend::Postgres(Box::new(Postgres::open(target, node)?)),
            }),
        }
    }

    /// Opens the configured queue for a tool (`plan`, `report`,
    /// `maintenance`): a SQLite file must exist already (a tool does not
    /// create an empty queue where the daemon never ran).
    pub fn open_existing(db: &Database, node: &str) -> Result<Store> {
        if let Database::Sqlite(path) = db
            && !path.exists()
        {
            return Err(QueueError::Setup {
                path: path.display().to_string(),
                message: "no database here (has the daemon run with this config?)".into(),
            });
        }
        Store::open_database(db, node)
    }

    /// The backend, for what only one of them has.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// `"sqlite"` or `"postgresql"`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgresql",
        }
    }

    /// This daemon's node name on a shared queue.
    pub fn node(&self) -> Option<&str> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.node()),
        }
    }

    /// Whether several daemons may share this queue.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }
}

/// What daemons sharing a queue tell each other ([`super::coord`]): on
/// SQLite, the one daemon's trivial answers.
impl Store {
    /// Renews this daemon's liveness, and tries to become (or checks that
    /// it still is) the planner.
    pub fn heartbeat(&self, beat: &Beat) -> Result<Coordination> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Coordination {
                planner: true,
                live: 1,
                latest_source: 0,
            }),
            Backend::Postgres(p) => p.heartbeat(beat),
        }
    }

    /// Removes this daemon from the live ones (a graceful stop: its jobs
    /// were released), and gives up the planner lock.
    pub fn leave(&self, owner: &str) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.leave(owner),
        }
    }

    /// The daemons sharing the queue (none recorded on SQLite: the one
    /// daemon is the state directory's lock holder).
    pub fn daemons(&self, now_ms: i64) -> Result<Vec<DaemonRow>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.daemons(now_ms),
        }
    }

    /// Publishes the planner's plan; fails when this daemon no longer holds
    /// the planner lock.
    pub fn publish_plan(&self, plan: &SharedPlan) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.publish_plan(plan),
        }
    }

    /// The plan the planner published last.
    pub fn published_plan(&self) -> Result<Option<SharedPlan>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(p) => p.published_plan(),
        }
    }

    /// The rate limits claims are admitted against, summed over every
    /// daemon (SQLite: the dispatcher's own limiter is the whole truth).
    pub fn share_limits(&self, catalog: &Catalog) {
        if let Backend::Postgres(p) = &self.backend {
            p.share_limits(catalog);
        }
    }

    /// Requests other daemons sent since `cursors` (which this advances),
    /// for this daemon's pacing. The first call, with no cursor for a
    /// provider, only places it at the newest send.
    pub fn sends_of_others(
        &self,
        owner: &str,
        cursors: &mut SendCursors,
    ) -> Result<Vec<SentGroup>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.sends_of_others(owner, cursors),
        }
    }

    /// Tells every daemon that `provider` takes no requests until `until_ms`.
    pub fn share_pause(&self, pause: &SharedPause) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.share_pause(pause),
        }
    }

    /// Provider pauses in force at `now_ms`.
    pub fn shared_pauses(&self, now_ms: i64) -> Result<Vec<SharedPause>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.shared_pauses(now_ms),
        }
    }

    /// Takes over the open provider batches of daemons that are gone (no
    /// live heartbeat for their node) and returns their ids: this daemon
    /// follows them from now on (SQLite: the one daemon follows its own).
    pub fn adopt_orphaned_batches(&self, now_ms: i64) -> Result<Vec<i64>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.adopt_orphaned_batches(now_ms),
        }
    }

    /// Whether the database answers (for `/healthz`): SQLite is a file this
    /// process holds open.
    pub fn ping(&self) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.ping(),
        }
    }
}

/// Forwards each listed method to the backend's method of the same name
/// and signature.
#[allow(clippy::type_complexity)]
mod forwarded {
    use super::*;

    macro_rules! forward {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident : $ty:ty)* $(,)?) -> $ret:ty; )*) => {
        impl Store {
            $(
                $(#[$doc])*
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match &self.backend {
                        Backend::Sqlite(s) => s.$name($($arg),*),
                        Backend::Postgres(p) => p.$name($($arg),*),
                    }
                }
            )*
        }
    };
}

    forward! {
        /// The inbox source with this content hash, if it was ingested before.
        fn inbox_source_by_hash(&self, sha256: &str) -> Result<Option<(i64, String)>>;
        /// Queues a source's valid lines and records its invalid ones, in one
        /// transaction.
        fn ingest(&self, source: &NewSource, lines: impl Iterator<Item = std::io::Result<LineOutcome>>) -> Result<IngestSummary>;
        /// Output/input token ratios learned from the last `days` of finished jobs.
        fn learned_token_ratios(&self, days: i64) -> Result<(Vec<(String, f64)>, Vec<(String, f64)>)>;
        /// Queued jobs per route.
        fn queued_by_route(&self) -> Result<Vec<(String, u64)>>;
        /// The planner's summary of the queue.
        fn queued_buckets(&self) -> Result<Vec<crate::plan::QueuedBucket>>;
        /// A group's queued jobs in dispatch order.
        fn queued_in_route(&self, route_key: &str, size_bin: i64, from: i64, to: i64, now_ms: i64, limit: usize) -> Result<Vec<DueJob>>;
        /// Fails every queued job of a route.
        fn fail_route(&self, route_key: &str, now_ms: i64, code: &str, message: &str) -> Result<usize>;
        /// Claims queued jobs for one (provider, model) each under `owner`'s
        /// lease; returns the ids claimed.
        fn start_attempts(&self, starts: &[Start], now_ms: i64, lease_until: i64, owner: &str) -> Result<Vec<i64>>;
        /// The requests sent in the last 24 hours, grouped for the rate limits.
        fn recent_sends(&self, now_ms: i64, minute_held: i64) -> Result<Vec<SentGroup>>;
        /// Records a job's final result if `owner` still holds it.
        fn finish(&self, job_id: i64, owner: &str, f: &Finish) -> Result<bool>;
        /// Queues a running job again for a retry after `not_before`.
        fn retry_later(&self, job_id: i64, owner: &str, not_before: i64, last: &Finish) -> Result<bool>;
        /// Records many attempts' outcomes in one transaction.
        fn record_attempts(&self, owner: &str, attempts: &[Recorded]) -> Result<Vec<bool>>;
        /// Counts an answer that arrived for a job already answered.
        fn record_late_answer(&self, job_id: i64, cost_usd: f64) -> Result<()>;
        /// Fails a queued job without dispatch.
        fn fail_queued(&self, job_id: i64, now_ms: i64, code: &str, message: &str) -> Result<bool>;
        /// Expires queued jobs past their deadline.
        fn expire_overdue(&self, now_ms: i64) -> Result<Vec<(i64, String)>>;
        /// The earliest deadline of a queued job.
        fn earliest_queued_deadline(&self) -> Result<Option<i64>>;
        /// Queues again running jobs whose lease expired or whose daemon is gone.
        fn recover_leases(&self, now_ms: i64, owner: &str) -> Result<usize>;
        /// Queues again one running job of `owner`.
        fn requeue_running(&self, job_id: i64, owner: &str) -> Result<bool>;
        /// Queues again every running job of `owner` (shutdown).
        fn release_running(&self, owner: &str) -> Result<usize>;
        /// Sources whose jobs are all final and whose outbox files are not written.
        fn sources_ready_for_outbox(&self) -> Result<Vec<SourceRow>>;
        /// Streams a source's jobs in line order.
        fn for_each_job_of(&self, source_id: i64, on_job: impl FnMut(FinishedJob) -> std::io::Result<()>) -> std::result::Result<(), ResultsError>;
        /// A source's invalid lines.
        fn line_errors_of(&self, source_id: i64) -> Result<Vec<StoredLineError>>;
        /// Marks a source's outbox files written.
        fn mark_outbox_written(&self, source_id: i64, now_ms: i64) -> Result<()>;
        /// USD spent since a time, on one provider or all.
        fn spent_since(&self, provider: Option<&str>, since_ms: i64) -> Result<f64>;
        /// Spend since a time, grouped.
        fn spend(&self, since_ms: i64, by: SpendBy) -> Result<Vec<SpendRow>>;
        /// Jobs per state.
        fn counts(&self) -> Result<BTreeMap<JobState, u64>>;
        /// One job as its result line needs it.
        fn job(&self, id: i64) -> Result<Option<FinishedJob>>;
        /// One job for the API.
        fn job_detail(&self, id: i64) -> Result<Option<JobDetail>>;
        /// A job's request body.
        fn job_body(&self, id: i64) -> Result<Option<String>>;
        /// A page of jobs.
        fn list_jobs(&self, filter: &JobFilter, after: i64, limit: usize) -> Result<Vec<JobDetail>>;
        /// A source's jobs: (id, custom_id, line).
        fn job_ids_of(&self, source_id: i64) -> Result<Vec<(i64, String, i64)>>;
        /// Cancels a queued job.
        fn cancel_job(&self, id: i64, now_ms: i64) -> Result<CancelOutcome>;
        /// One source for the API.
        fn source_info(&self, id: i64) -> Result<Option<SourceInfo>>;
        /// A page of sources.
        fn list_sources(&self, before: Option<i64>, limit: usize) -> Result<Vec<SourceInfo>>;
        /// Queue statistics.
        fn queue_stats(&self) -> Result<QueueStats>;
        /// Outcomes per provider since a time.
        fn recent_outcomes(&self, since_ms: i64) -> Result<BTreeMap<String, RecentOutcomes>>;
        /// Stores an uploaded file.
        fn insert_file(&self, purpose: &str, filename: &str, content: &[u8], now_ms: i64) -> Result<FileRow>;
        /// One file's metadata.
        fn file(&self, id: i64) -> Result<Option<FileRow>>;
        /// Streams a file's content in chunks.
        fn file_content(&self, id: i64, chunk: usize, on_chunk: impl FnMut(Vec<u8>) -> std::io::Result<()>) -> Result<()>;
        /// Creates an API batch (validating).
        fn create_batch(&self, b: &NewBatch) -> Result<i64>;
        /// Moves an API batch to in_progress or failed.
        fn start_batch(&self, batch_id: i64, source_id: Option<i64>, failed: bool, errors: Option<&str>, now_ms: i64) -> Result<()>;
        /// Ingests an API batch's input file, linked to the batch.
        fn ingest_batch(&self, batch_id: i64, source: &NewSource, lines: impl Iterator<Item = std::io::Result<LineOutcome>>) -> Result<IngestSummary>;
        /// API batches still validating.
        fn validating_batches(&self) -> Result<Vec<(BatchRow, Option<i64>)>>;
        /// One API batch.
        fn batch(&self, id: i64) -> Result<Option<BatchRow>>;
        /// A page of API batches.
        fn list_batches(&self, before: Option<i64>, limit: usize) -> Result<Vec<BatchRow>>;
        /// An API batch's request counts.
        fn batch_counts(&self, source_id: i64) -> Result<SourceCounts>;
        /// API batches whose jobs are all final.
        fn done_batches(&self) -> Result<Vec<DoneBatch>>;
        /// Closes an API batch.
        fn close_batch(&self, batch_id: i64, close: &BatchClose) -> Result<bool>;
        /// Cancels an API batch's queued jobs.
        fn cancel_batch(&self, batch_id: i64, now_ms: i64) -> Result<Option<usize>>;
        /// Records a provider batch and claims its jobs, before any upload.
        fn create_provider_batch(&self, b: &NewProviderBatch, job_ids: &[i64]) -> Result<Option<(i64, Vec<i64>)>>;
        /// Provider batches not done.
        fn open_provider_batches(&self) -> Result<Vec<ProviderBatch>>;
        /// One provider batch.
        fn provider_batch(&self, id: i64) -> Result<Option<ProviderBatch>>;
        /// The newest provider batches.
        fn recent_provider_batches(&self, limit: usize) -> Result<Vec<ProviderBatch>>;
        /// Provider batches per (provider, state).
        fn provider_batch_counts(&self) -> Result<Vec<(String, String, u64)>>;
        /// A provider batch's jobs.
        fn provider_batch_jobs(&self, batch: i64) -> Result<Vec<BatchJob>>;
        /// Jobs by id, as a provider batch needs them.
        fn batch_jobs_by_id(&self, ids: &[i64]) -> Result<Vec<BatchJob>>;
        /// A provider batch's file is uploaded (or being created).
        fn provider_batch_creating(&self, batch: i64, file_id: Option<&str>) -> Result<()>;
        /// A provider batch exists at the provider.
        fn provider_batch_submitted(&self, batch: i64, remote_id: &str, status: &str, now_ms: i64) -> Result<()>;
        /// A provider batch's status at the provider.
        fn provider_batch_status(&self, batch: i64, status: &str) -> Result<()>;
        /// A provider batch is being cancelled (its fallback instant passed).
        fn provider_batch_cancelling(&self, batch: i64, status: &str) -> Result<u64>;
        /// A provider batch is given up; its jobs return to the queue.
        fn provider_batch_abandoned(&self, batch: i64, error: &str, now_ms: i64) -> Result<u64>;
        /// Applies a provider batch's result lines.
        fn apply_provider_batch(&self, batch: &ProviderBatch, lines: &[LineRecord], status: &str, now_ms: i64) -> Result<Applied>;
        /// Retention: deletes finished, delivered jobs older than the cutoff.
        fn purge_before(&self, cutoff_ms: i64, batch: usize, keep_going: &dyn Fn() -> bool) -> Result<Purged>;
        /// SQLite's WAL checkpoint; PostgreSQL has none to run (its own
        /// checkpointer does this) and reports nothing done.
        fn wal_checkpoint(&self, mode: CheckpointMode) -> Result<Checkpoint>;
    }
}
