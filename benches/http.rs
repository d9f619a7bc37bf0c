//! `POST /v1/jobs` throughput: jobs durably queued per second over the real
//! Unix socket (the server in-process, no dispatcher, so jobs stay queued),
//! batched (1,000 jobs per request) and single (one job per request, one
//! client, then 8 concurrent clients), next to a reference measured in the
//! same run: the same lines validated and queued directly with
//! `Store::ingest`, in the same batch sizes, on a fresh database.
//!
//! `cargo bench --bench http` (NIGHTSHIFT_BENCH_JOBS=N scales the batched run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use nightshift::api::client::{Client, Target};
use nightshift::config::Config;
use nightshift::domain::job::{self, JobContext};
use nightshift::store::{LineOutcome, NewSource, Origin, Store};
use tokio::sync::watch;

fn line(i: usize) -> String {
    format!(
        r#"{{"custom_id":"job-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"cheap-chat","messages":[{{"role":"system","content":"Classify the ticket as billing, bug, or other."}},{{"role":"user","content":"Ticket {i}: I was charged twice for my subscription this month and need a refund."}}],"max_tokens":16}},"nightshift":{{"deadline":"12h"}}}}"#
    )
}

/// The reference: validate and queue `lines` in groups of `per` with
/// `Store::ingest`, each group one transaction, as the API does.
fn direct(config: &Config, dir: &std::path::Path, lines: &[String], per: usize) -> Duration {
    let store = Store::open(&dir.join("direct.db")).unwrap();
    let start = Instant::now();
    for (n, chunk) in lines.chunks(per).enumerate() {
        let now = Utc::now();
        let ctx = JobContext {
            catalog: &config.catalog,
            now,
            default_deadline: config.daemon.default_deadline,
        };
        let stem = format!("direct-{n}");
        let source = NewSource {
            origin: Origin::Api,
            name: "bench",
            stem: &stem,
            sha256: None,
            now_ms: now.timestamp_millis(),
        };
        let outcomes = chunk.iter().enumerate().map(|(i, l)| {
            Ok(LineOutcome {
                line: i as u64 + 1,
                job: job::parse_line(l, &ctx),
            })
        });
        let s = store.ingest(&source, outcomes).unwrap();
        assert_eq!(s.queued as usize, chunk.len());
    }
    start.elapsed()
}

/// A server on a fresh database in `dir`, and a way to stop it.
async fn server(
    config: &Config,
    dir: &std::path::Path,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>, Arc<Store>) {
    let mut config = config.clone();
    config.daemon.database = nightshift::config::database::Database::Sqlite(dir.join("http.db"));
    config.http.socket = dir.join("api.sock");
    config.http.max_body = 100_000_000;
    let store = Arc::new(Store::open(config.daemon.database.sqlite_path().unwrap()).unwrap());
    let shared = nightshift::shared::Shared::fixed(store.clone(), &config);
    let s = nightshift::api::Server::bind(&config, shared)
        .await
        .unwrap();
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(s.serve(rx));
    (tx, task, store)
}

async fn post(client: &Client, body: String) {
    let (status, text) = client
        .send(
            hyper::Method::POST,
            "/v1/jobs",
            Some("application/jsonl"),
            body,
        )
        .await
        .unwrap();
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&text)
    );
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    let batched_jobs: usize = std::env::var("NIGHTSHIFT_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let per_request = 1_000;
    let single_jobs = 3_000;
    let concurrency = 8;
    let config = Config::embedded_default();
    let lines: Vec<String> = (0..batched_jobs.max(single_jobs)).map(line).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    println!("POST /v1/jobs over the Unix socket vs Store::ingest, same lines, same run");
    println!("(a job counts once its transaction has committed: the HTTP 200)\n");
    println!(
        "{:<44} {:>8} {:>10} {:>14} {:>10}",
        "case", "jobs", "seconds", "jobs/s", "vs direct"
    );
    let row = |name: &str, n: usize, d: Duration, reference: Duration| {
        println!(
            "{name:<44} {n:>8} {:>10.3} {:>14.0} {:>9.0}%",
            d.as_secs_f64(),
            rate(n, d),
            100.0 * reference.as_secs_f64() / d.as_secs_f64()
        );
    };

    // Batched: 1,000 jobs per request / per transaction.
    let dir = tempfile::tempdir().unwrap();
    let reference = direct(&config, dir.path(), &lines[..batched_jobs], per_request);
    row(
        &format!("direct Store::ingest, {per_request} per txn"),
        batched_jobs,
        reference,
        reference,
    );
    let bodies: Vec<String> = lines[..batched_jobs]
        .chunks(per_request)
        .map(|c| c.join("\n") + "\n")
        .collect();
    let http = runtime.block_on(async {
        let (stop, task, store) = server(&config, dir.path()).await;
        let client = Client::new(Target::Unix(dir.path().join("api.sock")));
        let start = Instant::now();
        for b in &bodies {
            post(&client, b.clone()).await;
        }
        let d = start.elapsed();
        assert_eq!(
            store.counts().unwrap().values().sum::<u64>() as usize,
            batched_jobs
        );
        let _ = stop.send(true);
        let _ = task.await;
        d
    });
    row(
        &format!("HTTP, {per_request} jobs per request"),
        batched_jobs,
        http,
        reference,
    );

    // Single: one job per request / per transaction.
    let dir = tempfile::tempdir().unwrap();
    let reference = direct(&config, dir.path(), &lines[..single_jobs], 1);
    row(
        "direct Store::ingest, 1 per txn",
        single_jobs,
        reference,
        reference,
    );
    let (one, many) = runtime.block_on(async {
        let (stop, task, store) = server(&config, dir.path()).await;
        let socket = dir.path().join("api.sock");
        let client = Client::new(Target::Unix(socket.clone()));
        let start = Instant::now();
        for l in &lines[..single_jobs] {
            post(&client, l.clone()).await;
        }
        let one = start.elapsed();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..concurrency {
            let socket = socket.clone();
            let mine: Vec<String> = lines[..single_jobs]
                .iter()
                .skip(c)
                .step_by(concurrency)
                .cloned()
                .collect();
            tasks.push(tokio::spawn(async move {
                let client = Client::new(Target::Unix(socket));
                for l in mine {
                    post(&client, l).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let many = start.elapsed();
        assert_eq!(
            store.counts().unwrap().values().sum::<u64>() as usize,
            2 * single_jobs
        );
        let _ = stop.send(true);
        let _ = task.await;
        (one, many)
    });
    row(
        "HTTP, 1 job per request, 1 client",
        single_jobs,
        one,
        reference,
    );
    row(
        &format!("HTTP, 1 job per request, {concurrency} clients"),
        single_jobs,
        many,
        reference,
    );
}
