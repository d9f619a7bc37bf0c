//! Rate limits hold over every sliding minute, across restarts: a daemon
//! with a 300 rpm provider and a longer queue is stopped (SIGTERM or
//! SIGKILL) and started again six times within the first minute, and the
//! loopback provider's own timestamps never show more than 300 requests in
//! any 60 s window — at start, when the window opens, and after each
//! restart (which reads the sends of earlier runs from the store).

use std::time::{Duration, Instant};

use crate::common::*;

const RPM: usize = 300;

/// The most requests in any window of `window` over sorted instants.
fn max_in_any_window(at: &[Instant], window: Duration) -> usize {
    let mut max = 0;
    let mut from = 0;
    for (to, &t) in at.iter().enumerate() {
        while t.duration_since(at[from]) >= window {
            from += 1;
        }
        max = max.max(to + 1 - from);
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_within_a_minute_never_send_more_than_rpm_in_any_60_s() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "rpm = 300",
    }];
    let config = config_toml(dir.path(), &spec);
    let jobs: Vec<String> = (0..RPM * 2)
        .map(|i| chat_line(&format!("r{i:04}"), "chat", &format!("job {i}"), None))
        .collect();
    let mut daemon = Daemon::start(dir.path(), &config);
    drop_file(&daemon.jobs(), "many.jsonl", &jobs.join("\n"));
    // Restart every 40 requests: six times in the first minute.
    for k in 1..=6 {
        let target = 40 * k;
        wait_until(
            &format!("request {target}"),
            Duration::from_secs(60),
            || provider.count() >= target,
        )
        .await;
        if k % 2 == 0 {
            daemon.kill();
        } else {
            daemon.terminate().await;
        }
        daemon = Daemon::start(dir.path(), &config);
    }
    // Run on past the first minute, so that a window opening is measured too.
    let first = provider.seen()[0].at;
    wait_until(
        "a minute and a half of requests",
        Duration::from_secs(120),
        || first.elapsed() >= Duration::from_secs(90),
    )
    .await;
    daemon.terminate().await;
    let mut at: Vec<Instant> = provider.seen().iter().map(|s| s.at).collect();
    at.sort();
    let max = max_in_any_window(&at, Duration::from_secs(60));
    eprintln!(
        "most requests in any 60 s: {max} (rpm {RPM}, {} in all)",
        at.len()
    );
    assert!(
        max <= RPM,
        "{max} requests within 60 s, rpm {RPM} (of {} in all)",
        at.len()
    );
    // The limit was what held the daemon back, not a slow start.
    assert!(
        max >= RPM * 9 / 10,
        "{max} requests within 60 s: the test did not reach the limit"
    );
    assert!(
        daemon
            .log_text()
            .contains("rate limits count the requests sent"),
        "a restarted daemon seeds its limits from the store"
    );
}
