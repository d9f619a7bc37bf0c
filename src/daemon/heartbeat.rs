//! The daemon's heartbeat on a shared queue: every
//! [`HEARTBEAT_MS`](crate::store::pg::coord::HEARTBEAT_MS) it renews its row
//! among the live daemons, keeps or tries for the planner lock, and wakes
//! the dispatcher when another daemon queued jobs (the planner re-plans
//! them). On SQLite the store answers "alone, and the planner" and this
//! returns at once.

use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::dispatch::blocking;
use crate::shared::Shared;
use crate::store::coord::{Beat, Coordination};
use crate::store::pg::coord::HEARTBEAT_MS;

/// This daemon's beat, stamped at `now_ms`.
pub fn beat(owner: &str, node: &str, started_at: i64) -> Beat {
    Beat {
        owner: owner.to_string(),
        node: node.to_string(),
        host: rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at,
        now_ms: Utc::now().timestamp_millis(),
    }
}

/// One heartbeat: publishes what it learned, and logs a change of planner.
pub async fn beat_once(shared: &Shared, mut beat: Beat) {
    beat.now_ms = Utc::now().timestamp_millis();
    let was = *shared.coordination.borrow();
    let got = blocking(&shared.store, move |s| s.heartbeat(&beat)).await;
    let now = match got {
        Ok(c) => c,
        Err(e) => {
            // Without the database this daemon claims nothing anyway; it
            // stops planning for the others until it is back.
            warn!("heartbeat failed (retrying): {e}");
            Coordination {
                planner: false,
                ..was
            }
        }
    };
    if now.planner != was.planner {
        if now.planner {
            info!(daemons = now.live, "this daemon plans the shared queue now");
        } else {
            info!("this daemon follows the planning daemon's plan");
        }
    }
    if now.latest_source > was.latest_source && was.latest_source > 0 {
        // Another daemon (or this one) queued jobs.
        shared.wake.notify_one();
    }
    if now.planner != was.planner || now.live != was.live {
        // The dispatcher's plan no longer fits: a daemon that took the
        // planner lock still holds the plan it followed (made for the old
        // planner's view, never published again), one that lost it still
        // holds its own, and every share is 1/live. Without a wake a daemon
        // with nothing in flight keeps that plan for up to a minute, and
        // the followers follow the dead planner's plan meanwhile.
        shared.wake.notify_one();
    }
    shared.coordination.send_replace(now);
}

/// Beats until `stop`, then leaves the live daemons (the dispatcher has
/// released its jobs by then: this component stops last).
pub async fn run(shared: Shared, beat: Beat, mut stop: watch::Receiver<bool>) {
    if !shared.store.is_shared() {
        let _ = stop.changed().await;
        return;
    }
    let every = Duration::from_millis(HEARTBEAT_MS as u64);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(every) => beat_once(&shared, beat.clone()).await,
        }
    }
    let owner = beat.owner.clone();
    if let Err(e) = blocking(&shared.store, move |s| s.leave(&owner)).await {
        warn!("could not leave the shared queue (others see this daemon dead in 10 s): {e}");
    }
}
