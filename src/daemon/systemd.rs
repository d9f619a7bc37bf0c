//! systemd integration over the sd_notify protocol: READY=1 once the daemon
//! can serve, WATCHDOG=1 at half of `WatchdogSec`, STOPPING=1 on shutdown.
//! Every call is a no-op when `NOTIFY_SOCKET` is not set (not under systemd).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tracing::{debug, warn};

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify failed: {e}");
    }
}

/// The database is open and migrated, leases are recovered and the
/// listeners are bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A configuration reload has begun (READY=1 follows when it is done).
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining in-flight requests"),
    ]);
}

/// Pings the watchdog at half its interval until `stop`. Runs on the async
/// runtime, so a wedged runtime stops the pings and systemd restarts us.
pub async fn watchdog(mut stop: watch::Receiver<bool>) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        // Not under a systemd watchdog: nothing to ping, but a component
        // that ends early reads as a failure, so wait for the stop.
        let _ = stop.wait_for(|s| *s).await;
        return;
    };
    let every = (interval / 2).max(Duration::from_millis(10));
    debug!(
        every_ms = every.as_millis() as u64,
        "systemd watchdog enabled"
    );
    loop {
        send(&[NotifyState::Watchdog]);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
