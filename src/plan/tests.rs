//! Hand-checked planner cases.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;
use crate::domain::pricing::{
    Endpoint, Limits, Model, Price, PriceWindow, ProviderInfo, WindowEffect,
};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Providers (name, input/output price, rpm, windows), one model each, all
/// in one class.
fn catalog(
    providers: &[(&str, f64, Option<u32>, Vec<PriceWindow>)],
) -> (Catalog, Vec<ProviderCapacity>) {
    let mut c = Catalog::default();
    let mut caps = Vec::new();
    for (i, (name, price, rpm, windows)) in providers.iter().enumerate() {
        let limits = Limits {
            rpm: *rpm,
            ..Limits::default()
        };
        c.providers.push(ProviderInfo {
            name: name.to_string(),
            region: None,
            markup: 0.0,
            windows: windows.clone(),
            limits,
            simulated: true,
            wire: Default::default(),
            flex: None,
            batch: None,
        });
        c.models.push(Model {
            limits: None,
            cached_input_per_mtok: None,
            cache_write_per_mtok: None,
            provider: i,
            name: format!("{name}-m"),
            list: Price {
                input_per_mtok: *price,
                output_per_mtok: *price,
            },
            windows: vec![],
            endpoints: [Endpoint::ChatCompletions].into_iter().collect(),
            channel: Default::default(),
            standard: None,
        });
        caps.push(ProviderCapacity::from_limits(
            &limits,
            Duration::from_secs(1),
            0.0,
        ));
    }
    c.classes = BTreeMap::from([("chat".to_string(), (0..providers.len()).collect())]);
    (c, caps)
}

fn group(
    jobs: u64,
    release: DateTime<Utc>,
    deadline: DateTime<Utc>,
    candidates: Vec<ModelId>,
) -> JobGroup {
    JobGroup {
        candidates,
        jobs,
        input_tokens: jobs * 1000,
        output_tokens: jobs * 1000,
        release,
        deadline,
    }
}

fn half_price(from: &str, to: &str) -> PriceWindow {
    let mut w = PriceWindow::always("cheap", WindowEffect::Multiplier(0.5));
    w.absolute = Some((at(from), at(to)));
    w
}

fn jobs_in(plan: &Plan, pred: impl Fn(&Allocation) -> bool) -> f64 {
    plan.allocations
        .iter()
        .filter(|a| pred(a))
        .map(|a| a.jobs)
        .sum()
}

#[test]
fn a_job_waits_for_the_cheap_window() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, caps) = catalog(&[(
        "d",
        1.0,
        None,
        vec![half_price("2026-11-24T14:00:00Z", "2026-11-24T16:00:00Z")],
    )]);
    let groups = [group(10, now, at("2026-11-24T22:00:00Z"), vec![0])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert_eq!(p.method, Method::Lp);
    let in_window = jobs_in(&p, |a| {
        p.slots[a.slot].start >= at("2026-11-24T14:00:00Z")
            && p.slots[a.slot].end <= at("2026-11-24T16:00:00Z")
    });
    assert!((in_window - 10.0).abs() < 1e-6, "{p:?}");
    // Half of 10 × (1000 + 1000) tokens × $1/M.
    assert!((p.expected_cost - 0.01).abs() < 1e-9, "{}", p.expected_cost);
    assert!((p.dispatch_now_cost - 0.02).abs() < 1e-9);
    assert!(
        Quotas::from_plan(&p, &groups, &c, &caps).entries.is_empty(),
        "nothing runs now"
    );
}

#[test]
fn a_job_whose_deadline_falls_before_the_window_runs_now() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, caps) = catalog(&[(
        "d",
        1.0,
        None,
        vec![half_price("2026-11-24T14:00:00Z", "2026-11-24T16:00:00Z")],
    )]);
    let groups = [group(10, now, at("2026-11-24T13:30:00Z"), vec![0])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!((jobs_in(&p, |a| a.slot == 0) - 10.0).abs() < 1e-6, "{p:?}");
    let q = Quotas::from_plan(&p, &groups, &c, &caps);
    assert_eq!(q.entries, vec![(0, 0, 10)]);
    assert_eq!(q.until, Some(at("2026-11-24T12:15:00Z")));
}

#[test]
fn capacity_overflow_spills_to_the_next_cheapest_provider() {
    let now = at("2026-11-24T12:00:00Z");
    // cheap: 10 rpm = 150 requests in the 15-minute slot the deadline allows.
    let (c, caps) = catalog(&[
        ("pricey", 2.0, None, vec![]),
        ("cheap", 1.0, Some(10), vec![]),
    ]);
    let groups = [group(300, now, at("2026-11-24T12:25:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!(
        (jobs_in(&p, |a| a.model == 1) - 150.0).abs() < 1e-6,
        "{p:?}"
    );
    assert!(
        (jobs_in(&p, |a| a.model == 0) - 150.0).abs() < 1e-6,
        "{p:?}"
    );
    assert!(p.overflow.is_empty());
}

#[test]
fn jobs_beyond_all_capacity_overflow_to_the_fastest_provider_now() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, mut caps) = catalog(&[("a", 1.0, Some(1), vec![]), ("b", 2.0, Some(1), vec![])]);
    caps[1].latency = Duration::from_millis(100);
    let groups = [group(100, now, at("2026-11-24T12:25:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    let overflow: f64 = p.overflow.iter().map(|o| o.1).sum();
    assert!(
        (overflow - 70.0).abs() < 1e-6,
        "15 + 15 fit, 70 do not: {p:?}"
    );
    let q = Quotas::from_plan(&p, &groups, &c, &caps);
    // b is faster: the overflow goes there, on top of its own 15.
    assert!(q.entries.contains(&(0, 1, 85)), "{q:?}");
}

#[test]
fn the_lower_bound_never_exceeds_the_plan() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, caps) = catalog(&[
        (
            "d",
            1.0,
            Some(20),
            vec![half_price("2026-11-24T13:10:00Z", "2026-11-24T14:00:00Z")],
        ),
        ("o", 0.8, Some(5), vec![]),
    ]);
    let groups = [
        group(500, now, at("2026-11-24T15:00:00Z"), vec![0, 1]),
        group(100, now, at("2026-11-24T13:00:00Z"), vec![0, 1]),
    ];
    let planned = plan(&groups, &c, &caps, now, &PlanSettings::default());
    let bound = plan(
        &groups,
        &c,
        &caps,
        now,
        &PlanSettings {
            relaxed: true,
            ..PlanSettings::default()
        },
    );
    assert!(bound.expected_cost <= planned.expected_cost + 1e-12);
    assert!(planned.overflow.is_empty() && bound.overflow.is_empty());
    // The window holds 50 min × 20 rpm = 1000 requests: all 500 long-deadline jobs fit there.
    let in_window = jobs_in(&planned, |a| {
        a.group == 0 && a.model == 0 && planned.slots[a.slot].start >= at("2026-11-24T13:10:00Z")
    });
    assert!((in_window - 500.0).abs() < 1e-6, "{planned:?}");
}

#[test]
fn slots_split_at_price_changes_and_align_to_the_clock() {
    let now = at("2026-11-24T12:07:00Z");
    let (c, _) = catalog(&[(
        "d",
        1.0,
        None,
        vec![half_price("2026-11-24T12:20:00Z", "2026-11-24T15:30:00Z")],
    )]);
    let slots = make_slots(
        &c,
        now,
        at("2026-11-24T16:00:00Z"),
        &PlanSettings::default(),
    );
    let starts: Vec<String> = slots
        .iter()
        .map(|s| s.start.format("%H:%M").to_string())
        .collect();
    assert_eq!(starts[..4], ["12:07", "12:15", "12:20", "12:30"]);
    assert!(starts.contains(&"15:30".to_string()));
    assert!(slots.windows(2).all(|w| w[0].end == w[1].start));
    assert_eq!(slots.last().unwrap().end, at("2026-11-24T16:00:00Z"));
}

#[test]
fn the_greedy_fallback_respects_capacity() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, caps) = catalog(&[
        ("pricey", 2.0, None, vec![]),
        ("cheap", 1.0, Some(10), vec![]),
    ]);
    let groups = [group(300, now, at("2026-11-24T12:25:00Z"), vec![0, 1])];
    let settings = PlanSettings::default();
    let slots = make_slots(&c, now, groups[0].deadline, &settings);
    let mut options = Vec::new();
    for (si, slot) in slots.iter().enumerate() {
        if usable(slot, &groups[0], &settings, si == 0) {
            for m in [0, 1] {
                options.push(Option_ {
                    group: 0,
                    model: m,
                    slot: si,
                    cost: effective_cost(&c, &caps, &groups[0], m, slot.start),
                });
            }
        }
    }
    let caps_map = slots
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            caps.iter()
                .enumerate()
                .map(move |(p, cap)| ((p, si), cap.per(s.duration())))
        })
        .collect();
    let (alloc, overflow) = solve_greedy(&groups, &options, &caps_map, &caps, &c);
    let cheap: f64 = alloc.iter().filter(|a| a.model == 1).map(|a| a.jobs).sum();
    assert_eq!(cheap, 150.0);
    assert!(overflow.is_empty());
}

#[test]
#[ignore = "timing probe; the planner benchmark measures this properly"]
fn lp_size_probe() {
    let now = at("2026-11-24T12:00:00Z");
    let c = crate::config::Config::embedded_default();
    let caps: Vec<ProviderCapacity> = c
        .catalog
        .providers
        .iter()
        .map(|p| ProviderCapacity::from_limits(&p.limits, Duration::from_secs(2), 0.0))
        .collect();
    let classes: Vec<Vec<ModelId>> = c.catalog.classes.values().cloned().collect();
    let mut groups = Vec::new();
    for (ci, cand) in classes.iter().enumerate() {
        for b in 0..96 {
            let deadline = now + chrono::Duration::minutes(30 + 15 * b);
            groups.push(JobGroup {
                candidates: cand.clone(),
                jobs: 1000 + ci as u64,
                input_tokens: 500_000,
                output_tokens: 100_000,
                release: now,
                deadline,
            });
        }
    }
    let t = std::time::Instant::now();
    let p = plan(&groups, &c.catalog, &caps, now, &PlanSettings::default());
    eprintln!(
        "groups {} slots {} allocations {} method {:?} in {:?}",
        groups.len(),
        p.slots.len(),
        p.allocations.len(),
        p.method,
        t.elapsed()
    );
}

#[test]
fn an_unavailable_provider_gets_nothing_even_if_unlimited_and_cheapest() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, mut caps) = catalog(&[("cheap", 1.0, None, vec![]), ("backup", 2.0, None, vec![])]);
    caps[0].unavailable_until = Some(DateTime::<Utc>::MAX_UTC);
    let groups = [group(20, now, at("2026-11-24T18:00:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert_eq!(jobs_in(&p, |a| a.model == 0), 0.0, "{p:?}");
    assert!(
        (jobs_in(&p, |a| a.model == 1 && a.slot == 0) - 20.0).abs() < 1e-6,
        "{p:?}"
    );
    // Paused for 30 minutes: the cheap provider takes the work after that.
    caps[0].unavailable_until = Some(at("2026-11-24T12:30:00Z"));
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!(
        (jobs_in(&p, |a| a.model == 0
            && p.slots[a.slot].start >= at("2026-11-24T12:30:00Z"))
            - 20.0)
            .abs()
            < 1e-6,
        "{p:?}"
    );
}

/// One provider at $1/M with a flex channel at `discount`: models 0 (sync)
/// and 1 (flex), both in class "chat".
fn with_flex(discount: f64) -> (Catalog, Vec<ProviderCapacity>) {
    let (mut c, caps) = catalog(&[("o", 1.0, Some(1000), vec![])]);
    c.providers[0].flex = Some(crate::domain::pricing::FlexTerms {
        discount,
        timeout: Duration::from_secs(15 * 60),
        backoff: Duration::from_secs(60),
        simulated_refusal_fraction: 0.0,
    });
    let row = c.flex_row(0, c.models[0].list.scaled_by(discount));
    c.models.push(row);
    c.classes.insert("chat".into(), vec![0, 1]);
    (c, caps)
}

#[test]
fn a_backlog_goes_to_flex_when_it_is_cheaper_and_the_deadline_allows() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, caps) = with_flex(0.5);
    let groups = [group(10, now, at("2026-11-24T18:00:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!((jobs_in(&p, |a| a.model == 1) - 10.0).abs() < 1e-6, "{p:?}");
    // Half of 10 × (1000 + 1000) tokens × $1/M.
    assert!((p.expected_cost - 0.01).abs() < 1e-9, "{}", p.expected_cost);
    let q = Quotas::from_plan(&p, &groups, &c, &caps);
    assert_eq!(q.entries, vec![(0, 1, 10)], "flex starts now");

    // A deadline closer than the flex timeout plus the margin: standard.
    let groups = [group(10, now, at("2026-11-24T12:20:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!((jobs_in(&p, |a| a.model == 0) - 10.0).abs() < 1e-6, "{p:?}");

    // Flex refused lately: nothing on flex before its back-off ends; a
    // job that cannot wait for it goes to standard now.
    let mut caps = caps;
    caps[0].flex_unavailable_until = Some(at("2026-11-24T13:00:00Z"));
    let groups = [group(10, now, at("2026-11-24T13:20:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!((jobs_in(&p, |a| a.model == 0) - 10.0).abs() < 1e-6, "{p:?}");
    // One that can waits for the cheaper channel.
    let groups = [group(10, now, at("2026-11-24T18:00:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!((jobs_in(&p, |a| a.model == 1) - 10.0).abs() < 1e-6, "{p:?}");
    assert!(
        p.allocations
            .iter()
            .all(|a| p.slots[a.slot].end > at("2026-11-24T13:00:00Z"))
    );
}

fn with_batch(discount: f64, turnaround: Duration) -> (Catalog, Vec<ProviderCapacity>) {
    let (mut c, mut caps) = catalog(&[("o", 1.0, Some(1000), vec![])]);
    c.providers[0].batch = Some(crate::domain::pricing::BatchTerms {
        discount,
        completion_window: "24h".into(),
        window: Duration::from_secs(86_400),
        expected_turnaround: turnaround,
        max_requests: 50_000,
        max_bytes: 200_000_000,
        poll_every: Duration::from_secs(30),
        simulated_turnaround: (turnaround / 4, turnaround * 3 / 2),
        simulated_late_fraction: 0.0,
        simulated_expire_fraction: 0.0,
    });
    let row = c.batch_row(0, c.models[0].list.scaled_by(discount));
    c.models.push(row);
    c.classes.insert("chat".into(), vec![0, 1]);
    caps[0].batch_turnaround = turnaround;
    (c, caps)
}

#[test]
fn a_backlog_goes_to_a_batch_only_when_turnaround_and_a_sync_fallback_fit_before_its_deadline() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, caps) = with_batch(0.5, Duration::from_secs(3600));
    // 6 h: turnaround 1 h, then 10,000 jobs at 1000 rpm take 10 min, then
    // the 10-minute margin: a batch, created now, at half price.
    let groups = [group(10_000, now, at("2026-11-24T18:00:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!(
        (jobs_in(&p, |a| a.model == 1) - 10_000.0).abs() < 1e-6,
        "{p:?}"
    );
    let q = Quotas::from_plan(&p, &groups, &c, &caps);
    assert_eq!(q.entries, vec![(0, 1, 10_000)], "the batch is created now");
    // No sync capacity is used by it: the batch row is outside the limits.
    assert!((p.expected_cost - 0.5 * 10_000.0 * 2000.0 / 1e6).abs() < 1e-6);

    // 1 h 15 min: the turnaround fits, the fallback after it does not.
    let groups = [group(10_000, now, at("2026-11-24T13:15:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!(jobs_in(&p, |a| a.model == 1) < 1e-6, "{p:?}");

    // Batch creation refused lately: no batch before the pause ends.
    let mut caps = caps;
    caps[0].batch_unavailable_until = Some(at("2026-11-24T14:00:00Z"));
    let groups = [group(100, now, at("2026-11-24T18:00:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!(
        p.allocations
            .iter()
            .filter(|a| a.model == 1)
            .all(|a| p.slots[a.slot].end > at("2026-11-24T14:00:00Z")),
        "{p:?}"
    );
}

#[test]
fn the_sync_fallback_time_is_the_binding_limit_of_the_quickest_model() {
    let (c, caps) = with_batch(0.5, Duration::from_secs(3600));
    // 1000 rpm: 5000 jobs take 5 minutes, plus one answer's latency.
    let t = super::sync_fallback_time(&c, &caps, &[0, 1], 5000, 0);
    let latency = caps[0].latency.as_secs_f64();
    assert!((t.as_secs_f64() - (300.0 + latency)).abs() < 1e-6, "{t:?}");
    // With only the batch row, a late batch cannot be made up for.
    let t = super::sync_fallback_time(&c, &caps, &[1], 5000, 0);
    assert_eq!(t, crate::domain::bounds::MAX_CONFIG_DURATION);
}

/// Equal prices: the first slot's work is spread over the providers in
/// proportion to their capacity, not all given to one while the other idles;
/// a cheaper provider still takes everything it can.
#[test]
fn equal_prices_spread_the_first_slot_by_capacity() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, caps) = catalog(&[("a", 1.0, Some(120), vec![]), ("b", 1.0, Some(60), vec![])]);
    let groups = [group(150, now, at("2026-11-24T14:00:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    let a = jobs_in(&p, |x| x.model == 0 && x.slot == 0);
    let b = jobs_in(&p, |x| x.model == 1 && x.slot == 0);
    assert!((a + b - 150.0).abs() < 1e-6, "{p:?}");
    // 2:1 by capacity, within a tier's width.
    assert!(a > 80.0 && b > 35.0, "a {a}, b {b}: {p:?}");
    // A cheaper provider is not spread away from.
    let (c, caps) = catalog(&[("a", 1.0, Some(120), vec![]), ("b", 1.01, Some(60), vec![])]);
    let p = plan(&groups, &c, &caps, now, &PlanSettings::default());
    assert!(
        (jobs_in(&p, |x| x.model == 0) - 150.0).abs() < 1e-6,
        "{p:?}"
    );
}

/// 240 jobs due in 5 minutes, a 60-rpm provider half price from the first
/// minute on: the plan fills its window up to the deadline minus the 30 s
/// margin (3.5 min × 60 = 210), not to the minute before (180).
#[test]
fn a_short_deadline_uses_the_cheap_window_up_to_the_margin() {
    let now = at("2026-11-24T11:59:00Z");
    let (c, caps) = catalog(&[
        (
            "cheap",
            1.0,
            Some(60),
            vec![half_price("2026-11-24T12:00:00Z", "2026-11-24T13:00:00Z")],
        ),
        ("dear", 0.8, None, vec![]),
    ]);
    let settings = PlanSettings {
        safety_margin: Duration::from_secs(30),
        ..PlanSettings::default()
    };
    let groups = [group(240, now, at("2026-11-24T12:04:00Z"), vec![0, 1])];
    let p = plan(&groups, &c, &caps, now, &settings);
    let cheap = jobs_in(&p, |a| a.model == 0);
    assert!(cheap >= 205.0, "{cheap} on the cheap window: {p:?}");
    assert!(p.overflow.is_empty());
}

/// A backlog's stop past the first slot keeps its minutes: due at 15:00
/// with a 10 min margin, its cheap provider works until 14:50, not until
/// the 14:45 of the quarter-hour grid (five minutes of cheap capacity).
#[test]
fn a_stop_past_the_first_slot_is_kept_to_the_minute() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, caps) = catalog(&[
        ("pricey", 2.0, None, vec![]),
        ("cheap", 1.0, Some(10), vec![]),
    ]);
    let settings = PlanSettings {
        safety_margin: Duration::from_secs(600),
        ..PlanSettings::default()
    };
    let cheap_until = |deadline: &str| {
        let groups = [group(3000, now, at(deadline), vec![0, 1])];
        let p = plan(&groups, &c, &caps, now, &settings);
        assert!(p.overflow.is_empty(), "{p:?}");
        jobs_in(&p, |a| a.model == 1)
    };
    // A stop on the grid (14:45) against one five minutes past it.
    let on_grid = cheap_until("2026-11-24T14:55:00Z");
    let off_grid = cheap_until("2026-11-24T15:00:00Z");
    assert!(on_grid > 0.0);
    assert!(
        (off_grid - on_grid * 170.0 / 165.0).abs() < 1e-6,
        "{off_grid} vs {on_grid}"
    );
}

/// A stream of groups does not multiply the slots: past the first slot,
/// only the earliest `MINUTE_STOPS` off-grid stops keep their minute; the
/// rest snap to the quarter hour.
#[test]
fn only_the_earliest_few_stops_keep_their_minute() {
    let now = at("2026-11-24T12:00:00Z");
    let (c, _) = catalog(&[("d", 1.0, None, vec![])]);
    let settings = PlanSettings::default();
    // Stops at 12:20, 12:35, ..., each five minutes past the grid.
    let extra: Vec<DateTime<Utc>> = (0..12)
        .map(|i| bounds::add(at("2026-11-24T12:20:00Z"), Duration::from_secs(900 * i)))
        .collect();
    let end = at("2026-11-24T16:00:00Z");
    let slots = make_slots_with(&c, now, end, &settings, &extra, MINUTE_STOPS);
    let off_grid: Vec<String> = slots
        .iter()
        .filter(|s| s.start.timestamp() % 900 != 0)
        .map(|s| s.start.format("%H:%M").to_string())
        .collect();
    assert_eq!(off_grid, ["12:20", "12:35", "12:50"][..MINUTE_STOPS]);
    let plain = make_slots_with(&c, now, end, &settings, &extra, 0);
    assert_eq!(slots.len(), plain.len() + MINUTE_STOPS);
}
