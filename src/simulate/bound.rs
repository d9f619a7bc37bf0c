//! The offline lower bound: a relaxation of the real scheduling problem that
//! no feasible schedule can undercut.
//!
//! What it keeps (each as a necessary condition every real schedule meets):
//!
//! - **Per-job sizes.** Jobs are grouped by (route, submission bucket,
//!   deadline bucket) and, within a group, sorted by output tokens and cut
//!   into size bins. A bin's jobs on a (model, slot) carry `n` jobs plus
//!   `u` extra input and `v` extra output tokens above the bin's minimum,
//!   with `0 ≤ u ≤ n·(max−min)` (likewise `v`) and the bin's token totals
//!   conserved. Any real assignment of the bin's jobs satisfies this, so the
//!   longest jobs *can* go to the cheapest slots.
//! - **Failures as extra attempts.** A provider with failure rate `f` needs
//!   `1/(1−f)` attempts per success, in expectation: each attempt uses a
//!   request, concurrency and (for rpd) the day's allowance; only the
//!   successful one is billed. Prices are *not* divided by the success rate.
//! - **rpm, tpm** per slot: at most `rpm × ⌈slot/60 s⌉` requests start in a
//!   slot (any 60 s window holds at most rpm), `tpm × ⌈slot/60 s⌉` tokens of
//!   successful answers (the actual counts); both less the configured reserve.
//! - **rpd over rolling days**: the attempts in every set of slots that fits
//!   inside one 24 h window are at most rpd.
//! - **Concurrency as service-seconds**: the attempts started in a slot,
//!   each taking latency + ms_per_output_token × output tokens, fit in
//!   `concurrency × (slot + the longest service time)`.
//!
//! What it relaxes: jobs are divisible (the LP is not integral); every job
//! is known at time zero and may start anywhere in a slot that overlaps
//! `[submission, deadline)` (no safety margin, no need to finish before the
//! deadline); failures take their expected number of attempts and every job
//! eventually succeeds; a failed attempt uses no tokens; the daemon-wide
//! in-flight cap and the 99% limiter pacing are ignored; prices are exact
//! (slots split at every price change).
//!
//! Batch channels: a batch row is a candidate like any other, at its batch
//! price in each slot, usable in a slot if a batch created at the slot's
//! start (or the jobs' submission, if later) can answer by the deadline
//! with the **shortest** turnaround the provider draws (the low end of
//! `simulated_turnaround`: no schedule gets a batch back sooner). The rest
//! is relaxed: no sync fallback time is reserved, the deadline guard never
//! fires, late batches are not drawn, and batch rows use none of the
//! provider's synchronous capacity nor any batch limit (requests per batch,
//! creations per hour). Flex rows count against their provider's capacity
//! like sync.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use microlp::{ComparisonOp, OptimizationDirection, Problem, Variable};

use super::WorkloadJob;
use crate::config::{Config, Transport};
use crate::domain::bounds;
use crate::domain::pricing::{Channel, ModelId, sustained_per_minute, window_limit};
use crate::plan::{self, PlanSettings, Slot};

/// Jobs per size bin, at least (a smaller group is one bin).
const MIN_BIN_JOBS: usize = 12;
/// Size bins per group, at most.
const MAX_BINS: usize = 8;
/// Size bins in all, at most: a long stream has many (submission, deadline)
/// groups, and 8 bins each made rpd's LP (720 bins × 194 slots) miss its
/// time limit. Fewer, wider bins keep the bound valid (each bin's min/max
/// still bound its sizes), only looser.
const MAX_TOTAL_BINS: usize = 200;

/// Jobs interchangeable up to their size, within a token range.
#[derive(Debug, Clone)]
struct Bin {
    candidates: Vec<ModelId>,
    jobs: f64,
    input: f64,
    output: f64,
    in_min: f64,
    in_max: f64,
    out_min: f64,
    out_max: f64,
    release: DateTime<Utc>,
    deadline: DateTime<Utc>,
    /// The least time any of its jobs has from submission to deadline.
    shortest_window: chrono::Duration,
}

/// How the bound was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundMethod {
    /// The LP relaxation above.
    Lp,
    /// The LP failed: every job at its cheapest price in its window,
    /// capacity ignored (still a valid, weaker bound).
    CapacityFree,
}

/// The bound and how it was computed.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    pub cost: f64,
    /// Jobs that fit no capacity before their deadline (priced at their cheapest).
    pub infeasible: f64,
    pub method: BoundMethod,
    pub bins: usize,
    pub slots: usize,
}

fn bins(workload: &[WorkloadJob]) -> Vec<Bin> {
    let mut groups: BTreeMap<(&str, i64, i64), Vec<&WorkloadJob>> = BTreeMap::new();
    for w in workload {
        groups
            .entry((
                w.route_key.as_str(),
                w.submit_at.timestamp_millis().div_euclid(plan::BUCKET_MS),
                w.deadline.timestamp_millis().div_euclid(plan::BUCKET_MS),
            ))
            .or_default()
            .push(w);
    }
    let mut out = Vec::new();
    let max_bins = (MAX_TOTAL_BINS / groups.len().max(1)).clamp(1, MAX_BINS);
    for mut jobs in groups.into_values() {
        jobs.sort_by_key(|w| (w.output_tokens, w.input_tokens));
        let n = (jobs.len() / MIN_BIN_JOBS).clamp(1, max_bins);
        let per = jobs.len().div_ceil(n);
        for chunk in jobs.chunks(per) {
            let f = |g: fn(&WorkloadJob) -> u64| chunk.iter().map(move |w| g(w) as f64);
            out.push(Bin {
                candidates: chunk[0].candidates.clone(),
                jobs: chunk.len() as f64,
                input: f(|w| w.input_tokens).sum(),
                output: f(|w| w.output_tokens).sum(),
                in_min: f(|w| w.input_tokens).fold(f64::INFINITY, f64::min),
                in_max: f(|w| w.input_tokens).fold(0.0, f64::max),
                out_min: f(|w| w.output_tokens).fold(f64::INFINITY, f64::min),
                out_max: f(|w| w.output_tokens).fold(0.0, f64::max),
                release: chunk.iter().map(|w| w.submit_at).min().expect("non-empty"),
                deadline: chunk.iter().map(|w| w.deadline).max().expect("non-empty"),
                shortest_window: chunk
                    .iter()
                    .map(|w| w.deadline - w.submit_at)
                    .min()
                    .expect("non-empty"),
            });
        }
    }
    out
}

/// The bound's slots: 15 minutes for two days, then hourly, split at every
/// price change and at every bin's release and deadline (snapped down).
fn slots(
    config: &Config,
    bins: &[Bin],
    start: DateTime<Utc>,
    settings: &PlanSettings,
) -> Vec<Slot> {
    let s = PlanSettings {
        fine_slot: Duration::from_secs(15 * 60),
        fine_horizon: Duration::from_secs(2 * 86_400),
        coarse_slot: Duration::from_secs(3600),
        coarse_horizon: settings.max_horizon,
        far_slot: Duration::from_secs(3600),
        ..*settings
    };
    let end = bins
        .iter()
        .map(|b| b.deadline)
        .max()
        .unwrap_or(start)
        .min(bounds::add(start, settings.max_horizon))
        .max(bounds::add(start, s.fine_slot));
    let extra: Vec<DateTime<Utc>> = bins.iter().flat_map(|b| [b.release, b.deadline]).collect();
    // No minute stops: finer slots would only tighten the bound, and cost
    // its LP time.
    plan::make_slots_with(&config.catalog, start, end, &s, &extra, 0)
}

/// What the bound knows about a provider's service.
struct Service {
    success: f64,
    /// (latency s, s per output token), for a simulated provider.
    time: Option<(f64, f64)>,
}

fn service(t: &Transport) -> Service {
    Service {
        success: (1.0 - t.failure_rate()).clamp(0.01, 1.0),
        time: match t {
            Transport::Simulated {
                latency,
                ms_per_output_token,
                ..
            } => Some((latency.as_secs_f64(), ms_per_output_token / 1000.0)),
            Transport::OpenAi { .. } => None,
        },
    }
}

/// Terms of one LP row.
type Terms = Vec<(Variable, f64)>;

/// One (bin, model, slot) column group: `n` jobs, `u`, `v` scaled extra tokens.
struct Column {
    bin: usize,
    model: ModelId,
    slot: usize,
    n: Variable,
    u: Option<Variable>,
    v: Option<Variable>,
    /// USD per job at the bin's minimum sizes; per unit of u and v.
    cost_n: f64,
    cost_u: f64,
    cost_v: f64,
}

/// The workload as the planner can know it, for a second reference next to
/// the bound (not a bound on every schedule): each job's deadline moved
/// earlier by the safety margin (never before its submission), and its
/// actual output tokens replaced by the mean of the jobs the planner cannot
/// tell apart before they run (same route and expected output). Its bound
/// is what a schedule blind to answer lengths pays at least *in
/// expectation* (a blind schedule can still be lucky in which jobs it
/// sends where), within the bound's own relaxations (a slot overlapping the
/// moved deadline still counts whole, rpm per started minute): the gap from
/// the bound to it is what foresight of sizes and the margin are worth, the
/// gap from it to the planner the planner's own.
pub fn as_the_planner_knows(workload: &[WorkloadJob], margin: Duration) -> Vec<WorkloadJob> {
    let mut classes: BTreeMap<(&str, u64), (u64, u64)> = BTreeMap::new();
    for w in workload {
        let c = classes
            .entry((w.route_key.as_str(), w.expected_output_tokens))
            .or_default();
        c.0 += w.output_tokens;
        c.1 += 1;
    }
    let margin = chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::zero());
    workload
        .iter()
        .map(|w| {
            let (sum, n) = classes[&(w.route_key.as_str(), w.expected_output_tokens)];
            WorkloadJob {
                deadline: (w.deadline - margin).max(w.submit_at),
                output_tokens: (sum as f64 / n.max(1) as f64).round() as u64,
                ..w.clone()
            }
        })
        .collect()
}

/// The bound of the workload as the planner knows it
/// ([`as_the_planner_knows`]), under the rules the daemon holds itself to:
/// a flex answer may take its provider's `flex.timeout` and a batch the
/// high end of its simulated turnaround (a flex or batch row takes a job
/// only in slots that start at least that long before the moved deadline,
/// as the planner's rules do; the sync fallback a batch also needs is
/// still not reserved), and requests flow at the
/// limiter's pace ([`sustained_per_minute`] of rpm / tpm, what its window
/// admits of rpd) spread over each second
/// (one second's allowance at once), not a whole minute's at once. Again a
/// reference, not a bound on every schedule.
pub fn as_known(config: &Config, workload: &[WorkloadJob], settings: &PlanSettings) -> Bound {
    let known = as_the_planner_knows(workload, settings.safety_margin);
    compute_with(config, &known, settings, Reference::AsKnown)
}

/// Which problem [`compute_with`] solves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reference {
    /// The relaxation every schedule meets: flex answers as the simulated
    /// provider draws them, a minute's allowance per started minute.
    Bound,
    /// The daemon's own rules (see [`as_known`]).
    AsKnown,
}

/// The requests a day a reference counts on: all of `rpd` for the bound (a
/// schedule may use the whole day), what the limiter's window admits
/// ([`window_limit`]: less the reserve) as the daemon.
fn rpd_usable(reference: Reference, rpd: u32, reserve: f64) -> f64 {
    match reference {
        Reference::Bound => f64::from(rpd),
        Reference::AsKnown => window_limit(f64::from(rpd), reserve) as f64,
    }
}

/// Computes the bound (see the module docs for what it relaxes).
pub fn compute(config: &Config, workload: &[WorkloadJob], settings: &PlanSettings) -> Bound {
    compute_with(config, workload, settings, Reference::Bound)
}

fn compute_with(
    config: &Config,
    workload: &[WorkloadJob],
    settings: &PlanSettings,
    reference: Reference,
) -> Bound {
    let Some(start) = workload.iter().map(|w| w.submit_at).min() else {
        return Bound {
            cost: 0.0,
            infeasible: 0.0,
            method: BoundMethod::Lp,
            bins: 0,
            slots: 0,
        };
    };
    let catalog = &config.catalog;
    let bins = bins(workload);
    let slots = slots(config, &bins, start, settings);
    let services: Vec<Service> = config.transports.iter().map(service).collect();
    let max_output = workload.iter().map(|w| w.output_tokens).max().unwrap_or(0) as f64;

    let unit = |m: ModelId, t: DateTime<Utc>| {
        let price = catalog.price_at(m, t);
        let k = (1.0 + catalog.providers[catalog.models[m].provider].markup) / 1e6;
        (price.input_per_mtok * k, price.output_per_mtok * k)
    };
    // No batch answers sooner than the shortest turnaround its provider can
    // draw: a bin whose deadline comes first cannot take the batch price in
    // slot `s` in any schedule that meets the deadline. As a reference for
    // the planner, a batch takes the high end of what the planner observes
    // and a flex answer its timeout, for the bin and for each of its jobs.
    let answer_time = |m: ModelId| -> Option<Duration> {
        let p = &catalog.providers[catalog.models[m].provider];
        if catalog.is_batch(m) {
            p.batch.as_ref().map(|t| match reference {
                Reference::Bound => t.simulated_turnaround.0,
                Reference::AsKnown => t.simulated_turnaround.1,
            })
        } else if reference == Reference::AsKnown && catalog.models[m].channel == Channel::Flex {
            p.flex.map(|f| f.timeout)
        } else {
            None
        }
    };
    let too_slow = |m: ModelId, s: &Slot, b: &Bin| {
        answer_time(m).is_some_and(|d| {
            bounds::add(s.start.max(b.release), d) > b.deadline
                || (reference == Reference::AsKnown
                    && chrono::Duration::from_std(d).is_ok_and(|d| d > b.shortest_window))
        })
    };
    // The capacity-free bound: each job at its cheapest price in its window.
    let capacity_free = |b: &Bin| {
        let mut best = f64::INFINITY;
        for s in slots
            .iter()
            .filter(|s| s.end > b.release && s.start < b.deadline)
        {
            for &m in &b.candidates {
                if too_slow(m, s, b) {
                    continue;
                }
                let (a, o) = unit(m, s.start);
                best = best.min(b.input * a + b.output * o);
            }
        }
        if best.is_finite() {
            best
        } else {
            b.candidates
                .iter()
                .map(|&m| {
                    let (a, o) = unit(m, b.release);
                    b.input * a + b.output * o
                })
                .fold(f64::INFINITY, f64::min)
        }
    };

    let mut problem = Problem::new(OptimizationDirection::Minimize);
    problem.set_time_limit(Duration::from_secs(120));
    // Costs are ~1e-4 USD per job: scale the objective to ~1.
    let per_job_scale = bins
        .iter()
        .map(|b| capacity_free(b) / b.jobs.max(1.0))
        .fold(0.0, f64::max)
        .max(1e-12);
    let scale = 1.0 / per_job_scale;
    let mut columns: Vec<Column> = Vec::new();
    for (bi, b) in bins.iter().enumerate() {
        let du = b.in_max - b.in_min;
        let dv = b.out_max - b.out_min;
        for (si, s) in slots.iter().enumerate() {
            if !(s.end > b.release && s.start < b.deadline) {
                continue;
            }
            for &m in &b.candidates {
                if too_slow(m, s, b) {
                    continue;
                }
                let (a, o) = unit(m, s.start);
                let cost_n = b.in_min * a + b.out_min * o;
                let n = problem.add_var(cost_n * scale, (0.0, f64::INFINITY));
                let u = (du > 0.0).then(|| problem.add_var(a * du * scale, (0.0, f64::INFINITY)));
                let v = (dv > 0.0).then(|| problem.add_var(o * dv * scale, (0.0, f64::INFINITY)));
                for x in [u, v].into_iter().flatten() {
                    problem.add_constraint([(x, 1.0), (n, -1.0)], ComparisonOp::Le, 0.0);
                }
                columns.push(Column {
                    bin: bi,
                    model: m,
                    slot: si,
                    n,
                    u,
                    v,
                    cost_n,
                    cost_u: a * du,
                    cost_v: o * dv,
                });
            }
        }
    }
    // Overflow: far dearer than any real option, used only when nothing fits.
    let overflow: Vec<Variable> = bins
        .iter()
        .map(|_| problem.add_var(1000.0, (0.0, f64::INFINITY)))
        .collect();
    // Per bin: every job placed; the tokens above the minimum placed.
    let mut by_bin: Vec<(Terms, Terms, Terms)> = bins.iter().map(|_| Default::default()).collect();
    for c in &columns {
        let e = &mut by_bin[c.bin];
        e.0.push((c.n, 1.0));
        if let Some(u) = c.u {
            e.1.push((u, 1.0));
        }
        if let Some(v) = c.v {
            e.2.push((v, 1.0));
        }
    }
    for (bi, (mut n, mut u, mut v)) in by_bin.into_iter().enumerate() {
        let b = &bins[bi];
        n.push((overflow[bi], 1.0));
        problem.add_constraint(n.as_slice(), ComparisonOp::Eq, b.jobs);
        let du = b.in_max - b.in_min;
        if du > 0.0 {
            u.push((overflow[bi], 1.0));
            problem.add_constraint(
                u.as_slice(),
                ComparisonOp::Ge,
                (b.input - b.in_min * b.jobs) / du,
            );
        }
        let dv = b.out_max - b.out_min;
        if dv > 0.0 {
            v.push((overflow[bi], 1.0));
            problem.add_constraint(
                v.as_slice(),
                ComparisonOp::Ge,
                (b.output - b.out_min * b.jobs) / dv,
            );
        }
    }
    // Capacity rows per (provider, slot).
    #[derive(Default)]
    struct Rows {
        attempts: Vec<(Variable, f64)>,
        tokens: Vec<(Variable, f64)>,
        seconds: Vec<(Variable, f64)>,
    }
    let mut rows: BTreeMap<(usize, usize), Rows> = BTreeMap::new();
    for c in &columns {
        if catalog.is_batch(c.model) {
            // A batch row takes none of its provider's synchronous capacity
            // (the daemon's batches do not count against rpm/tpm/rpd or
            // concurrency), and its batch limits are not modelled.
            continue;
        }
        let b = &bins[c.bin];
        let p = catalog.models[c.model].provider;
        let sv = &services[p];
        let r = rows.entry((p, c.slot)).or_default();
        let attempts = 1.0 / sv.success;
        r.attempts.push((c.n, attempts));
        // Tokens in thousands (conditioning).
        r.tokens.push((c.n, (b.in_min + b.out_min) / 1000.0));
        if let Some(u) = c.u {
            r.tokens.push((u, (b.in_max - b.in_min) / 1000.0));
        }
        if let Some(v) = c.v {
            r.tokens.push((v, (b.out_max - b.out_min) / 1000.0));
        }
        if let Some((lat, per_tok)) = sv.time {
            r.seconds
                .push((c.n, attempts * (lat + per_tok * b.out_min)));
            if let Some(v) = c.v {
                r.seconds
                    .push((v, attempts * per_tok * (b.out_max - b.out_min)));
            }
        }
    }
    let mut by_provider: BTreeMap<usize, Vec<(usize, Terms)>> = BTreeMap::new();
    for ((p, si), r) in rows {
        let limits = &catalog.providers[p].limits;
        let slot_s = slots[si].duration().as_secs_f64();
        // Any 60 s window holds at most a minute's allowance; the limiter
        // also spreads it over the seconds.
        // A slot's allowance of a per-minute limit: the bound counts whole
        // minutes; the daemon's reference, the limiter's sustained rate
        // plus the one second's allowance its bucket starts with.
        let per_slot = |limit: f64| match reference {
            Reference::Bound => {
                limit * (1.0 - limits.reserve).clamp(0.0, 1.0) * (slot_s / 60.0).ceil()
            }
            Reference::AsKnown => {
                sustained_per_minute(limit, limits.reserve) * (slot_s + 1.0) / 60.0
            }
        };
        let mut req_cap = limits.rpm.map_or(f64::INFINITY, |r| per_slot(f64::from(r)));
        if let Some(d) = limits.rpd {
            req_cap = req_cap.min(rpd_usable(reference, d, limits.reserve));
        }
        if req_cap.is_finite() {
            problem.add_constraint(r.attempts.as_slice(), ComparisonOp::Le, req_cap);
        }
        if let Some(t) = limits.tpm {
            let cap = per_slot(t as f64) / 1000.0;
            problem.add_constraint(r.tokens.as_slice(), ComparisonOp::Le, cap);
        }
        if let (Some(c), Some((lat, per_tok))) = (limits.concurrency, services[p].time)
            && !r.seconds.is_empty()
        {
            let longest = lat + per_tok * max_output;
            let cap = f64::from(c) * (slot_s + longest);
            problem.add_constraint(r.seconds.as_slice(), ComparisonOp::Le, cap);
        }
        if limits.rpd.is_some() {
            by_provider.entry(p).or_default().push((si, r.attempts));
        }
    }
    // rpd over rolling days: every run of slots inside one 24 h window.
    for (p, per_slot) in by_provider {
        let limits = &catalog.providers[p].limits;
        let rpd = rpd_usable(reference, limits.rpd.expect("rpd"), limits.reserve);
        let mut seen = std::collections::BTreeSet::new();
        for (i, &(si, _)) in per_slot.iter().enumerate() {
            let window_end = bounds::add(slots[si].start, Duration::from_secs(86_400));
            let last = per_slot[i..]
                .iter()
                .take_while(|(sj, _)| slots[*sj].end <= window_end)
                .count();
            if last < 2 || !seen.insert((i, i + last)) {
                continue;
            }
            let terms: Vec<(Variable, f64)> = per_slot[i..i + last]
                .iter()
                .flat_map(|(_, t)| t.iter().copied())
                .collect();
            problem.add_constraint(terms.as_slice(), ComparisonOp::Le, rpd);
            if i + last == per_slot.len() {
                break;
            }
        }
    }

    let solved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| problem.solve()))
        .ok()
        .and_then(|r| r.ok())
        .and_then(|s| s.into_solution().ok());
    let Some(solution) = solved else {
        return Bound {
            cost: bins.iter().map(capacity_free).sum(),
            infeasible: 0.0,
            method: BoundMethod::CapacityFree,
            bins: bins.len(),
            slots: slots.len(),
        };
    };
    let mut cost = 0.0;
    for c in &columns {
        cost += solution.var_value(c.n).max(0.0) * c.cost_n;
        if let Some(u) = c.u {
            cost += solution.var_value(u).max(0.0) * c.cost_u;
        }
        if let Some(v) = c.v {
            cost += solution.var_value(v).max(0.0) * c.cost_v;
        }
    }
    let mut infeasible = 0.0;
    for (bi, &o) in overflow.iter().enumerate() {
        let jobs = solution.var_value(o).max(0.0);
        if jobs > 1e-6 {
            infeasible += jobs;
            // At the bin's minimum sizes, cheapest anywhere in its window.
            let b = &bins[bi];
            let per_job = capacity_free(&Bin {
                input: b.in_min,
                output: b.out_min,
                jobs: 1.0,
                ..b.clone()
            });
            cost += jobs * per_job;
        }
    }
    Bound {
        cost,
        infeasible,
        method: BoundMethod::Lp,
        bins: bins.len(),
        slots: slots.len(),
    }
}

#[cfg(test)]
mod tests;
