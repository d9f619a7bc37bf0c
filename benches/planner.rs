//! Planner benchmark: cost on every scenario against the offline lower bound
//! and the baselines, and re-plan time for large queues.
//!
//!     cargo bench --bench planner
//!
//! Environment: NIGHTSHIFT_BENCH_QUEUES=10000,100000 to choose queue sizes
//! (default 10,000, 100,000 and 1,000,000; empty for none);
//! NIGHTSHIFT_BENCH_SCENARIOS=burst,flaky to run only those scenarios.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nightshift::config::Config;
use nightshift::domain::job::{Options, RouteKey};
use nightshift::domain::pricing::Endpoint;
use nightshift::plan::{self, PlanSettings, ProviderCapacity, QueuedBucket};
use nightshift::simulate::{self, Policy};

fn main() {
    scenarios();
    let sizes = queue_sizes();
    replan_times(&sizes);
    sql_summary_times(&sizes);
}

fn queue_sizes() -> Vec<usize> {
    std::env::var("NIGHTSHIFT_BENCH_QUEUES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000])
}

/// Every scenario folder under bench/scenarios, or those named in
/// NIGHTSHIFT_BENCH_SCENARIOS.
fn scenario_names(root: &Path) -> Vec<String> {
    if let Ok(s) = std::env::var("NIGHTSHIFT_BENCH_SCENARIOS") {
        return s.split(',').map(|x| x.trim().to_string()).collect();
    }
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn scenarios() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/scenarios");
    println!("## Cost per scenario (USD; simulated, virtual time)\n");
    println!(
        "| scenario | jobs | planner | cheapest-now | best fixed | lower bound | planner / bound | bound as the planner knows it | planner / that | planner misses (failed) | saving vs cheapest-now | planner sync / flex / batch (batches, guarded) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut timings = Vec::new();
    let mut rates = Vec::new();
    for name in scenario_names(&root) {
        let dir = root.join(&name);
        let config = Config::load(&dir.join("config.toml")).expect("scenario config");
        let start = std::fs::read_to_string(dir.join("start.txt")).unwrap();
        let start = DateTime::parse_from_rfc3339(start.trim())
            .unwrap()
            .with_timezone(&Utc);
        let text = std::fs::read_to_string(dir.join("workload.jsonl")).unwrap();
        let workload = simulate::load_workload(&text, &config, start).expect("scenario workload");
        let settings = PlanSettings {
            safety_margin: config.daemon.safety_margin,
            ..PlanSettings::default()
        };
        let run = |p: &Policy| simulate::run(&config, &workload, p, &settings).unwrap().0;
        let t = Instant::now();
        let planner = run(&Policy::Planner);
        let planner_wall = t.elapsed();
        let t = Instant::now();
        let cheapest = run(&Policy::CheapestNow);
        let best_fixed = config
            .catalog
            .providers
            .iter()
            .map(|p| run(&Policy::Fixed(p.name.clone())))
            // A provider that cannot serve some jobs fails them: its cost
            // is not comparable, so the best fixed one serves the most.
            .min_by(|a, b| {
                (a.deadline_misses + a.failed, a.total_cost_usd)
                    .partial_cmp(&(b.deadline_misses + b.failed, b.total_cost_usd))
                    .unwrap()
            })
            .unwrap();
        let others_wall = t.elapsed();
        // The planner's peak use of each limited provider, from its trace
        // (every attempt, retries too), against the configured limit.
        for r in planner
            .rate_use
            .iter()
            .filter(|r| r.rpm.is_some() || r.rpd.is_some())
        {
            let ratio = |used: usize, limit: Option<u32>| {
                limit.map_or("-".to_string(), |l| {
                    format!("{:.3}", used as f64 / f64::from(l.max(1)))
                })
            };
            rates.push(format!(
                "| {name} | {} | {} / {} | {} | {} / {} | {} |",
                r.provider,
                r.max_requests_per_minute,
                r.rpm.map_or("-".to_string(), |l| l.to_string()),
                ratio(r.max_requests_per_minute, r.rpm),
                r.max_requests_per_day,
                r.rpd.map_or("-".to_string(), |l| l.to_string()),
                ratio(r.max_requests_per_day, r.rpd),
            ));
        }
        let t = Instant::now();
        let b = simulate::bound::compute(&config, &workload, &settings);
        let bound_wall = t.elapsed();
        let (bound, infeasible) = (b.cost, b.infeasible);
        // Not a bound on every schedule: the bound of the workload with the
        // daemon's safety margin and only the answer lengths the planner can
        // know (see `bound::as_the_planner_knows`).
        let known = simulate::bound::as_known(&config, &workload, &settings).cost;
        timings.push(format!(
            "| {name} | {} | {:.2} s | {:.2} s | {:.2} s ({:?}, {} bins × {} slots) |",
            workload.len(),
            planner_wall.as_secs_f64(),
            others_wall.as_secs_f64(),
            bound_wall.as_secs_f64(),
            b.method,
            b.bins,
            b.slots,
        ));
        let saving = 100.0 * (1.0 - planner.total_cost_usd / cheapest.total_cost_usd);
        let channel = |c: &str| planner.per_channel.get(c).copied().unwrap_or(0);
        let channels = format!(
            "{} / {} / {} ({}, {})",
            channel("sync"),
            channel("flex"),
            channel("batch"),
            planner.batches_created,
            planner.batches_guarded
        );
        println!(
            "| {name} | {} | {:.6} | {:.6} ({} misses, {} failed) | {:.6} {} ({} misses, {} failed) | {:.6}{} | {:.3}x | {known:.6} | {:.3}x | {} ({} failed) | {saving:.1}% | {channels} |",
            workload.len(),
            planner.total_cost_usd,
            cheapest.total_cost_usd,
            cheapest.deadline_misses,
            cheapest.failed,
            best_fixed.total_cost_usd,
            best_fixed.policy,
            best_fixed.deadline_misses,
            best_fixed.failed,
            bound,
            if infeasible > 0.0 {
                format!(" ({infeasible:.0} infeasible)")
            } else {
                String::new()
            },
            planner.total_cost_usd / bound,
            planner.total_cost_usd / known,
            planner.deadline_misses,
            planner.failed,
        );
    }
    println!();
    println!("## Wall time per scenario (simulate, this machine)\n");
    println!("| scenario | jobs | simulate planner | other policies | lower bound |");
    println!("|---|---|---|---|---|");
    for t in timings {
        println!("{t}");
    }
    println!();
    println!("## Planner's peak requests per limited provider (from the trace: every attempt)\n");
    println!(
        "| scenario | provider | max in any sliding 60 s / rpm | utilisation | max in any rolling 24 h / rpd | utilisation |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rates {
        println!("{r}");
    }
    println!();
}

/// A synthetic queue of `n` jobs over the embedded default's classes, with
/// deadlines spread over two days, as the queue's GROUP BY reports it.
fn synthetic_queue(config: &Config, n: usize, now: DateTime<Utc>) -> Vec<(String, i64, u64, u64)> {
    let classes: Vec<&String> = config
        .catalog
        .classes
        .keys()
        .filter(|c| c.as_str() != "embed")
        .collect();
    let keys: Vec<String> = classes
        .iter()
        .map(|c| RouteKey::new(Endpoint::ChatCompletions, c, &Options::default()).encode())
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let deadline = now.timestamp_millis() + 3_600_000 + (x % (47 * 3_600_000)) as i64;
            (
                keys[i % keys.len()].clone(),
                deadline,
                200 + x % 800,
                50 + x % 200,
            )
        })
        .collect()
}

fn aggregate(queue: &[(String, i64, u64, u64)]) -> Vec<QueuedBucket> {
    plan::bucket_jobs(queue.iter().map(|(k, d, i, o)| (k.as_str(), *d, *i, *o)))
}

fn replan_times(sizes: &[usize]) {
    let config = Config::embedded_default();
    let now = DateTime::parse_from_rfc3339("2026-11-24T00:30:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let capacity: Vec<ProviderCapacity> = simulate::capacities(&config);
    let settings = PlanSettings::default();
    println!("## Re-plan time (embedded default catalog, 3 chat classes, deadlines over 48 h)\n");
    println!(
        "| queued jobs | groups | slots | aggregate (in memory) | build groups + LP | total | method |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in sizes {
        let queue = synthetic_queue(&config, n, now);
        let mut best: Option<(Duration, Duration, usize, usize, String)> = None;
        for _ in 0..3 {
            let t0 = Instant::now();
            let buckets = aggregate(&queue);
            let t1 = Instant::now();
            let q = plan::plan_queue(
                &buckets,
                &config.catalog,
                &capacity,
                now,
                &settings,
                |_| 1.0,
                |_| None,
            );
            let (plain, p) = (q.groups, q.plan);
            let t2 = Instant::now();
            let run = (
                t1 - t0,
                t2 - t1,
                plain.len(),
                p.slots.len(),
                format!("{:?}", p.method),
            );
            if best.as_ref().is_none_or(|b| run.0 + run.1 < b.0 + b.1) {
                best = Some(run);
            }
        }
        let (agg, lp, groups, slots, method) = best.unwrap();
        println!(
            "| {n} | {groups} | {slots} | {:.1} ms | {:.1} ms | {:.1} ms | {method} |",
            agg.as_secs_f64() * 1e3,
            lp.as_secs_f64() * 1e3,
            (agg + lp).as_secs_f64() * 1e3
        );
    }
    println!();
}

/// The daemon's side of a re-plan: the queue summary query on SQLite.
fn sql_summary_times(sizes: &[usize]) {
    use nightshift::store::{LineOutcome, NewSource, Origin, Store};
    let config = Config::embedded_default();
    let now = Utc::now();
    println!(
        "## Queue summary query (SQLite GROUP BY over queued jobs, the daemon's re-plan input)\n"
    );
    println!("| queued jobs | buckets | query time |");
    println!("|---|---|---|");
    for &n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.db")).unwrap();
        let queue = synthetic_queue(&config, n, now);
        let lines = queue
            .iter()
            .enumerate()
            .map(|(i, (key, deadline, input, output))| {
                let route = RouteKey::decode(key).unwrap();
                Ok(LineOutcome {
                    line: i as u64 + 1,
                    job: Ok(nightshift::domain::job::NewJob {
                        custom_id: format!("j{i}"),
                        endpoint: Endpoint::ChatCompletions,
                        model: route.model.clone(),
                        body: "{}".into(),
                        options: None,
                        priority: 0,
                        estimate: nightshift::domain::estimate::TokenEstimate {
                            input: *input,
                            output: *output,
                        },
                        deadline: DateTime::from_timestamp_millis(*deadline).unwrap(),
                        route_key: key.clone(),
                    }),
                })
            });
        let source = NewSource {
            origin: Origin::Api,
            name: "bench",
            stem: "bench",
            sha256: None,
            now_ms: now.timestamp_millis(),
        };
        store.ingest(&source, lines).unwrap();
        let mut best = Duration::MAX;
        let mut buckets = 0;
        for _ in 0..3 {
            let t = Instant::now();
            buckets = store.queued_buckets().unwrap().len();
            best = best.min(t.elapsed());
        }
        println!("| {n} | {buckets} | {:.1} ms |", best.as_secs_f64() * 1e3);
    }
    println!();
}
