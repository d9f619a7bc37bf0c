//! Ingest benchmark: nightshift's watched-folder path against a bare SQLite
//! insert of the same rows.
//!
//! Run with `cargo bench --bench ingest`. Environment:
//!
//! - `NIGHTSHIFT_BENCH_LINES` — lines in the job file (default 1,000,000);
//! - `NIGHTSHIFT_BENCH_RUNS` — timed runs of each measurement (default 3).
//!
//! Two measurements, in the same process, on the same file, each run on a
//! fresh database created by [`Store::open`] (same schema, indexes, pragmas):
//!
//! 1. **bare**: a plain `rusqlite::Connection` inserts the already-parsed rows
//!    (parsed by nightshift's own validator before the timer starts, route ids
//!    assigned) into `jobs`, after the source row and the few `routes` rows, in
//!    one transaction with a cached prepared statement
//!    ([`store::bare_insert_statement`]). This is the ceiling: SQLite
//!    insertion only.
//! 2. **nightshift**: [`ingest::ingest_file`] end to end on a copy of the file
//!    in the inbox: hashing pass, per-line validation, insert, move to
//!    `processed/`.
//!
//! After each run both databases are fingerprinted (row count, summed sizes
//! and estimates, route keys) and must agree: the two measurements store the
//! same rows. The goal is nightshift ≥ 50% of the bare insert's rows/s.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nightshift::config::Config;
use nightshift::domain::job::{self, JobContext, NewJob};
use nightshift::ingest::{self, FileOutcome, Folders};
use nightshift::store::{self, JobState, Store};
use rusqlite::{Connection, TransactionBehavior, params};

const DEFAULT_LINES: usize = 1_000_000;
const DEFAULT_RUNS: usize = 3;
/// nightshift's rows/s as a share of the bare insert's.
const GOAL_PERCENT: f64 = 50.0;
/// The chat classes of the embedded default configuration, with weights.
const CLASSES: [(&str, u64); 3] = [("cheap-chat", 5), ("budget-chat", 3), ("smart-chat", 2)];

fn main() {
    let lines = env_count("NIGHTSHIFT_BENCH_LINES", DEFAULT_LINES);
    let runs = env_count("NIGHTSHIFT_BENCH_RUNS", DEFAULT_RUNS);
    let config = Config::embedded_default();
    for (class, _) in CLASSES {
        assert!(
            config.catalog.classes.contains_key(class),
            "the embedded default configuration has no class '{class}'"
        );
    }

    let tmp = tempfile::tempdir().expect("create a temporary directory");
    let source = tmp.path().join("bench.jsonl");
    let bytes = generate(&source, lines);
    let rows = parse_all(&source, &config);
    assert_eq!(rows.len(), lines);
    let routes = Routes::of(&rows);

    println!("nightshift ingest benchmark");
    println!(
        "  lines {lines}, file {:.1} MB ({} bytes/line on average), {runs} run(s) each, fresh database per run",
        bytes as f64 / 1e6,
        bytes / lines as u64,
    );

    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let dir = tmp.path().join(format!("run-{run}"));
        fs::create_dir_all(&dir).expect("create the run directory");
        let (b, bare_rows) = bare_insert(&dir.join("bare.db"), &rows, &routes);
        let (n, our_rows) = nightshift_ingest(&dir, &source, &config, lines);
        assert_eq!(
            bare_rows, our_rows,
            "the two measurements stored different rows"
        );
        fs::remove_dir_all(&dir).expect("remove the run directory");
        println!(
            "  run {run}: bare {:.3} s, nightshift {:.3} s",
            b.as_secs_f64(),
            n.as_secs_f64()
        );
        bare.push(b);
        ours.push(n);
    }

    let bare = Stats::of(&bare);
    let ours = Stats::of(&ours);
    println!();
    println!(
        "  {:<28} {:>9} {:>9} {:>13} {:>13}",
        "", "best s", "median s", "best rows/s", "median rows/s"
    );
    for (name, s) in [
        ("bare rusqlite insert", &bare),
        ("nightshift ingest_file", &ours),
    ] {
        println!(
            "  {:<28} {:>9.3} {:>9.3} {:>13} {:>13}",
            name,
            s.best,
            s.median,
            thousands(lines as f64 / s.best),
            thousands(lines as f64 / s.median),
        );
    }
    let best = 100.0 * bare.best / ours.best;
    let median = 100.0 * bare.median / ours.median;
    println!();
    println!(
        "  nightshift / bare (rows/s): best {best:.1}%, median {median:.1}%; goal >= {GOAL_PERCENT:.0}%: {}",
        if best >= GOAL_PERCENT && median >= GOAL_PERCENT {
            "met"
        } else {
            "NOT MET"
        }
    );
}

/// A positive count from the environment (underscores allowed), or `default`.
fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => match v.replace('_', "").trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("{name}={v:?}: expected a positive integer"),
        },
    }
}

/// A deterministic xorshift64* generator: the same file on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const SYSTEM: &[&str] = &[
    "Answer with one word.",
    "Be brief.",
    "Label the ticket: billing, bug or other.",
];

const TASKS: &[&str] = &[
    "Classify ticket {n}:",
    "Summarise (ref {n}):",
    "Translate to French:",
    "Extract the order number:",
    "Reply politely to customer {n}:",
    "Sentiment 1-5 of review {n}:",
];

/// Customer text; a few carry JSON escapes and non-ASCII, as real files do.
const TEXTS: &[&str] = &[
    "I was charged twice this month.",
    "The export button does nothing in Firefox.",
    "Order #A-4471 arrived with a cracked lid.",
    "Can I switch to annual billing?",
    "The app crashes when I open settings.",
    "Invoice says \\\"Pro\\\" but I have Basic.",
    "Livraison très rapide, je recommande.",
    "Password reset emails never arrive.",
    "Meeting moved to Thursday at 10.",
    "Great product, manual only in German.",
    "Refund for order 88213, never shipped.",
    "Phone and laptop stopped syncing.",
];

const NIGHTSHIFT: &[&str] = &[
    r#","nightshift":{"deadline":"12h"}"#,
    r#","nightshift":{"deadline":"2d","priority":1}"#,
    r#","nightshift":{"deadline":"90m"}"#,
    r#","nightshift":{"deadline":"6h","max_cost_usd":0.01}"#,
    "",
];

/// Writes `lines` job lines to `path`; returns the file size in bytes.
fn generate(path: &Path, lines: usize) -> u64 {
    let file = File::create(path).expect("create the job file");
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let total_weight: u64 = CLASSES.iter().map(|(_, w)| w).sum();
    for i in 0..lines {
        let mut roll = rng.next() % total_weight;
        let class = CLASSES
            .iter()
            .find(|(_, w)| {
                let hit = roll < *w;
                roll = roll.saturating_sub(*w);
                hit
            })
            .map(|(c, _)| *c)
            .expect("a class");
        let task = rng
            .pick(TASKS)
            .replace("{n}", &(i * 7 % 100_003).to_string());
        let text = rng.pick(TEXTS);
        let system = if rng.below(5) == 0 {
            format!(r#"{{"role":"system","content":"{}"}},"#, rng.pick(SYSTEM))
        } else {
            String::new()
        };
        let max_tokens = [16, 32, 64, 128, 256][rng.below(5)];
        let cap = if rng.below(10) == 0 {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        // budget-chat's models are all in the EU, so a region pin is valid there.
        let options = if class == "budget-chat" && rng.below(4) == 0 {
            r#","nightshift":{"deadline":"1d","regions":["eu"]}"#
        } else {
            rng.pick(NIGHTSHIFT)
        };
        writeln!(
            w,
            r#"{{"custom_id":"job-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{class}","messages":[{system}{{"role":"user","content":"{task} {text}"}}],"{cap}":{max_tokens}}}{options}}}"#
        )
        .expect("write the job file");
    }
    let file = w.into_inner().expect("flush the job file");
    // Written back before any timing starts, so writeback does not overlap it.
    file.sync_all().expect("sync the job file");
    file.metadata().expect("stat the job file").len()
}

/// The rows nightshift would store, parsed with nightshift's own validator
/// (before any timer starts). Panics on an invalid line: the file must be
/// entirely valid for the two measurements to insert the same rows.
fn parse_all(path: &Path, config: &Config) -> Vec<NewJob> {
    let ctx = JobContext {
        catalog: &config.catalog,
        now: bench_now(),
        default_deadline: config.daemon.default_deadline,
    };
    let reader = BufReader::with_capacity(1 << 20, File::open(path).expect("open the job file"));
    reader
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let line = line.expect("read the job file");
            job::parse_line(&line, &ctx)
                .unwrap_or_else(|e| panic!("generated line {} is invalid: {e}\n{line}", i + 1))
        })
        .collect()
}

/// The distinct route keys of the rows and each row's `routes.id`, assigned
/// in first-seen order as ingest assigns them in a fresh database.
struct Routes {
    keys: Vec<String>,
    ids: Vec<i64>,
}

impl Routes {
    fn of(rows: &[NewJob]) -> Routes {
        let mut seen: HashMap<&str, i64> = HashMap::new();
        let mut keys = Vec::new();
        let ids = rows
            .iter()
            .map(|job| {
                *seen.entry(&job.route_key).or_insert_with(|| {
                    keys.push(job.route_key.clone());
                    keys.len() as i64
                })
            })
            .collect();
        Routes { keys, ids }
    }
}

fn bench_now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
        .expect("a valid timestamp")
        .with_timezone(&Utc)
}

/// The reference: a fresh nightshift database, then a plain connection that
/// inserts the precomputed rows (the source, the routes, the jobs) in one
/// transaction. Times the transaction.
fn bare_insert(db: &Path, rows: &[NewJob], routes: &Routes) -> (Duration, Fingerprint) {
    // Schema, indexes and WAL exactly as nightshift creates them.
    drop(Store::open(db).expect("create the database"));
    let mut conn = Connection::open(db).expect("open the database");
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
        .expect("set journal_mode");
    assert!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
    conn.pragma_update(None, "synchronous", "NORMAL")
        .expect("set synchronous");
    // Store's connection enforces foreign keys; so does the reference.
    conn.pragma_update(None, "foreign_keys", true)
        .expect("set foreign_keys");
    let now_ms = bench_now().timestamp_millis();

    let start = Instant::now();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .expect("begin");
    tx.execute(
        "INSERT INTO sources (origin, name, stem, sha256, ingested_at, total_lines, valid_jobs, invalid_lines)
         VALUES ('inbox', 'bench.jsonl', 'bench', NULL, ?1, 0, 0, 0)",
        [now_ms],
    )
    .expect("insert the source");
    let source_id = tx.last_insert_rowid();
    for (i, key) in routes.keys.iter().enumerate() {
        tx.execute(
            "INSERT INTO routes (id, key) VALUES (?1, ?2)",
            params![i as i64 + 1, key],
        )
        .expect("insert a route");
    }
    {
        let mut insert = tx
            .prepare_cached(store::bare_insert_statement())
            .expect("prepare the insert");
        // The parameters below are Store::ingest's, in its order.
        assert_eq!(
            insert.parameter_count(),
            14,
            "store::bare_insert_statement() changed; update the bare insert's parameters"
        );
        for (i, job) in rows.iter().enumerate() {
            insert
                .execute(params![
                    source_id,
                    i as i64 + 1,
                    job.custom_id,
                    job.endpoint.as_url(),
                    job.model,
                    job.body,
                    job.options,
                    job.priority,
                    job.estimate.input as i64,
                    job.estimate.output as i64,
                    now_ms,
                    job.deadline.timestamp_millis(),
                    routes.ids[i],
                    nightshift::domain::estimate::size_bin(job.estimate.output)
                ])
                .expect("insert a job");
        }
    }
    tx.commit().expect("commit");
    let elapsed = start.elapsed();

    let print = fingerprint(&conn);
    assert_eq!(print.0, rows.len() as i64, "bare insert row count");
    (elapsed, print)
}

/// nightshift's path: a fresh store and jobs folder, the file copied into
/// the inbox, then `ingest_file` timed end to end.
fn nightshift_ingest(
    dir: &Path,
    source: &Path,
    config: &Config,
    lines: usize,
) -> (Duration, Fingerprint) {
    let db = dir.join("nightshift.db");
    let store = Store::open(&db).expect("create the database");
    let folders = Folders::new(&dir.join("jobs"));
    folders.create().expect("create the jobs folders");
    let path: PathBuf = folders.inbox.join("bench.jsonl");
    fs::copy(source, &path).expect("copy the job file into the inbox");
    File::open(&path)
        .and_then(|f| f.sync_all())
        .expect("sync the inbox copy");

    let start = Instant::now();
    let outcome = ingest::ingest_file(
        &store,
        &config.catalog,
        config.daemon.default_deadline,
        &folders,
        &path,
        Utc::now(),
    )
    .expect("ingest the file");
    let elapsed = start.elapsed();

    match outcome {
        FileOutcome::Ingested { summary, moved_to } => {
            assert_eq!(summary.queued, lines as u64, "queued: {summary:?}");
            assert_eq!(summary.invalid, 0, "invalid: {summary:?}");
            assert!(moved_to.starts_with(&folders.processed), "{moved_to:?}");
        }
        other => panic!("expected the file to be ingested, got {other:?}"),
    }
    let queued = store.counts().expect("count the jobs")[&JobState::Queued];
    assert_eq!(queued, lines as u64, "queued jobs in the store");
    drop(store);
    let conn = Connection::open(&db).expect("reopen the database");
    (elapsed, fingerprint(&conn))
}

/// What both measurements must have stored alike: job count, summed sizes
/// and estimates, and the route keys in id order. (Deadlines and submission
/// times differ: nightshift's run uses the wall clock.)
#[derive(Debug, PartialEq)]
struct Fingerprint(i64, i64, i64, i64, String);

fn fingerprint(conn: &Connection) -> Fingerprint {
    conn.query_row(
        "SELECT COUNT(*),
                SUM(length(custom_id) + length(endpoint) + length(model) + length(body) + ifnull(length(options), 0)),
                SUM(priority + est_input_tokens + est_output_tokens),
                SUM(route_id),
                (SELECT group_concat(key, ' ') FROM (SELECT key FROM routes ORDER BY id))
         FROM jobs",
        [],
        |r| Ok(Fingerprint(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )
    .expect("fingerprint the jobs")
}

/// Best and median of a set of timings, in seconds.
struct Stats {
    best: f64,
    median: f64,
}

impl Stats {
    fn of(times: &[Duration]) -> Stats {
        let mut s: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 {
            s[mid]
        } else {
            (s[mid - 1] + s[mid]) / 2.0
        };
        Stats { best: s[0], median }
    }
}

/// `1234567.8` as `1,234,568`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
