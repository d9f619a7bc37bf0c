//! The dispatch step, pure: given the plan's quotas for its first slot, the
//! queued jobs of each planned group, the rate limits, budgets, provider
//! health and what has been observed, decide what starts now, on which
//! model, what fails without being sent, and when to look again.
//!
//! The daemon's loop ([`super::Dispatcher`]) and the simulator
//! ([`crate::simulate`]) both call [`step`] and then [`settle`] when an
//! attempt ends, and apply the returned actions to their queue (SQLite or a
//! virtual one), so the simulator's costs are the daemon's. Nothing here
//! reads the clock: `now` is an argument.
//!
//! Every capacity [`step`] takes for a start (a rate-limiter slot and
//! tokens, a budget charge, a half-open probe) is given back by exactly one
//! of [`settle`] (the attempt ended), [`settle_lost`] (its task died) or
//! [`undo_start`] (the start was never recorded).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::dispatch::budget::BudgetState;
use crate::dispatch::limits::RateLimits;
use crate::dispatch::reliability::{Health, Signals, Verdict};
use crate::domain::pricing::{Catalog, Channel, ModelId, ProviderId, sustained_per_minute};
use crate::plan::{PlannedGroup, ProviderCapacity, Quotas};

/// How many jobs of one group one step starts at most.
pub const BATCH: usize = 256;

/// How long to wait when nothing else is due.
pub const IDLE: Duration = Duration::from_secs(1);

/// Exponentially weighted moving average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    pub value: f64,
    weight: f64,
}

impl Ewma {
    pub fn new(value: f64) -> Ewma {
        Ewma {
            value,
            weight: 0.05,
        }
    }

    pub fn observe(&mut self, x: f64) {
        if x.is_finite() {
            self.value += self.weight * (x - self.value);
        }
    }
}

/// A provider's fraction of requests that succeed, seen over two horizons.
///
/// The planner turns the success rate into capacity (a job takes 1 ÷ it
/// attempts), and what it moves to a dearer provider because of a dip is
/// sent and paid for: it does not come back when the rate recovers. A short
/// average (20 answers) on a provider failing a quarter of its requests
/// wanders between about 0.6 and 0.9, and each dip handed hundreds of jobs to
/// the dearer provider (issue 10's `flaky` scenario: 2,373 of 4,000 jobs on
/// it, against ~800 needed). So the plan's figure is a long one: the
/// decayed count of the last ~1,000 answers, starting from 50 answers' worth of
/// full success so that the first few failures move little (it errs towards
/// the cheap provider, whose leftovers the dear one can still take at the
/// end). Whether a provider is failing most of what it is sent *now* (the
/// circuit breaker's question, [`Health::plan_excluded_until`]) is the short
/// average's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuccessRate {
    recent: Ewma,
    successes: f64,
    answers: f64,
}

impl SuccessRate {
    /// Answers the long figure remembers (its decay is 1 − 1/this per answer).
    const HORIZON: f64 = 1000.0;
    /// Answers of full success it starts with.
    const PRIOR: f64 = 50.0;

    pub fn new() -> SuccessRate {
        SuccessRate {
            recent: Ewma::new(1.0),
            successes: Self::PRIOR,
            answers: Self::PRIOR,
        }
    }

    pub fn observe(&mut self, succeeded: bool) {
        let x = if succeeded { 1.0 } else { 0.0 };
        self.recent.observe(x);
        let keep = 1.0 - 1.0 / Self::HORIZON;
        self.successes = self.successes * keep + x;
        self.answers = self.answers * keep + 1.0;
    }

    /// The long-run rate the plan's capacity is discounted by.
    pub fn planned(&self) -> f64 {
        (self.successes / self.answers).clamp(0.0, 1.0)
    }

    /// The rate over the last ~20 answers.
    pub fn recent(&self) -> f64 {
        self.recent.value
    }
}

impl Default for SuccessRate {
    fn default() -> SuccessRate {
        SuccessRate::new()
    }
}

/// What the dispatcher has learned about providers and routes. Parallel to
/// `catalog.providers` (except `output_ratio`, by route key).
#[derive(Debug, Clone)]
pub struct Observed {
    pub latency_s: Vec<Ewma>,
    pub success: Vec<SuccessRate>,
    /// Provider-reported input tokens ÷ our estimate, per provider.
    pub input_ratio: Vec<Ewma>,
    /// Actual output tokens ÷ expected, per route key (model class).
    pub output_ratio: HashMap<String, Ewma>,
    /// Pauses, circuit breakers, disabled providers.
    pub health: Vec<Health>,
    /// Per provider: its flex channel refused a request; no flex before then.
    pub flex_until: Vec<Option<DateTime<Utc>>>,
    /// Per provider: what its batches showed (turnarounds, a refused creation).
    pub batches: Vec<BatchSeen>,
    /// The earliest time a retried job becomes due again: re-plan then.
    pub next_retry: Option<DateTime<Utc>>,
    /// Spend against the budgets in their current periods.
    pub budget: BudgetState,
}

impl Observed {
    /// Nothing observed yet: the configured latencies, full success.
    pub fn new(initial_latency: &[Duration], budget: BudgetState) -> Observed {
        let n = initial_latency.len();
        Observed {
            latency_s: initial_latency
                .iter()
                .map(|l| Ewma::new(l.as_secs_f64()))
                .collect(),
            success: vec![SuccessRate::new(); n],
            input_ratio: vec![Ewma::new(1.0); n],
            output_ratio: HashMap::new(),
            health: vec![Health::default(); n],
            flex_until: vec![None; n],
            batches: vec![BatchSeen::default(); n],
            next_retry: None,
            budget,
        }
    }

    /// The planner's view of each provider now: configured limits, observed
    /// latency, success rate and token ratio, and no capacity while it is
    /// out of health or out of budget.
    pub fn capacities(&self, catalog: &Catalog, now: DateTime<Utc>) -> Vec<ProviderCapacity> {
        catalog
            .providers
            .iter()
            .enumerate()
            .map(|(p, info)| ProviderCapacity {
                latency: Duration::from_secs_f64(self.latency_s[p].value.clamp(0.001, 86_400.0)),
                success_rate: self.success[p].planned(),
                input_token_ratio: self.input_ratio[p].value.clamp(0.25, 4.0),
                unavailable_until: {
                    let health = self.health[p].plan_excluded_until(now, self.success[p].recent());
                    let budget = (self.budget.remaining(p) <= 1e-9)
                        .then(|| self.budget.renews_at(p, 1e-9, now));
                    health.max(budget)
                },
                flex_unavailable_until: self.flex_off_until(p, now),
                batch_turnaround: self.batches.get(p).map_or(Duration::ZERO, |b| {
                    b.turnaround(info.batch.as_ref().map(|t| t.expected_turnaround))
                }),
                batch_unavailable_until: self
                    .batches
                    .get(p)
                    .and_then(|b| b.refused_until)
                    .filter(|&t| t > now),
                ..ProviderCapacity::from_limits(&info.limits, Duration::ZERO, 0.0)
            })
            .collect()
    }

    /// [`Observed::capacities`] for a plan: with the requests each provider
    /// already has in its rolling 24 h (`rpd`), so that the plan does not
    /// hand out a day's allowance that was spent before it.
    pub fn plan_capacities(
        &self,
        catalog: &Catalog,
        limits: &mut RateLimits,
        now: DateTime<Utc>,
    ) -> Vec<ProviderCapacity> {
        let mut caps = self.capacities(catalog, now);
        for (p, c) in caps.iter_mut().enumerate() {
            // A minute carries what the limiter sustains, not the whole
            // rpm: at rpm 25, 24.6 (a plan counting on 25 holds back work
            // the provider never gets to in time). The figures are net of
            // the reserve.
            let configured = &catalog.providers[p].limits;
            c.rpm = configured
                .rpm
                .map(|r| sustained_per_minute(f64::from(r), c.reserve));
            c.tpm = configured
                .tpm
                .map(|t| sustained_per_minute(t as f64, c.reserve));
            c.reserve = 0.0;
            if let Some(day) = limits
                .provider(p)
                .usage(now.timestamp_millis())
                .day_requests
            {
                c.rpd_used = day.used as f64;
                // The limiter admits `rpd` × (1 − reserve) a day, in whole
                // requests, not `rpd`: a plan counting on the difference holds jobs
                // for requests that are never admitted, until their
                // deadline passes (two of 200 here, a job expired).
                c.rpd = Some(day.usable as f64);
            }
        }
        caps
    }

    /// Until when `provider`'s flex channel is backed off after a refusal,
    /// if it still is at `now`.
    pub fn flex_off_until(
        &self,
        provider: ProviderId,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.flex_until
            .get(provider)
            .copied()
            .flatten()
            .filter(|&t| t > now)
    }

    /// Whether `model` may be sent now as far as its channel goes: a flex
    /// row not while its provider's flex channel is backed off.
    pub fn channel_open(&self, catalog: &Catalog, model: ModelId, now: DateTime<Utc>) -> bool {
        let m = &catalog.models[model];
        m.channel != crate::domain::pricing::Channel::Flex
            || self.flex_off_until(m.provider, now).is_none()
    }

    /// Output tokens ÷ expected for a route, bounded.
    pub fn output_scale(&self, route_key: &str) -> f64 {
        self.output_ratio
            .get(route_key)
            .map_or(1.0, |e| e.value.clamp(0.05, 4.0))
    }

    /// The tokens to charge the rate limiter for a job: its estimate,
    /// calibrated by what this provider and route have actually reported.
    pub fn charge(&self, provider: ProviderId, route_key: &str, input: u64, output: u64) -> u64 {
        let tokens = input as f64 * self.input_ratio[provider].value.clamp(0.25, 4.0)
            + output as f64 * self.output_scale(route_key);
        // Bounded: a hostile estimate must not put a bucket ~1e19 in debt.
        tokens.ceil().clamp(0.0, u32::MAX as f64) as u64
    }
}

/// What a provider's batches have shown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchSeen {
    /// Seconds from creation to results of the last batches that ended
    /// (at most [`BatchSeen::KEPT`]).
    pub turnarounds_s: std::collections::VecDeque<f64>,
    /// Its Batch API refused a creation (429): no batch before then.
    pub refused_until: Option<DateTime<Utc>>,
}

impl BatchSeen {
    /// Turnarounds kept.
    pub const KEPT: usize = 50;
    /// Batches that must have ended before observations replace the prior.
    pub const MIN_SAMPLES: usize = 5;
    /// The quantile planned with.
    pub const QUANTILE: f64 = 0.9;

    pub fn observe(&mut self, turnaround: Duration) {
        if self.turnarounds_s.len() == Self::KEPT {
            self.turnarounds_s.pop_front();
        }
        self.turnarounds_s.push_back(turnaround.as_secs_f64());
    }

    /// The turnaround to plan with: the 90th percentile of what was
    /// observed once [`BatchSeen::MIN_SAMPLES`] batches ended, before then
    /// the larger of `prior` and the longest observed.
    pub fn turnaround(&self, prior: Option<Duration>) -> Duration {
        let prior = prior.unwrap_or(Duration::from_secs(3600)).as_secs_f64();
        let mut seen: Vec<f64> = self.turnarounds_s.iter().copied().collect();
        seen.sort_by(f64::total_cmp);
        let secs = if seen.len() < Self::MIN_SAMPLES {
            seen.last().copied().unwrap_or(0.0).max(prior)
        } else {
            let i = ((seen.len() as f64 * Self::QUANTILE).ceil() as usize).clamp(1, seen.len());
            seen[i - 1]
        };
        Duration::from_secs_f64(secs.clamp(0.0, 30.0 * 86_400.0))
    }
}

/// A queued job as the step sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: i64,
    pub est_input_tokens: u64,
    pub est_output_tokens: u64,
    /// Unix milliseconds.
    pub deadline_ms: i64,
    pub max_cost_usd: Option<f64>,
}

/// The plan the step follows: its groups and the first slot's quotas
/// (serialized, it is what a planning daemon publishes to the others on a
/// shared queue).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CurrentPlan {
    pub groups: Vec<PlannedGroup>,
    pub quotas: Quotas,
}

impl CurrentPlan {
    /// For each group, how many queued jobs the caller should read for the
    /// next [`step`]: what its quotas still allow, no more than their models
    /// could start now (free concurrency slots, whole requests in the rpm
    /// and rpd buckets; none on a paused provider), and at most [`BATCH`].
    /// Reading more would only read job bodies the step cannot start: with
    /// every slot taken, a pass after one answer reads one job, not 256.
    pub fn wanted(
        &self,
        catalog: &Catalog,
        limits: &mut RateLimits,
        observed: &Observed,
        now: DateTime<Utc>,
    ) -> Vec<usize> {
        let now_ms = now.timestamp_millis();
        let mut wanted = vec![0usize; self.groups.len()];
        let mut batched = vec![0usize; self.groups.len()];
        for &(g, model, n) in &self.quotas.entries {
            if catalog.is_batch(model) {
                // A batch takes its whole quota at once, up to its size.
                let max = catalog.providers[catalog.models[model].provider]
                    .batch
                    .as_ref()
                    .map_or(0, |b| b.max_requests as usize);
                batched[g] = (batched[g] + n as usize).min(max);
                continue;
            }
            let provider = catalog.models[model].provider;
            let open = observed.health[provider]
                .available_from(now)
                .is_some_and(|t| t <= now);
            let startable = if open {
                limits.startable_now(provider, model, now_ms) as usize
            } else {
                0
            };
            wanted[g] = (wanted[g] + (n as usize).min(startable)).min(BATCH);
        }
        for (w, b) in wanted.iter_mut().zip(batched) {
            *w += b;
        }
        wanted
    }
}

/// What the step decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send job `job` to `model`. `tokens` and `cost` were charged to the
    /// rate limits and the budget; `reference` prices the job's list cost.
    Start {
        job: i64,
        group: usize,
        model: ModelId,
        reference: ModelId,
        tokens: u64,
        cost: f64,
    },
    /// Fail the queued job without sending it.
    Fail {
        job: i64,
        code: &'static str,
        message: String,
    },
}

/// The step's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub actions: Vec<Action>,
    /// A provider ran out of budget: plan again without it, now.
    pub replan: bool,
    /// Quota and capacity are left: call again right away (more jobs than
    /// one batch were due).
    pub more: bool,
    /// When something becomes due if nothing else happens (a pause ends, a
    /// rate limit frees up, a budget renews); `None`: only events.
    pub next: Option<DateTime<Utc>>,
}

/// The inputs of one step. `due[g]` holds group `g`'s queued jobs, most
/// urgent first, as many as `wanted[g]` asked for, where `wanted` is what
/// [`CurrentPlan::wanted`] returned for this plan, these limits and this
/// `now`. Jobs are taken from the front, so a job is started at most once
/// per step whichever model's quota takes it.
pub struct StepInput<'a> {
    pub catalog: &'a Catalog,
    pub plan: &'a mut CurrentPlan,
    pub wanted: Vec<usize>,
    pub due: Vec<Vec<Candidate>>,
    pub limits: &'a mut RateLimits,
    pub observed: &'a mut Observed,
    /// The planner's safety margin before a deadline.
    pub safety_margin: Duration,
    pub now: DateTime<Utc>,
}

fn later(a: &mut Option<DateTime<Utc>>, t: DateTime<Utc>) {
    *a = Some(a.map_or(t, |x| x.min(t)));
}

/// Decides what starts now. See the module documentation.
pub fn step(input: StepInput<'_>) -> Step {
    let StepInput {
        catalog,
        plan,
        wanted,
        due,
        limits,
        observed,
        safety_margin,
        now,
    } = input;
    let now_ms = now.timestamp_millis();
    // A group that returned fewer jobs than asked has no more queued now;
    // one that returned all it was asked for may have more (the read is
    // capped): its quota stays for the next step.
    let mut due: Vec<std::collections::VecDeque<Candidate>> =
        due.into_iter().map(Into::into).collect();
    due.resize_with(plan.groups.len(), Default::default);
    let all_read: Vec<bool> = due.iter().zip(&wanted).map(|(d, &w)| d.len() < w).collect();
    let mut actions = Vec::new();
    let mut next: Option<DateTime<Utc>> = None;
    let mut blocked: HashSet<ProviderId> = HashSet::new();
    let mut blocked_models: HashSet<ModelId> = HashSet::new();
    let mut replan = false;
    let margin = chrono::Duration::from_std(safety_margin).unwrap_or(chrono::Duration::zero());

    for idx in 0..plan.quotas.entries.len() {
        let (g, model, remaining) = plan.quotas.entries[idx];
        let provider = catalog.models[model].provider;
        let batch = catalog.is_batch(model);
        if remaining == 0
            || blocked_models.contains(&model)
            || (!batch && blocked.contains(&provider))
        {
            continue;
        }
        if batch {
            if let Some(t) = observed
                .batches
                .get(provider)
                .and_then(|b| b.refused_until)
                .filter(|&t| t > now)
            {
                // Batch creation was refused lately: not before the pause
                // ends (the next plan may move these jobs elsewhere).
                blocked_models.insert(model);
                later(&mut next, t);
                continue;
            }
            // A batch row: outside the synchronous rate limits, circuit and
            // probes (the planner keeps it out while the provider is
            // disabled or out of budget).
            take_batch(
                catalog,
                plan,
                idx,
                &mut due[g],
                all_read[g],
                observed,
                now,
                &mut actions,
            );
            continue;
        }
        if let Some(t) = observed
            .flex_off_until(provider, now)
            .filter(|_| !observed.channel_open(catalog, model, now))
        {
            // Flex refused a request lately: the next plan moves these jobs
            // to the standard channel, or waits for flex if they can.
            blocked_models.insert(model);
            later(&mut next, t);
            continue;
        }
        match observed.health[provider].available_from(now) {
            Some(t) if t <= now => {}
            until => {
                // Paused, circuit open or disabled: the next plan moves its jobs.
                blocked.insert(provider);
                if let Some(t) = until {
                    later(&mut next, t);
                }
                continue;
            }
        }
        if limits.startable_now(provider, model, now_ms) == 0 {
            // Full (so `wanted` read nothing for it): look again when a
            // request fits, or when an answer frees a slot.
            blocked_models.insert(model);
            if let Some(wait) = limits.ready_in_ms(provider, model, 1, now_ms) {
                later(&mut next, now + chrono::Duration::milliseconds(wait.max(1)));
            }
            continue;
        }
        let group = &plan.groups[g];
        let mut taken = 0u64;
        while taken < remaining {
            let Some(job) = due[g].front().cloned() else {
                if all_read[g] {
                    // Fewer queued jobs than planned, and all of them taken:
                    // nothing more of this quota can start now.
                    plan.quotas.entries[idx].2 = 0;
                }
                break;
            };
            let (input_t, output_t) = (job.est_input_tokens, job.est_output_tokens);
            let cost_on = |m: ModelId| catalog.cost_at(m, now, input_t, output_t);
            let within_cap = |m: ModelId| job.max_cost_usd.is_none_or(|max| cost_on(m) <= max);
            let size = input_t.saturating_add(output_t);
            let suits = |m: ModelId| within_cap(m) && catalog.request_fits(m, size);
            // The planned model does not suit this job (above its cap, or its
            // tpm cannot take a request this large): the cheapest eligible
            // model that suits it and can take it now, or fail only if no
            // eligible model suits it at all.
            let mut chosen = model;
            if !suits(model) {
                let mut fitting: Vec<(f64, ModelId)> = group
                    .group
                    .candidates
                    .iter()
                    .map(|&m| (cost_on(m), m))
                    .filter(|&(_, m)| suits(m))
                    .collect();
                fitting.sort_by(|a, b| a.0.total_cmp(&b.0));
                if fitting.is_empty() {
                    due[g].pop_front();
                    let action = match job.max_cost_usd {
                        Some(max) if !group.group.candidates.iter().any(|&m| within_cap(m)) => {
                            Action::Fail {
                                job: job.id,
                                code: "max_cost_exceeded",
                                message: format!(
                                    "every eligible model costs more than max_cost_usd ${max:.6} \
                                     (the planned {} an estimated ${:.6})",
                                    catalog.qualified_name(model),
                                    cost_on(model)
                                ),
                            }
                        }
                        _ => Action::Fail {
                            job: job.id,
                            code: "request_too_large",
                            message: format!(
                                "about {size} tokens is more than the tpm limit of every eligible \
                                 model{} takes in one request",
                                if job.max_cost_usd.is_some() {
                                    " within max_cost_usd"
                                } else {
                                    ""
                                }
                            ),
                        },
                    };
                    actions.push(action);
                    plan.quotas.take(g, model);
                    taken += 1;
                    continue;
                }
                let alternative = fitting.into_iter().map(|(_, m)| m).find(|&m| {
                    let p = catalog.models[m].provider;
                    !blocked.contains(&p)
                        && !blocked_models.contains(&m)
                        && observed.channel_open(catalog, m, now)
                        && observed.health[p].available_from(now) == Some(now)
                        && observed.budget.fits(p, cost_on(m))
                });
                match alternative {
                    Some(m) => chosen = m,
                    None => {
                        // It fits elsewhere, later: leave it queued for the
                        // next plan, and let this quota serve the next job.
                        due[g].pop_front();
                        continue;
                    }
                }
            }
            let provider = catalog.models[chosen].provider;
            let cost = cost_on(chosen);
            if !observed.budget.fits(provider, cost) {
                // Over budget here. If another eligible provider still has
                // budget, re-plan (this one now counts as unavailable);
                // otherwise wait for the earliest renewal, unless the
                // deadline comes first.
                let others_fit = group.group.candidates.iter().any(|&m| {
                    let p = catalog.models[m].provider;
                    p != provider && observed.budget.fits(p, cost_on(m))
                });
                if others_fit {
                    blocked.insert(provider);
                    replan = true;
                    break;
                }
                let renews = group
                    .group
                    .candidates
                    .iter()
                    .map(|&m| {
                        let p = catalog.models[m].provider;
                        observed.budget.renews_at(p, cost_on(m), now)
                    })
                    .min()
                    .unwrap_or(now);
                if job.deadline_ms
                    <= renews
                        .checked_add_signed(margin)
                        .unwrap_or(DateTime::<Utc>::MAX_UTC)
                        .timestamp_millis()
                {
                    due[g].pop_front();
                    actions.push(Action::Fail {
                        job: job.id,
                        code: "budget_exhausted",
                        message: format!(
                            "{}'s budget cannot pay the estimated ${cost:.6} before the deadline (it renews at {})",
                            catalog.providers[provider].name,
                            renews.to_rfc3339()
                        ),
                    });
                    plan.quotas.take(g, model);
                    taken += 1;
                    continue;
                }
                blocked.insert(provider);
                later(
                    &mut next,
                    renews.max(now + chrono::Duration::milliseconds(1)),
                );
                break;
            }
            if !observed.health[provider].admit(now) {
                // A half-open circuit admits one probe at a time.
                blocked.insert(provider);
                break;
            }
            let tokens = observed.charge(provider, &group.route_key, input_t, output_t);
            if !limits.try_acquire(provider, chosen, tokens, now_ms) {
                observed.health[provider].abandon_probe(now);
                // The provider's limits, or only this model's.
                if limits.provider(provider).ready_in_ms(tokens, now_ms) == Some(0) {
                    blocked_models.insert(chosen);
                } else {
                    blocked.insert(provider);
                }
                if let Some(wait) = limits.ready_in_ms(provider, chosen, tokens, now_ms) {
                    later(&mut next, now + chrono::Duration::milliseconds(wait.max(1)));
                }
                if chosen == model {
                    break;
                }
                // The alternative model is full: the job waits for the next plan.
                due[g].pop_front();
                continue;
            }
            due[g].pop_front();
            plan.quotas.take(g, model);
            taken += 1;
            observed.budget.charge(provider, cost);
            actions.push(Action::Start {
                job: job.id,
                group: g,
                model: chosen,
                reference: group.reference,
                tokens,
                cost,
            });
        }
    }
    if replan {
        plan.quotas.until = Some(now);
    }
    let more = plan.quotas.entries.iter().any(|&(g, m, n)| {
        n > 0
            && !catalog.is_batch(m)
            && (!due[g].is_empty() || !all_read[g])
            && !blocked.contains(&catalog.models[m].provider)
            && !blocked_models.contains(&m)
    });
    Step {
        actions,
        replan,
        more,
        next,
    }
}

/// Takes the jobs of quota entry `idx` for its batch row: each within its
/// `max_cost_usd` there (a job above it stays queued for the next plan,
/// which puts it elsewhere) and within the provider's budget.
#[allow(clippy::too_many_arguments)]
fn take_batch(
    catalog: &Catalog,
    plan: &mut CurrentPlan,
    idx: usize,
    due: &mut std::collections::VecDeque<Candidate>,
    all_read: bool,
    observed: &mut Observed,
    now: DateTime<Utc>,
    actions: &mut Vec<Action>,
) {
    let (g, model, remaining) = plan.quotas.entries[idx];
    let provider = catalog.models[model].provider;
    let reference = plan.groups[g].reference;
    let mut taken = 0u64;
    let mut skipped = Vec::new();
    while taken < remaining {
        let Some(job) = due.pop_front() else {
            if all_read {
                plan.quotas.entries[idx].2 = 0;
            }
            break;
        };
        let cost = catalog.cost_at(model, now, job.est_input_tokens, job.est_output_tokens);
        if job.max_cost_usd.is_some_and(|max| cost > max) || !observed.budget.fits(provider, cost) {
            skipped.push(job);
            continue;
        }
        plan.quotas.take(g, model);
        taken += 1;
        observed.budget.charge(provider, cost);
        actions.push(Action::Start {
            job: job.id,
            group: g,
            model,
            reference,
            tokens: 0,
            cost,
        });
    }
    // Left for the group's other quotas (another channel may suit them).
    for job in skipped.into_iter().rev() {
        due.push_front(job);
    }
}

/// An attempt in flight: what [`step`] charged for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub job: i64,
    pub provider: ProviderId,
    /// `None` if the model left the configuration meanwhile (a reload):
    /// only the provider's limits apply.
    pub model: Option<ModelId>,
    pub route_key: String,
    pub tokens: u64,
    pub cost: f64,
    pub est_input_tokens: u64,
    pub est_output_tokens: u64,
    /// When it was sent (Unix ms): its token charge is corrected there.
    pub sent_ms: i64,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub verdict: Verdict,
    pub signals: Signals,
    /// (input, output) tokens the provider reported.
    pub usage: Option<(u64, u64)>,
    /// What the attempt was billed.
    pub billed: f64,
    /// Time from send to answer (the provider call alone).
    pub latency: Duration,
    /// When the job becomes due again, if it was queued for a retry.
    pub retry_at: Option<DateTime<Utc>>,
    /// The attempt went to flex and flex refused it (429
    /// `resource_unavailable`).
    pub flex_refused: Option<FlexRefusal>,
}

/// A flex refusal within an attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlexRefusal {
    /// No flex on this provider for this long (its `flex.backoff`).
    pub backoff: Duration,
    /// The job was sent again on the standard channel within the same
    /// attempt (the answer is that request's); else it was queued again.
    pub fell_back: bool,
}

/// What a refused flex request may wait for: the attempt it was (this one
/// counted), how retries back off, and the safety margin.
#[derive(Debug, Clone, Copy)]
pub struct FlexWait<'a> {
    pub attempts: u32,
    pub retry: &'a crate::domain::policy::RetryPolicy,
    pub margin: Duration,
}

impl FlexRefusal {
    /// What a flex request on row `model` that flex refused becomes, as the
    /// daemon and the simulator both apply it: the standard row it is sent
    /// again on right away, or `None`: the job is queued again, and the
    /// next plan waits for flex or moves it. And the refusal to book in
    /// [`settle`] (its provider's flex back-off). `None` if `model` is not a
    /// flex row of a provider with flex terms.
    ///
    /// The job waits for flex when its deadline allows it: another attempt
    /// is left, and after this attempt's retry delay and the flex back-off
    /// (whichever is longer) a flex answer, which may take `flex.timeout`,
    /// still comes `margin` before the deadline. A refusal is not billed,
    /// so waiting costs nothing but time, while the standard channel costs
    /// 1/discount times as much. Otherwise it falls back at once, if the
    /// job's `max_cost_usd` allows the standard price at `dispatched_at`
    /// (else it is queued again all the same).
    pub fn of(
        catalog: &Catalog,
        model: ModelId,
        job: &Candidate,
        dispatched_at: DateTime<Utc>,
        wait: FlexWait<'_>,
    ) -> Option<(Option<ModelId>, FlexRefusal)> {
        use crate::domain::bounds::add;
        let m = &catalog.models[model];
        if m.channel != Channel::Flex {
            return None;
        }
        let terms = catalog.providers[m.provider].flex?;
        let pause = wait.retry.backoff(wait.attempts, 1.0).max(terms.backoff);
        let flex_again = add(add(add(dispatched_at, pause), terms.timeout), wait.margin);
        let may_wait = wait.attempts < wait.retry.max_attempts
            && flex_again.timestamp_millis() <= job.deadline_ms;
        let fallback = m.standard.filter(|&s| {
            !may_wait
                && job.max_cost_usd.is_none_or(|max| {
                    catalog.cost_at(
                        s,
                        dispatched_at,
                        job.est_input_tokens,
                        job.est_output_tokens,
                    ) <= max
                })
        });
        Some((
            fallback,
            FlexRefusal {
                backoff: terms.backoff,
                fell_back: fallback.is_some(),
            },
        ))
    }

    /// The attempt's verdict: a refusal not sent again is queued again (the
    /// next plan waits for flex, or moves the job); else the fallback's.
    pub fn verdict(refusal: Option<FlexRefusal>, answered: impl FnOnce() -> Verdict) -> Verdict {
        match refusal {
            Some(r) if !r.fell_back => Verdict::Retry { pause: None },
            _ => answered(),
        }
    }
}

/// Books an ended attempt: rate-limit correction, budget correction, health,
/// observations. Returns true if a provider's availability changed (re-plan).
pub fn settle(
    limits: &mut RateLimits,
    observed: &mut Observed,
    attempt: &Attempt,
    answer: &Answer,
    now: DateTime<Utc>,
) -> bool {
    let p = attempt.provider;
    // The budget was charged the estimate; correct it to what was billed.
    observed.budget.charge(p, answer.billed - attempt.cost);
    let health = &mut observed.health[p];
    // Sent when the provider call began: the answer took `latency`.
    let sent_at = now - chrono::Duration::from_std(answer.latency).unwrap_or_default();
    let refused_only = answer.flex_refused.is_some_and(|r| !r.fell_back);
    let mut changed = if refused_only {
        // A flex refusal says nothing about the provider's health (nor is
        // it its rate limit): no pause, no circuit-breaker failure.
        health.abandon_probe(now);
        false
    } else {
        health.record_sent(&answer.verdict, sent_at, now)
    };
    if let Some(r) = answer.flex_refused {
        let until = crate::domain::bounds::add(now, r.backoff);
        if let Some(slot) = observed.flex_until.get_mut(p) {
            *slot = Some(slot.map_or(until, |t| t.max(until)));
        }
        if r.fell_back {
            // Two requests went out for the one the step charged.
            limits.seed(
                p,
                attempt.model,
                crate::dispatch::limits::Sent {
                    at_ms: attempt.sent_ms,
                    requests: 1,
                    tokens: 0,
                },
                now.timestamp_millis(),
            );
        }
        changed = true;
    }
    let health = &mut observed.health[p];
    if let Some(pause) = answer
        .signals
        .pause()
        .filter(|_| answer.verdict == Verdict::Succeeded)
    {
        // A success that leaves a limit at zero: wait for its reset.
        changed |= health.pause(now, pause);
    }
    let actual = answer.usage.map(|(i, o)| i.saturating_add(o));
    limits.release(
        p,
        attempt.model.unwrap_or(usize::MAX),
        attempt.tokens,
        actual,
        attempt.sent_ms,
        now.timestamp_millis(),
    );
    observed.latency_s[p].observe(answer.latency.as_secs_f64());
    if let Some(at) = answer.retry_at {
        later(&mut observed.next_retry, at);
    }
    let succeeded = answer.verdict == Verdict::Succeeded;
    if !refused_only {
        observed.success[p].observe(succeeded);
    }
    if let Some((input, output)) = answer.usage {
        if attempt.est_input_tokens > 0 {
            observed.input_ratio[p].observe(input as f64 / attempt.est_input_tokens as f64);
        }
        if attempt.est_output_tokens > 0 {
            observed
                .output_ratio
                .entry(attempt.route_key.clone())
                .or_insert_with(|| Ewma::new(1.0))
                .observe(output as f64 / attempt.est_output_tokens as f64);
        }
    }
    changed
}

/// Books an attempt whose task died without an answer (a panic): its slot
/// and its budget charge are given back, and it counts as a failure of the
/// provider (a half-open probe that never returned reopens the circuit).
pub fn settle_lost(
    limits: &mut RateLimits,
    observed: &mut Observed,
    attempt: &Attempt,
    now: DateTime<Utc>,
) -> bool {
    let answer = Answer {
        verdict: Verdict::Retry { pause: None },
        signals: Signals::default(),
        usage: None,
        billed: 0.0,
        latency: Duration::ZERO,
        retry_at: None,
        flex_refused: None,
    };
    // Not a latency observation: keep the average.
    let latency = observed.latency_s[attempt.provider];
    let changed = settle(limits, observed, attempt, &answer, now);
    observed.latency_s[attempt.provider] = latency;
    changed
}

/// Gives back what [`step`] took for a start that was never recorded (the
/// job was cancelled meanwhile, or the store refused the write).
pub fn undo_start(
    catalog: &Catalog,
    limits: &mut RateLimits,
    observed: &mut Observed,
    action: &Action,
    now: DateTime<Utc>,
) {
    if let Action::Start {
        model,
        tokens,
        cost,
        ..
    } = action
    {
        let p = catalog.models[*model].provider;
        observed.budget.charge(p, -cost);
        if catalog.is_batch(*model) {
            // A batch start takes no rate-limit slot and no probe.
            return;
        }
        let now_ms = now.timestamp_millis();
        limits.release(p, *model, *tokens, Some(0), now_ms, now_ms);
        observed.health[p].abandon_probe(now);
    }
}

#[cfg(test)]
mod tests {
    //! The dispatch step on hand-written states: no store, no binary, no clock.
    use super::*;
    use crate::config::Config;
    use crate::dispatch::reliability::{RetryPolicy, next_attempt};
    use crate::plan::JobGroup;
    use std::path::Path;

    /// `cheap` (1.0/1.0 per Mtok, 2 concurrent, daily budget 1 µ$-ish when
    /// asked) and `dear` (3.0/3.0), one class over both.
    fn config(cheap_extra: &str) -> Config {
        let text = format!(
            r#"
[[providers]]
name = "cheap"
kind = "simulated"
concurrency = 2
{cheap_extra}

[[providers.models]]
name = "c1"
input_per_mtok = 1.0
output_per_mtok = 1.0

[[providers]]
name = "dear"
kind = "simulated"

[[providers.models]]
name = "d1"
input_per_mtok = 3.0
output_per_mtok = 3.0

[classes]
chat = ["cheap/c1", "dear/d1"]
"#
        );
        Config::parse(&text, "test.toml", Path::new(".")).unwrap()
    }

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn job(id: i64, deadline: DateTime<Utc>, max_cost: Option<f64>) -> Candidate {
        Candidate {
            id,
            est_input_tokens: 1000,
            est_output_tokens: 1000,
            deadline_ms: deadline.timestamp_millis(),
            max_cost_usd: max_cost,
        }
    }

    /// One group of the `chat` class with `quotas` (model, jobs).
    fn plan_for(c: &Config, jobs: u64, quotas: &[(ModelId, u64)]) -> CurrentPlan {
        let cheap = c.catalog.model_id("cheap/c1").unwrap();
        let dear = c.catalog.model_id("dear/d1").unwrap();
        CurrentPlan {
            groups: vec![PlannedGroup {
                route_key: "class:chat".into(),
                size_bin: 0,
                deadline_from: 0,
                deadline_to: i64::MAX,
                reference: dear,
                group: JobGroup {
                    candidates: vec![cheap, dear],
                    jobs,
                    input_tokens: 1000 * jobs,
                    output_tokens: 1000 * jobs,
                    release: t0(),
                    deadline: t0() + chrono::Duration::hours(1),
                },
            }],
            quotas: Quotas {
                entries: quotas.iter().map(|&(m, n)| (0, m, n)).collect(),
                until: Some(t0() + chrono::Duration::minutes(15)),
            },
        }
    }

    struct World {
        c: Config,
        limits: RateLimits,
        observed: Observed,
    }

    impl World {
        fn new(c: Config) -> World {
            let n = c.catalog.providers.len();
            let budget = BudgetState::new(c.budgets.clone(), t0(), |_, _| 0.0);
            World {
                limits: RateLimits::for_catalog(&c.catalog, t0().timestamp_millis()),
                observed: Observed::new(&vec![Duration::from_secs(1); n], budget),
                c,
            }
        }

        fn step(
            &mut self,
            plan: &mut CurrentPlan,
            due: Vec<Candidate>,
            now: DateTime<Utc>,
        ) -> Step {
            let wanted = plan.wanted(&self.c.catalog, &mut self.limits, &self.observed, now);
            step(StepInput {
                catalog: &self.c.catalog,
                plan,
                wanted,
                due: vec![due],
                limits: &mut self.limits,
                observed: &mut self.observed,
                safety_margin: Duration::from_secs(60),
                now,
            })
        }

        fn model(&self, name: &str) -> ModelId {
            self.c.catalog.model_id(name).unwrap()
        }
    }

    /// What the step charged for a job of the test group on `model` (of provider 0).
    fn attempt_on(job: i64, model: ModelId, tokens: u64, cost: f64) -> Attempt {
        Attempt {
            job,
            provider: 0,
            model: Some(model),
            route_key: "class:chat".into(),
            tokens,
            cost,
            est_input_tokens: 1000,
            est_output_tokens: 1000,
            sent_ms: t0().timestamp_millis(),
        }
    }

    fn started(s: &Step) -> Vec<(i64, ModelId)> {
        s.actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { job, model, .. } => Some((*job, *model)),
                Action::Fail { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_job_starts_once_even_when_two_models_have_quota_for_its_group() {
        let mut w = World::new(config(""));
        let (cheap, dear) = (w.model("cheap/c1"), w.model("dear/d1"));
        let mut plan = plan_for(&w.c, 2, &[(cheap, 1), (dear, 1)]);
        let deadline = t0() + chrono::Duration::hours(1);
        let s = w.step(
            &mut plan,
            vec![job(1, deadline, None), job(2, deadline, None)],
            t0(),
        );
        assert_eq!(started(&s), vec![(1, cheap), (2, dear)]);
    }

    #[test]
    fn a_full_provider_reads_no_jobs_and_waits_for_an_answer() {
        let mut w = World::new(config(""));
        let cheap = w.model("cheap/c1");
        let mut plan = plan_for(&w.c, 5, &[(cheap, 5)]);
        // cheap has concurrency = 2: only two of the five are read.
        assert_eq!(
            plan.wanted(&w.c.catalog, &mut w.limits, &w.observed, t0()),
            vec![2]
        );
        let d = t0() + chrono::Duration::hours(1);
        let s = w.step(&mut plan, vec![job(1, d, None), job(2, d, None)], t0());
        assert_eq!(started(&s), vec![(1, cheap), (2, cheap)]);
        // Both slots taken: nothing to read, no busy loop, no timer (an
        // answer frees a slot), and the rest of the quota is kept.
        assert_eq!(
            plan.wanted(&w.c.catalog, &mut w.limits, &w.observed, t0()),
            vec![0]
        );
        let s = w.step(&mut plan, vec![], t0());
        assert!(s.actions.is_empty());
        assert!(!s.more, "a full provider must not be polled");
        assert_eq!(s.next, None);
        assert_eq!(plan.quotas.entries[0].2, 3);
    }

    #[test]
    fn a_quota_larger_than_one_read_keeps_its_remainder_for_the_next_step() {
        let mut w = World::new(config(""));
        let dear = w.model("dear/d1");
        let mut plan = plan_for(&w.c, 300, &[(dear, 300)]);
        assert_eq!(
            plan.wanted(&w.c.catalog, &mut w.limits, &w.observed, t0()),
            vec![BATCH]
        );
        let d = t0() + chrono::Duration::hours(1);
        let read: Vec<Candidate> = (1..=BATCH as i64).map(|i| job(i, d, None)).collect();
        let s = w.step(&mut plan, read, t0());
        assert_eq!(started(&s).len(), BATCH);
        // The read was capped, not the queue: the rest of the quota stays.
        assert_eq!(plan.quotas.entries[0].2, 300 - BATCH as u64);
        assert!(s.more);
        // A read that comes back short means the group is empty: the quota
        // shrinks to what was taken.
        let s = w.step(&mut plan, vec![job(1000, d, None)], t0());
        assert_eq!(started(&s).len(), 1);
        assert_eq!(plan.quotas.entries[0].2, 0);
        assert!(!s.more);
    }

    #[test]
    fn concurrency_binds_and_the_step_says_when_to_look_again_after_settle() {
        let mut w = World::new(config(""));
        let cheap = w.model("cheap/c1");
        let mut plan = plan_for(&w.c, 3, &[(cheap, 3)]);
        let d = t0() + chrono::Duration::hours(1);
        let s = w.step(&mut plan, (1..=3).map(|i| job(i, d, None)).collect(), t0());
        // concurrency = 2: the third waits for an answer (an event, no timer).
        assert_eq!(started(&s).len(), 2);
        assert_eq!(w.limits.provider(0).in_flight(), 2);
        let Action::Start { tokens, cost, .. } = s.actions[0].clone() else {
            panic!()
        };
        let attempt = attempt_on(1, cheap, tokens, cost);
        let answer = Answer {
            verdict: Verdict::Succeeded,
            signals: Signals::default(),
            usage: Some((1000, 500)),
            billed: cost * 0.75,
            latency: Duration::from_millis(800),
            retry_at: None,
            flex_refused: None,
        };
        settle(&mut w.limits, &mut w.observed, &attempt, &answer, t0());
        assert_eq!(w.limits.provider(0).in_flight(), 1);
        let s = w.step(&mut plan, vec![job(3, d, None)], t0());
        assert_eq!(started(&s), vec![(3, cheap)]);
    }

    #[test]
    fn undo_start_and_settle_lost_give_every_slot_and_charge_back() {
        let mut w = World::new(config("daily_budget_usd = 1.0"));
        let cheap = w.model("cheap/c1");
        let mut plan = plan_for(&w.c, 2, &[(cheap, 2)]);
        let d = t0() + chrono::Duration::hours(1);
        let before = w.observed.budget.remaining(0);
        let s = w.step(&mut plan, vec![job(1, d, None), job(2, d, None)], t0());
        assert_eq!(w.limits.provider(0).in_flight(), 2);
        assert!(w.observed.budget.remaining(0) < before);
        // The store refused the first start; the second's task panicked.
        undo_start(
            &w.c.catalog,
            &mut w.limits,
            &mut w.observed,
            &s.actions[0],
            t0(),
        );
        let Action::Start { tokens, cost, .. } = s.actions[1].clone() else {
            panic!()
        };
        let lost = attempt_on(2, cheap, tokens, cost);
        settle_lost(&mut w.limits, &mut w.observed, &lost, t0());
        assert_eq!(w.limits.provider(0).in_flight(), 0);
        assert!((w.observed.budget.remaining(0) - before).abs() < 1e-12);
    }

    #[test]
    fn max_cost_takes_the_cheaper_eligible_model_instead_of_failing() {
        let mut w = World::new(config(""));
        let (cheap, dear) = (w.model("cheap/c1"), w.model("dear/d1"));
        // Planned on the dear model (cheap one busy in the plan's view), but
        // the job's cap only fits the cheap one: 2000 tokens × 1 $/Mtok.
        let mut plan = plan_for(&w.c, 2, &[(dear, 2)]);
        let d = t0() + chrono::Duration::hours(1);
        let s = w.step(
            &mut plan,
            vec![job(1, d, Some(0.0025)), job(2, d, Some(0.001))],
            t0(),
        );
        assert_eq!(started(&s), vec![(1, cheap)]);
        // Nothing eligible fits 0.001: that one fails, naming the cap.
        assert!(matches!(
            &s.actions[1],
            Action::Fail { job: 2, code: "max_cost_exceeded", message } if message.contains("0.001000")
        ));
    }

    #[test]
    fn a_request_too_large_for_the_planned_models_tpm_goes_where_it_fits() {
        // cheap takes at most 1500 tokens a minute; jobs here are 2000.
        let mut w = World::new(config("tpm = 1500"));
        let (cheap, dear) = (w.model("cheap/c1"), w.model("dear/d1"));
        let mut plan = plan_for(&w.c, 1, &[(cheap, 1)]);
        let d = t0() + chrono::Duration::hours(1);
        let s = w.step(&mut plan, vec![job(1, d, None)], t0());
        assert_eq!(started(&s), vec![(1, dear)]);
        assert_eq!(
            w.limits.provider(0).in_flight(),
            0,
            "cheap's bucket untouched"
        );
        // Only cheap is within this cap, and it cannot take the request.
        let mut plan = plan_for(&w.c, 1, &[(cheap, 1)]);
        let s = w.step(&mut plan, vec![job(2, d, Some(0.0025))], t0());
        assert!(
            matches!(
                &s.actions[..],
                [Action::Fail {
                    job: 2,
                    code: "request_too_large",
                    ..
                }]
            ),
            "{:?}",
            s.actions
        );
    }

    #[test]
    fn a_paused_provider_starts_nothing_and_the_plan_sees_it_unavailable() {
        let mut w = World::new(config(""));
        let cheap = w.model("cheap/c1");
        let until = t0() + chrono::Duration::seconds(30);
        w.observed.health[0].pause(t0(), Duration::from_secs(30));
        let mut plan = plan_for(&w.c, 1, &[(cheap, 1)]);
        let d = t0() + chrono::Duration::hours(1);
        let s = w.step(&mut plan, vec![job(1, d, None)], t0());
        assert!(s.actions.is_empty());
        assert_eq!(s.next, Some(until));
        // The next plan gets no capacity there until the pause ends, so its
        // jobs move to the other provider.
        let caps = w.observed.capacities(&w.c.catalog, t0());
        assert_eq!(caps[0].unavailable_until, Some(until));
        assert_eq!(caps[1].unavailable_until, None);
    }

    #[test]
    fn an_exhausted_budget_waits_for_renewal_or_fails_when_the_deadline_comes_first() {
        // Only one provider in the class, with a tiny daily budget.
        let text = r#"
[[providers]]
name = "solo"
kind = "simulated"
daily_budget_usd = 0.001

[[providers.models]]
name = "m"
input_per_mtok = 1.0
output_per_mtok = 1.0

[classes]
chat = ["solo/m"]
"#;
        let c = Config::parse(text, "t.toml", Path::new(".")).unwrap();
        let m = c.catalog.model_id("solo/m").unwrap();
        let mut w = World::new(c);
        let mut plan = plan_for_single(m, 2);
        let midnight = DateTime::parse_from_rfc3339("2026-11-25T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        // 0.002 $ each: over budget. Due after the renewal: wait for it.
        let late = midnight + chrono::Duration::hours(2);
        let s = w.step(&mut plan, vec![job(1, late, None)], t0());
        assert!(s.actions.is_empty(), "{s:?}");
        assert_eq!(s.next, Some(midnight));
        // Due before it: fail now, with why.
        let soon = t0() + chrono::Duration::hours(1);
        let s = w.step(&mut plan, vec![job(2, soon, None)], t0());
        assert!(matches!(
            &s.actions[..],
            [Action::Fail {
                job: 2,
                code: "budget_exhausted",
                ..
            }]
        ));
    }

    fn plan_for_single(m: ModelId, jobs: u64) -> CurrentPlan {
        CurrentPlan {
            groups: vec![PlannedGroup {
                route_key: "class:chat".into(),
                size_bin: 0,
                deadline_from: 0,
                deadline_to: i64::MAX,
                reference: m,
                group: JobGroup {
                    candidates: vec![m],
                    jobs,
                    input_tokens: 1000 * jobs,
                    output_tokens: 1000 * jobs,
                    release: t0(),
                    deadline: t0() + chrono::Duration::hours(1),
                },
            }],
            quotas: Quotas {
                entries: vec![(0, m, jobs)],
                until: None,
            },
        }
    }

    #[test]
    fn a_retry_waits_for_its_backoff_and_gives_up_at_the_deadline_or_the_last_attempt() {
        let policy = RetryPolicy {
            max_attempts: 3,
            base: Duration::from_secs(10),
            cap: Duration::from_secs(60),
        };
        let retry = Verdict::Retry { pause: None };
        let deadline = t0() + chrono::Duration::hours(1);
        // Full jitter: the first retry waits up to 10 s, the second up to 20 s.
        let at = next_attempt(&retry, 1, &policy, deadline, t0(), 0.5).unwrap();
        assert_eq!(at, t0() + chrono::Duration::seconds(5));
        let at = next_attempt(&retry, 2, &policy, deadline, t0(), 0.5).unwrap();
        assert_eq!(at, t0() + chrono::Duration::seconds(10));
        // The provider's own pause wins over a shorter backoff.
        let paused = Verdict::Retry {
            pause: Some(Duration::from_secs(30)),
        };
        let at = next_attempt(&paused, 1, &policy, deadline, t0(), 0.5).unwrap();
        assert_eq!(at, t0() + chrono::Duration::seconds(30));
        // The last attempt, a backoff past the deadline, a permanent error.
        assert_eq!(next_attempt(&retry, 3, &policy, deadline, t0(), 0.5), None);
        let close = t0() + chrono::Duration::seconds(3);
        assert_eq!(next_attempt(&retry, 1, &policy, close, t0(), 0.5), None);
        assert_eq!(
            next_attempt(&Verdict::FailJob, 1, &policy, deadline, t0(), 0.5),
            None
        );
        // A provider that refused our key: straight back, for another one.
        let disabled = Verdict::DisableProvider {
            reason: "401".into(),
        };
        assert_eq!(
            next_attempt(&disabled, 1, &policy, deadline, t0(), 0.5),
            Some(t0())
        );
    }
}
