//! The daemon's shell under faults injected from outside
//! (`NIGHTSHIFT_FAULTS`, see `nightshift::faults`): a request task that
//! panics, a store that refuses a dispatch batch, a component that dies.
//! With `concurrency = 1`, one leaked slot would stop the provider for good,
//! so "every job succeeds" is the assertion that nothing leaked.

use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(60);

fn one_at_a_time(p: &LoopbackProvider) -> ProviderSpec<'static> {
    ProviderSpec {
        name: "solo",
        base_url: p.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "concurrency = 1",
    }
}

fn three_jobs() -> String {
    (1..=3)
        .map(|i| chat_line(&format!("j{i}"), "chat", &format!("job {i}"), None))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_task_returns_its_job_to_the_queue_and_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let provider = LoopbackProvider::start().await;
    let config = config_toml(dir.path(), &[one_at_a_time(&provider)]);
    let mut daemon = Daemon::start_with_env(
        dir.path(),
        &config,
        &[("NIGHTSHIFT_FAULTS", "dispatch.request_panic:1")],
    );
    daemon.wait_ready().await;
    drop_file(&daemon.jobs(), "p.jsonl", &three_jobs());
    // The lease is request_timeout + 60 s = 70 s: finishing well within it
    // means the job came back at once, not when its lease expired.
    let started = Instant::now();
    let (out, err) = wait_for_outbox(&daemon.jobs(), "p", T).await;
    assert_eq!((out.len(), err.len()), (3, 0), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(daemon.log_text().contains("a request task panicked"));
    // The panicked attempt is counted: one job took two.
    let attempts: u64 = out
        .iter()
        .map(|l| l["nightshift"]["attempts"].as_u64().unwrap())
        .sum();
    assert_eq!(attempts, 4);
    // Each job was sent once (the panic came before its request).
    assert_eq!(provider.count(), 3);
    assert!(daemon.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_error_on_a_dispatch_batch_gives_its_rate_limit_slots_back() {
    let dir = tempfile::tempdir().unwrap();
    let provider = LoopbackProvider::start().await;
    let config = config_toml(dir.path(), &[one_at_a_time(&provider)]);
    let mut daemon = Daemon::start_with_env(
        dir.path(),
        &config,
        &[("NIGHTSHIFT_FAULTS", "dispatch.start_attempts:2")],
    );
    daemon.wait_ready().await;
    drop_file(&daemon.jobs(), "s.jsonl", &three_jobs());
    let (out, err) = wait_for_outbox(&daemon.jobs(), "s", T).await;
    assert_eq!((out.len(), err.len()), (3, 0), "{err:?}");
    assert!(
        daemon
            .log_text()
            .contains("injected fault: dispatch.start_attempts")
    );
    // Nothing was started by the refused batches: one attempt each.
    assert!(
        out.iter()
            .all(|l| l["nightshift"]["attempts"].as_u64() == Some(1))
    );
    assert!(daemon.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_dies_stops_the_daemon_with_a_failure_status() {
    let dir = tempfile::tempdir().unwrap();
    let provider = LoopbackProvider::start().await;
    let config = config_toml(dir.path(), &[one_at_a_time(&provider)]);
    let mut daemon = Daemon::start_with_env(
        dir.path(),
        &config,
        &[("NIGHTSHIFT_FAULTS", "daemon.outbox_panic:1")],
    );
    let status = daemon.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "{status:?}");
    let log = daemon.log_text();
    assert!(log.contains("component panicked"), "{log}");
    assert!(
        log.contains("the outbox component stopped unexpectedly"),
        "{log}"
    );
}
