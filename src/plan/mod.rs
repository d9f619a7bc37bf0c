//! The planner: for every queued job, which model and which time slot, so that
//! the whole queue costs as little as possible, every job can finish before
//! its deadline (with a safety margin), and no provider gets more requests or
//! tokens in a slot than its limits allow.
//!
//! # The problem, and why an LP
//!
//! Time from `now` to the furthest deadline is cut into slots (15 minutes for
//! the first two hours, then hourly) that are also split at every instant a
//! price changes, so prices are constant within a slot. Jobs are aggregated
//! into [`JobGroup`]s — same eligible models, deadlines in the same slot — so
//! the problem's size depends on how many *kinds* of job are queued, not how
//! many jobs: a million queued jobs are typically a few hundred groups.
//!
//! With `x[g, m, s]` the number of group `g`'s jobs run on model `m` in slot
//! `s`, the planner solves
//!
//! ```text
//! minimise   Σ x[g,m,s] · cost(g, m, s)  +  Σ o[g] · penalty(g)
//! subject to Σ_{m,s} x[g,m,s] + o[g] = jobs(g)                  for every group
//!            Σ_{g, m of p} x[g,m,s]            ≤ requests(p, s)   for every provider, slot
//!            Σ_{g, m of p} x[g,m,s] · tok(g)   ≤ tokens(p, s)
//!            x ≥ 0, o ≥ 0, and x[g,m,s] only where s ends before g's deadline
//! ```
//!
//! a transportation problem with two capacity resources (requests and tokens)
//! per provider and slot. Two resources rule out a plain min-cost flow, so it
//! is solved as a linear program with `microlp` (pure Rust). The LP relaxes
//! integrality; rounding a group's fractional share up costs at most one job
//! per (group, model, slot) and the rate limiter still enforces the real
//! limits. `o[g]` is overflow: jobs that fit no slot before their deadline.
//! They run now on the fastest eligible provider. The penalty makes the LP
//! use overflow only when capacity truly runs out.
//!
//! The same function with every job known in advance (each group released at
//! its submission time) and no safety margin is the offline **lower bound**
//! any real schedule can be measured against (`nightshift simulate
//! --lower-bound`).

mod route;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use microlp::{ComparisonOp, OptimizationDirection, Problem};

pub use route::{Decision, by_cost_at, route};

use crate::domain::bounds;
use crate::domain::pricing::{Catalog, ModelId, ProviderId};

/// Jobs that are interchangeable for planning: same eligible models, released
/// and due in the same slots.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobGroup {
    pub candidates: Vec<ModelId>,
    pub jobs: u64,
    /// Sums over the group's jobs (estimates).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// No job of the group may start before this (submission time).
    pub release: DateTime<Utc>,
    /// The earliest deadline among the group's jobs.
    pub deadline: DateTime<Utc>,
}

impl JobGroup {
    fn tokens_per_job(&self) -> (f64, f64) {
        let n = self.jobs.max(1) as f64;
        (self.input_tokens as f64 / n, self.output_tokens as f64 / n)
    }
}

/// The planner's view of each provider before anything is observed: its
/// configured limits, typical latency and (for a simulated provider) its
/// configured failure rate. Parallel to `catalog.providers`.
pub fn configured_capacities(
    catalog: &Catalog,
    transports: &[crate::config::Transport],
) -> Vec<ProviderCapacity> {
    catalog
        .providers
        .iter()
        .zip(transports)
        .map(|(p, t)| match t {
            crate::config::Transport::Simulated {
                latency,
                ms_per_output_token,
                failure_rate,
            } => ProviderCapacity {
                success_rate: 1.0 - failure_rate,
                ms_per_output_token: *ms_per_output_token,
                ..ProviderCapacity::from_limits(&p.limits, *latency, 0.0)
            },
            crate::config::Transport::OpenAi { .. } => ProviderCapacity {
                success_rate: 1.0 - t.failure_rate(),
                ..ProviderCapacity::from_limits(&p.limits, t.typical_latency(), 0.0)
            },
        })
        .collect()
}

/// What the planner assumes about a provider's capacity and reliability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProviderCapacity {
    pub rpm: Option<f64>,
    pub tpm: Option<f64>,
    pub rpd: Option<f64>,
    pub concurrency: Option<u32>,
    /// Typical time from send to answer (for a configured provider: before
    /// the output tokens, see `ms_per_output_token`).
    pub latency: Duration,
    /// Extra answer time per output token (0 where `latency` is observed,
    /// which already includes it).
    pub ms_per_output_token: f64,
    /// Observed fraction of requests that succeed: a job takes 1 ÷ this
    /// attempts of capacity (requests, concurrency); price is unaffected.
    pub success_rate: f64,
    /// Fraction of the limits kept free for other traffic on the same key.
    pub reserve: f64,
    /// Provider-reported input tokens ÷ our estimate (tokenizers differ).
    pub input_token_ratio: f64,
    /// Paused, circuit open, or disabled (`MAX_UTC`) until then: no capacity before.
    pub unavailable_until: Option<DateTime<Utc>>,
    /// Its flex channel refused a request (429 `resource_unavailable`): no
    /// flex row of this provider is planned before then. The standard
    /// channel is unaffected.
    pub flex_unavailable_until: Option<DateTime<Utc>>,
    /// How long a batch of this provider is assumed to take from creation
    /// to its results: a high quantile of the batches that ended, the
    /// configured `expected_turnaround` before any did.
    pub batch_turnaround: Duration,
    /// Its Batch API refused a batch creation (429): no batch row of this
    /// provider is planned before then. The synchronous channel is
    /// unaffected.
    pub batch_unavailable_until: Option<DateTime<Utc>>,
    /// Requests already counted in the provider's rolling 24 h (`rpd`)
    /// when the plan is made: the daily allowance the plan may still use
    /// is `rpd` less these, until they leave the window.
    pub rpd_used: f64,
}

impl ProviderCapacity {
    /// From the configured limits, assuming a reliable provider.
    pub fn from_limits(
        limits: &crate::domain::pricing::Limits,
        latency: Duration,
        reserve: f64,
    ) -> ProviderCapacity {
        ProviderCapacity {
            rpm: limits.rpm.map(f64::from),
            tpm: limits.tpm.map(|t| t as f64),
            rpd: limits.rpd.map(f64::from),
            concurrency: limits.concurrency,
            latency,
            ms_per_output_token: 0.0,
            success_rate: 1.0,
            reserve: reserve.max(limits.reserve),
            input_token_ratio: 1.0,
            unavailable_until: None,
            flex_unavailable_until: None,
            batch_turnaround: Duration::from_secs(3600),
            batch_unavailable_until: None,
            rpd_used: 0.0,
        }
    }

    /// (attempts, tokens, concurrency service-seconds) this provider can
    /// take within `duration`.
    fn per(&self, duration: Duration) -> Cap {
        if duration.is_zero() {
            // Not available in this slot at all (and ∞ × 0 would be NaN).
            return (0.0, 0.0, 0.0);
        }
        let minutes = duration.as_secs_f64() / 60.0;
        let usable = (1.0 - self.reserve).clamp(0.0, 1.0);
        let by_rpm = self.rpm.map_or(f64::INFINITY, |r| r * minutes * usable);
        let tokens = self.tpm.map_or(f64::INFINITY, |t| t * minutes);
        // A daily limit caps any slot at a day's allowance (a loose bound:
        // the rate limiter enforces the rolling day exactly).
        let by_day = self.rpd.unwrap_or(f64::INFINITY);
        // Concurrency: each attempt holds a slot for its service time.
        let seconds = self
            .concurrency
            .map_or(f64::INFINITY, |c| c as f64 * duration.as_secs_f64());
        (by_rpm.min(by_day), tokens * usable, seconds)
    }
}

/// Planner settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanSettings {
    /// A job must be planned to finish this long before its deadline.
    pub safety_margin: Duration,
    /// Slot length near `now`, and for how long.
    pub fine_slot: Duration,
    pub fine_horizon: Duration,
    /// Slot length after that.
    pub coarse_slot: Duration,
    /// Slot length beyond `coarse_horizon` (far slots only decide "later").
    pub coarse_horizon: Duration,
    pub far_slot: Duration,
    /// Nothing is planned further out than this.
    pub max_horizon: Duration,
    /// Lower-bound mode: a slot is usable if it overlaps [release, deadline);
    /// no safety margin. Every real schedule costs at least this much.
    pub relaxed: bool,
    /// Give up on the LP after this long and fall back to the greedy plan.
    pub time_limit: Duration,
}

impl Default for PlanSettings {
    fn default() -> PlanSettings {
        PlanSettings {
            safety_margin: Duration::from_secs(10 * 60),
            fine_slot: Duration::from_secs(15 * 60),
            fine_horizon: Duration::from_secs(2 * 3600),
            coarse_slot: Duration::from_secs(3600),
            coarse_horizon: Duration::from_secs(24 * 3600),
            far_slot: Duration::from_secs(4 * 3600),
            max_horizon: Duration::from_secs(8 * 86_400),
            relaxed: false,
            time_limit: Duration::from_secs(5),
        }
    }
}

/// A time slot `[start, end)` with constant prices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Slot {
    pub fn duration(&self) -> Duration {
        (self.end - self.start).to_std().unwrap_or_default()
    }
}

/// Part of a group planned on one model in one slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub group: usize,
    pub model: ModelId,
    pub slot: usize,
    /// May be fractional (LP); the dispatcher rounds up.
    pub jobs: f64,
    /// Expected cost per job in USD (markup and success rate included).
    pub cost_per_job: f64,
}

/// How the plan was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The LP optimum.
    Lp,
    /// The LP failed or timed out; greedy fill by cost.
    Greedy,
}

/// The plan for a set of groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub now: DateTime<Utc>,
    pub slots: Vec<Slot>,
    pub allocations: Vec<Allocation>,
    /// Jobs per group that fit no slot before their deadline: run now, on the
    /// fastest eligible model.
    pub overflow: Vec<(usize, f64)>,
    /// Σ allocations × cost (overflow priced at the fastest model now).
    pub expected_cost: f64,
    /// What dispatching every job now on its cheapest model would cost
    /// (ignoring capacity): the per-request router's price.
    pub dispatch_now_cost: f64,
    pub method: Method,
}

/// Expected cost of one job of `group` on `model` at `t`: tokens × price at
/// `t`, with markup (failed attempts are not billed).
pub fn effective_cost(
    catalog: &Catalog,
    capacity: &[ProviderCapacity],
    group: &JobGroup,
    model: ModelId,
    t: DateTime<Utc>,
) -> f64 {
    let (input, output) = group.tokens_per_job();
    let m = &catalog.models[model];
    let price = catalog.price_at(model, t);
    let markup = catalog.providers[m.provider].markup;
    let cap = capacity.get(m.provider);
    let input = input * cap.map_or(1.0, |c| c.input_token_ratio);
    // A failed attempt is not billed: failures cost capacity (extra
    // attempts, see `attempts_per_job`), not price.
    (input * price.input_per_mtok + output * price.output_per_mtok) / 1e6 * (1.0 + markup)
}

/// Attempts a job takes on average on this provider (1 ÷ success rate).
fn attempts_per_job(capacity: &[ProviderCapacity], provider: ProviderId) -> f64 {
    1.0 / capacity
        .get(provider)
        .map_or(1.0, |c| c.success_rate.clamp(0.05, 1.0))
}

/// Seconds one attempt of a job with `output` tokens holds a concurrency
/// slot of this provider.
fn service_seconds(capacity: &[ProviderCapacity], provider: ProviderId, output: f64) -> f64 {
    capacity.get(provider).map_or(0.0, |c| {
        c.latency.as_secs_f64() + c.ms_per_output_token * output / 1000.0
    })
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl PlanSettings {
    /// The slot length at `t`: fine near `now`, coarse later, far beyond.
    pub fn step_at(&self, now: DateTime<Utc>, t: DateTime<Utc>) -> Duration {
        if t < bounds::add(now, self.fine_horizon) {
            self.fine_slot
        } else if t < bounds::add(now, self.coarse_horizon) {
            self.coarse_slot
        } else {
            self.far_slot
        }
    }
}

fn align_down(t: DateTime<Utc>, step: Duration) -> DateTime<Utc> {
    let step_ms = step.as_millis().max(1) as i64;
    Utc.timestamp_millis_opt(t.timestamp_millis().div_euclid(step_ms) * step_ms)
        .single()
        .unwrap_or(t)
}

/// Cuts `[now, end)` into slots: `fine_slot`s for `fine_horizon`, then
/// `coarse_slot`s, then `far_slot`s, boundaries aligned to the clock, split
/// at price changes.
pub fn make_slots(
    catalog: &Catalog,
    now: DateTime<Utc>,
    end: DateTime<Utc>,
    settings: &PlanSettings,
) -> Vec<Slot> {
    make_slots_with(catalog, now, end, settings, &[], 0)
}

/// How many extra boundaries past the first slot the planner keeps to the
/// minute (see [`make_slots_with`]).
pub const MINUTE_STOPS: usize = 3;

/// [`make_slots`], with extra boundaries (snapped down to the grid; the
/// earliest `minute_stops` past the first slot only to the minute).
pub fn make_slots_with(
    catalog: &Catalog,
    now: DateTime<Utc>,
    end: DateTime<Utc>,
    settings: &PlanSettings,
    extra: &[DateTime<Utc>],
    minute_stops: usize,
) -> Vec<Slot> {
    let mut bounds = vec![now];
    // Extra boundaries are snapped down to the grid where they fall, which
    // bounds the slot count (and the LP) whatever the groups.
    let mut sorted: Vec<DateTime<Utc>> = extra
        .iter()
        .copied()
        .filter(|&t| t > now && t < end)
        .collect();
    sorted.sort();
    let (mut kept, mut last_minute) = (0usize, None);
    bounds.extend(
        sorted
            .into_iter()
            .map(|t| {
                // Within the first slot's length of `now` (short deadlines,
                // a window opening in the next minutes) to the second, so
                // no cheap capacity is lost to the grid (snapping a 12:03:30
                // stop down to 12:03 lost the last 30 s of a cheap window:
                // 180 of 210 jobs).
                if t < bounds::add(now, settings.fine_slot) {
                    return align_down(t, Duration::from_secs(1)).max(now);
                }
                // The earliest few further out to the minute: snapping a
                // single backlog's 14:50 stop down to 14:45 lost five
                // minutes of its cheap providers. Only a few, so a stream
                // of groups does not multiply the slots.
                let step = settings.step_at(now, t);
                if kept < minute_stops {
                    let m = align_down(t, Duration::from_secs(60));
                    if m != align_down(t, (step / 4).max(settings.fine_slot).min(step))
                        && last_minute != Some(m)
                    {
                        kept += 1;
                        last_minute = Some(m);
                    }
                    return m;
                }
                // Further out to a quarter of the step.
                align_down(t, (step / 4).max(settings.fine_slot).min(step))
            })
            .filter(|&t| t > now && t < end),
    );
    let mut t = now;
    while t < end {
        let step = settings.step_at(now, t);
        t = bounds::add(align_down(t, step), step).min(end);
        bounds.push(t);
    }
    let mut change = now;
    while let Some(c) = catalog.next_price_change(
        change,
        (end - change).to_std().map(to_chrono).unwrap_or_default(),
    ) {
        if c >= end {
            break;
        }
        bounds.push(c);
        change = c;
    }
    bounds.sort();
    bounds.dedup();
    bounds
        .windows(2)
        .map(|w| Slot {
            start: w[0],
            end: w[1],
        })
        .collect()
}

/// Whether group `g` may be planned in `slot` (the `first` usable slot of a
/// group is allowed as long as the job can start there before its deadline
/// minus the margin; later slots must end before it).
fn usable(slot: &Slot, group: &JobGroup, settings: &PlanSettings, first_for_group: bool) -> bool {
    if settings.relaxed {
        return slot.end > group.release && slot.start < group.deadline;
    }
    if slot.start < group.release && slot.end <= group.release {
        return false;
    }
    // Saturating: no margin, deadline or slot can overflow a time.
    let margin = settings.safety_margin;
    bounds::add(slot.end, margin) <= group.deadline
        || (first_for_group && bounds::add(slot.start.max(group.release), margin) <= group.deadline)
}

struct Option_ {
    group: usize,
    model: ModelId,
    slot: usize,
    cost: f64,
}

/// Plans `groups` from `now`. Pure: same inputs, same plan.
pub fn plan(
    groups: &[JobGroup],
    catalog: &Catalog,
    capacity: &[ProviderCapacity],
    now: DateTime<Utc>,
    settings: &PlanSettings,
) -> Plan {
    let horizon_end = groups
        .iter()
        .map(|g| g.deadline)
        .max()
        .unwrap_or(now)
        .min(bounds::add(now, settings.max_horizon))
        .max(bounds::add(now, settings.fine_slot));
    // Slot boundaries also fall where groups become usable or stop being
    // usable, so no capacity is lost to rounding a deadline to the grid.
    let margin = if settings.relaxed {
        Duration::ZERO
    } else {
        settings.safety_margin
    };
    let extra: Vec<DateTime<Utc>> = groups
        .iter()
        .flat_map(|g| [g.release, bounds::sub(g.deadline, margin)])
        .filter(|&t| t > now && t < horizon_end)
        .collect();
    let slots = make_slots_with(catalog, now, horizon_end, settings, &extra, MINUTE_STOPS);

    // Every (group, model, slot) a job may use, with its cost.
    let mut options = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let first = slots.iter().position(|s| s.end > g.release);
        for (si, slot) in slots.iter().enumerate() {
            if !usable(slot, g, settings, Some(si) == first) {
                continue;
            }
            let t = slot.start.max(g.release);
            for &m in &g.candidates {
                if !flex_fits(catalog, capacity, m, slot, t, g.deadline, margin)
                    || !batch_fits(catalog, capacity, g, m, slot, t, settings)
                {
                    continue;
                }
                options.push(Option_ {
                    group: gi,
                    model: m,
                    slot: si,
                    cost: effective_cost(catalog, capacity, g, m, t),
                });
            }
        }
    }
    let caps: BTreeMap<(ProviderId, usize), Cap> = slots
        .iter()
        .enumerate()
        .flat_map(|(si, slot)| {
            capacity.iter().enumerate().map(move |(p, c)| {
                // Only the part of the slot after the provider is available again.
                let from = c
                    .unavailable_until
                    .map_or(slot.start, |u| u.max(slot.start));
                let usable = if from >= slot.end {
                    Duration::ZERO
                } else {
                    (slot.end - from).to_std().unwrap_or_default()
                };
                ((p, si), c.per(usable))
            })
        })
        .collect();

    let (allocations, overflow, method) = match solve_lp(
        groups, &options, &caps, &slots, now, capacity, catalog, settings,
    ) {
        Some((a, o)) => (a, o, Method::Lp),
        None => {
            let (a, o) = solve_greedy(groups, &options, &caps, capacity, catalog);
            (a, o, Method::Greedy)
        }
    };
    let mut expected_cost: f64 = allocations.iter().map(|a| a.jobs * a.cost_per_job).sum();
    for &(g, jobs) in &overflow {
        let m = fastest_model(catalog, capacity, &groups[g].candidates);
        expected_cost += jobs * effective_cost(catalog, capacity, &groups[g], m, now);
    }
    let dispatch_now_cost = groups
        .iter()
        .map(|g| {
            let t = now.max(g.release);
            g.jobs as f64
                * g.candidates
                    .iter()
                    .map(|&m| effective_cost(catalog, capacity, g, m, t))
                    .fold(f64::INFINITY, f64::min)
        })
        .sum();
    Plan {
        now,
        slots,
        allocations,
        overflow,
        expected_cost,
        dispatch_now_cost,
        method,
    }
}

/// Whether `model` may take a job of a group due at `deadline` in `slot`
/// (starting at `t`): always on the standard channel; on flex only once
/// its provider's flex back-off is over within the slot, and if a flex
/// answer, which may take up to the flex timeout, still comes `margin`
/// before the deadline.
fn flex_fits(
    catalog: &Catalog,
    capacity: &[ProviderCapacity],
    model: ModelId,
    slot: &Slot,
    t: DateTime<Utc>,
    deadline: DateTime<Utc>,
    margin: Duration,
) -> bool {
    let m = &catalog.models[model];
    if m.channel != crate::domain::pricing::Channel::Flex {
        return true;
    }
    let Some(terms) = catalog.providers[m.provider].flex else {
        return false;
    };
    let backed_off = capacity
        .get(m.provider)
        .and_then(|c| c.flex_unavailable_until)
        .is_some_and(|u| u >= slot.end);
    !backed_off && bounds::add(bounds::add(t, terms.timeout), margin) <= deadline
}

/// Whether `model` may take jobs of group `g` in `slot` (a batch created at
/// `t`): always where it is not a batch row; a batch row only while its
/// provider takes batch creations, and only if the batch's turnaround, then
/// running the group on its synchronous models should the batch come back
/// late, and the margin, all fit before the deadline. (In lower-bound mode
/// a batch row is as usable as any: every real schedule costs at least
/// that.)
fn batch_fits(
    catalog: &Catalog,
    capacity: &[ProviderCapacity],
    g: &JobGroup,
    model: ModelId,
    slot: &Slot,
    t: DateTime<Utc>,
    settings: &PlanSettings,
) -> bool {
    if !catalog.is_batch(model) {
        return true;
    }
    let p = catalog.models[model].provider;
    let Some(c) = capacity.get(p) else {
        return false;
    };
    if c.batch_unavailable_until.is_some_and(|u| u >= slot.end)
        || c.unavailable_until.is_some_and(|u| u >= slot.end)
    {
        return false;
    }
    if settings.relaxed {
        return true;
    }
    let fallback = sync_fallback_time(
        catalog,
        capacity,
        &g.candidates,
        g.jobs,
        g.input_tokens + g.output_tokens,
    );
    let ready = bounds::add(bounds::add(t, c.batch_turnaround), fallback);
    bounds::add(ready, settings.safety_margin) <= g.deadline
}

/// How long running `jobs` jobs (`tokens` in all) takes on the quickest of
/// `candidates`' synchronous models, should a batch come back late: the
/// binding one of its rpm, tpm and concurrency, plus one answer's latency.
/// The deadline guard cancels a batch this long (and the safety margin)
/// before the earliest deadline of its jobs.
pub fn sync_fallback_time(
    catalog: &Catalog,
    capacity: &[ProviderCapacity],
    candidates: &[ModelId],
    jobs: u64,
    tokens: u64,
) -> Duration {
    let n = jobs.max(1) as f64;
    candidates
        .iter()
        .filter(|&&m| catalog.models[m].channel == crate::domain::pricing::Channel::Sync)
        .filter_map(|&m| capacity.get(catalog.models[m].provider))
        .map(|c| {
            let usable = (1.0 - c.reserve).clamp(0.05, 1.0);
            let attempts = n / c.success_rate.clamp(0.05, 1.0);
            let latency = c.latency.as_secs_f64();
            let by_rpm = c
                .rpm
                .map_or(0.0, |r| attempts / (r * usable).max(1e-9) * 60.0);
            let by_tpm = c
                .tpm
                .map_or(0.0, |t| tokens as f64 / (t * usable).max(1e-9) * 60.0);
            let by_conc = c
                .concurrency
                .map_or(0.0, |k| attempts * latency / f64::from(k.max(1)));
            let secs = by_rpm.max(by_tpm).max(by_conc) + latency;
            Duration::from_secs_f64(secs.clamp(0.0, bounds::MAX_CONFIG_DURATION.as_secs_f64()))
        })
        .min()
        // No synchronous model: a late batch cannot be made up for.
        .unwrap_or(bounds::MAX_CONFIG_DURATION)
}

/// The eligible model whose provider answers fastest (ties: cheapest list price).
pub fn fastest_model(
    catalog: &Catalog,
    capacity: &[ProviderCapacity],
    candidates: &[ModelId],
) -> ModelId {
    // Synchronous rows first (a batch answers in minutes to hours), then
    // available providers (an unavailable one cannot run anything now),
    // then the fastest, then the cheapest.
    let key = |m: ModelId| {
        let c = capacity.get(catalog.models[m].provider);
        (
            catalog.is_batch(m),
            c.is_some_and(|c| c.unavailable_until.is_some()),
            c.map_or(Duration::ZERO, |c| c.latency),
        )
    };
    *candidates
        .iter()
        .min_by(|&&a, &&b| {
            key(a).cmp(&key(b)).then(
                catalog.models[a]
                    .list
                    .input_per_mtok
                    .total_cmp(&catalog.models[b].list.input_per_mtok),
            )
        })
        .expect("a group has at least one candidate")
}

type Solved = (Vec<Allocation>, Vec<(usize, f64)>);
/// (attempts, tokens, concurrency service-seconds) of one provider in one slot.
type Cap = (f64, f64, f64);
/// Terms of one LP constraint row.
type Terms = Vec<(microlp::Variable, f64)>;

#[allow(clippy::too_many_arguments)]
fn solve_lp(
    groups: &[JobGroup],
    options: &[Option_],
    caps: &BTreeMap<(ProviderId, usize), Cap>,
    slots: &[Slot],
    now: DateTime<Utc>,
    capacity: &[ProviderCapacity],
    catalog: &Catalog,
    settings: &PlanSettings,
) -> Option<Solved> {
    if groups.is_empty() {
        return Some((Vec::new(), Vec::new()));
    }
    // Costs are tiny (1e-6 USD per job); scale to keep the LP well conditioned.
    let max_cost = options
        .iter()
        .map(|o| o.cost)
        .fold(0.0, f64::max)
        .max(1e-12);
    let scale = 1.0 / max_cost;
    let mut problem = Problem::new(OptimizationDirection::Minimize);
    problem.set_time_limit(settings.time_limit);
    // Among equal costs, earlier is better (less risk, results sooner): a
    // tie-break far below any real price difference. At an equal price a
    // synchronous row beats a batch row (answers sooner, no guard), also
    // when the spreading tiers below add to the synchronous row's cost.
    let coef = |o: &Option_| {
        let batch = if catalog.is_batch(o.model) { 8e-8 } else { 0.0 };
        o.cost * scale + o.slot as f64 * 1e-7 + batch
    };
    // A batch row has no capacity in the LP: a group's cheapest one can
    // take all of its jobs. So every other option of the group that costs
    // at least as much can never do better, and is left out (an exact
    // reduction; at 100,000 queued jobs it removes most of the columns).
    let mut unlimited = vec![f64::INFINITY; groups.len()];
    let mut cheapest_batch: Vec<Option<usize>> = vec![None; groups.len()];
    for (i, o) in options.iter().enumerate() {
        if catalog.is_batch(o.model) && coef(o) < unlimited[o.group] {
            unlimited[o.group] = coef(o);
            cheapest_batch[o.group] = Some(i);
        }
    }
    let options: Vec<&Option_> = options
        .iter()
        .enumerate()
        .filter(|&(i, o)| coef(o) < unlimited[o.group] || cheapest_batch[o.group] == Some(i))
        .map(|(_, o)| o)
        .collect();
    let vars: Vec<_> = options
        .iter()
        .map(|o| problem.add_var(coef(o), (0.0, f64::INFINITY)))
        .collect();
    // Overflow costs more than any real option, so it is used only when needed.
    let overflow: Vec<_> = groups
        .iter()
        .map(|_| problem.add_var(1000.0, (0.0, f64::INFINITY)))
        .collect();
    let mut by_group: Vec<Vec<(microlp::Variable, f64)>> = vec![Vec::new(); groups.len()];
    let mut by_cap: BTreeMap<(ProviderId, usize), (Terms, Terms, Terms)> = BTreeMap::new();
    for (o, &v) in options.iter().zip(&vars) {
        by_group[o.group].push((v, 1.0));
        if catalog.is_batch(o.model) {
            // Batches do not count against the synchronous limits.
            continue;
        }
        let (i, out) = groups[o.group].tokens_per_job();
        let p = catalog.models[o.model].provider;
        let attempts = attempts_per_job(capacity, p);
        let entry = by_cap.entry((p, o.slot)).or_default();
        entry.0.push((v, attempts));
        entry.1.push((v, i + out));
        entry
            .2
            .push((v, attempts * service_seconds(capacity, p, out)));
    }
    for (gi, mut terms) in by_group.into_iter().enumerate() {
        terms.push((overflow[gi], 1.0));
        problem.add_constraint(terms.as_slice(), ComparisonOp::Eq, groups[gi].jobs as f64);
    }
    // rpd over rolling days: the attempts planned in the slots of any 24 h
    // ending at a slot's end, plus the requests already in the provider's
    // window while that day still overlaps now, are at most rpd. (A slot's
    // own row caps it at one day's allowance; without these rows the plan
    // could give every slot a whole day's allowance.)
    for (p, c) in capacity.iter().enumerate() {
        let Some(rpd) = c.rpd else { continue };
        for (k, end) in slots.iter().map(|s| s.end).enumerate() {
            let from = end - chrono::Duration::hours(24);
            let terms: Vec<(microlp::Variable, f64)> = (0..=k)
                .filter(|&j| slots[j].start >= from)
                .filter_map(|j| by_cap.get(&(p, j)))
                .flat_map(|(requests, _, _)| requests.iter().copied())
                .collect();
            if terms.is_empty() {
                continue;
            }
            let used = if from < now { c.rpd_used } else { 0.0 };
            problem.add_constraint(terms.as_slice(), ComparisonOp::Le, (rpd - used).max(0.0));
        }
    }
    // Equal prices spread over providers by capacity: in the first slot
    // (what the dispatcher starts now), a provider's requests are priced in
    // tiers of 1/64, 1/64, 1/32, …, 1/2 of its request capacity at 1..7 × a
    // cost far below any price difference and below the tie-break between
    // slots. A cheaper provider still takes all it can, and nothing moves to
    // a later slot to spread; but among equal prices the LP fills every
    // provider's small tiers before anyone's large ones, so each gets work in
    // proportion to its capacity (the run ends when all do) instead of one
    // taking the whole group while the others idle.
    for (&(p, slot), (requests, _, _)) in &by_cap {
        let cap = caps.get(&(p, slot)).map_or(f64::INFINITY, |c| c.0);
        if slot != 0 || !cap.is_finite() || cap <= 0.0 || requests.is_empty() {
            continue;
        }
        let mut sum: Vec<(microlp::Variable, f64)> = requests.clone();
        for (k, share) in [64.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0]
            .into_iter()
            .enumerate()
        {
            let y = problem.add_var(1e-8 * (k + 1) as f64, (0.0, cap / share));
            sum.push((y, -1.0));
        }
        problem.add_constraint(sum.as_slice(), ComparisonOp::Le, 0.0);
    }
    for (key, (requests, tokens, seconds)) in by_cap {
        let (req_cap, tok_cap, sec_cap) =
            caps.get(&key)
                .copied()
                .unwrap_or((f64::INFINITY, f64::INFINITY, f64::INFINITY));
        if sec_cap.is_finite() {
            problem.add_constraint(seconds.as_slice(), ComparisonOp::Le, sec_cap);
        }
        if req_cap.is_finite() {
            problem.add_constraint(requests.as_slice(), ComparisonOp::Le, req_cap);
        }
        if tok_cap.is_finite() {
            problem.add_constraint(tokens.as_slice(), ComparisonOp::Le, tok_cap);
        }
    }
    // microlp documents that it may panic on hard problems; a plan must not
    // take the daemon down, so fall back to the greedy plan instead.
    let solution = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| problem.solve()))
        .ok()?
        .ok()?
        .into_solution()
        .ok()?;
    let allocations = options
        .iter()
        .zip(&vars)
        .filter_map(|(o, &v)| {
            let jobs = solution.var_value(v);
            (jobs > 1e-6).then_some(Allocation {
                group: o.group,
                model: o.model,
                slot: o.slot,
                jobs,
                cost_per_job: o.cost,
            })
        })
        .collect();
    let overflow = overflow
        .iter()
        .enumerate()
        .filter_map(|(g, &v)| {
            let jobs = solution.var_value(v);
            (jobs > 1e-6).then_some((g, jobs))
        })
        .collect();
    Some((allocations, overflow))
}

/// Fills the cheapest options first, most urgent groups first on ties. Used
/// when the LP fails; optimal when capacity does not bind.
fn solve_greedy(
    groups: &[JobGroup],
    options: &[Option_],
    caps: &BTreeMap<(ProviderId, usize), Cap>,
    capacity: &[ProviderCapacity],
    catalog: &Catalog,
) -> Solved {
    let mut left: Vec<f64> = groups.iter().map(|g| g.jobs as f64).collect();
    let mut caps = caps.clone();
    let mut order: Vec<&Option_> = options.iter().collect();
    order.sort_by(|a, b| {
        a.cost
            .total_cmp(&b.cost)
            .then(a.slot.cmp(&b.slot))
            .then(groups[a.group].deadline.cmp(&groups[b.group].deadline))
    });
    let mut allocations = Vec::new();
    for o in order {
        if left[o.group] <= 0.0 {
            continue;
        }
        if catalog.is_batch(o.model) {
            let fit = left[o.group].ceil();
            left[o.group] = 0.0;
            allocations.push(Allocation {
                group: o.group,
                model: o.model,
                slot: o.slot,
                jobs: fit,
                cost_per_job: o.cost,
            });
            continue;
        }
        let (i, out) = groups[o.group].tokens_per_job();
        let p = catalog.models[o.model].provider;
        let attempts = attempts_per_job(capacity, p);
        let secs = attempts * service_seconds(capacity, p, out);
        let cap = caps
            .entry((p, o.slot))
            .or_insert((f64::INFINITY, f64::INFINITY, f64::INFINITY));
        let fit = left[o.group]
            .min(cap.0 / attempts)
            .min(cap.1 / (i + out).max(1.0))
            .min(cap.2 / secs.max(1e-9))
            .floor();
        if fit >= 1.0 {
            cap.0 -= fit * attempts;
            cap.1 -= fit * (i + out);
            cap.2 -= fit * secs;
            left[o.group] -= fit;
            allocations.push(Allocation {
                group: o.group,
                model: o.model,
                slot: o.slot,
                jobs: fit,
                cost_per_job: o.cost,
            });
        }
    }
    let overflow = left
        .iter()
        .enumerate()
        .filter(|(_, l)| **l > 0.0)
        .map(|(g, l)| (g, *l))
        .collect();
    (allocations, overflow)
}

/// How many jobs of each (group, model) may start in the plan's first slot.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quotas {
    /// (group, model, jobs), most urgent group first.
    pub entries: Vec<(usize, ModelId, u64)>,
    /// The first slot ends here: re-plan then at the latest.
    pub until: Option<DateTime<Utc>>,
}

impl Quotas {
    /// The first slot's allocations, rounded up, plus overflow on each
    /// group's fastest model.
    pub fn from_plan(
        plan: &Plan,
        groups: &[JobGroup],
        catalog: &Catalog,
        capacity: &[ProviderCapacity],
    ) -> Quotas {
        let mut map: BTreeMap<(usize, ModelId), f64> = BTreeMap::new();
        for a in plan.allocations.iter().filter(|a| a.slot == 0) {
            *map.entry((a.group, a.model)).or_default() += a.jobs;
        }
        for &(g, jobs) in &plan.overflow {
            let m = fastest_model(catalog, capacity, &groups[g].candidates);
            *map.entry((g, m)).or_default() += jobs;
        }
        let mut entries: Vec<(usize, ModelId, u64)> = map
            .into_iter()
            .map(|((g, m), jobs)| (g, m, (jobs - 1e-6).ceil().max(0.0) as u64))
            .filter(|e| e.2 > 0)
            .collect();
        entries.sort_by_key(|&(g, _, _)| groups[g].deadline);
        Quotas {
            entries,
            until: plan.slots.first().map(|s| s.end),
        }
    }

    /// Takes one job of `group` for `model`, if the quota allows.
    pub fn take(&mut self, group: usize, model: ModelId) -> bool {
        match self
            .entries
            .iter_mut()
            .find(|e| e.0 == group && e.1 == model && e.2 > 0)
        {
            Some(e) => {
                e.2 -= 1;
                true
            }
            None => false,
        }
    }
}

/// Queued jobs of one route and size bin whose deadlines fall in one fixed
/// bucket, as the queue reports them (`GROUP BY route_key, size_bin,
/// deadline / bucket`).
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedBucket {
    pub route_key: String,
    /// [`crate::domain::estimate::size_bin`] of the jobs' expected output.
    pub size_bin: i64,
    /// Deadlines in `[deadline_from, deadline_to)` (Unix ms).
    pub deadline_from: i64,
    pub deadline_to: i64,
    pub jobs: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub min_deadline: i64,
}

/// The queue summary the daemon's SQL produces (`GROUP BY route_key,
/// size_bin, deadline / BUCKET_MS`), computed from jobs in memory: (route
/// key, deadline ms, estimated input tokens, expected output tokens) each.
/// The bin is of the expected output as estimated at ingest (before any
/// learned ratio), as the store records it.
pub fn bucket_jobs<'a>(
    jobs: impl IntoIterator<Item = (&'a str, i64, u64, u64)>,
) -> Vec<QueuedBucket> {
    let mut map: BTreeMap<(&'a str, i64, i64), QueuedBucket> = BTreeMap::new();
    for (key, deadline, input, output) in jobs {
        let b = deadline.div_euclid(BUCKET_MS);
        let size_bin = crate::domain::estimate::size_bin(output);
        let e = map
            .entry((key, size_bin, b))
            .or_insert_with(|| QueuedBucket {
                route_key: key.to_string(),
                size_bin,
                deadline_from: b * BUCKET_MS,
                deadline_to: (b + 1) * BUCKET_MS,
                jobs: 0,
                input_tokens: 0,
                output_tokens: 0,
                min_deadline: deadline,
            });
        e.jobs += 1;
        e.input_tokens += input;
        e.output_tokens += output;
        e.min_deadline = e.min_deadline.min(deadline);
    }
    map.into_values().collect()
}

/// A plan of the queue, with the groups it was made for and the routes no
/// configured model can serve.
#[derive(Debug, Clone)]
pub struct QueuePlan {
    pub groups: Vec<PlannedGroup>,
    pub plan: Plan,
    /// (route key, why it cannot be served).
    pub unroutable: Vec<(String, String)>,
}

impl QueuePlan {
    /// The groups as the planner saw them.
    pub fn job_groups(&self) -> Vec<JobGroup> {
        self.groups.iter().map(|g| g.group.clone()).collect()
    }
}

/// Plans the queue from its summary: the one path from queued buckets to a
/// plan, for the daemon, `nightshift plan`, the HTTP API and the simulator.
/// `output_scale` gives the learned output-token ratio of a route;
/// `veto` may refuse a route's candidates (e.g. every provider disabled).
pub fn plan_queue(
    buckets: &[QueuedBucket],
    catalog: &Catalog,
    capacity: &[ProviderCapacity],
    now: DateTime<Utc>,
    settings: &PlanSettings,
    output_scale: impl Fn(&str) -> f64,
    veto: impl Fn(&[ModelId]) -> Option<String>,
) -> QueuePlan {
    let (groups, unroutable) = build_groups(buckets, now, settings, output_scale, |key| {
        let c = crate::domain::job::RouteKey::resolve(key, catalog)?;
        match veto(&c.models) {
            Some(why) => Err(why),
            None => Ok((c.models, c.reference)),
        }
    });
    let job_groups: Vec<JobGroup> = groups.iter().map(|g| g.group.clone()).collect();
    let plan = plan(&job_groups, catalog, capacity, now, settings);
    QueuePlan {
        groups,
        plan,
        unroutable,
    }
}

/// Width of the queue's deadline buckets.
pub const BUCKET_MS: i64 = 15 * 60 * 1000;

/// A planned group and how to find its jobs in the queue: a route's jobs of
/// one size bin with deadlines in `[deadline_from, deadline_to)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannedGroup {
    pub route_key: String,
    pub size_bin: i64,
    pub deadline_from: i64,
    pub deadline_to: i64,
    /// The class's reference model, for list cost.
    pub reference: ModelId,
    pub group: JobGroup,
}

/// Merges queue buckets into planner groups: per route and size bin,
/// deadline buckets as wide as the slots where the deadlines fall (finer distinctions would
/// change little in the plan and cost LP size). `resolve` gives a route's
/// candidates and reference model, or an error if it no longer has any.
pub fn build_groups<E>(
    buckets: &[QueuedBucket],
    now: DateTime<Utc>,
    settings: &PlanSettings,
    output_scale: impl Fn(&str) -> f64,
    mut resolve: impl FnMut(&str) -> Result<(Vec<ModelId>, ModelId), E>,
) -> (Vec<PlannedGroup>, Vec<(String, E)>) {
    let mut merged: BTreeMap<(String, i64, i64), PlannedGroup> = BTreeMap::new();
    let mut resolved: BTreeMap<String, Option<(Vec<ModelId>, ModelId)>> = BTreeMap::new();
    let mut errors = Vec::new();
    for b in buckets {
        let route =
            resolved
                .entry(b.route_key.clone())
                .or_insert_with(|| match resolve(&b.route_key) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        errors.push((b.route_key.clone(), e));
                        None
                    }
                });
        let Some((candidates, reference)) = route else {
            continue;
        };
        let from = Utc
            .timestamp_millis_opt(b.deadline_from)
            .single()
            .unwrap_or(now);
        let key_start = align_down(from, settings.step_at(now, from)).timestamp_millis();
        let scale = output_scale(&b.route_key);
        let output = (b.output_tokens as f64 * scale).round() as u64;
        let entry = merged
            .entry((b.route_key.clone(), b.size_bin, key_start))
            .or_insert_with(|| PlannedGroup {
                route_key: b.route_key.clone(),
                size_bin: b.size_bin,
                deadline_from: b.deadline_from,
                deadline_to: b.deadline_to,
                reference: *reference,
                group: JobGroup {
                    candidates: candidates.clone(),
                    jobs: 0,
                    input_tokens: 0,
                    output_tokens: 0,
                    release: now,
                    deadline: Utc
                        .timestamp_millis_opt(b.min_deadline)
                        .single()
                        .unwrap_or(now),
                },
            });
        entry.deadline_from = entry.deadline_from.min(b.deadline_from);
        entry.deadline_to = entry.deadline_to.max(b.deadline_to);
        entry.group.jobs += b.jobs;
        entry.group.input_tokens += b.input_tokens;
        entry.group.output_tokens += output;
        let d = Utc
            .timestamp_millis_opt(b.min_deadline)
            .single()
            .unwrap_or(now);
        entry.group.deadline = entry.group.deadline.min(d);
    }
    (merged.into_values().collect(), errors)
}

#[cfg(test)]
mod tests;
