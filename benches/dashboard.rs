//! The dashboard's first paint with a deep queue: the time each of its
//! views takes to get its data from the daemon (the requests the page
//! makes, over the real Unix socket, the server in-process), with
//! 1,000,000 jobs queued. Next to a reference measured in the same run on
//! the same database: one bare `SELECT COUNT(*) FROM jobs`, the cheapest
//! aggregate SQLite can answer over the queue.
//!
//! `cargo bench --bench dashboard` (NIGHTSHIFT_BENCH_JOBS=N sets the depth).

use std::time::{Duration, Instant};

use chrono::Utc;
use nightshift::api::client::{Client, Target};
use nightshift::config::Config;
use nightshift::domain::job::{self, JobContext};
use nightshift::store::{LineOutcome, NewSource, Origin, Store};
use tokio::sync::watch;

fn line(i: usize) -> String {
    // Three classes and a spread of deadlines, as a real backlog has.
    let class = ["cheap-chat", "smart-chat", "budget-chat"][i % 3];
    let deadline = 6 + (i % 7) * 3;
    format!(
        r#"{{"custom_id":"job-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{class}","messages":[{{"role":"user","content":"Ticket {i}: I was charged twice for my subscription this month and need a refund."}}],"max_tokens":16}},"nightshift":{{"deadline":"{deadline}h"}}}}"#
    )
}

fn fill(config: &Config, store: &Store, jobs: usize) {
    let per = 10_000;
    for (n, start) in (0..jobs).step_by(per).enumerate() {
        let now = Utc::now();
        let ctx = JobContext {
            catalog: &config.catalog,
            now,
            default_deadline: config.daemon.default_deadline,
        };
        let stem = format!("backlog-{n}");
        let source = NewSource {
            origin: Origin::Api,
            name: "bench",
            stem: &stem,
            sha256: None,
            now_ms: now.timestamp_millis(),
        };
        let end = (start + per).min(jobs);
        let outcomes = (start..end).map(|i| {
            Ok(LineOutcome {
                line: (i - start) as u64 + 1,
                job: job::parse_line(&line(i), &ctx),
            })
        });
        let s = store.ingest(&source, outcomes).unwrap();
        assert_eq!(s.queued as usize, end - start);
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let jobs: usize = std::env::var("NIGHTSHIFT_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runs = 5;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::embedded_default();
    config.daemon.database =
        nightshift::config::database::Database::Sqlite(dir.path().join("dash.db"));
    config.http.socket = dir.path().join("api.sock");
    config.http.tcp = None;
    let store =
        std::sync::Arc::new(Store::open(config.daemon.database.sqlite_path().unwrap()).unwrap());
    let t = Instant::now();
    fill(&config, &store, jobs);
    println!(
        "{jobs} jobs queued in {:.1} s; each figure is the median of {runs} runs\n",
        t.elapsed().as_secs_f64()
    );

    // The reference: the cheapest aggregate over the same table.
    let conn = rusqlite::Connection::open(config.daemon.database.sqlite_path().unwrap()).unwrap();
    let reference = median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                let n: i64 = conn
                    .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(n as usize, jobs);
                t.elapsed()
            })
            .collect(),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let shared = nightshift::shared::Shared::fixed(store.clone(), &config);
        let server = nightshift::api::Server::bind(&config, shared)
            .await
            .unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(server.serve(rx));
        let client = Client::new(Target::Unix(config.http.socket.clone()));
        // The first plan of the queue (no dispatcher here: the API plans
        // it from the store and caches it for a second), then the page's
        // views with SQLite's page cache warm, as for a page already open.
        let t = Instant::now();
        client.get("/v1/plan").await.unwrap();
        let first_plan = t.elapsed();

        println!(
            "{:<34} {:>12} {:>14}",
            "view (its requests, in parallel)", "ms", "vs COUNT(*)"
        );
        let row = |name: &str, d: Duration| {
            println!(
                "{name:<34} {:>12.1} {:>13.1}x",
                d.as_secs_f64() * 1e3,
                d.as_secs_f64() / reference.as_secs_f64()
            );
        };
        row("reference: SELECT COUNT(*)", reference);
        row("plan, first (summary + LP)", first_plan);
        let views: [(&str, &[&str]); 5] = [
            ("overview", &["/v1/stats", "/v1/providers"]),
            ("plan", &["/v1/plan", "/v1/prices?hours=48"]),
            ("jobs (first page)", &["/v1/jobs?limit=50"]),
            ("sources", &["/v1/sources?limit=50", "/v1/batches?limit=50"]),
            ("providers", &["/v1/providers"]),
        ];
        for (name, paths) in views {
            let mut times = Vec::new();
            for _ in 0..runs {
                let t = Instant::now();
                let calls = paths.iter().map(|p| client.get(p));
                for r in futures_util::future::join_all(calls).await {
                    r.unwrap();
                }
                times.push(t.elapsed());
            }
            row(name, median(times));
        }
        let _ = stop.send(true);
        let _ = task.await;
    });
}
