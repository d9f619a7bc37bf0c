//! The offline commands (`plan`, `simulate`): argument handling and IO
//! around the pure planner and simulator, returning the text to print.

pub mod client;
pub mod tables;

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use chrono::Utc;

use crate::config::Config;
use crate::plan::{self, PlanSettings, ProviderCapacity};
use crate::simulate::{self, Policy};
use crate::store::Store;

/// `nightshift plan`: the plan for the daemon's current queue, read from its
/// database (safe while the daemon runs: WAL readers do not block it).
pub fn plan(config: &Config) -> anyhow::Result<String> {
    let db = &config.daemon.database;
    let store =
        Store::open_existing(db, &config.daemon.node).with_context(|| format!("opening {db}"))?;
    let buckets = store.queued_buckets()?;
    let now = Utc::now();
    let settings = PlanSettings {
        safety_margin: config.daemon.safety_margin,
        ..PlanSettings::default()
    };
    let capacity: Vec<ProviderCapacity> = simulate::capacities(config);
    let q = plan::plan_queue(
        &buckets,
        &config.catalog,
        &capacity,
        now,
        &settings,
        |_| 1.0,
        |_| None,
    );
    let mut out = crate::cli::tables::plan_table(&q.plan, &q.job_groups(), &config.catalog);
    for (key, reason) in q.unroutable {
        out.push_str(&format!("  not routable in this config: {key}: {reason}\n"));
    }
    Ok(out)
}
/// `nightshift report`: spend and savings of finished jobs, from the database.
pub fn report(
    config: &Config,
    since: Option<&str>,
    by: crate::store::SpendBy,
) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let db = &config.daemon.database;
    let since_ms = match since {
        None => 0,
        Some(s) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => t.timestamp_millis(),
            Err(_) => {
                let d = crate::domain::units::parse_duration(s).map_err(|_| {
                    anyhow::anyhow!(
                        "--since '{s}' is neither an RFC 3339 timestamp nor a duration like 7d"
                    )
                })?;
                Utc::now()
                    .timestamp_millis()
                    .saturating_sub(crate::domain::bounds::millis(d))
            }
        },
    };
    let store =
        Store::open_existing(db, &config.daemon.node).with_context(|| format!("opening {db}"))?;
    let rows = store.spend(since_ms, by)?;
    let mut out = String::new();
    let label = match by {
        crate::store::SpendBy::Provider => "provider",
        crate::store::SpendBy::Class => "class / model",
        crate::store::SpendBy::Day => "day (UTC)",
        crate::store::SpendBy::Channel => "channel",
    };
    let _ = writeln!(
        out,
        "{label:<24} {:>9} {:>12} {:>12} {:>14} {:>14} {:>14} {:>8}",
        "jobs", "input tok", "output tok", "spend USD", "list USD", "saved USD", "saved"
    );
    let mut total = crate::store::SpendRow {
        key: "total".into(),
        jobs: 0,
        input_tokens: 0,
        output_tokens: 0,
        cost_usd: 0.0,
        list_cost_usd: 0.0,
        late_cost_usd: 0.0,
    };
    for r in &rows {
        total.jobs += r.jobs;
        total.input_tokens += r.input_tokens;
        total.output_tokens += r.output_tokens;
        total.cost_usd += r.cost_usd;
        total.list_cost_usd += r.list_cost_usd;
        total.late_cost_usd += r.late_cost_usd;
    }
    for r in rows.iter().chain(std::iter::once(&total)) {
        let spend = r.cost_usd + r.late_cost_usd;
        let saved = r.list_cost_usd - spend;
        let pct = if r.list_cost_usd > 0.0 {
            100.0 * saved / r.list_cost_usd
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>12} {:>12} {:>14.6} {:>14.6} {:>14.6} {:>7.1}%",
            r.key, r.jobs, r.input_tokens, r.output_tokens, spend, r.list_cost_usd, saved, pct
        );
    }
    out.push_str(
        "
spend = actual cost (usage × price at dispatch, markup included) plus late duplicate answers;
list = the same tokens on the class's reference model at arrival time.
",
    );
    Ok(out)
}

/// Arguments of `nightshift simulate`.
pub struct SimulateArgs {
    pub workload: PathBuf,
    pub start: String,
    pub policies: Vec<String>,
    pub lower_bound: bool,
    pub trace: Option<PathBuf>,
    pub json: bool,
}

/// `nightshift simulate`: runs each policy on the workload and returns the
/// summary (a table, or JSON).
pub fn simulate(config: &Config, args: &SimulateArgs) -> anyhow::Result<String> {
    let start = chrono::DateTime::parse_from_rfc3339(&args.start)
        .with_context(|| format!("--start '{}' is not an RFC 3339 timestamp", args.start))?
        .with_timezone(&Utc);
    let policies: Vec<Policy> = args
        .policies
        .iter()
        .map(|p| Policy::parse(p))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let text = fs::read_to_string(&args.workload)
        .with_context(|| format!("reading {}", args.workload.display()))?;
    let workload = simulate::load_workload(&text, config, start)
        .map_err(|e| anyhow::anyhow!("{}:{}: {}", args.workload.display(), e.line, e.error))?;
    let settings = PlanSettings {
        safety_margin: config.daemon.safety_margin,
        ..PlanSettings::default()
    };
    let mut trace = match &args.trace {
        Some(p) => Some(std::io::BufWriter::new(
            fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut summaries = Vec::new();
    for policy in &policies {
        let (summary, lines) =
            simulate::run(config, &workload, policy, &settings).map_err(anyhow::Error::msg)?;
        if let Some(w) = trace.as_mut() {
            for line in lines {
                let mut v = serde_json::to_value(&line)?;
                v["policy"] = serde_json::Value::String(policy.name());
                serde_json::to_writer(&mut *w, &v)?;
                w.write_all(b"\n")?;
            }
        }
        summaries.push(summary);
    }
    if let Some(mut w) = trace {
        w.flush()?;
    }
    let bound = args
        .lower_bound
        .then(|| simulate::lower_bound(config, &workload, &settings));
    Ok(if args.json {
        let mut v = serde_json::json!({ "jobs": workload.len(), "policies": summaries });
        if let Some((cost, infeasible)) = bound {
            v["lower_bound"] =
                serde_json::json!({ "total_cost_usd": cost, "infeasible_jobs": infeasible });
        }
        format!("{}\n", serde_json::to_string_pretty(&v)?)
    } else {
        format!(
            "{} jobs from {}\n\n{}",
            workload.len(),
            args.workload.display(),
            simulate::render_table(&summaries, bound)
        )
    })
}
