//! The PostgreSQL backend next to SQLite, in one run:
//!
//!     cargo bench --bench shared
//!
//! 1. **Ingest**: N job lines (parsed beforehand, so only the store is
//!    timed) queued by `Store::ingest` in one source, into a fresh SQLite
//!    file and a fresh PostgreSQL database; rows/s of each.
//! 2. **Re-plan at N queued**: `nightshift plan`'s path (`cli::plan`: open
//!    the configured database, read the queue's summary, plan it) on the
//!    queue just ingested; the best of three runs on each backend.
//! 3. **Dispatch**: M jobs queued, then the real daemon drains them into a
//!    loopback OpenAI-compatible server that answers at once (concurrency
//!    64, no rate limits): one daemon on SQLite, one on PostgreSQL, three on
//!    one PostgreSQL queue (each its own state directory and node). jobs/s
//!    is M over the window from the server's first request to its Mth;
//!    the server must see each job exactly once.
//!
//! PostgreSQL is the throwaway server of `store::pg::testing` (a Unix
//! socket on this machine, fsync off): the figures are the backend's cost,
//! not a network's or a disk's. NIGHTSHIFT_BENCH_INGEST (default 100000)
//! and NIGHTSHIFT_BENCH_DISPATCH (default 20000) set N and M.

#[allow(dead_code)] // rss_kb is for the memory benchmarks
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use nightshift::config::Config;
use nightshift::domain::job::{JobContext, parse_line};
use nightshift::store::pg::testing;
use nightshift::store::{LineOutcome, NewSource, Origin, Store};
use serde_json::json;
use support::loopback::{Shared, chat_body, handle, reset, stop};

/// How long one dispatch run may take before it is given up.
const RUN_LIMIT: Duration = Duration::from_secs(600);

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().parse().expect("a positive job count"))
        .unwrap_or(default)
        .max(1)
}

/// A config for `dir` on `database` (a SQLite path, or a PostgreSQL URL).
fn config_text(dir: &Path, base_url: &str, database: Option<&str>, node: &str) -> String {
    let database = database.map_or(String::new(), |d| format!("database = \"{d}\"\n"));
    format!(
        r#"[daemon]
state_dir = "{state}"
jobs_dir = "{jobs}"
node = "{node}"
{database}
[[providers]]
name = "loopback"
kind = "openai"
base_url = "{base_url}"
api_key_env = "NIGHTSHIFT_BENCH_KEY"
concurrency = 64

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

fn parse(config: &str, dir: &Path) -> Config {
    Config::parse(config, "bench.toml", dir).unwrap()
}

/// `n` jobs, parsed as ingest parses them.
fn outcomes(config: &Config, n: u64) -> Vec<LineOutcome> {
    let ctx = JobContext {
        catalog: &config.catalog,
        now: chrono::Utc::now(),
        default_deadline: Duration::from_secs(86_400),
    };
    (0..n)
        .map(|i| {
            let line = json!({"custom_id": format!("j{i}"), "method": "POST", "url": "/v1/chat/completions",
                              "body": chat_body(&format!("j{i}"), "chat"),
                              "nightshift": {"deadline": "24h"}})
            .to_string();
            LineOutcome {
                line: i + 1,
                job: parse_line(&line, &ctx),
            }
        })
        .collect()
}

/// Queues `jobs` as one API source; returns rows/s.
fn ingest(store: &Store, jobs: Vec<LineOutcome>) -> f64 {
    let n = jobs.len();
    let source = NewSource {
        origin: Origin::Api,
        name: "bench",
        stem: "bench",
        sha256: None,
        now_ms: chrono::Utc::now().timestamp_millis(),
    };
    let t = Instant::now();
    let summary = store.ingest(&source, jobs.into_iter().map(Ok)).unwrap();
    let took = t.elapsed().as_secs_f64();
    assert_eq!(summary.queued as usize, n, "every job queued");
    n as f64 / took
}

/// The best of three `nightshift plan` runs, in ms.
fn replan_ms(config: &Config) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let out = nightshift::cli::plan(config).unwrap();
            assert!(!out.is_empty());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

fn postgres(url: &str, node: &str) -> Store {
    let db = nightshift::config::database::Database::Postgres(Box::new(
        nightshift::config::database::Target::parse(url, None).unwrap(),
    ));
    Store::open_database(&db, node).unwrap()
}

/// One dispatch run: `daemons` daemons on `url` (SQLite when `None`)
/// drain `n` queued jobs. Returns the table row.
fn dispatch(seen: &Shared, base_url: &str, url: Option<&str>, daemons: usize, n: u64) -> String {
    let dirs: Vec<tempfile::TempDir> = (0..daemons).map(|_| tempfile::tempdir().unwrap()).collect();
    let configs: Vec<String> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| config_text(d.path(), base_url, url, &format!("bench-{i}")))
        .collect();
    let first = parse(&configs[0], dirs[0].path());
    std::fs::create_dir_all(&first.daemon.state_dir).unwrap();
    let store = match url {
        None => Store::open(first.daemon.database.sqlite_path().unwrap()).unwrap(),
        Some(u) => postgres(u, "bench-0"),
    };
    ingest(&store, outcomes(&first, n));
    drop(store);
    reset(seen, n, 0);
    let mut children: Vec<_> = dirs
        .iter()
        .zip(&configs)
        .map(|(d, c)| support::spawn_daemon(d.path(), c, &[("NIGHTSHIFT_BENCH_KEY", "sk-bench")]))
        .collect();
    let started = Instant::now();
    let gave_up = loop {
        let (requests, done) = {
            let s = seen.lock().unwrap();
            (s.requests, s.last.is_some())
        };
        if done {
            break None;
        }
        if started.elapsed() > RUN_LIMIT {
            break Some(format!(
                "gave up after {} s: {requests} of {n} requests",
                RUN_LIMIT.as_secs()
            ));
        }
        if let Some(status) = children
            .iter_mut()
            .find_map(|c| c.try_wait().ok().flatten())
        {
            break Some(format!(
                "a daemon exited ({status}) after {requests} of {n} requests"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    for c in &mut children {
        stop(c);
    }
    let backend = if url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    if let Some(why) = gave_up {
        for d in dirs {
            eprintln!("kept {} for a look", d.keep().display());
        }
        return format!("| {backend} | {daemons} | {why} | | | |");
    }
    let s = seen.lock().unwrap();
    let window = s
        .last
        .unwrap()
        .duration_since(s.first.unwrap())
        .as_secs_f64();
    let correct = s.requests == n && s.duplicates == 0 && s.unlabelled == 0;
    if !correct {
        eprintln!(
            "WRONG: {} requests of {n}, {} duplicates, {} unlabelled",
            s.requests, s.duplicates, s.unlabelled
        );
    }
    format!(
        "| {backend} | {daemons} | {n} | {} | {} | {:.0} |",
        s.requests,
        s.duplicates,
        n as f64 / window.max(1e-9)
    )
}

fn main() {
    let ingest_n = env_count("NIGHTSHIFT_BENCH_INGEST", 100_000);
    let dispatch_n = env_count("NIGHTSHIFT_BENCH_DISPATCH", 20_000);
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

    // 1 and 2: ingest, then re-plan the queue it left.
    let dir = tempfile::tempdir().unwrap();
    let sqlite_cfg = parse(
        &config_text(dir.path(), &base_url, None, "bench"),
        dir.path(),
    );
    std::fs::create_dir_all(&sqlite_cfg.daemon.state_dir).unwrap();
    let sqlite = Store::open(sqlite_cfg.daemon.database.sqlite_path().unwrap()).unwrap();
    let sqlite_rows = ingest(&sqlite, outcomes(&sqlite_cfg, ingest_n));
    eprintln!("ingest SQLite: {sqlite_rows:.0} rows/s");
    let url = testing::fresh_database();
    let pg_cfg = parse(
        &config_text(dir.path(), &base_url, Some(&url), "bench"),
        dir.path(),
    );
    let pg = postgres(&url, "bench");
    let pg_rows = ingest(&pg, outcomes(&pg_cfg, ingest_n));
    eprintln!("ingest PostgreSQL: {pg_rows:.0} rows/s");
    drop((sqlite, pg));
    let sqlite_plan = replan_ms(&sqlite_cfg);
    let pg_plan = replan_ms(&pg_cfg);
    eprintln!("re-plan at {ingest_n}: SQLite {sqlite_plan:.0} ms, PostgreSQL {pg_plan:.0} ms");

    // 3: dispatch.
    let rows: Vec<String> = [
        (None, 1),
        (Some(testing::fresh_database()), 1),
        (Some(testing::fresh_database()), 3),
    ]
    .iter()
    .map(|(url, daemons)| {
        let row = dispatch(&seen, &base_url, url.as_deref(), *daemons, dispatch_n);
        eprintln!("{row}");
        row
    })
    .collect();

    println!(
        "## PostgreSQL next to SQLite (same run; PostgreSQL on a local Unix socket, fsync off)\n"
    );
    println!("| figure | SQLite | PostgreSQL | PostgreSQL / SQLite |");
    println!("|---|---|---|---|");
    println!(
        "| ingest, rows/s ({ingest_n} jobs, one source) | {sqlite_rows:.0} | {pg_rows:.0} | {:.2} |",
        pg_rows / sqlite_rows
    );
    println!(
        "| re-plan at {ingest_n} queued, ms (best of 3) | {sqlite_plan:.0} | {pg_plan:.0} | {:.2} |",
        pg_plan / sqlite_plan
    );
    println!(
        "\nDispatch to a loopback server answering at once (concurrency 64, no rate limits):\n"
    );
    println!("| backend | daemons | jobs | requests seen | duplicates | jobs/s |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!();
}
