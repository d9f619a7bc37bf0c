//! The batch channel's rules, pure: the daemon's batch runner and the
//! simulator decide alike.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::bounds;
use crate::domain::pricing::{Catalog, ModelId};
use crate::plan::{ProviderCapacity, sync_fallback_time};

/// The deadline guard's instant for a batch created at `now` of `jobs`
/// jobs (`tokens` estimated in all) whose earliest deadline is
/// `earliest_deadline`: that deadline minus the time to run them on their
/// synchronous models and the safety margin, and no later than the end of
/// the provider's completion window (a batch not ended by then expires).
/// Unix ms.
#[allow(clippy::too_many_arguments)]
pub fn fallback_at(
    catalog: &Catalog,
    capacity: &[ProviderCapacity],
    candidates: &[ModelId],
    jobs: u64,
    tokens: u64,
    earliest_deadline: DateTime<Utc>,
    margin: Duration,
    window: Duration,
    now: DateTime<Utc>,
) -> i64 {
    let sync = sync_fallback_time(catalog, capacity, candidates, jobs, tokens);
    let guard = bounds::sub(bounds::sub(earliest_deadline, sync), margin);
    guard.min(bounds::add(now, window)).timestamp_millis()
}

/// Whether the deadline guard is due at `now`.
pub fn guard_due(fallback_at_ms: i64, now: DateTime<Utc>) -> bool {
    now.timestamp_millis() >= fallback_at_ms
}

/// How long to wait before the poll after `polls` polls of a running
/// batch: `every`, growing by half each poll up to `max_factor` times it.
pub fn poll_wait(every: Duration, polls: u32, max_factor: u32) -> Duration {
    let factor = 1.5f64
        .powi(polls.min(64) as i32)
        .min(f64::from(max_factor.max(1)));
    every.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_back_off_by_half_up_to_the_cap() {
        let s = Duration::from_secs(10);
        assert_eq!(poll_wait(s, 0, 8), s);
        assert_eq!(poll_wait(s, 1, 8), Duration::from_secs(15));
        assert_eq!(poll_wait(s, 100, 8), Duration::from_secs(80));
    }

    #[test]
    fn the_guard_is_due_at_its_instant_not_before() {
        let t = DateTime::<Utc>::from_timestamp_millis(1_000_000).unwrap();
        assert!(!guard_due(1_000_001, t));
        assert!(guard_due(1_000_000, t));
    }
}
