//! Fault injection for the integration tests, a no-op unless the
//! environment variable `NIGHTSHIFT_FAULTS` is set: a comma-separated list
//! of `point` or `point:N` (fire N times, default once). Points:
//!
//! - `dispatch.start_attempts`: the store refuses to start a dispatch batch;
//! - `dispatch.request_panic`: a request task panics before it sends;
//! - `daemon.outbox_panic`: the outbox writer component panics;
//! - `batch.die_after_upload`, `batch.die_after_create`,
//!   `batch.die_after_download`: the daemon dies on the spot ([`die_at`]) at
//!   that step of a provider batch: after its input file is uploaded and
//!   recorded, after the provider created it and before its id is
//!   recorded, after its results are downloaded and before they are applied.
//!
//! Hand-written rather than the `fail` crate: that one is active only when a
//! cargo feature is on, and these tests drive the release binary unchanged.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn armed() -> &'static Mutex<HashMap<String, u32>> {
    static ARMED: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var("NIGHTSHIFT_FAULTS").unwrap_or_default();
        let map = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once(':') {
                Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
                None => (s.to_string(), 1),
            })
            .collect();
        Mutex::new(map)
    })
}

/// True if the fault at `point` is armed; uses up one of its firings.
pub fn fire(point: &str) -> bool {
    let mut armed = armed().lock().unwrap_or_else(|e| e.into_inner());
    match armed.get_mut(point) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

/// Ends the process on the spot if the fault at `point` is armed, as a
/// SIGKILL would: no destructor runs, nothing is flushed or released
/// (`abort`, so that the kill lands exactly between two steps, which a
/// signal sent from outside cannot).
pub fn die_at(point: &str) {
    if fire(point) {
        eprintln!("injected fault: {point}: dying now");
        std::process::abort();
    }
}
