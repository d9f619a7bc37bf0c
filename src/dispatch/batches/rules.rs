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

/// How many times its expected turnaround a batch runs before it counts as
/// overdue.
pub const OVERDUE_FACTOR: u32 = 2;

/// The instant the deadline guard cancels a batch created at `now` whose
/// fallback instant is `fallback_at_ms`, given the turnaround the planner
/// expects of the provider's batches (`expected`: a high quantile of those
/// observed, the prior before any).
///
/// A batch that has run [`OVERDUE_FACTOR`] × `expected` is late by what the
/// provider usually does. If a fresh batch created then, taking `expected`,
/// would still end by the fallback instant, the guard cancels it then: its
/// jobs go back to the queue and the next plan can put them in a new batch
/// at the batch price, instead of waiting out the late one and paying the
/// synchronous price after the fallback instant. Otherwise the fallback
/// instant alone guards it. Unix ms.
pub fn guard_at(fallback_at_ms: i64, now: DateTime<Utc>, expected: Duration) -> i64 {
    if expected.is_zero() {
        return fallback_at_ms;
    }
    let expected_ms = bounds::millis(expected);
    let overdue = now
        .timestamp_millis()
        .saturating_add(expected_ms.saturating_mul(i64::from(OVERDUE_FACTOR)));
    if overdue.saturating_add(expected_ms) <= fallback_at_ms {
        overdue
    } else {
        fallback_at_ms
    }
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
    fn an_overdue_batch_is_guarded_early_only_while_a_new_batch_still_fits() {
        let t = DateTime::<Utc>::from_timestamp_millis(0).unwrap();
        let hour = Duration::from_secs(3600);
        let h = |n: i64| n * 3_600_000;
        // Expected 1 h, fallback at 6 h: overdue at 2 h, and a new batch
        // created then would end by 3 h.
        assert_eq!(guard_at(h(6), t, hour), h(2));
        // Exactly fits: overdue at 2 h, a new one ends at the fallback.
        assert_eq!(guard_at(h(3), t, hour), h(2));
        // A new batch would not end in time: the fallback instant alone.
        assert_eq!(guard_at(h(3) - 1, t, hour), h(3) - 1);
        assert_eq!(guard_at(h(1), t, hour), h(1));
        // No expectation at all: the fallback instant.
        assert_eq!(guard_at(h(6), t, Duration::ZERO), h(6));
        // Never later than the fallback instant, and no overflow.
        assert_eq!(guard_at(i64::MAX, t, Duration::MAX), i64::MAX);
    }

    #[test]
    fn the_guard_is_due_at_its_instant_not_before() {
        let t = DateTime::<Utc>::from_timestamp_millis(1_000_000).unwrap();
        assert!(!guard_due(1_000_001, t));
        assert!(guard_due(1_000_000, t));
    }
}
