//! Human-readable tables for the command line: prices hour by hour, and the
//! plan per provider and hour. Pure: they take values and return text.

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, Duration, DurationRound, Utc};

use crate::plan::{JobGroup, Plan};
use crate::pricing::{Catalog, ModelId};

/// The token mix used to rank models in the price table: a typical
/// classification or extraction job.
pub const TYPICAL_INPUT: u64 = 1000;
pub const TYPICAL_OUTPUT: u64 = 250;

fn hour_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

/// For each model class, the effective price (markup included, USD per 1M
/// input / output tokens) of each member hour by hour from `at` for `hours`
/// hours. Hours with the same prices are merged into one row; `*` marks the
/// cheapest model for a typical job (1,000 in / 250 out).
pub fn prices_table(catalog: &Catalog, at: DateTime<Utc>, hours: u32) -> String {
    let mut out = String::new();
    let start = hour_floor(at);
    for (class, members) in &catalog.classes {
        let names: Vec<String> = members.iter().map(|&m| catalog.qualified_name(m)).collect();
        let width = names.iter().map(String::len).max().unwrap_or(10).max(13);
        let _ = writeln!(
            out,
            "{class}  (USD per 1M tokens, input/output; * = cheapest for {TYPICAL_INPUT} in / {TYPICAL_OUTPUT} out)"
        );
        let _ = write!(out, "  {:<27}", "from (UTC)");
        for n in &names {
            let _ = write!(out, " {n:>width$}");
        }
        out.push('\n');
        let mut rows: Vec<(DateTime<Utc>, DateTime<Utc>, Vec<String>)> = Vec::new();
        for h in 0..hours {
            let t = start + Duration::hours(h as i64);
            let cells = row(catalog, members, t);
            match rows.last_mut() {
                Some(last) if last.2 == cells => last.1 = t + Duration::hours(1),
                _ => rows.push((t, t + Duration::hours(1), cells)),
            }
        }
        for (from, to, cells) in rows {
            let span = format!(
                "{} – {}",
                from.format("%a %d %H:%M"),
                to.format("%a %d %H:%M")
            );
            let _ = write!(out, "  {span:<27}");
            for c in cells {
                let _ = write!(out, " {c:>width$}");
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

fn row(catalog: &Catalog, members: &[ModelId], t: DateTime<Utc>) -> Vec<String> {
    let costs: Vec<f64> = members
        .iter()
        .map(|&m| catalog.cost_at(m, t, TYPICAL_INPUT, TYPICAL_OUTPUT))
        .collect();
    let best = costs.iter().copied().fold(f64::INFINITY, f64::min);
    members
        .iter()
        .zip(&costs)
        .map(|(&m, &c)| {
            let markup = 1.0 + catalog.providers[catalog.models[m].provider].markup;
            let p = catalog.price_at(m, t);
            let mark = if c <= best { "*" } else { " " };
            format!(
                "{:.3}/{:.3}{mark}",
                p.input_per_mtok * markup,
                p.output_per_mtok * markup
            )
        })
        .collect()
}

/// The plan per provider and hour: jobs and expected cost, then the totals
/// against dispatching everything now.
pub fn plan_table(plan: &Plan, groups: &[JobGroup], catalog: &Catalog) -> String {
    let mut out = String::new();
    let queued: u64 = groups.iter().map(|g| g.jobs).sum();
    let _ = writeln!(
        out,
        "{queued} queued jobs in {} groups, planned at {} ({:?})\n",
        groups.len(),
        plan.now.format("%Y-%m-%d %H:%M:%S UTC"),
        plan.method
    );
    let mut cells: BTreeMap<(String, DateTime<Utc>), (f64, f64)> = BTreeMap::new();
    for a in &plan.allocations {
        let provider = catalog.providers[catalog.models[a.model].provider]
            .name
            .clone();
        let hour = hour_floor(plan.slots[a.slot].start);
        let e = cells.entry((provider, hour)).or_default();
        e.0 += a.jobs;
        e.1 += a.jobs * a.cost_per_job;
    }
    let _ = writeln!(
        out,
        "  {:<14} {:<18} {:>10} {:>14}",
        "provider", "hour (UTC)", "jobs", "expected USD"
    );
    for ((provider, hour), (jobs, cost)) in &cells {
        let _ = writeln!(
            out,
            "  {provider:<14} {:<18} {jobs:>10.0} {cost:>14.6}",
            hour.format("%a %d %H:00")
        );
    }
    let overflow: f64 = plan.overflow.iter().map(|o| o.1).sum();
    if overflow > 0.0 {
        let _ = writeln!(
            out,
            "  {:<14} {:<18} {overflow:>10.0}",
            "(no capacity)", "now, fastest"
        );
    }
    let saving = plan.dispatch_now_cost - plan.expected_cost;
    let pct = if plan.dispatch_now_cost > 0.0 {
        100.0 * saving / plan.dispatch_now_cost
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "\n  expected cost of the plan       {:>14.6} USD",
        plan.expected_cost
    );
    let _ = writeln!(
        out,
        "  dispatching everything now     {:>14.6} USD",
        plan.dispatch_now_cost
    );
    let _ = writeln!(
        out,
        "  saving                         {saving:>14.6} USD ({pct:.1}%)"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_price_table_shows_deepseek_peak_and_off_peak() {
        let c = Config::embedded_default();
        // Tuesday 2026-11-24 00:00 UTC, 12 hours: off-peak, peak 01-04, off 04-06, peak 06-10, off.
        let at = DateTime::parse_from_rfc3339("2026-11-24T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = prices_table(&c.catalog, at, 12);
        let cheap: Vec<&str> = t
            .lines()
            .skip_while(|l| !l.starts_with("cheap-chat"))
            .skip(2)
            .take(5)
            .collect();
        assert_eq!(cheap.len(), 5, "{t}");
        assert!(
            cheap[0].contains("Tue 24 00:00 – Tue 24 01:00") && cheap[0].contains("0.150/0.600*"),
            "{t}"
        );
        assert!(
            cheap[1].contains("Tue 24 01:00 – Tue 24 04:00") && cheap[1].contains("0.300/1.200 "),
            "{t}"
        );
        assert!(cheap[2].contains("04:00 – Tue 24 06:00"), "{t}");
        assert!(cheap[3].contains("06:00 – Tue 24 10:00"), "{t}");
        assert!(cheap[4].contains("10:00 – Tue 24 12:00"), "{t}");
    }
}
