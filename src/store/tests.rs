//! The store's job state machine on a temporary database: queued → running
//! (a lease) → succeeded | failed | queued again (retry, a dead task, an
//! expired lease), and the owner check that keeps a recovered job's late
//! answer from overwriting another attempt.

use super::*;
use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::domain::estimate::size_bin;
use crate::domain::job::{JobContext, parse_line};

const OWNER: &str = "me";
/// What the dispatcher asks `recent_sends` to keep to the millisecond.
const MINUTE_HELD: i64 =
    crate::dispatch::limits::MINUTE_MS + crate::dispatch::limits::ARRIVAL_MARGIN_MS;
const T0: i64 = 1_800_000_000_000;

/// A store holding `n` queued chat jobs (ids 1..=n), due an hour after T0,
/// and their route key.
fn store_with(n: usize) -> (tempfile::TempDir, Sqlite, String) {
    let dir = tempfile::tempdir().unwrap();
    let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
    let config = Config::embedded_default();
    let ctx = JobContext {
        catalog: &config.catalog,
        now: DateTime::<Utc>::from_timestamp_millis(T0).unwrap(),
        default_deadline: std::time::Duration::from_secs(3600),
    };
    let lines: Vec<String> = (1..=n)
        .map(|i| {
            format!(
                r#"{{"custom_id":"j{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"cheap-chat","messages":[{{"role":"user","content":"hi"}}],"max_tokens":10}}}}"#
            )
        })
        .collect();
    let route = parse_line(&lines[0], &ctx).unwrap().route_key;
    let outcomes = lines.iter().enumerate().map(|(i, l)| {
        Ok(LineOutcome {
            line: i as u64 + 1,
            job: parse_line(l, &ctx),
        })
    });
    let source = NewSource {
        origin: Origin::Inbox,
        name: "t.jsonl",
        stem: "t",
        sha256: Some("t"),
        now_ms: T0,
    };
    store.ingest(&source, outcomes).unwrap();
    (dir, store, route)
}

fn due(store: &Sqlite, route: &str, now_ms: i64) -> Vec<i64> {
    store
        .queued_in_route(route, size_bin(10 / 2), 0, i64::MAX, now_ms, 100)
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect()
}

fn start(store: &Sqlite, ids: &[i64], lease_until: i64) -> Vec<i64> {
    let starts: Vec<Start> = ids
        .iter()
        .map(|&job_id| Start {
            job_id,
            provider: "deepseek".into(),
            provider_model: "deepseek-flash".into(),
            channel: "sync",
            tokens: 0,
        })
        .collect();
    store
        .start_attempts(&starts, T0, lease_until, OWNER)
        .unwrap()
}

fn state(store: &Sqlite, id: i64) -> (JobState, u32) {
    let d = store.job_detail(id).unwrap().unwrap();
    (d.job.state, d.job.attempts)
}

fn succeeded() -> Finish {
    Finish {
        succeeded: true,
        completed_at: T0 + 1000,
        status_code: Some(200),
        response: Some("{}".into()),
        input_tokens: Some(5),
        output_tokens: Some(3),
        cost_usd: Some(1e-6),
        list_cost_usd: Some(2e-6),
        ..Finish::default()
    }
}

#[test]
fn a_job_runs_under_its_owners_lease_and_only_that_owner_finishes_it() {
    let (_d, store, route) = store_with(2);
    assert_eq!(due(&store, &route, T0), vec![1, 2]);
    assert_eq!(start(&store, &[1], T0 + 60_000), vec![1]);
    // Running jobs are not due, and a second start of the same job is refused.
    assert_eq!(due(&store, &route, T0), vec![2]);
    assert_eq!(start(&store, &[1], T0 + 60_000), Vec::<i64>::new());
    assert_eq!(state(&store, 1), (JobState::Running, 1));
    // Another owner (a recovered lease) cannot finish it; its owner can.
    assert!(!store.finish(1, "someone-else", &succeeded()).unwrap());
    assert!(store.finish(1, OWNER, &succeeded()).unwrap());
    assert_eq!(state(&store, 1), (JobState::Succeeded, 1));
    assert!(
        !store.finish(1, OWNER, &succeeded()).unwrap(),
        "final is final"
    );
}

#[test]
fn a_retry_waits_until_not_before_and_keeps_its_attempt_count() {
    let (_d, store, route) = store_with(1);
    start(&store, &[1], T0 + 60_000);
    let failed = Finish {
        completed_at: T0 + 500,
        status_code: Some(500),
        ..Finish::default()
    };
    assert!(store.retry_later(1, OWNER, T0 + 10_000, &failed).unwrap());
    assert_eq!(state(&store, 1), (JobState::Queued, 1));
    assert!(due(&store, &route, T0 + 9_999).is_empty());
    assert_eq!(due(&store, &route, T0 + 10_000), vec![1]);
    start(&store, &[1], T0 + 60_000);
    assert_eq!(state(&store, 1), (JobState::Running, 2));
}

#[test]
fn a_dead_tasks_job_returns_at_once_and_an_expired_lease_on_recovery() {
    let (_d, store, route) = store_with(3);
    start(&store, &[1, 2, 3], T0 + 60_000);
    // A request task panicked: its job goes straight back.
    assert!(store.requeue_running(1, OWNER).unwrap());
    assert!(
        !store.requeue_running(1, OWNER).unwrap(),
        "no longer running"
    );
    assert_eq!(state(&store, 1), (JobState::Queued, 1));
    // Periodic recovery: only leases that have expired.
    assert_eq!(store.recover_leases(T0 + 30_000, OWNER).unwrap(), 0);
    assert_eq!(store.recover_leases(T0 + 60_000, OWNER).unwrap(), 2);
    assert_eq!(due(&store, &route, T0 + 60_000), vec![1, 2, 3]);
}

#[test]
fn outcomes_recorded_in_one_batch_are_each_checked_against_the_lease() {
    let (_d, store, _route) = store_with(3);
    start(&store, &[1, 2], T0 + 60_000);
    let recorded = store
        .record_attempts(
            OWNER,
            &[
                Recorded {
                    job_id: 1,
                    retry_at: None,
                    finish: succeeded(),
                },
                Recorded {
                    job_id: 2,
                    retry_at: Some(T0 + 5_000),
                    finish: Finish::default(),
                },
                // Never started: not this owner's to record.
                Recorded {
                    job_id: 3,
                    retry_at: None,
                    finish: succeeded(),
                },
            ],
        )
        .unwrap();
    assert_eq!(recorded, vec![true, true, false]);
    assert_eq!(state(&store, 1).0, JobState::Succeeded);
    assert_eq!(state(&store, 2).0, JobState::Queued);
    assert_eq!(state(&store, 3).0, JobState::Queued);
}

#[test]
fn overdue_queued_jobs_expire_and_running_ones_do_not() {
    let (_d, store, _route) = store_with(2);
    start(&store, &[1], T0 + 7_200_000);
    assert_eq!(
        store.earliest_queued_deadline().unwrap(),
        Some(T0 + 3_600_000)
    );
    assert!(store.expire_overdue(T0 + 3_599_999).unwrap().is_empty());
    let expired = store.expire_overdue(T0 + 3_600_000).unwrap();
    assert_eq!(expired, vec![(2, "j2".to_string())]);
    assert_eq!(state(&store, 1).0, JobState::Running);
    assert_eq!(state(&store, 2).0, JobState::Expired);
    assert_eq!(store.earliest_queued_deadline().unwrap(), None);
}

#[test]
fn the_queue_summary_matches_the_planners_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let store = Sqlite::open(&dir.path().join("q.db")).unwrap();
    let config = Config::embedded_default();
    let ctx = JobContext {
        catalog: &config.catalog,
        now: DateTime::<Utc>::from_timestamp_millis(T0).unwrap(),
        default_deadline: std::time::Duration::from_secs(3600),
    };
    // Two routes; deadlines that share a bucket, straddle its end, and sit
    // buckets apart; lines of different sizes.
    let mut lines = Vec::new();
    for (i, (class, deadline)) in [
        ("cheap-chat", "1h"),
        ("cheap-chat", "1h1m"),
        ("cheap-chat", "1h14m"),
        ("cheap-chat", "1h16m"),
        ("cheap-chat", "5h"),
        ("budget-chat", "1h1m"),
        ("budget-chat", "1h"),
        ("budget-chat", "1h"),
    ]
    .into_iter()
    .enumerate()
    {
        let text = "word ".repeat(1 + 40 * i);
        lines.push(format!(
            r#"{{"custom_id":"j{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{class}","messages":[{{"role":"user","content":"{text}"}}],"max_tokens":{}}},"nightshift":{{"deadline":"{deadline}"}}}}"#,
            10 + i
        ));
    }
    let jobs: Vec<_> = lines.iter().map(|l| parse_line(l, &ctx).unwrap()).collect();
    let outcomes = lines.iter().enumerate().map(|(i, l)| {
        Ok(LineOutcome {
            line: i as u64 + 1,
            job: parse_line(l, &ctx),
        })
    });
    let source = NewSource {
        origin: Origin::Inbox,
        name: "t.jsonl",
        stem: "t",
        sha256: Some("t"),
        now_ms: T0,
    };
    store.ingest(&source, outcomes).unwrap();
    let key = |b: &crate::plan::QueuedBucket| (b.route_key.clone(), b.deadline_from);
    let mut got = store.queued_buckets().unwrap();
    got.sort_by_key(key);
    let mut want = crate::plan::bucket_jobs(jobs.iter().map(|j| {
        (
            j.route_key.as_str(),
            j.deadline.timestamp_millis(),
            j.estimate.input,
            j.estimate.output,
        )
    }));
    want.sort_by_key(key);
    assert_eq!(got, want);
    assert!(got.len() >= 4, "{got:?}");
}

#[test]
fn sums_over_rows_from_before_the_bounds_cannot_overflow() {
    // Rows queued before estimates were bounded (issue 11): one at i64::MAX.
    let (_dir, store, _route) = store_with(3);
    store
        .conn()
        .execute(
            "UPDATE jobs SET est_output_tokens = 9223372036854775807, est_input_tokens = 9223372036854775807 WHERE id <= 2",
            [],
        )
        .unwrap();
    let buckets = store.queued_buckets().unwrap();
    assert_eq!(buckets.len(), 1);
    assert_eq!(buckets[0].jobs, 3);
    assert!(
        buckets[0].output_tokens >= i64::MAX as u64,
        "saturated, not an error"
    );
    store.learned_token_ratios(7).unwrap();
    store.spend(0, SpendBy::Provider).unwrap();
}

#[test]
fn sends_are_recorded_with_their_starts_read_back_and_pruned_after_a_day() {
    let (_dir, store, _route) = store_with(5);
    let at = |job_id: i64, tokens: u64| Start {
        job_id,
        provider: "deepseek".into(),
        provider_model: "deepseek-flash".into(),
        channel: "sync",
        tokens,
    };
    // Two at T0 (one send each), one a retry: a second attempt is a second send.
    store
        .start_attempts(&[at(1, 10), at(2, 20)], T0, T0 + 60_000, OWNER)
        .unwrap();
    assert!(store.release_running(OWNER).unwrap() >= 1);
    store
        .start_attempts(&[at(1, 30)], T0 + 90_000, T0 + 150_000, OWNER)
        .unwrap();
    // A job no longer queued is not started and not sent.
    store
        .start_attempts(&[at(1, 99), at(3, 5)], T0 + 90_500, T0 + 150_000, OWNER)
        .unwrap();
    let now = T0 + 100_000;
    let sends = store.recent_sends(now, MINUTE_HELD).unwrap();
    let row = |at_ms, requests, tokens| SentGroup {
        provider: "deepseek".into(),
        model: "deepseek-flash".into(),
        at_ms,
        requests,
        tokens,
    };
    // Older than a minute: grouped by second; within it: by instant.
    assert_eq!(
        sends,
        [
            row(T0, 2, 30),
            row(T0 + 90_000, 1, 30),
            row(T0 + 90_500, 1, 5)
        ]
    );
    // A day later the first sends are gone from the reading (and the
    // others, in the same second, are one row)...
    let day = crate::dispatch::limits::DAY_MS;
    assert_eq!(
        store.recent_sends(T0 + day, MINUTE_HELD).unwrap(),
        [row(T0 + 90_500, 2, 35)]
    );
    // ... and the next start deletes them from the table.
    store
        .start_attempts(&[at(4, 1)], T0 + day + 1, T0 + day + 60_000, OWNER)
        .unwrap();
    let rows: i64 = store
        .conn()
        .query_row("SELECT COUNT(*) FROM sends", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3);
    store
        .start_attempts(&[at(5, 1)], T0 + day + 90_501, T0 + day + 150_000, OWNER)
        .unwrap();
    assert_eq!(
        store.recent_sends(T0 + day + 90_501, MINUTE_HELD).unwrap(),
        [row(T0 + day + 1, 1, 1), row(T0 + day + 90_501, 1, 1)]
    );
}
