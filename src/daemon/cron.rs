//! Maintenance jobs on a cron schedule (tokio-cron-scheduler, UTC):
//!
//! - **retention + WAL truncation** (`daemon.maintenance`, default nightly at
//!   03:17:00): drops the bodies and results of finished jobs older than
//!   `daemon.retention` whose results were delivered, and the content of old
//!   uploads (see [`Store::purge_before`]), then runs a TRUNCATE checkpoint;
//! - **WAL checkpoint** (`daemon.checkpoint_every`, default 10 minutes): a
//!   PASSIVE checkpoint;
//! - **budget roll-over nudge** (00:00:00 UTC daily): wakes the dispatcher,
//!   which starts new budget periods on its next pass.
//!
//! The same retention pass and checkpoint run once with
//! `nightshift maintenance` ([`command`]).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, Notify, watch};
use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::instrument::WithSubscriber;
use tracing::{debug, error, info, warn};

use crate::config::{Config, DaemonSettings};
use crate::store::Store;
use crate::store::maintenance::{Checkpoint, CheckpointMode, PURGE_BATCH, Purged};

/// Midnight UTC, when daily (and monthly) budget periods begin.
pub const MIDNIGHT_UTC: &str = "0 0 0 * * *";

/// When and what maintenance runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// How long bodies and results of finished jobs are kept; `None`: forever.
    pub retention: Option<Duration>,
    /// Cron expression (seconds first, UTC) for retention and the TRUNCATE checkpoint.
    pub maintenance: String,
    /// How often a PASSIVE checkpoint runs; `None`: only SQLite's own.
    pub checkpoint_every: Option<Duration>,
}

impl From<&DaemonSettings> for Schedule {
    fn from(d: &DaemonSettings) -> Schedule {
        Schedule {
            retention: d.retention,
            maintenance: d.maintenance.clone(),
            checkpoint_every: d.checkpoint_every,
        }
    }
}

/// What one maintenance run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub retention: Option<Duration>,
    /// Finished before this (Unix ms) and delivered: purged. `None` when retention is off.
    pub cutoff_ms: Option<i64>,
    pub purged: Purged,
    pub checkpoint: Checkpoint,
    pub elapsed: Duration,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.retention, self.cutoff_ms) {
            (Some(r), Some(cutoff)) => {
                let p = &self.purged;
                writeln!(
                    f,
                    "retention {}: purged {} jobs (body, options, response) and {} uploaded files \
                     finished before {} ({} transactions{})",
                    humantime::format_duration(r),
                    p.jobs,
                    p.files,
                    rfc3339(cutoff),
                    p.transactions,
                    if p.interrupted { ", interrupted" } else { "" }
                )?;
            }
            _ => writeln!(f, "retention off: nothing purged")?,
        }
        let c = &self.checkpoint;
        writeln!(
            f,
            "WAL checkpoint ({}): {} frames in the log, {} checkpointed{}",
            c.mode.as_str(),
            c.log_frames,
            c.checkpointed_frames,
            if c.busy {
                " (busy: a reader or writer held on; the next checkpoint catches up)"
            } else {
                ""
            }
        )
    }
}

fn rfc3339(ms: i64) -> String {
    crate::domain::units::rfc3339_ms(ms).unwrap_or_else(|| ms.to_string())
}

/// Runs retention (if on) and then a TRUNCATE checkpoint, now. Blocking.
/// `keep_going` is asked between transactions.
pub fn run_once(
    store: &Store,
    retention: Option<Duration>,
    now: DateTime<Utc>,
    keep_going: &dyn Fn() -> bool,
) -> crate::store::Result<Outcome> {
    let started = Instant::now();
    let cutoff_ms = retention.map(|r| {
        now.timestamp_millis()
            .saturating_sub(i64::try_from(r.as_millis()).unwrap_or(i64::MAX))
    });
    let purged = match cutoff_ms {
        Some(cutoff) => store.purge_before(cutoff, PURGE_BATCH, keep_going)?,
        None => Purged::default(),
    };
    // TRUNCATE here, once a night and after the purge wrote the most: SQLite
    // never shrinks a WAL file by itself, so a burst (a million-job file)
    // would otherwise leave it at its largest for good. It waits at most a
    // second for readers, holding the writer meanwhile; the frequent
    // checkpoints are PASSIVE and never wait.
    let checkpoint = store.wal_checkpoint(CheckpointMode::Truncate)?;
    Ok(Outcome {
        retention,
        cutoff_ms,
        purged,
        checkpoint,
        elapsed: started.elapsed(),
    })
}

fn log_outcome(o: &Outcome) {
    if let (Some(r), Some(cutoff)) = (o.retention, o.cutoff_ms) {
        info!(
            jobs = o.purged.jobs,
            files = o.purged.files,
            transactions = o.purged.transactions,
            interrupted = o.purged.interrupted,
            retention = %humantime::format_duration(r),
            finished_before = %rfc3339(cutoff),
            elapsed_ms = o.elapsed.as_millis() as u64,
            "retention: purged bodies and results of delivered jobs"
        );
    }
    log_checkpoint(&o.checkpoint);
}

fn log_checkpoint(c: &Checkpoint) {
    debug!(
        mode = c.mode.as_str(),
        busy = c.busy,
        wal_frames = c.log_frames,
        checkpointed = c.checkpointed_frames,
        "WAL checkpoint"
    );
}

/// `nightshift maintenance`: one retention pass and a TRUNCATE checkpoint on
/// the configured database, whether the daemon runs or not (SQLite
/// serialises the writes). Returns what to print.
pub fn command(config: &Config) -> anyhow::Result<String> {
    let db = &config.daemon.database;
    let store =
        Store::open_existing(db, &config.daemon.node).with_context(|| format!("opening {db}"))?;
    let o = run_once(&store, config.daemon.retention, Utc::now(), &|| true)?;
    Ok(format!("{o}"))
}

/// Builds a cron job (UTC) whose runs call `f`.
fn cron_job<F, Fut>(expr: &str, f: F) -> anyhow::Result<Job>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    Job::new_async(expr, move |_, _| Box::pin(f()))
        .map_err(|e| anyhow::anyhow!("cron expression '{expr}': {e:?}"))
}

/// The job that wakes the dispatcher at `expr` ([`MIDNIGHT_UTC`] in the
/// daemon), so that budget periods roll over at the boundary rather than on
/// whatever pass comes next.
pub fn nudge_job(expr: &str, wake: Arc<Notify>) -> anyhow::Result<Job> {
    cron_job(expr, move || {
        let wake = wake.clone();
        async move {
            debug!("midnight UTC: waking the dispatcher for budget roll-over");
            wake.notify_one();
        }
    })
}

/// Runs the maintenance schedule until `stop` turns true. A run still in
/// progress then stops at its next transaction and is waited for.
pub async fn run(
    shared: crate::shared::Shared,
    schedule: Schedule,
    mut stop: watch::Receiver<bool>,
) {
    let crate::shared::Shared { store, wake, .. } = shared;
    // The scheduler starts a job on time even if its previous run (or the
    // other job) is still going: `busy` is held by whatever touches the
    // database, so checkpoints and maintenance take turns.
    let busy = Arc::new(Mutex::new(()));
    let scheduler = match start(&store, &schedule, wake, &busy, &stop).await {
        Ok(s) => Some(s),
        Err(e) => {
            error!("maintenance scheduler did not start: {e:#}; no retention or checkpoints");
            None
        }
    };
    let _ = stop.wait_for(|s| *s).await;
    if let Some(mut s) = scheduler
        && let Err(e) = s.shutdown().await
    {
        warn!("stopping the maintenance scheduler: {e:?}");
    }
    let _idle = busy.lock().await;
}

async fn start(
    store: &Arc<Store>,
    schedule: &Schedule,
    wake: Arc<Notify>,
    busy: &Arc<Mutex<()>>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<JobScheduler> {
    let scheduler = JobScheduler::new()
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // `add` logs "Uninited" and "Job creator created" at info; a failure
    // comes back as an error, which the caller logs.
    let add = async |job: Job| {
        scheduler
            .add(job)
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };

    // A maintenance run skips if the previous one is still going, and waits
    // for a checkpoint in progress (they are short).
    let maintaining = Arc::new(Mutex::new(()));
    let (s, b, st, retention) = (
        store.clone(),
        busy.clone(),
        stop.clone(),
        schedule.retention,
    );
    add(cron_job(&schedule.maintenance, move || {
        let (store, busy, stop, maintaining) =
            (s.clone(), b.clone(), st.clone(), maintaining.clone());
        async move {
            let Ok(_maintaining) = maintaining.try_lock_owned() else {
                warn!("maintenance: the previous run is still going; this one is skipped");
                return;
            };
            let _busy = busy.lock_owned().await;
            if *stop.borrow() {
                return;
            }
            let done = tokio::task::spawn_blocking(move || {
                run_once(&store, retention, Utc::now(), &|| !*stop.borrow())
            })
            .await;
            match done {
                Ok(Ok(o)) => log_outcome(&o),
                Ok(Err(e)) => error!("maintenance failed (next run retries): {e}"),
                Err(e) => error!("maintenance panicked: {e}"),
            }
        }
    })?)
    .await?;

    if let Some(every) = schedule.checkpoint_every {
        let (s, b, st) = (store.clone(), busy.clone(), stop.clone());
        let job = Job::new_repeated_async(every, move |_, _| {
            let (store, busy, stop) = (s.clone(), b.clone(), st.clone());
            Box::pin(async move {
                // Maintenance is running (it ends with a TRUNCATE checkpoint),
                // or the previous checkpoint is.
                let Ok(_busy) = busy.try_lock_owned() else {
                    debug!("WAL checkpoint skipped: maintenance or a checkpoint is running");
                    return;
                };
                if *stop.borrow() {
                    return;
                }
                // PASSIVE: copies what it can and never waits for a reader
                // or another writer (it holds our writer connection only
                // while it copies). SQLite checkpoints passively on commits
                // past 1000 pages; this one also covers the tail a quiet
                // daemon leaves in the WAL after a burst.
                match tokio::task::spawn_blocking(move || {
                    store.wal_checkpoint(CheckpointMode::Passive)
                })
                .await
                {
                    Ok(Ok(c)) => log_checkpoint(&c),
                    Ok(Err(e)) => warn!("WAL checkpoint failed: {e}"),
                    Err(e) => error!("WAL checkpoint panicked: {e}"),
                }
            })
        })
        .map_err(|e| anyhow::anyhow!("checkpoint every {every:?}: {e:?}"))?;
        add(job).await?;
    }

    add(nudge_job(MIDNIGHT_UTC, wake)?).await?;
    scheduler
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    info!(
        maintenance = %schedule.maintenance,
        retention = %schedule.retention.map(|r| humantime::format_duration(r).to_string()).unwrap_or_else(|| "off".into()),
        checkpoint_every = %schedule.checkpoint_every.map(|r| humantime::format_duration(r).to_string()).unwrap_or_else(|| "off".into()),
        "maintenance scheduled (cron times in UTC)"
    );
    Ok(scheduler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::units::check_cron;

    #[test]
    fn cron_expressions_are_checked_like_the_scheduler_parses_them() {
        for ok in [
            "0 17 3 * * *",
            "* * * * * *",
            "0 0 0 * * *",
            "0 */5 * * * Mon-Fri",
        ] {
            assert_eq!(check_cron(ok, Utc::now()), Ok(()), "{ok}");
            assert!(
                Job::new_async(ok, |_, _| Box::pin(async {})).is_ok(),
                "{ok}"
            );
        }
        // Five fields (no seconds), nonsense, out-of-range values.
        for bad in ["17 3 * * *", "nightly", "0 61 3 * * *", "0 0 25 * * *", ""] {
            let e = check_cron(bad, Utc::now()).unwrap_err();
            assert!(e.contains("not a cron expression"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_nudge_is_due_at_the_next_midnight_utc() {
        let mut job = nudge_job(MIDNIGHT_UTC, Arc::new(Notify::new())).unwrap();
        let next = job.job_data().unwrap().next_tick as i64;
        let now = Utc::now();
        let midnight = (now + chrono::Duration::days(1))
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp();
        // (A test started in the last instant before midnight may see the
        // boundary it is about to cross.)
        assert!(
            next == midnight || next == midnight - 86_400 && next >= now.timestamp(),
            "next tick {next}, expected {midnight}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scheduled_nudge_wakes_the_dispatcher() {
        let wake = Arc::new(Notify::new());
        let mut scheduler = JobScheduler::new().await.unwrap();
        scheduler
            .add(nudge_job("* * * * * *", wake.clone()).unwrap())
            .await
            .unwrap();
        scheduler.start().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), wake.notified())
            .await
            .expect("the every-second nudge fired within 10 s");
        scheduler.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_schedule_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("q.db")).unwrap());
        let (stop_tx, stop_rx) = watch::channel(false);
        let schedule = Schedule {
            retention: Some(Duration::from_secs(1)),
            maintenance: "* * * * * *".into(),
            checkpoint_every: Some(Duration::from_secs(1)),
        };
        let shared =
            crate::shared::Shared::fixed(store, &crate::config::Config::embedded_default());
        let task = tokio::spawn(run(shared, schedule, stop_rx));
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the maintenance task stopped within 10 s")
            .unwrap();
    }
}
