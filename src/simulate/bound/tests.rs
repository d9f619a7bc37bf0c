use super::*;
use crate::simulate::load_workload;
use std::path::Path;

/// A cheap provider (half price from 04:00) allowing 2 requests a day; a
/// flaky one (half its attempts fail) at 0.7 that serves one request at a
/// time, 200 s each; an unlimited one at 2.0.
const CONFIG: &str = r#"
[daemon]
safety_margin = "1m"

[[providers]]
name = "cheap"
kind = "simulated"
latency = "1s"
ms_per_output_token = 0.0
rpd = 2

[[providers.price_windows]]
name = "night"
hours = ["04:00-06:00"]
multiplier = 0.5

[[providers.models]]
name = "m1"
input_per_mtok = 1.0
output_per_mtok = 1.0

[[providers]]
name = "flaky"
kind = "simulated"
latency = "200s"
ms_per_output_token = 0.0
failure_rate = 0.5
concurrency = 1

[[providers.models]]
name = "m2"
input_per_mtok = 0.7
output_per_mtok = 0.7

[[providers]]
name = "steady"
kind = "simulated"
latency = "1s"
ms_per_output_token = 0.0

[[providers.models]]
name = "m3"
input_per_mtok = 2.0
output_per_mtok = 2.0

[classes]
chat = ["cheap/m1", "flaky/m2", "steady/m3"]
"#;

fn workload(outputs: &[u64], config: &Config, start: DateTime<Utc>) -> Vec<WorkloadJob> {
    let text: Vec<String> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            format!(
                r#"{{"custom_id":"j{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"chat","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":500}},"nightshift":{{"deadline":"30m"}},"submit_at":"+0s","sim":{{"output_tokens":{o}}}}}"#
            )
        })
        .collect();
    load_workload(&text.join("\n"), config, start).unwrap()
}

/// The exact optimum of the integer problem on the bound's slots, by
/// enumerating every assignment of jobs to (model, slot), each checked
/// against the same limits job by job (exact sizes, expected attempts).
fn brute_force(config: &Config, jobs: &[WorkloadJob], slots: &[Slot]) -> f64 {
    let catalog = &config.catalog;
    let options: Vec<(ModelId, usize)> = (0..catalog.models.len())
        .flat_map(|m| (0..slots.len()).map(move |s| (m, s)))
        .collect();
    let services: Vec<Service> = config.transports.iter().map(service).collect();
    let longest = jobs.iter().map(|j| j.output_tokens).max().unwrap() as f64;
    let mut best = f64::INFINITY;
    let mut pick = vec![0usize; jobs.len()];
    loop {
        // Usage per (provider, slot): attempts, tokens, service-seconds.
        let mut use_: BTreeMap<(usize, usize), (f64, f64, f64)> = BTreeMap::new();
        let mut cost = 0.0;
        let mut ok = true;
        for (j, &o) in jobs.iter().zip(&pick) {
            let (m, s) = options[o];
            let slot = &slots[s];
            if !(slot.end > j.submit_at && slot.start < j.deadline) {
                ok = false;
                break;
            }
            let p = catalog.models[m].provider;
            let sv = &services[p];
            let attempts = 1.0 / sv.success;
            let (lat, per_tok) = sv.time.unwrap();
            let e = use_.entry((p, s)).or_default();
            e.0 += attempts;
            e.1 += (j.input_tokens + j.output_tokens) as f64;
            e.2 += attempts * (lat + per_tok * j.output_tokens as f64);
            cost += catalog.cost_at(m, slot.start, j.input_tokens, j.output_tokens);
        }
        if ok {
            let mut day: BTreeMap<usize, f64> = BTreeMap::new();
            for (&(p, s), &(attempts, tokens, seconds)) in &use_ {
                let l = &catalog.providers[p].limits;
                let t = slots[s].duration().as_secs_f64();
                let minutes = (t / 60.0).ceil();
                let (lat, per_tok) = services[p].time.unwrap();
                ok &= l
                    .rpm
                    .is_none_or(|r| attempts <= f64::from(r) * minutes + 1e-9);
                ok &= l.tpm.is_none_or(|r| tokens <= r as f64 * minutes + 1e-9);
                ok &= l
                    .concurrency
                    .is_none_or(|c| seconds <= f64::from(c) * (t + lat + per_tok * longest) + 1e-9);
                // The instance spans less than a day: one rolling window.
                *day.entry(p).or_default() += attempts;
            }
            for (p, attempts) in day {
                ok &= catalog.providers[p]
                    .limits
                    .rpd
                    .is_none_or(|d| attempts <= f64::from(d) + 1e-9);
            }
            if ok {
                best = best.min(cost);
            }
        }
        // Next assignment.
        let mut k = 0;
        loop {
            if k == pick.len() {
                return best;
            }
            pick[k] += 1;
            if pick[k] < options.len() {
                break;
            }
            pick[k] = 0;
            k += 1;
        }
    }
}

#[test]
fn the_bound_is_at_most_the_exact_optimum_with_skewed_sizes_and_a_flaky_provider() {
    let config = Config::parse(CONFIG, "test.toml", Path::new(".")).unwrap();
    let start = DateTime::parse_from_rfc3339("2026-11-24T03:45:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let settings = PlanSettings::default();
    // Two long jobs among short ones: the optimum sends the long ones to the
    // cheap provider's two requests at night, the short ones to the flaky one.
    for outputs in [
        &[10, 10, 10, 10, 400, 400][..],
        &[400, 10, 300, 10, 10, 50][..],
        &[50, 50, 50, 50, 50][..],
    ] {
        let jobs = workload(outputs, &config, start);
        let b = compute(&config, &jobs, &settings);
        let slots = slots(&config, &bins(&jobs), start, &settings);
        assert_eq!(slots.len(), 2, "{slots:?}");
        let optimum = brute_force(&config, &jobs, &slots);
        assert_eq!(b.method, BoundMethod::Lp);
        assert_eq!(b.infeasible, 0.0);
        assert!(
            b.cost <= optimum * (1.0 + 1e-9),
            "{outputs:?}: bound {} > optimum {optimum}",
            b.cost
        );
        // And it is not trivially loose here.
        assert!(
            b.cost >= optimum * 0.9,
            "{outputs:?}: {} vs {optimum}",
            b.cost
        );
    }
}

#[test]
fn a_group_averaging_sizes_or_dividing_prices_by_success_would_overshoot() {
    // What the old bound did: average tokens over the group, divide the
    // flaky provider's price by its success rate. Both land above the optimum.
    let config = Config::parse(CONFIG, "test.toml", Path::new(".")).unwrap();
    let start = DateTime::parse_from_rfc3339("2026-11-24T03:45:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let settings = PlanSettings::default();
    let jobs = workload(&[10, 10, 10, 10, 400, 400], &config, start);
    let slots = slots(&config, &bins(&jobs), start, &settings);
    let optimum = brute_force(&config, &jobs, &slots);
    let group = crate::plan::JobGroup {
        candidates: jobs[0].candidates.clone(),
        jobs: jobs.len() as u64,
        input_tokens: jobs.iter().map(|j| j.input_tokens).sum(),
        output_tokens: jobs.iter().map(|j| j.output_tokens).sum(),
        release: start,
        deadline: jobs[0].deadline,
    };
    let relaxed = PlanSettings {
        relaxed: true,
        safety_margin: Duration::ZERO,
        ..settings
    };
    let old = crate::plan::plan(
        &[group],
        &config.catalog,
        &crate::simulate::capacities(&config),
        start,
        &relaxed,
    )
    .expected_cost;
    assert!(old > optimum * 1.05, "old {old} vs optimum {optimum}");
    assert!(compute(&config, &jobs, &settings).cost <= optimum * (1.0 + 1e-9));
}

/// A batch row whose shortest turnaround ends after the jobs' deadline
/// cannot lower the bound; once the deadline leaves room, it does.
#[test]
fn a_batch_slower_than_the_deadline_does_not_lower_the_bound() {
    let config_with = |turnaround: &str| {
        let text = format!(
            r#"
[[providers]]
name = "steady"
kind = "simulated"
latency = "1s"
ms_per_output_token = 0.0

[providers.batch]
discount = 0.5
expected_turnaround = "{turnaround}"
simulated_turnaround = ["{turnaround}", "{turnaround}"]

[[providers.models]]
name = "m3"
input_per_mtok = 2.0
output_per_mtok = 2.0

[classes]
chat = ["steady/m3"]
"#
        );
        Config::parse(&text, "test.toml", Path::new(".")).unwrap()
    };
    let start = DateTime::parse_from_rfc3339("2026-11-24T03:45:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let settings = PlanSettings::default();
    let cost = |turnaround: &str| {
        let config = config_with(turnaround);
        // Due in 30 minutes (see `workload`).
        let jobs = workload(&[100, 100, 100], &config, start);
        compute(&config, &jobs, &settings).cost
    };
    let slow = cost("40m");
    let quick = cost("5m");
    assert!(slow > 0.0);
    assert!(
        (quick - slow / 2.0).abs() <= slow * 1e-6,
        "a 5 m batch halves the cost: {quick} vs {slow}"
    );
}

/// The planner's view of a workload averages answer lengths only among
/// jobs it cannot tell apart, keeps each class's total, and moves every
/// deadline earlier by the margin; its bound is at least the true one.
#[test]
fn the_workload_as_the_planner_knows_it_averages_sizes_and_keeps_the_margin() {
    let config = Config::parse(CONFIG, "test.toml", Path::new(".")).unwrap();
    let start = DateTime::parse_from_rfc3339("2026-11-24T03:45:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let jobs = workload(&[10, 10, 10, 10, 400, 400], &config, start);
    let known = as_the_planner_knows(&jobs, Duration::from_secs(60));
    assert!(known.iter().all(|w| w.output_tokens == 140));
    let total = |w: &[WorkloadJob]| w.iter().map(|j| j.output_tokens).sum::<u64>();
    assert_eq!(total(&known), total(&jobs));
    assert!(
        known
            .iter()
            .zip(&jobs)
            .all(|(k, j)| j.deadline - k.deadline == chrono::Duration::seconds(60))
    );
    let settings = PlanSettings::default();
    let true_bound = compute(&config, &jobs, &settings).cost;
    let blind = compute(&config, &known, &settings).cost;
    assert!(
        blind > true_bound * 1.01,
        "blind {blind} vs bound {true_bound}"
    );
}

/// The reference as the planner knows it holds flex to the planner's rule
/// (a flex answer may take `flex.timeout`) and requests to the limiter's
/// pace; the bound holds neither, so it stays below.
#[test]
fn as_known_holds_flex_to_its_timeout_and_requests_to_the_limiters_pace() {
    let config_with = |timeout: &str, rpm: u32| {
        let text = format!(
            r#"
[daemon]
safety_margin = "1m"

[[providers]]
name = "steady"
kind = "simulated"
latency = "1s"
ms_per_output_token = 0.0
rpm = {rpm}

[providers.flex]
discount = 0.5
timeout = "{timeout}"

[[providers.models]]
name = "m3"
input_per_mtok = 2.0
output_per_mtok = 2.0

[[providers]]
name = "dear"
kind = "simulated"
latency = "1s"
ms_per_output_token = 0.0

[[providers.models]]
name = "m4"
input_per_mtok = 4.0
output_per_mtok = 4.0

[classes]
chat = ["steady/m3", "dear/m4"]
"#
        );
        Config::parse(&text, "test.toml", Path::new(".")).unwrap()
    };
    let start = DateTime::parse_from_rfc3339("2026-11-24T03:45:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let settings = PlanSettings {
        safety_margin: Duration::from_secs(60),
        ..PlanSettings::default()
    };
    let costs = |config: &Config, n: usize| {
        // Due in 30 minutes (see `workload`).
        let jobs = workload(&vec![100; n], config, start);
        (
            compute(config, &jobs, &settings).cost,
            as_known(config, &jobs, &settings).cost,
        )
    };
    // A 15 m flex answer fits the 29 m the planner has: flex for both.
    let (bound, known) = costs(&config_with("15m", 600), 3);
    assert!((known - bound).abs() <= bound * 1e-6, "{known} vs {bound}");
    // A 40 m one does not: the reference pays the standard price, twice
    // the bound's flex price.
    let (bound, known) = costs(&config_with("40m", 600), 3);
    assert!(
        (known - 2.0 * bound).abs() <= bound * 1e-6,
        "{known} vs {bound}"
    );
    // At 1 rpm the bound may send a minute's allowance per started minute
    // (15 in each 15 m slot: all 30 on flex); paced at 99% over the
    // seconds, fewer fit before the moved deadline, and the rest go to the
    // dear provider.
    let (bound, known) = costs(&config_with("1m", 1), 30);
    let flex_job = 0.5 * 2.0 * 110.0 / 1e6;
    assert!((bound - 30.0 * flex_job).abs() <= 1e-12, "{bound}");
    assert!(known > bound + 0.5 * flex_job, "{known} vs {bound}");
}
