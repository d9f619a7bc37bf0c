//! The parts of the configuration that `SIGHUP` replaces while the daemon
//! runs: providers, prices, limits, classes and budgets. Everything that
//! reads them holds a [`LiveRx`] and takes the current value when it needs
//! it, so a reload reaches the planner, the dispatcher, the folder ingest and
//! the HTTP API at their next step, and no job in flight or in the queue is
//! touched. Paths, listeners and timings need a restart.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, Transport};
use crate::domain::policy::Budget;
use crate::domain::pricing::Catalog;

/// The reloadable configuration.
#[derive(Debug)]
pub struct Live {
    /// Where it came from.
    pub origin: String,
    pub catalog: Arc<Catalog>,
    /// Parallel to `catalog.providers`.
    pub transports: Vec<Transport>,
    pub budgets: Vec<Budget>,
}

impl Live {
    pub fn from_config(config: &Config) -> Live {
        Live {
            origin: config.origin.clone(),
            catalog: Arc::new(config.catalog.clone()),
            transports: config.transports.clone(),
            budgets: config.budgets.clone(),
        }
    }
}

/// A handle on the current reloadable configuration.
pub type LiveRx = watch::Receiver<Arc<Live>>;

/// A channel holding `config`'s reloadable parts.
pub fn channel(config: &Config) -> (watch::Sender<Arc<Live>>, LiveRx) {
    watch::channel(Arc::new(Live::from_config(config)))
}

/// What a reload cannot change without a restart, named for the log.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let (a, b) = (&old.daemon, &new.daemon);
    if a.state_dir != b.state_dir || a.database != b.database {
        out.push("daemon.state_dir / daemon.database");
    }
    if a.jobs_dir != b.jobs_dir {
        out.push("daemon.jobs_dir");
    }
    if a.request_timeout != b.request_timeout
        || a.shutdown_grace != b.shutdown_grace
        || a.rescan_interval != b.rescan_interval
        || a.default_deadline != b.default_deadline
        || a.safety_margin != b.safety_margin
        || a.retry != b.retry
        || a.run_after_deadline != b.run_after_deadline
    {
        out.push("daemon timings (deadlines, margins, retries, timeouts)");
    }
    if a.retention != b.retention
        || a.maintenance != b.maintenance
        || a.checkpoint_every != b.checkpoint_every
    {
        out.push("daemon.retention / maintenance / checkpoint_every");
    }
    if old.http != new.http {
        out.push("http");
    }
    out
}
