//! Dispatch benchmark: how fast the real daemon drains a queue when the
//! provider is not the limit. A loopback OpenAI-compatible server answers
//! every `POST /v1/chat/completions` at once, with no rate-limit headers, and
//! the provider has no rpm/tpm limits, only `concurrency = 64`.
//!
//!     cargo bench --bench dispatch
//!
//! First the CEILING: a client doing what the daemon does (reqwest with
//! rustls, 64 requests in flight, keep-alive) sends a fixed number of
//! requests to that server alone; requests/s is what the provider side
//! allows on this machine. Then, for each queue depth, one JSONL file of N
//! jobs is ingested into a fresh state directory by the daemon's own
//! `ingest::ingest_file` (so the queue holds all N, and the file's outbox is
//! due, before the daemon starts: ingest time is the ingest benchmark's,
//! not this one's), and the daemon is started on it. The window runs from
//! the server's first request to its Nth; jobs/s is N over
//! that window, and CPU ms/job is the daemon's CPU time (utime + stime from
//! /proc/<pid>/stat, all threads) over the same window, divided by N. Both
//! are taken by the server as it counts requests. Afterwards the daemon is
//! stopped with SIGTERM and the server must have seen exactly N requests,
//! each job's custom_id (carried in the message content) at most once, and
//! the outbox must hold N results and no errors.
//!
//! NIGHTSHIFT_BENCH_QUEUES (default 1000,20000,100000) sets the depths. A
//! depth is given up, with a message, if its N requests take over 10 minutes.

#[allow(dead_code)] // rss_kb is for the memory benchmarks
mod support;

use support::loopback::{
    Shared, chat_body, clock_ticks, count_lines, cpu_ticks, handle, reset, stop,
};

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use nightshift::config::Config;
use nightshift::ingest::{self, Folders};
use nightshift::store::Store;
use serde_json::json;

/// Requests in flight: the provider's `concurrency` and the ceiling client's.
const CONCURRENCY: usize = 64;
/// Requests the ceiling client sends.
const CEILING_REQUESTS: u64 = 20_000;
/// How long one depth (or the ceiling) may take before it is given up.
const DEPTH_LIMIT: Duration = Duration::from_secs(600);
/// After the Nth request: how long to wait for the outbox file.
const OUTBOX_LIMIT: Duration = Duration::from_secs(120);

/// Requests/s the server answers to a daemon-like client: reqwest with
/// rustls, CONCURRENCY requests in flight, keep-alive, CEILING_REQUESTS in
/// all. Timed like a depth: server's first request to its last.
fn ceiling(seen: &Shared, base_url: &str) -> f64 {
    reset(seen, CEILING_REQUESTS, 0);
    let client_rt = tokio::runtime::Runtime::new().unwrap();
    let failures = client_rt.block_on(async {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .user_agent("nightshift-bench")
            .build()
            .unwrap();
        let next = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let url = format!("{base_url}/chat/completions");
        let workers: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let (client, next, failures, url) =
                    (client.clone(), next.clone(), failures.clone(), url.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= CEILING_REQUESTS {
                            break;
                        }
                        let response = client
                            .post(&url)
                            .bearer_auth("sk-bench")
                            .json(&chat_body(&format!("c{i}"), "m"))
                            .send()
                            .await;
                        // Read the whole body, as the daemon does.
                        let ok = match response {
                            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                            _ => false,
                        };
                        if !ok {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let all = futures_util::future::join_all(workers);
        tokio::time::timeout(DEPTH_LIMIT, all)
            .await
            .expect("the ceiling client did not finish in 10 minutes");
        failures.load(Ordering::Relaxed)
    });
    let s = seen.lock().unwrap();
    assert_eq!(failures, 0, "ceiling: {failures} requests failed");
    assert_eq!(s.requests, CEILING_REQUESTS, "ceiling: request count");
    assert_eq!(s.duplicates, 0, "ceiling: duplicate custom_ids");
    let window = s.last.unwrap().duration_since(s.first.unwrap());
    CEILING_REQUESTS as f64 / window.as_secs_f64()
}

fn config(dir: &Path, base_url: &str) -> String {
    format!(
        r#"[daemon]
state_dir = "{state}"
jobs_dir = "{jobs}"

[[providers]]
name = "loopback"
kind = "openai"
base_url = "{base_url}"
api_key_env = "NIGHTSHIFT_BENCH_KEY"
concurrency = {CONCURRENCY}

[[providers.models]]
name = "m"
input_per_mtok = 1.0
output_per_mtok = 1.0

[classes]
chat = ["loopback/m"]
"#,
        state = dir.join("state").display(),
        jobs = dir.join("jobs").display(),
    )
}

/// Writes N jobs as one file into `jobs/inbox/` and queues them as the
/// daemon's folder ingest would (the file ends in `processed/`).
fn queue_jobs(dir: &Path, config: &str, n: u64) {
    let mut text = String::with_capacity(n as usize * 260);
    for i in 0..n {
        let line = json!({"custom_id": format!("j{i}"), "method": "POST", "url": "/v1/chat/completions",
                          "body": chat_body(&format!("j{i}"), "chat"),
                          "nightshift": {"deadline": "24h"}});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let inbox = dir.join("jobs/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let path = inbox.join("backlog.jsonl");
    std::fs::write(&path, text).unwrap();
    let config = Config::parse(config, "bench.toml", dir).unwrap();
    let folders = Folders::new(&config.daemon.jobs_dir);
    folders.create().unwrap();
    std::fs::create_dir_all(&config.daemon.state_dir).unwrap();
    let store = Store::open(config.daemon.database.sqlite_path().unwrap()).unwrap();
    let outcome = ingest::ingest_file(
        &store,
        &config.catalog,
        config.daemon.default_deadline,
        &folders,
        &path,
        chrono::Utc::now(),
    )
    .unwrap();
    assert!(
        matches!(outcome, ingest::FileOutcome::Ingested { ref summary, .. } if summary.queued == n),
        "the backlog was not queued whole"
    );
}

/// One table row, or why the depth was given up.
fn depth(seen: &Shared, base_url: &str, n: u64, ticks_per_s: f64, ceiling: f64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), base_url);
    queue_jobs(dir.path(), &config, n);
    // The pid is known only after the spawn; the server reads the daemon's
    // CPU time from the pid it holds, which is set right after the spawn,
    // long before the daemon has opened its queue and sent its first request.
    reset(seen, n, 0);
    let mut child =
        support::spawn_daemon(dir.path(), &config, &[("NIGHTSHIFT_BENCH_KEY", "sk-bench")]);
    let pid = child.id();
    {
        let mut s = seen.lock().unwrap();
        s.pid = pid;
        if s.requests > 0 {
            // Should the first request ever beat this, read it late.
            s.cpu_first = cpu_ticks(pid);
        }
    }
    let started = Instant::now();
    let mut report = Instant::now();
    let gave_up = loop {
        let (requests, done) = {
            let s = seen.lock().unwrap();
            (s.requests, s.last.is_some())
        };
        if done {
            break None;
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Some(format!(
                "daemon exited ({status}) after {requests} of {n} requests; see its log"
            ));
        }
        if started.elapsed() > DEPTH_LIMIT {
            break Some(format!(
                "gave up after {} s: {requests} of {n} requests seen",
                DEPTH_LIMIT.as_secs()
            ));
        }
        if report.elapsed() > Duration::from_secs(10) {
            eprintln!("  {n} queued: {requests} requests so far");
            report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Let the daemon settle the last answers and write the outbox.
    let output = dir.path().join("jobs/outbox/backlog.output.jsonl");
    let errors = dir.path().join("jobs/outbox/backlog.errors.jsonl");
    if gave_up.is_none() {
        let until = Instant::now() + OUTBOX_LIMIT;
        while !output.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    stop(&mut child);
    if let Some(why) = gave_up {
        eprintln!("{n} queued: {why}");
        return format!("| {n} | {why} | | | | | | |");
    }
    let results = count_lines(&output);
    let failed = count_lines(&errors);
    let s = seen.lock().unwrap();
    let window = s
        .last
        .unwrap()
        .duration_since(s.first.unwrap())
        .as_secs_f64();
    let jobs_per_s = n as f64 / window.max(1e-9);
    let cpu = match (s.cpu_first, s.cpu_last) {
        (Some(a), Some(b)) => format!("{:.3}", (b - a) as f64 / ticks_per_s * 1000.0 / n as f64),
        _ => "n/a".to_string(),
    };
    let correct = s.requests == n && s.duplicates == 0 && s.unlabelled == 0;
    let delivered = results == Some(n as usize) && failed.unwrap_or(0) == 0;
    if !correct || !delivered {
        eprintln!(
            "{n} queued: WRONG: {} requests (want {n}), {} duplicates, {} without a custom_id, outbox {results:?} results / {failed:?} errors; daemon log in {}",
            s.requests,
            s.duplicates,
            s.unlabelled,
            dir.path().display()
        );
        // Keep the temp dir for a look.
        let _ = dir.keep();
    }
    format!(
        "| {n} | {} | {} | {} | {jobs_per_s:.0} | {cpu} | {ceiling:.0} | {:.1}% |",
        s.requests,
        s.duplicates,
        results.map_or("none".to_string(), |r| r.to_string()),
        jobs_per_s / ceiling * 100.0
    )
}

fn main() {
    let depths: Vec<u64> = std::env::var("NIGHTSHIFT_BENCH_QUEUES")
        .unwrap_or_else(|_| "1000,20000,100000".to_string())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("NIGHTSHIFT_BENCH_QUEUES: comma-separated job counts")
        })
        .collect();
    assert!(
        depths.iter().all(|&n| n > 0),
        "NIGHTSHIFT_BENCH_QUEUES: depths must be positive"
    );
    let ticks_per_s = clock_ticks();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen: Shared = Arc::default();
    let addr = rt.block_on(async {
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });
    let base_url = format!("http://{addr}/v1");

    let ceiling = ceiling(&seen, &base_url);
    eprintln!("ceiling: {ceiling:.0} requests/s over {CEILING_REQUESTS} requests");
    let rows: Vec<String> = depths
        .iter()
        .map(|&n| {
            let row = depth(&seen, &base_url, n, ticks_per_s, ceiling);
            eprintln!("{row}");
            row
        })
        .collect();

    println!(
        "## Dispatch (loopback OpenAI-compatible server answering at once, concurrency {CONCURRENCY}, no rate limits)\n"
    );
    println!(
        "Ceiling: the server alone, {CEILING_REQUESTS} requests from reqwest/rustls with {CONCURRENCY} in flight. CPU: the daemon's utime+stime over the window, {ticks_per_s} ticks/s.\n"
    );
    println!(
        "| queued | requests seen | duplicates | results | jobs/s | CPU ms/job | ceiling req/s | jobs/s as % of ceiling |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!();
}
