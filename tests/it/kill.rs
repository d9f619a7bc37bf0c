//! Durability: the real binary runs thousands of jobs while the test
//! SIGKILLs it at random moments and restarts it. Afterwards every job has
//! exactly one final result, none is lost, and the duplicate provider calls
//! are at most what was in flight at each kill.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;

/// A small deterministic generator (xorshift), so the "random" kill moments
/// are the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_duplicates_only_what_was_in_flight() {
    const JOBS: usize = 2000;
    const CONCURRENCY: usize = 8;
    const KILLS: usize = 3;
    let provider = LoopbackProvider::with(|seen| Reply {
        delay: Duration::from_millis(20),
        ..default_reply(seen)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "concurrency = 8",
    }];
    let config = config_toml(dir.path(), &spec);
    let content: Vec<String> = (0..JOBS)
        .map(|i| chat_line(&format!("k{i:05}"), "chat", &format!("job {i}"), None))
        .collect();

    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut daemon = Daemon::start(dir.path(), &config);
    drop_file(&daemon.jobs(), "many.jsonl", &content.join("\n"));
    let mut kill_points = Vec::new();
    for k in 0..KILLS {
        // Somewhere in the next stretch of work: between 100 and 500 more requests.
        let target = provider.count() + 100 + rng.below(400) as usize;
        wait_until(
            &format!("request {target} (kill {k})"),
            Duration::from_secs(60),
            || provider.count() >= target,
        )
        .await;
        daemon.kill();
        kill_points.push(provider.count());
        daemon = Daemon::start(dir.path(), &config);
    }
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "many", Duration::from_secs(120)).await;
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(3)]);

    // Exactly one result per job, none missing.
    let mut ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), JOBS, "one output line per job");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), JOBS, "no job appears twice");

    // Duplicates: requests the provider saw for the same job more than once.
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for s in provider.seen() {
        *per_job.entry(s.text()).or_default() += 1;
    }
    assert_eq!(per_job.len(), JOBS, "every job reached the provider");
    let duplicates: usize = per_job.values().map(|n| n - 1).sum();
    assert!(
        duplicates <= KILLS * CONCURRENCY,
        "{duplicates} duplicate calls; at most {} were in flight at the kills ({kill_points:?})",
        KILLS * CONCURRENCY
    );
    // The results show the re-run attempts.
    let rerun = output
        .iter()
        .filter(|l| l["nightshift"]["attempts"].as_u64().unwrap() > 1)
        .count();
    assert!(
        rerun >= duplicates,
        "{rerun} jobs re-run, {duplicates} duplicate calls"
    );
}
