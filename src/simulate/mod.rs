//! `nightshift simulate`: a workload run in virtual time against simulated
//! providers, with the *same* pricing, planning and rate-limit code as the
//! daemon, so policies can be compared on cost and deadline misses.
//!
//! Discrete events: job arrivals, request completions, and decision points
//! (a plan's first slot ending, a provider's rate limit freeing up). At each
//! event the policy decides what to send; nothing happens between events.
//!
//! Batch channels are simulated as the daemon runs them: the starts of one
//! step on one batch row form one virtual batch (split by `max_requests`),
//! created at that step's `now` with the deadline guard's instant from
//! [`rules::fallback_at`] and [`rules::guard_at`] (earlier for a batch that
//! would run overdue while a new one still fits), the same inputs as the
//! daemon's; a guarded batch's age is learned as a turnaround, as the
//! daemon learns it. Its turnaround is
//! drawn per batch from the provider's `simulated_turnaround` range (or, for
//! `simulated_late_fraction` of batches, the whole completion window). It
//! ends at created + turnaround, unless the guard comes first: then, as the
//! daemon cancels it at the provider and the provider runs none of the
//! lines not yet finished (a batch returns nothing before it ends), its jobs
//! go back to the queue without counting the attempt and cost nothing. An
//! ended batch's lines succeed or fail like simulated synchronous answers
//! and cost the batch row's price at creation. Batches take no rate-limit
//! slot and no concurrency. For `simulated_expire_fraction` of batches the
//! provider ends the batch at its completion window having run only a drawn
//! share of its lines: the others go back to the queue, the attempt not
//! counted (the store's `LineEffect::NotRun`); the guard is unchanged.
//!
//! Flex: `simulated_refusal_fraction` of flex requests are refused (429
//! `resource_unavailable`) after the provider's base latency, and handled
//! by the daemon's own rule, [`decide::FlexRefusal::of`]: queued again to
//! wait for flex where the deadline allows it, else sent again at once on
//! the standard row if `max_cost_usd` allows (one attempt), else queued
//! again; [`decide::settle`] starts the provider's flex back-off.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, Transport};
use crate::dispatch::batches::rules;
use crate::dispatch::budget::BudgetState;
use crate::dispatch::decide::{self, Action, Answer, Attempt, Candidate, CurrentPlan, Observed};
use crate::dispatch::limits::RateLimits;
use crate::dispatch::reliability::{self, Outcome, Usage};
use crate::domain::job::{self, JobContext, LineError, RouteKey};
use crate::domain::pricing::{Channel, ModelId, ProviderId};
pub mod bound;

use crate::plan::{self, Decision, PlanSettings, ProviderCapacity, Quotas};

/// How the simulation chooses where and when jobs run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// nightshift's planner (the daemon's policy).
    Planner,
    /// Each job on arrival to its cheapest eligible model with capacity,
    /// spilling to the next when that one is rate-limited: a per-request router.
    CheapestNow,
    /// Only this provider, waiting for its capacity.
    Fixed(String),
}

impl Policy {
    pub fn parse(s: &str) -> Result<Policy, String> {
        match s {
            "planner" => Ok(Policy::Planner),
            "cheapest-now" => Ok(Policy::CheapestNow),
            _ => match s.strip_prefix("fixed:") {
                Some(p) if !p.is_empty() => Ok(Policy::Fixed(p.to_string())),
                _ => Err(format!(
                    "unknown policy '{s}' (expected planner, cheapest-now or fixed:<provider>)"
                )),
            },
        }
    }

    pub fn name(&self) -> String {
        match self {
            Policy::Planner => "planner".into(),
            Policy::CheapestNow => "cheapest-now".into(),
            Policy::Fixed(p) => format!("fixed:{p}"),
        }
    }
}

/// A workload job: a job line plus when it is submitted and how many output
/// tokens the simulated provider will produce.
#[derive(Debug, Clone)]
pub struct WorkloadJob {
    pub custom_id: String,
    pub submit_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    pub route_key: String,
    pub candidates: Vec<ModelId>,
    pub input_tokens: u64,
    pub expected_output_tokens: u64,
    pub output_tokens: u64,
    pub max_cost_usd: Option<f64>,
}

/// A workload line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadError {
    pub line: usize,
    pub error: LineError,
}

/// Parses a workload: job lines with a top-level `submit_at` (RFC 3339, or
/// `+2h30m` after `start`) and an optional `"sim": {"output_tokens": N}`.
pub fn load_workload(
    text: &str,
    config: &Config,
    start: DateTime<Utc>,
) -> Result<Vec<WorkloadJob>, WorkloadError> {
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |field: Option<&str>, message: String| WorkloadError {
            line: lineno,
            error: LineError {
                custom_id: None,
                field: field.map(str::to_owned),
                message,
            },
        };
        let mut value: serde_json::Map<String, Value> =
            serde_json::from_str(line).map_err(|e| err(None, format!("invalid JSON: {e}")))?;
        let submit_at = match value.remove("submit_at") {
            Some(Value::String(s)) => {
                parse_submit_at(&s, start).map_err(|m| err(Some("submit_at"), m))?
            }
            Some(_) => return Err(err(Some("submit_at"), "must be a string".into())),
            None => start,
        };
        let output_tokens = match value.remove("sim") {
            None => None,
            Some(Value::Object(sim)) => match sim.get("output_tokens") {
                Some(v) => Some(
                    v.as_u64()
                        .filter(|&n| n <= crate::domain::bounds::MAX_OUTPUT_TOKENS)
                        .ok_or_else(|| {
                            err(
                                Some("sim.output_tokens"),
                                format!(
                                    "must be an integer from 0 to {}",
                                    crate::domain::bounds::MAX_OUTPUT_TOKENS
                                ),
                            )
                        })?,
                ),
                None => None,
            },
            Some(_) => return Err(err(Some("sim"), "must be an object".into())),
        };
        let ctx = JobContext {
            catalog: &config.catalog,
            now: submit_at,
            default_deadline: config.daemon.default_deadline,
        };
        let line = Value::Object(value).to_string();
        let job = job::parse_line(&line, &ctx).map_err(|e| WorkloadError {
            line: lineno,
            error: e,
        })?;
        let route = RouteKey::decode(&job.route_key).expect("parse_line encodes route keys");
        let candidates = route
            .candidates(&config.catalog)
            .map_err(|e| WorkloadError {
                line: lineno,
                error: e,
            })?;
        let max_cost_usd = job
            .options
            .as_deref()
            .and_then(|o| job::Options::parse(o).ok())
            .and_then(|o| o.max_cost_usd);
        jobs.push(WorkloadJob {
            custom_id: job.custom_id,
            submit_at,
            deadline: job.deadline,
            route_key: job.route_key,
            candidates: candidates.models,
            input_tokens: job.estimate.input,
            expected_output_tokens: job.estimate.output,
            output_tokens: output_tokens.unwrap_or(job.estimate.output),
            max_cost_usd,
        });
    }
    jobs.sort_by_key(|j| j.submit_at);
    Ok(jobs)
}

/// `2026-11-24T01:00:00Z`, or an offset from `start` such as `+2h30m`.
pub fn parse_submit_at(s: &str, start: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Some(offset) = s.strip_prefix('+') {
        let d = crate::domain::units::parse_duration(offset)?;
        return chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| start.checked_add_signed(d))
            .ok_or_else(|| format!("'{s}' is too far after the start"));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("'{s}' is neither an RFC 3339 timestamp nor an offset like +2h30m"))
}

/// One line of the trace: what happened to one job.
#[derive(Debug, Clone, Serialize)]
pub struct TraceLine {
    pub custom_id: String,
    pub submitted_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// `sync`, `flex` or `batch`: the channel of the attempt that answered.
    pub channel: Option<&'static str>,
    /// Attempts counted (a batch line not run is not one).
    pub attempts: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub state: &'static str,
    /// Every request sent for the job, the failed and retried ones too
    /// (each used its provider's rate limits), in the order sent.
    pub sent: Vec<TraceAttempt>,
}

/// One attempt of a job: when it was sent, where, on which channel.
#[derive(Debug, Clone, Serialize)]
pub struct TraceAttempt {
    pub sent_at: DateTime<Utc>,
    pub provider: String,
    pub model: String,
    pub channel: &'static str,
}

/// The most requests a provider received in any sliding 60 s and in any
/// rolling 24 h, from every synchronous (and flex) attempt of the run,
/// next to its configured rpm and rpd. Batch requests count against
/// neither.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateUse {
    pub provider: String,
    pub max_requests_per_minute: usize,
    pub rpm: Option<u32>,
    pub max_requests_per_day: usize,
    pub rpd: Option<u32>,
}

impl RateUse {
    /// The larger of the two utilisations (used ÷ limit), if a limit is set.
    pub fn peak(&self) -> Option<f64> {
        let minute = self
            .rpm
            .map(|r| self.max_requests_per_minute as f64 / f64::from(r.max(1)));
        let day = self
            .rpd
            .map(|r| self.max_requests_per_day as f64 / f64::from(r.max(1)));
        minute.into_iter().chain(day).reduce(f64::max)
    }
}

/// The most sends in any window of `width` ms over sorted `sends` (Unix
/// ms): a window `[t, t + width)` starting at each send.
fn max_in_window(sends: &[i64], width: i64) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for (hi, &t) in sends.iter().enumerate() {
        while sends[lo] <= t - width {
            lo += 1;
        }
        best = best.max(hi + 1 - lo);
    }
    best
}

/// Each provider's peak request rate in a run, from its trace.
pub fn rate_use(catalog: &crate::domain::pricing::Catalog, trace: &[TraceLine]) -> Vec<RateUse> {
    catalog
        .providers
        .iter()
        .map(|p| {
            let mut sends: Vec<i64> = trace
                .iter()
                .flat_map(|t| &t.sent)
                .filter(|a| a.provider == p.name && a.channel != "batch")
                .map(|a| a.sent_at.timestamp_millis())
                .collect();
            sends.sort_unstable();
            RateUse {
                provider: p.name.clone(),
                max_requests_per_minute: max_in_window(&sends, 60_000),
                rpm: p.limits.rpm,
                max_requests_per_day: max_in_window(&sends, 86_400_000),
                rpd: p.limits.rpd,
            }
        })
        .collect()
}

/// The outcome of one policy's run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub policy: String,
    pub jobs: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub expired: usize,
    /// Expired, or completed after the deadline.
    pub deadline_misses: usize,
    pub total_cost_usd: f64,
    pub per_provider: BTreeMap<String, usize>,
    /// Requests that failed and were retried.
    pub retries: usize,
    /// Succeeded jobs by the channel that answered (`sync`, `flex`, `batch`).
    pub per_channel: BTreeMap<String, usize>,
    /// Provider batches created.
    pub batches_created: usize,
    /// Batches the deadline guard cancelled (their jobs ran again).
    pub batches_guarded: usize,
    /// Lines of batches the provider expired that were not run (their jobs
    /// went back to the queue, the attempt not counted).
    pub batch_lines_expired: usize,
    /// Flex requests the provider refused (429 `resource_unavailable`).
    pub flex_refusals: usize,
    /// What the jobs answered on flex or batch rows would have cost on
    /// their standard (sync) rows at the same instant, minus what they cost.
    pub saved_vs_sync_usd: f64,
    /// Each provider's peak requests in a sliding minute and a rolling day.
    pub rate_use: Vec<RateUse>,
}

/// A virtual provider batch.
struct SimBatch {
    model: ModelId,
    jobs: Vec<usize>,
    created: DateTime<Utc>,
    /// Unix ms.
    ends_at: i64,
    fallback_at: i64,
    /// Lines the provider runs before the batch ends: all of them, unless
    /// it expires the batch (then the others are not run).
    runs: usize,
}

/// What the provider does with a batch: when it ends, and, if it expires
/// it, how many of its lines it ran first.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BatchDraw {
    turnaround: Duration,
    /// `Some(k)`: expired at the completion window, the first `k` lines run.
    expired_after: Option<usize>,
}

/// What the provider does with batch `n` (of `lines` lines) of a provider
/// with `terms`: its turnaround is uniform in the simulated range, or the
/// whole window for the late fraction; for the expire fraction (an
/// independent draw) it ends at the window having run a drawn share
/// (possibly none) of its lines.
fn batch_draw(
    terms: &crate::domain::pricing::BatchTerms,
    provider: &str,
    n: u32,
    lines: usize,
) -> BatchDraw {
    let mut h: u64 = 0x8422_2325_cbf2_9ce4;
    for b in provider.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Expiry draws: independent of the turnaround's (splitmix64 keys).
    let expire = |k: u32| {
        let mut x = h ^ 0x5851_f42d_4c95_7f2d_u64.wrapping_add(u64::from(k));
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        reliability::unit_draw(x ^ (x >> 31), 0)
    };
    if expire(n.wrapping_mul(2)) < terms.simulated_expire_fraction {
        let share = expire(n.wrapping_mul(2).wrapping_add(1));
        return BatchDraw {
            turnaround: terms.window,
            expired_after: Some(((lines as f64 * share) as usize).min(lines)),
        };
    }
    let turnaround = if reliability::unit_draw(h, n.wrapping_mul(2)) < terms.simulated_late_fraction
    {
        terms.window
    } else {
        let (from, to) = terms.simulated_turnaround;
        let u = reliability::unit_draw(h, n.wrapping_mul(2).wrapping_add(1));
        from + (to.saturating_sub(from)).mul_f64(u)
    };
    BatchDraw {
        turnaround,
        expired_after: None,
    }
}

/// What the simulation knows about each provider.
#[derive(Debug, Clone)]
struct SimProvider {
    latency: Duration,
    ms_per_output_token: f64,
    failure_rate: f64,
}

fn sim_providers(config: &Config) -> Vec<SimProvider> {
    config
        .transports
        .iter()
        .map(|t| match t {
            Transport::Simulated {
                latency,
                ms_per_output_token,
                failure_rate,
            } => SimProvider {
                latency: *latency,
                ms_per_output_token: *ms_per_output_token,
                failure_rate: *failure_rate,
            },
            Transport::OpenAi { .. } => SimProvider {
                latency: Duration::from_secs(2),
                ms_per_output_token: 10.0,
                failure_rate: 0.0,
            },
        })
        .collect()
}

/// The planner's view of provider capacity: configured limits, simulated latency.
pub fn capacities(config: &Config) -> Vec<ProviderCapacity> {
    plan::configured_capacities(&config.catalog, &config.transports)
}

/// Queued jobs, indexed by (route key, size bin, deadline, index) for the
/// planner's groups (the store's `jobs_due` order) and by (deadline, index)
/// for expiry, the next deadline and the baselines' most-urgent-first order.
#[derive(Default)]
struct Queue {
    by_route: BTreeSet<QueueKey>,
    by_deadline: BTreeSet<(i64, usize)>,
}

/// (route key, size bin, deadline ms, job index).
type QueueKey = (String, i64, i64, usize);

/// Where job `i` stands in [`Queue::by_route`].
fn queue_key(w: &WorkloadJob, i: usize) -> QueueKey {
    (
        w.route_key.clone(),
        crate::domain::estimate::size_bin(w.expected_output_tokens),
        w.deadline.timestamp_millis(),
        i,
    )
}

impl Queue {
    fn insert(&mut self, key: QueueKey) {
        self.by_deadline.insert((key.2, key.3));
        self.by_route.insert(key);
    }

    fn remove(&mut self, key: &QueueKey) {
        self.by_deadline.remove(&(key.2, key.3));
        self.by_route.remove(key);
    }

    fn is_empty(&self) -> bool {
        self.by_deadline.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Queued,
    Running,
    Succeeded,
    Expired,
    Failed,
}

struct SimJob<'a> {
    w: &'a WorkloadJob,
    state: State,
    attempts: u32,
    dispatched_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    model: Option<ModelId>,
    cost: f64,
    /// Every attempt: (sent at, model).
    sent: Vec<(DateTime<Utc>, ModelId)>,
}

/// The deterministic draw of attempt `n` of a job, in [0, 1): the same
/// function the daemon draws its jitter from, keyed by the job's custom_id.
fn draw(custom_id: &str, attempt: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in custom_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    reliability::unit_draw(h, attempt)
}

/// How often the planner policy re-plans at the latest, and at most on
/// events: the daemon's own timings.
const REPLAN_EVERY: chrono::Duration = chrono::Duration::seconds(60);
const REPLAN_AT_MOST: chrono::Duration = chrono::Duration::milliseconds(500);

/// Runs `workload` under `policy` from `start` in virtual time.
pub fn run(
    config: &Config,
    workload: &[WorkloadJob],
    policy: &Policy,
    settings: &PlanSettings,
) -> Result<(Summary, Vec<TraceLine>), String> {
    let catalog = &config.catalog;
    let providers = sim_providers(config);
    let fixed: Option<ProviderId> = match policy {
        Policy::Fixed(name) => Some(
            catalog
                .provider_id(name)
                .ok_or_else(|| format!("no provider '{name}' in the config"))?,
        ),
        _ => None,
    };
    let Some(start) = workload.first().map(|j| j.submit_at) else {
        return Ok((empty_summary(policy), Vec::new()));
    };
    let mut jobs: Vec<SimJob> = workload
        .iter()
        .map(|w| SimJob {
            w,
            state: State::Pending,
            attempts: 0,
            dispatched_at: None,
            completed_at: None,
            model: None,
            cost: 0.0,
            sent: Vec::new(),
        })
        .collect();
    let mut limits = RateLimits::for_catalog(catalog, start.timestamp_millis())
        .with_cap(config.daemon.max_in_flight);
    // The daemon's own observations, planner capacities and dispatch step.
    let initial_latency: Vec<Duration> = config
        .transports
        .iter()
        .map(Transport::typical_latency)
        .collect();
    let mut observed = Observed::new(
        &initial_latency,
        BudgetState::new(config.budgets.clone(), start, |_, _| 0.0),
    );
    let retry_policy = config.daemon.retry;
    let mut next_arrival = 0usize;
    // Queued jobs by (route key, deadline, index): a group's most urgent first.
    let mut queued = Queue::default();
    // Jobs waiting for a retry: (due at, index).
    let mut retrying: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
    // Requests in flight: (answer at, index), and what each was charged.
    let mut completions: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
    let mut attempts_in_flight: BTreeMap<usize, Attempt> = BTreeMap::new();
    let mut current = CurrentPlan::default();
    let mut planned_at: Option<DateTime<Utc>> = None;
    // Re-plan (throttled as in the daemon) on arrivals and retries; an
    // answer re-plans only if it changed a provider's availability. The
    // daemon also re-plans, throttled, after every answer: with the queue
    // unchanged that plan is the same, and it would cost the simulator a
    // plan per half second of virtual time.
    let mut replan = false;
    let mut retries = 0usize;
    // Virtual provider batches, and their next event: (ends or is guarded
    // at, index).
    let mut batches: Vec<SimBatch> = Vec::new();
    let mut batch_events: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
    let mut batches_per_provider = vec![0u32; catalog.providers.len()];
    let mut batches_guarded = 0usize;
    let mut batch_lines_expired = 0usize;
    // Flex refusals: how many, and those of the requests in flight.
    let mut flex_refusals = 0usize;
    let mut refused: BTreeMap<usize, decide::FlexRefusal> = BTreeMap::new();
    let mut now = start;
    loop {
        let now_ms = now.timestamp_millis();
        // Arrivals, retries and completions due now.
        while next_arrival < jobs.len() && jobs[next_arrival].w.submit_at <= now {
            let j = &mut jobs[next_arrival];
            j.state = State::Queued;
            queued.insert(queue_key(j.w, next_arrival));
            next_arrival += 1;
            replan = true;
        }
        while let Some(&Reverse((t, i))) = retrying.peek() {
            if t > now_ms {
                break;
            }
            retrying.pop();
            let j = &jobs[i];
            queued.insert(queue_key(j.w, i));
        }
        while let Some(&Reverse((t, i))) = completions.peek() {
            if t > now_ms {
                break;
            }
            completions.pop();
            let j = &mut jobs[i];
            let model = j.model.expect("a running job has a model");
            let provider = catalog.models[model].provider;
            let dispatched = j.dispatched_at.expect("dispatched");
            // A flex refusal not sent again (the job is queued again), or
            // the answer of the request (the standard fallback's, if any).
            let refusal = refused.remove(&i);
            let refused_only = refusal.is_some_and(|r| !r.fell_back);
            // A simulated failure is an HTTP 500, classified as the daemon does.
            let failed =
                refused_only || draw(&j.w.custom_id, j.attempts) < providers[provider].failure_rate;
            let outcome = if refused_only {
                flex_refusal()
            } else if failed {
                simulated_failure()
            } else {
                Outcome::Success {
                    status: 200,
                    request_id: None,
                    body: String::new(),
                    usage: Usage {
                        input_tokens: j.w.input_tokens,
                        output_tokens: j.w.output_tokens,
                        ..Usage::default()
                    },
                    signals: Default::default(),
                }
            };
            let verdict = decide::FlexRefusal::verdict(refusal, || reliability::classify(&outcome));
            let billed = if failed {
                0.0
            } else {
                catalog.cost_at(model, dispatched, j.w.input_tokens, j.w.output_tokens)
            };
            let retry_at = reliability::next_attempt(
                &verdict,
                j.attempts,
                &retry_policy,
                j.w.deadline,
                now,
                draw(&j.w.custom_id, j.attempts.wrapping_add(1 << 16)),
            );
            let answer = Answer {
                verdict,
                signals: Default::default(),
                usage: (!failed).then_some((j.w.input_tokens, j.w.output_tokens)),
                billed,
                latency: (now - dispatched).to_std().unwrap_or_default(),
                retry_at,
                flex_refused: refusal,
            };
            let attempt = attempts_in_flight.remove(&i).expect("charged at start");
            if decide::settle(&mut limits, &mut observed, &attempt, &answer, now) {
                planned_at = None;
            }
            match (failed, retry_at) {
                (false, _) => {
                    j.state = State::Succeeded;
                    j.completed_at = Some(now);
                    j.cost = billed;
                }
                (true, Some(at)) => {
                    retries += 1;
                    j.state = State::Queued;
                    retrying.push(Reverse((at.timestamp_millis(), i)));
                    replan = true;
                }
                (true, None) => {
                    j.state = State::Failed;
                    j.completed_at = Some(now);
                }
            }
        }
        while let Some(&Reverse((t, b))) = batch_events.peek() {
            if t > now_ms {
                break;
            }
            batch_events.pop();
            let batch = &batches[b];
            let model = batch.model;
            let provider = catalog.models[model].provider;
            replan = true;
            planned_at = None;
            // A line not run (cancelled by the guard, or expired by the
            // provider) costs nothing: its job goes back to the queue, the
            // attempt not counted (the store's `LineEffect::NotRun`).
            let not_run =
                |j: &mut SimJob, i: usize, queued: &mut Queue, observed: &mut Observed| {
                    let est = catalog.cost_at(
                        model,
                        batch.created,
                        j.w.input_tokens,
                        j.w.expected_output_tokens,
                    );
                    observed.budget.charge(provider, -est);
                    j.attempts = j.attempts.saturating_sub(1);
                    j.state = State::Queued;
                    j.model = None;
                    j.dispatched_at = None;
                    queued.insert(queue_key(j.w, i));
                };
            if batch.fallback_at < batch.ends_at {
                // The deadline guard: cancelled at the provider, nothing
                // returned; the jobs run again. The batch took at least this
                // long, which the planner learns from as the daemon does.
                batches_guarded += 1;
                observed.batches[provider]
                    .observe((now - batch.created).to_std().unwrap_or_default());
                for &i in &batch.jobs {
                    not_run(&mut jobs[i], i, &mut queued, &mut observed);
                }
                continue;
            }
            observed.batches[provider].observe((now - batch.created).to_std().unwrap_or_default());
            for (k, &i) in batch.jobs.iter().enumerate() {
                let j = &mut jobs[i];
                if k >= batch.runs {
                    // Expired by the provider before this line ran.
                    batch_lines_expired += 1;
                    not_run(j, i, &mut queued, &mut observed);
                    continue;
                }
                let failed = draw(&j.w.custom_id, j.attempts) < providers[provider].failure_rate;
                let est = catalog.cost_at(
                    model,
                    batch.created,
                    j.w.input_tokens,
                    j.w.expected_output_tokens,
                );
                if !failed {
                    let billed =
                        catalog.cost_at(model, batch.created, j.w.input_tokens, j.w.output_tokens);
                    observed.budget.charge(provider, billed - est);
                    j.state = State::Succeeded;
                    j.completed_at = Some(now);
                    j.cost = billed;
                    continue;
                }
                observed.budget.charge(provider, -est);
                let verdict = reliability::classify(&simulated_failure());
                let retry_at = reliability::next_attempt(
                    &verdict,
                    j.attempts,
                    &retry_policy,
                    j.w.deadline,
                    now,
                    draw(&j.w.custom_id, j.attempts.wrapping_add(1 << 16)),
                );
                match retry_at {
                    Some(at) => {
                        retries += 1;
                        j.state = State::Queued;
                        retrying.push(Reverse((at.timestamp_millis(), i)));
                    }
                    None => {
                        j.state = State::Failed;
                        j.completed_at = Some(now);
                    }
                }
            }
        }
        // Queued jobs past their deadline expire (the daemon does the same),
        // unless the config says to run them anyway.
        if !config.daemon.run_after_deadline {
            let overdue: Vec<QueueKey> = queued
                .by_deadline
                .range(..=(now_ms, usize::MAX))
                .map(|&(_, i)| queue_key(jobs[i].w, i))
                .collect();
            for key in overdue {
                queued.remove(&key);
                jobs[key.3].state = State::Expired;
                jobs[key.3].completed_at = Some(now);
            }
        }

        let mut dispatch =
            |i: usize, model: ModelId, jobs: &mut Vec<SimJob>, queued: &mut Queue| {
                let j = &mut jobs[i];
                queued.remove(&queue_key(j.w, i));
                j.state = State::Running;
                j.attempts += 1;
                j.sent.push((now, model));
                j.model = Some(model);
                j.dispatched_at = Some(now);
                let p = &providers[catalog.models[model].provider];
                let mut latency = p.latency.saturating_add(
                    Duration::try_from_secs_f64(
                        p.ms_per_output_token * j.w.output_tokens as f64 / 1000.0,
                    )
                    .unwrap_or(Duration::MAX),
                );
                // A flex request the simulated provider refuses (after its
                // base latency): what the daemon does about it, from the
                // same code (queued again to wait for flex where the
                // deadline allows, else sent again on the standard row).
                let refusal_fraction = catalog.providers[catalog.models[model].provider]
                    .flex
                    .map_or(0.0, |f| f.simulated_refusal_fraction);
                if draw(&j.w.custom_id, j.attempts.wrapping_add(2 << 16)) < refusal_fraction
                    && let Some((fallback, refusal)) = decide::FlexRefusal::of(
                        catalog,
                        model,
                        &Candidate {
                            id: i as i64,
                            est_input_tokens: j.w.input_tokens,
                            est_output_tokens: j.w.expected_output_tokens,
                            deadline_ms: j.w.deadline.timestamp_millis(),
                            max_cost_usd: j.w.max_cost_usd,
                        },
                        now,
                        decide::FlexWait {
                            attempts: j.attempts,
                            retry: &retry_policy,
                            margin: settings.safety_margin,
                        },
                    )
                {
                    flex_refusals += 1;
                    refused.insert(i, refusal);
                    match fallback {
                        Some(standard) => {
                            j.model = Some(standard);
                            latency = latency.saturating_add(p.latency);
                        }
                        None => latency = p.latency,
                    }
                }
                completions.push(Reverse((
                    now_ms.saturating_add(crate::domain::bounds::millis(latency)),
                    i,
                )));
            };

        // Decide.
        let mut wait_ms: Option<i64> = None;
        let mut step_next: Option<DateTime<Utc>> = None;
        let mut more = false;
        match policy {
            Policy::Planner => {
                let retry_due = observed.next_retry.is_some_and(|t| t <= now);
                if retry_due {
                    observed.next_retry = None;
                }
                let stale = match planned_at {
                    None => true,
                    Some(at) => {
                        retry_due
                            || now - at >= REPLAN_EVERY
                            || current.quotas.until.is_some_and(|u| now >= u)
                            || (replan && now - at >= REPLAN_AT_MOST)
                    }
                };
                if stale {
                    let buckets =
                        plan::bucket_jobs(queued.by_route.iter().map(|(key, _, deadline, i)| {
                            (
                                key.as_str(),
                                *deadline,
                                jobs[*i].w.input_tokens,
                                jobs[*i].w.expected_output_tokens,
                            )
                        }));
                    let capacity = observed.plan_capacities(catalog, &mut limits, now);
                    let q = plan::plan_queue(
                        &buckets,
                        catalog,
                        &capacity,
                        now,
                        settings,
                        |key| observed.output_scale(key),
                        |_| None,
                    );
                    let quotas = Quotas::from_plan(&q.plan, &q.job_groups(), catalog, &capacity);
                    current = CurrentPlan {
                        groups: q.groups,
                        quotas,
                    };
                    planned_at = Some(now);
                    replan = false;
                }
                let wanted = current.wanted(catalog, &mut limits, &observed, now);
                let due: Vec<Vec<Candidate>> = current
                    .groups
                    .iter()
                    .zip(&wanted)
                    .map(|(group, &n)| {
                        queued
                            .by_route
                            .range(
                                (
                                    group.route_key.clone(),
                                    group.size_bin,
                                    group.deadline_from,
                                    0,
                                )
                                    ..(
                                        group.route_key.clone(),
                                        group.size_bin,
                                        group.deadline_to,
                                        0,
                                    ),
                            )
                            .take(n)
                            .map(|&(_, _, deadline_ms, i)| Candidate {
                                id: i as i64,
                                est_input_tokens: jobs[i].w.input_tokens,
                                est_output_tokens: jobs[i].w.expected_output_tokens,
                                deadline_ms,
                                max_cost_usd: jobs[i].w.max_cost_usd,
                            })
                            .collect()
                    })
                    .collect();
                let step = decide::step(decide::StepInput {
                    catalog,
                    plan: &mut current,
                    wanted,
                    due,
                    limits: &mut limits,
                    observed: &mut observed,
                    safety_margin: settings.safety_margin,
                    now,
                });
                if step.replan {
                    planned_at = None;
                }
                more = step.more;
                step_next = step.next;
                // This step's starts on batch rows, by row: one batch each.
                let mut batched: BTreeMap<ModelId, Vec<(usize, usize)>> = BTreeMap::new();
                for action in step.actions {
                    match action {
                        Action::Start {
                            job, group, model, ..
                        } if catalog.is_batch(model) => {
                            batched
                                .entry(model)
                                .or_default()
                                .push((job as usize, group));
                        }
                        Action::Start {
                            job,
                            group,
                            model,
                            tokens,
                            cost,
                            ..
                        } => {
                            let i = job as usize;
                            attempts_in_flight.insert(
                                i,
                                Attempt {
                                    job,
                                    provider: catalog.models[model].provider,
                                    model: Some(model),
                                    route_key: current.groups[group].route_key.clone(),
                                    tokens,
                                    cost,
                                    est_input_tokens: jobs[i].w.input_tokens,
                                    est_output_tokens: jobs[i].w.expected_output_tokens,
                                    sent_ms: now_ms,
                                },
                            );
                            dispatch(i, model, &mut jobs, &mut queued);
                        }
                        Action::Fail { job, .. } => {
                            let i = job as usize;
                            let k = queue_key(jobs[i].w, i);
                            queued.remove(&k);
                            jobs[i].state = State::Failed;
                            jobs[i].completed_at = Some(now);
                        }
                    }
                }
                if !batched.is_empty() {
                    let capacity = observed.capacities(catalog, now);
                    for (model, starts) in batched {
                        let provider = catalog.models[model].provider;
                        let terms = catalog.providers[provider]
                            .batch
                            .clone()
                            .expect("a batch row's provider has batch terms");
                        for chunk in starts.chunks(terms.max_requests.max(1) as usize) {
                            let mut earliest = DateTime::<Utc>::MAX_UTC;
                            let mut tokens = 0u64;
                            let mut candidates: Vec<ModelId> = Vec::new();
                            let mut members = Vec::with_capacity(chunk.len());
                            for &(i, group) in chunk {
                                let j = &mut jobs[i];
                                earliest = earliest.min(j.w.deadline);
                                tokens = tokens
                                    .saturating_add(j.w.input_tokens + j.w.expected_output_tokens);
                                if let Some(g) = current.groups.get(group) {
                                    for &c in &g.group.candidates {
                                        if !candidates.contains(&c) {
                                            candidates.push(c);
                                        }
                                    }
                                }
                                queued.remove(&queue_key(j.w, i));
                                j.state = State::Running;
                                j.attempts += 1;
                                j.sent.push((now, model));
                                j.model = Some(model);
                                j.dispatched_at = Some(now);
                                members.push(i);
                            }
                            let fallback_at = rules::fallback_at(
                                catalog,
                                &capacity,
                                &candidates,
                                members.len() as u64,
                                tokens,
                                earliest,
                                settings.safety_margin,
                                terms.window,
                                now,
                            );
                            let fallback_at = rules::guard_at(
                                fallback_at,
                                now,
                                capacity[provider].batch_turnaround,
                            );
                            let n = batches_per_provider[provider];
                            batches_per_provider[provider] += 1;
                            let draw = batch_draw(
                                &terms,
                                &catalog.providers[provider].name,
                                n,
                                members.len(),
                            );
                            let ends_at = now_ms
                                .saturating_add(crate::domain::bounds::millis(draw.turnaround));
                            batch_events.push(Reverse((
                                ends_at.min(fallback_at).max(now_ms),
                                batches.len(),
                            )));
                            let runs = draw.expired_after.unwrap_or(members.len());
                            batches.push(SimBatch {
                                model,
                                jobs: members,
                                created: now,
                                ends_at,
                                fallback_at,
                                runs,
                            });
                        }
                    }
                }
            }
            Policy::CheapestNow | Policy::Fixed(_) => {
                let mut exhausted: BTreeSet<ProviderId> = BTreeSet::new();
                // Most urgent first, without copying the queue: a cursor
                // over the deadline index (jobs leave it as they are sent).
                let mut cursor: Option<(i64, usize)> = None;
                loop {
                    let next = match cursor {
                        None => queued.by_deadline.iter().next(),
                        Some(c) => queued
                            .by_deadline
                            .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                            .next(),
                    };
                    let Some(&(d, i)) = next else { break };
                    cursor = Some((d, i));
                    // Every provider (or the fixed one) is out of capacity: nothing
                    // more can be sent now, so stop instead of scanning the queue.
                    if exhausted.len() == catalog.providers.len()
                        || fixed.is_some_and(|p| exhausted.contains(&p))
                    {
                        break;
                    }
                    let w = jobs[i].w;
                    // Per-request routers: never a batch row (flex is a
                    // synchronous request, so it may be picked).
                    let candidates: Vec<ModelId> = w
                        .candidates
                        .iter()
                        .copied()
                        .filter(|&m| !catalog.is_batch(m))
                        .filter(|&m| fixed.is_none_or(|p| catalog.models[m].provider == p))
                        .collect();
                    if candidates.is_empty() {
                        let k = queue_key(w, i);
                        queued.remove(&k);
                        jobs[i].state = State::Failed;
                        jobs[i].completed_at = Some(now);
                        continue;
                    }
                    let tokens = w.input_tokens + w.expected_output_tokens;
                    let estimate = crate::domain::estimate::TokenEstimate {
                        input: w.input_tokens,
                        output: w.expected_output_tokens,
                    };
                    let urgent = fixed.is_none();
                    let decision = plan::route(
                        catalog,
                        &candidates,
                        estimate,
                        w.max_cost_usd,
                        now,
                        urgent,
                        |p| {
                            if exhausted.contains(&p) {
                                return false;
                            }
                            // The provider's limits and the global cap (no
                            // model's: model id MAX has none).
                            let ok = limits.try_acquire(p, usize::MAX, tokens, now_ms);
                            if !ok {
                                if let Some(w) = limits.ready_in_ms(p, usize::MAX, tokens, now_ms) {
                                    wait_ms = Some(wait_ms.map_or(w, |x: i64| x.min(w)));
                                }
                                exhausted.insert(p);
                            }
                            ok
                        },
                    );
                    match decision {
                        Decision::Send { model, .. } => {
                            // Only the provider's limiter was charged (above).
                            attempts_in_flight.insert(
                                i,
                                Attempt {
                                    job: i as i64,
                                    provider: catalog.models[model].provider,
                                    model: None,
                                    route_key: w.route_key.clone(),
                                    tokens,
                                    cost: 0.0,
                                    est_input_tokens: w.input_tokens,
                                    est_output_tokens: w.expected_output_tokens,
                                    sent_ms: now_ms,
                                },
                            );
                            dispatch(i, model, &mut jobs, &mut queued)
                        }
                        Decision::Wait => {}
                        Decision::TooExpensive { .. } => {
                            let k = queue_key(w, i);
                            queued.remove(&k);
                            jobs[i].state = State::Failed;
                            jobs[i].completed_at = Some(now);
                        }
                    }
                }
            }
        }

        // The next event.
        let mut next: Option<i64> = None;
        let mut consider = |t: i64| next = Some(next.map_or(t, |n: i64| n.min(t)));
        if let Some(j) = jobs.get(next_arrival) {
            consider(j.w.submit_at.timestamp_millis());
        }
        if let Some(&Reverse((t, _))) = completions.peek() {
            consider(t);
        }
        if let Some(&Reverse((t, _))) = retrying.peek() {
            consider(t);
        }
        if let Some(&Reverse((t, _))) = batch_events.peek() {
            consider(t);
        }
        if !queued.is_empty() {
            if more {
                consider(now_ms + 1);
            }
            if let Some(t) = step_next {
                consider(t.timestamp_millis());
            }
            if let Some(w) = wait_ms {
                consider(now_ms + w.max(1));
            }
            if let Some(&(d, _)) = queued.by_deadline.range((now_ms + 1, 0)..).next() {
                consider(d);
            }
            if *policy == Policy::Planner {
                if let Some(u) = current.quotas.until {
                    consider(u.timestamp_millis());
                }
                if let Some(at) = planned_at {
                    consider((at + REPLAN_EVERY).timestamp_millis());
                }
            }
        }
        match next {
            Some(t) => {
                now = Utc
                    .timestamp_millis_opt(t.max(now_ms + 1))
                    .single()
                    .unwrap_or(now)
            }
            None => break,
        }
    }

    let mut summary = empty_summary(policy);
    summary.jobs = jobs.len();
    summary.retries = retries;
    summary.batches_created = batches.len();
    summary.batches_guarded = batches_guarded;
    summary.batch_lines_expired = batch_lines_expired;
    summary.flex_refusals = flex_refusals;
    let mut trace = Vec::with_capacity(jobs.len());
    for j in &jobs {
        let late = j.completed_at.is_some_and(|c| c > j.w.deadline);
        match j.state {
            State::Succeeded => summary.succeeded += 1,
            State::Expired => summary.expired += 1,
            _ => summary.failed += 1,
        }
        if j.state == State::Expired || (j.state == State::Succeeded && late) {
            summary.deadline_misses += 1;
        }
        summary.total_cost_usd += j.cost;
        let provider = j
            .model
            .map(|m| catalog.providers[catalog.models[m].provider].name.clone());
        if j.state == State::Succeeded
            && let Some(p) = &provider
        {
            *summary.per_provider.entry(p.clone()).or_default() += 1;
        }
        let channel = j.model.map(|m| catalog.models[m].channel);
        if j.state == State::Succeeded
            && let (Some(m), Some(c)) = (j.model, channel)
        {
            *summary.per_channel.entry(c.as_str().into()).or_default() += 1;
            if c != Channel::Sync
                && let (Some(standard), Some(at)) = (catalog.models[m].standard, j.dispatched_at)
            {
                summary.saved_vs_sync_usd +=
                    catalog.cost_at(standard, at, j.w.input_tokens, j.w.output_tokens) - j.cost;
            }
        }
        trace.push(TraceLine {
            custom_id: j.w.custom_id.clone(),
            submitted_at: j.w.submit_at,
            deadline: j.w.deadline,
            dispatched_at: j.dispatched_at,
            completed_at: j.completed_at,
            provider,
            model: j.model.map(|m| catalog.models[m].name.clone()),
            channel: channel.map(Channel::as_str),
            attempts: j.attempts,
            input_tokens: j.w.input_tokens,
            output_tokens: if j.state == State::Succeeded {
                j.w.output_tokens
            } else {
                0
            },
            cost_usd: j.cost,
            state: match j.state {
                State::Succeeded => "succeeded",
                State::Expired => "expired",
                State::Pending | State::Queued | State::Running | State::Failed => "failed",
            },
            sent: j
                .sent
                .iter()
                .map(|&(sent_at, m)| TraceAttempt {
                    sent_at,
                    provider: catalog.providers[catalog.models[m].provider].name.clone(),
                    model: catalog.models[m].name.clone(),
                    channel: catalog.models[m].channel.as_str(),
                })
                .collect(),
        });
    }
    summary.rate_use = rate_use(catalog, &trace);
    Ok((summary, trace))
}

fn empty_summary(policy: &Policy) -> Summary {
    Summary {
        policy: policy.name(),
        jobs: 0,
        succeeded: 0,
        failed: 0,
        expired: 0,
        deadline_misses: 0,
        total_cost_usd: 0.0,
        per_provider: BTreeMap::new(),
        retries: 0,
        per_channel: BTreeMap::new(),
        batches_created: 0,
        batches_guarded: 0,
        batch_lines_expired: 0,
        flex_refusals: 0,
        saved_vs_sync_usd: 0.0,
        rate_use: Vec::new(),
    }
}

/// A simulated provider failure: an HTTP 500, classified as the daemon does.
fn simulated_failure() -> Outcome {
    Outcome::HttpError {
        status: 500,
        request_id: None,
        body: r#"{"error":{"message":"simulated failure","type":"server_error"}}"#.into(),
        signals: Default::default(),
    }
}

/// A simulated flex refusal: `429 resource_unavailable`, as OpenAI sends it.
fn flex_refusal() -> Outcome {
    Outcome::HttpError {
        status: 429,
        request_id: None,
        body: r#"{"error":{"message":"simulated flex refusal","type":"invalid_request_error","code":"resource_unavailable"}}"#.into(),
        signals: Default::default(),
    }
}

/// The offline lower bound: a relaxation of the real problem (per-job
/// sizes, failures as extra attempts, rpm/tpm per slot, rpd over rolling
/// days, concurrency as service-seconds) that no feasible schedule can
/// undercut; see [`bound`] for exactly what it relaxes. Returns (cost, jobs
/// that fit nowhere).
pub fn lower_bound(
    config: &Config,
    workload: &[WorkloadJob],
    settings: &PlanSettings,
) -> (f64, f64) {
    let b = bound::compute(config, workload, settings);
    (b.cost, b.infeasible)
}

/// A human table of summaries, with the lower bound if known.
pub fn render_table(summaries: &[Summary], lower_bound: Option<(f64, f64)>) -> String {
    let mut out = String::new();
    let lb = lower_bound.map(|(c, _)| c);
    out.push_str(&format!(
        "{:<22} {:>14} {:>9} {:>8} {:>10} {:>8}  {}\n",
        "policy", "cost (USD)", "vs bound", "misses", "succeeded", "failed", "jobs per provider"
    ));
    for s in summaries {
        let ratio = lb
            .filter(|&b| b > 0.0)
            .map_or("-".to_string(), |b| format!("{:.3}x", s.total_cost_usd / b));
        let per: Vec<String> = s
            .per_provider
            .iter()
            .map(|(p, n)| format!("{p}={n}"))
            .collect();
        out.push_str(&format!(
            "{:<22} {:>14.6} {:>9} {:>8} {:>10} {:>8}  {}\n",
            s.policy,
            s.total_cost_usd,
            ratio,
            s.deadline_misses,
            s.succeeded,
            s.failed,
            per.join(" ")
        ));
        // What the channels did, where anything but sync was used.
        if s.batches_created > 0 || s.flex_refusals > 0 || s.per_channel.keys().any(|c| c != "sync")
        {
            let channels: Vec<String> = s
                .per_channel
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            out.push_str(&format!(
                "{:<22} channels {}; batches {} (guarded {}{}){}; saved vs sync {:.6}\n",
                "",
                channels.join(" "),
                s.batches_created,
                s.batches_guarded,
                if s.batch_lines_expired > 0 {
                    format!(", lines expired {}", s.batch_lines_expired)
                } else {
                    String::new()
                },
                if s.flex_refusals > 0 {
                    format!("; flex refused {}", s.flex_refusals)
                } else {
                    String::new()
                },
                s.saved_vs_sync_usd
            ));
        }
    }
    if let Some((c, overflow)) = lower_bound {
        out.push_str(&format!("{:<22} {:>14.6}", "lower bound", c));
        if overflow > 0.0 {
            out.push_str(&format!(
                "   ({overflow:.0} jobs fit no capacity before their deadline: infeasible)"
            ));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// DeepSeek-like provider: half price from 04:00 UTC; a pricier provider always.
    const CONFIG: &str = r#"
[daemon]
safety_margin = "5m"
AFTER

[[providers]]
name = "cheap-at-night"
kind = "simulated"
latency = "1s"
rpm = 60

[[providers.price_windows]]
name = "night"
hours = ["04:00-06:00"]
multiplier = 0.5

[[providers.models]]
name = "m1"
input_per_mtok = 1.0
output_per_mtok = 1.0

[[providers]]
name = "steady"
kind = "simulated"
latency = "1s"

[[providers.models]]
name = "m2"
input_per_mtok = 0.8
output_per_mtok = 0.8

[classes]
chat = ["cheap-at-night/m1", "steady/m2"]
"#;

    fn config(after: &str) -> Config {
        Config::parse(&CONFIG.replace("AFTER", after), "test.toml", Path::new(".")).unwrap()
    }

    /// `n` jobs, one a second (or all at once if `burst`).
    fn workload_with(n: usize, deadline: &str, burst: bool) -> String {
        (0..n)
            .map(|i| {
                let at = if burst { 0 } else { i };
                format!(
                    r#"{{"custom_id":"j{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"chat","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":100}},"nightshift":{{"deadline":"{deadline}"}},"submit_at":"+{at}s","sim":{{"output_tokens":50}}}}"#
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn workload(n: usize, deadline: &str) -> String {
        workload_with(n, deadline, false)
    }

    fn start() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T02:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// A `chat` class over two simulated providers (1 s latency), each
    /// (name, extra provider lines, price per 1M tokens in and out), with
    /// models `m1` and `m2`.
    fn two_providers(a: (&str, &str, f64), b: (&str, &str, f64)) -> Config {
        let provider = |(name, extra, price): (&str, &str, f64), model: &str| {
            format!(
                "[[providers]]\nname = \"{name}\"\nkind = \"simulated\"\nlatency = \"1s\"\n{extra}\n\n\
                 [[providers.models]]\nname = \"{model}\"\ninput_per_mtok = {price:?}\noutput_per_mtok = {price:?}\n\n"
            )
        };
        let text = format!(
            "{}{}[classes]\nchat = [\"{}/m1\", \"{}/m2\"]\n",
            provider(a, "m1"),
            provider(b, "m2"),
            a.0,
            b.0
        );
        Config::parse(&text, "test.toml", Path::new(".")).unwrap()
    }

    /// Two equally priced 120-rpm providers and a burst: both serve it, so
    /// it ends in about half the time one alone would take.
    #[test]
    fn equal_prices_share_a_burst_between_providers() {
        let c = two_providers(("a", "rpm = 120", 1.0), ("b", "rpm = 120", 1.0));
        let w = load_workload(&workload_with(152, "1h", true), &c, start()).unwrap();
        let (summary, trace) = run(&c, &w, &Policy::Planner, &PlanSettings::default()).unwrap();
        assert_eq!(summary.succeeded, 152, "{summary:?}");
        let (a, b) = (summary.per_provider["a"], summary.per_provider["b"]);
        assert!(a >= 50 && b >= 50, "a {a}, b {b}");
        let last = trace.iter().filter_map(|t| t.completed_at).max().unwrap();
        // One 120-rpm provider alone needs ~76 s for 152 requests.
        assert!(
            last - start() <= chrono::Duration::seconds(50),
            "ended at {last}"
        );
    }

    /// A cheap provider failing a quarter of its requests keeps the share
    /// that fits it: its capacity is discounted by its long-run success
    /// rate, and dips of a short average (or one failed circuit probe) do
    /// not hand its jobs to the dear provider. 30 rpm × 50 min × 0.75 ≈
    /// 1,125 of the 1,200 jobs fit it before the deadline less the margin;
    /// it took 903 with a 20-answer average, 981 now (the rest is the
    /// rate learnt from 1.0 down: the dear provider takes what the plan
    /// thought would not fit while it learnt).
    #[test]
    fn a_flaky_cheap_provider_keeps_the_share_that_fits_it() {
        let c = two_providers(
            ("flaky", "failure_rate = 0.25\nrpm = 30", 0.5),
            ("steady", "", 1.0),
        );
        let w = load_workload(&workload_with(1200, "1h", true), &c, start()).unwrap();
        let (summary, _) = run(&c, &w, &Policy::Planner, &PlanSettings::default()).unwrap();
        assert_eq!(summary.succeeded, 1200, "{summary:?}");
        let flaky = summary.per_provider["flaky"];
        assert!(flaky >= 950, "{flaky} of 1200 jobs on the flaky provider");
    }

    #[test]
    fn max_in_window_counts_the_busiest_window() {
        assert_eq!(max_in_window(&[], 60_000), 0);
        assert_eq!(max_in_window(&[0, 59_999, 60_000, 60_001], 60_000), 3);
        assert_eq!(max_in_window(&[0, 1, 2, 100_000], 60_000), 3);
    }

    /// The trace records every attempt, the failed ones too, and the peak
    /// rates computed from it stay within the flaky provider's rpm and rpd.
    #[test]
    fn the_trace_records_every_attempt_and_rates_stay_within_limits() {
        let c = two_providers(
            ("flaky", "failure_rate = 0.3\nrpm = 30\nrpd = 200", 0.5),
            ("steady", "", 1.0),
        );
        let w = load_workload(&workload_with(300, "1h", true), &c, start()).unwrap();
        let (summary, trace) = run(&c, &w, &Policy::Planner, &PlanSettings::default()).unwrap();
        assert_eq!(summary.succeeded, 300, "{summary:?}");
        assert!(trace.iter().all(|t| t.sent.len() == t.attempts as usize));
        // A retried job shows its failed attempt on flaky before the answer.
        let retried: Vec<&TraceLine> = trace.iter().filter(|t| t.sent.len() > 1).collect();
        assert!(!retried.is_empty());
        assert!(retried.iter().all(|t| t.sent[0].provider == "flaky"
            && t.sent.windows(2).all(|a| a[0].sent_at <= a[1].sent_at)));
        let attempts: usize = trace.iter().map(|t| t.sent.len()).sum();
        assert_eq!(attempts, summary.succeeded + summary.retries);
        let flaky = &summary.rate_use[0];
        assert_eq!(flaky.provider, "flaky");
        assert!(flaky.max_requests_per_minute >= 20, "{flaky:?}");
        assert!(flaky.max_requests_per_minute <= 30, "{flaky:?}");
        assert!(flaky.max_requests_per_day <= 200, "{flaky:?}");
        assert!(flaky.peak().unwrap() <= 1.0);
    }

    #[test]
    fn the_planner_waits_for_the_night_price_and_matches_the_bound() {
        let c = config("");
        let w = load_workload(&workload(50, "8h"), &c, start()).unwrap();
        let settings = PlanSettings {
            safety_margin: c.daemon.safety_margin,
            ..PlanSettings::default()
        };
        let (planner, trace) = run(&c, &w, &Policy::Planner, &settings).unwrap();
        let (now, _) = run(&c, &w, &Policy::CheapestNow, &settings).unwrap();
        let (bound, infeasible) = lower_bound(&c, &w, &settings);
        assert_eq!(planner.succeeded, 50);
        assert_eq!(planner.deadline_misses, 0);
        assert_eq!(infeasible, 0.0);
        // Cheapest now is "steady" at 0.8; at night m1 costs 0.5.
        assert_eq!(now.per_provider.get("steady"), Some(&50));
        assert_eq!(planner.per_provider.get("cheap-at-night"), Some(&50));
        assert!((planner.total_cost_usd / now.total_cost_usd - 0.5 / 0.8).abs() < 1e-9);
        assert!(
            planner.total_cost_usd <= bound * 1.02,
            "{} vs {bound}",
            planner.total_cost_usd
        );
        assert!(trace.iter().all(|t| t.dispatched_at.unwrap()
            >= DateTime::parse_from_rfc3339("2026-11-24T04:00:00Z").unwrap()));
    }

    #[test]
    fn fixed_policy_misses_deadlines_when_its_provider_is_too_slow() {
        let c = config("");
        // 200 jobs at once due in 2 minutes do not fit one provider's 60 rpm.
        let w = load_workload(&workload_with(200, "2m", true), &c, start()).unwrap();
        let settings = PlanSettings {
            safety_margin: Duration::from_secs(10),
            ..PlanSettings::default()
        };
        let (fixed, trace) =
            run(&c, &w, &Policy::Fixed("cheap-at-night".into()), &settings).unwrap();
        assert!(
            fixed.expired > 0 && fixed.deadline_misses >= fixed.expired,
            "{fixed:?}"
        );
        assert_eq!(trace.len(), 200);
        assert!(
            trace
                .iter()
                .filter(|t| t.state == "expired")
                .all(|t| t.provider.is_none())
        );
        // The planner spills what the cheap provider cannot take to the other one.
        let (planner, _) = run(&c, &w, &Policy::Planner, &settings).unwrap();
        assert_eq!(planner.deadline_misses, 0, "{planner:?}");
    }

    #[test]
    fn after_deadline_run_runs_late_jobs_instead_of_expiring_them() {
        let c = config("after_deadline = \"run\"");
        let w = load_workload(&workload_with(200, "2m", true), &c, start()).unwrap();
        let settings = PlanSettings {
            safety_margin: Duration::from_secs(10),
            ..PlanSettings::default()
        };
        let (fixed, _) = run(&c, &w, &Policy::Fixed("cheap-at-night".into()), &settings).unwrap();
        assert_eq!((fixed.expired, fixed.succeeded), (0, 200), "{fixed:?}");
        assert!(
            fixed.deadline_misses > 0,
            "late completions still count as misses"
        );
    }

    /// A batch provider at half price (turnaround from its config) beside a
    /// sync-only one at 0.8.
    const BATCH_CONFIG: &str = r#"
[daemon]
safety_margin = "5m"

[[providers]]
name = "batchy"
kind = "simulated"
latency = "1s"
rpm = 600

[providers.batch]
discount = 0.5
expected_turnaround = "1h"
BATCH

[[providers.models]]
name = "m1"
input_per_mtok = 1.0
output_per_mtok = 1.0

[[providers]]
name = "steady"
kind = "simulated"
latency = "1s"
rpm = 600

[[providers.models]]
name = "m2"
input_per_mtok = 0.8
output_per_mtok = 0.8

[classes]
chat = ["batchy/m1", "steady/m2"]
"#;

    fn batch_config(batch: &str) -> Config {
        Config::parse(
            &BATCH_CONFIG.replace("BATCH", batch),
            "test.toml",
            Path::new("."),
        )
        .unwrap()
    }

    fn margin(c: &Config) -> PlanSettings {
        PlanSettings {
            safety_margin: c.daemon.safety_margin,
            ..PlanSettings::default()
        }
    }

    #[test]
    fn a_backlog_with_a_6h_deadline_goes_through_batches_at_the_batch_price() {
        let c = batch_config("simulated_turnaround = [\"2m\", \"20m\"]");
        let w = load_workload(&workload_with(200, "6h", true), &c, start()).unwrap();
        let settings = margin(&c);
        let (planner, trace) = run(&c, &w, &Policy::Planner, &settings).unwrap();
        assert_eq!(
            (planner.succeeded, planner.deadline_misses),
            (200, 0),
            "{planner:?}"
        );
        assert_eq!(planner.per_channel.get("batch"), Some(&200), "{planner:?}");
        assert!(!planner.per_channel.contains_key("sync"), "zero sync calls");
        assert!(planner.batches_created >= 1 && planner.batches_guarded == 0);
        assert!(trace.iter().all(|t| t.channel == Some("batch")));
        // Half of m1's sync price (what it saved equals what it paid), and
        // below the cheapest sync price.
        assert!((planner.saved_vs_sync_usd - planner.total_cost_usd).abs() < 1e-12);
        let (now, _) = run(&c, &w, &Policy::CheapestNow, &settings).unwrap();
        assert!(planner.total_cost_usd < now.total_cost_usd * (0.5 / 0.8) + 1e-12);
        let table = render_table(&[planner], None);
        assert!(table.contains("channels batch=200; batches"), "{table}");
    }

    #[test]
    fn a_batch_drawn_late_is_guarded_and_its_jobs_still_succeed_by_sync() {
        // Every batch takes the whole 24 h window: the guard must fire.
        let c = batch_config("simulated_late_fraction = 1.0");
        let w = load_workload(&workload_with(100, "6h", true), &c, start()).unwrap();
        let (planner, trace) = run(&c, &w, &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!(
            (planner.succeeded, planner.deadline_misses),
            (100, 0),
            "{planner:?}"
        );
        assert!(planner.batches_guarded >= 1, "{planner:?}");
        assert_eq!(planner.batches_guarded, planner.batches_created);
        assert!(!planner.per_channel.contains_key("batch"), "{planner:?}");
        assert!(trace.iter().all(|t| t.completed_at.unwrap() <= t.deadline));
    }

    #[test]
    fn an_overdue_batch_is_made_again_and_its_jobs_still_pay_the_batch_price() {
        // Batches usually end within 20 m (1 h expected); one drawn late
        // would take the whole 24 h window. Due in 6 h, a late batch is
        // cancelled once it has run 2 h, and its jobs go into a new batch
        // rather than waiting for the fallback instant and running on sync.
        // The draws are by provider name and batch number: `tardy`'s first
        // batch draws 0.043, the next ones 0.10 and more, so at a late
        // fraction of 0.05 only the first is late.
        let c = Config::parse(
            &BATCH_CONFIG.replace("batchy", "tardy").replace(
                "BATCH",
                "simulated_turnaround = [\"2m\", \"20m\"]\nsimulated_late_fraction = 0.05",
            ),
            "test.toml",
            Path::new("."),
        )
        .unwrap();
        let w = load_workload(&workload_with(100, "6h", true), &c, start()).unwrap();
        let (planner, trace) = run(&c, &w, &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!(
            (planner.succeeded, planner.deadline_misses),
            (100, 0),
            "{planner:?}"
        );
        assert!(planner.batches_guarded >= 1, "{planner:?}");
        assert!(planner.batches_created > planner.batches_guarded);
        assert_eq!(planner.per_channel.get("batch"), Some(&100), "{planner:?}");
        assert!(!planner.per_channel.contains_key("sync"), "{planner:?}");
        let two_hours = chrono::Duration::hours(2);
        for t in &trace {
            assert!(t.completed_at.unwrap() <= t.deadline, "{t:?}");
            // The late batch's jobs, sent twice (a cancelled line is not
            // an attempt): cancelled at 2 h, not at the fallback instant
            // (about 5 h 50 m), and sent again in a batch at once.
            if let [first, again] = &t.sent[..] {
                assert_eq!(first.sent_at, t.submitted_at, "{t:?}");
                assert_eq!(again.sent_at - t.submitted_at, two_hours, "{t:?}");
                assert_eq!(again.channel, "batch", "{t:?}");
            } else {
                assert_eq!(t.sent.len(), 1, "{t:?}");
            }
        }
        assert!(
            trace.iter().any(|t| t.sent.len() == 2),
            "the late batch's jobs"
        );
    }

    #[test]
    fn per_request_routers_never_use_a_batch_row() {
        let c = batch_config("");
        let w = load_workload(&workload_with(50, "6h", true), &c, start()).unwrap();
        for policy in [Policy::CheapestNow, Policy::Fixed("batchy".into())] {
            let (s, trace) = run(&c, &w, &policy, &margin(&c)).unwrap();
            assert_eq!(s.succeeded, 50, "{s:?}");
            assert_eq!(s.batches_created, 0);
            assert!(
                trace.iter().all(|t| t.channel == Some("sync")),
                "{policy:?}"
            );
        }
    }

    #[test]
    fn the_bound_is_at_most_the_planner_with_batch_rows() {
        let c = batch_config("simulated_turnaround = [\"2m\", \"20m\"]");
        let text = format!(
            "{}\n{}",
            workload_with(100, "6h", true),
            workload_with(30, "20m", true).replace("\"j", "\"short")
        );
        let w = load_workload(&text, &c, start()).unwrap();
        let settings = margin(&c);
        let (bound, infeasible) = lower_bound(&c, &w, &settings);
        assert_eq!(infeasible, 0.0);
        for policy in [
            Policy::Planner,
            Policy::CheapestNow,
            Policy::Fixed("steady".into()),
        ] {
            let (s, _) = run(&c, &w, &policy, &settings).unwrap();
            assert!(
                bound <= s.total_cost_usd + 1e-12,
                "{policy:?}: {bound} > {s:?}"
            );
        }
        // Not within 1.02 here: the bound ignores turnaround, so it puts the
        // 20-minute jobs on the batch row too (see `bound`).
    }

    #[test]
    fn a_cheap_chat_backlog_due_in_24h_pays_the_batch_price_not_off_peak() {
        // The embedded default's cheap-chat providers (its reference
        // prices), with a Batch API on openai.
        let text = r#"
[daemon]
safety_margin = "10m"

[[providers]]
name = "deepseek"
kind = "simulated"
rpm = 300

[[providers.price_windows]]
name = "peak"
days = ["mon", "tue", "wed", "thu", "fri"]
hours = ["01:00-04:00", "06:00-10:00"]
multiplier = 1.0

[[providers.price_windows]]
name = "off-peak"
multiplier = 0.5

[[providers.models]]
name = "deepseek-flash"
input_per_mtok = 0.30
output_per_mtok = 1.20

[[providers]]
name = "openai"
kind = "simulated"
rpm = 500

[providers.batch]
discount = 0.5
simulated_turnaround = ["2m", "20m"]

[[providers.models]]
name = "gpt-4o-mini"
input_per_mtok = 0.15
output_per_mtok = 0.60

[[providers]]
name = "google"
kind = "simulated"
rpm = 300

[[providers.models]]
name = "gemini-2.5-flash"
input_per_mtok = 0.30
output_per_mtok = 2.50

[classes]
cheap-chat = ["deepseek/deepseek-flash", "openai/gpt-4o-mini", "google/gemini-2.5-flash"]
"#;
        let c = Config::parse(text, "test.toml", Path::new(".")).unwrap();
        let w = load_workload(
            &workload_with(300, "24h", true).replace("\"chat\"", "\"cheap-chat\""),
            &c,
            start(),
        )
        .unwrap();
        let (planner, trace) = run(&c, &w, &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!(
            (planner.succeeded, planner.deadline_misses),
            (300, 0),
            "{planner:?}"
        );
        assert_eq!(planner.per_channel.get("batch"), Some(&300), "{planner:?}");
        // 0.075/0.30: half of DeepSeek's off-peak 0.15/0.60.
        let batch: f64 = trace
            .iter()
            .map(|t| (t.input_tokens as f64 * 0.075 + t.output_tokens as f64 * 0.30) / 1e6)
            .sum();
        assert!(
            (planner.total_cost_usd - batch).abs() < 1e-12,
            "{planner:?}"
        );
    }

    #[test]
    fn simulated_batch_fields_are_refused_on_a_real_provider() {
        let text = BATCH_CONFIG
            .replacen(
                "kind = \"simulated\"",
                "kind = \"openai\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"X\"",
                1,
            )
            .replace("BATCH", "simulated_late_fraction = 0.1");
        let e = Config::parse(&text, "test.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml:") && e.contains("simulated_late_fraction"),
            "{e}"
        );
    }

    #[test]
    fn an_expired_batchs_lines_rerun_by_sync_before_their_deadline_the_attempt_not_counted() {
        // Every batch is expired by the provider at its 24 h window, with a
        // drawn share of its lines not run; the deadline (30 h) is past the
        // window plus the time to run them, so the guard does not fire (nor
        // early: 12 h expected, so a batch overdue at 24 h could not be
        // made again in time).
        let c = Config::parse(
            &BATCH_CONFIG
                .replace(
                    "expected_turnaround = \"1h\"",
                    "expected_turnaround = \"12h\"",
                )
                .replace(
                    "BATCH",
                    "simulated_turnaround = [\"2m\", \"20m\"]\nsimulated_expire_fraction = 1.0",
                ),
            "test.toml",
            Path::new("."),
        )
        .unwrap();
        let w = load_workload(&workload_with(100, "30h", true), &c, start()).unwrap();
        let (planner, trace) = run(&c, &w, &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!(
            (planner.succeeded, planner.deadline_misses, planner.retries),
            (100, 0, 0),
            "{planner:?}"
        );
        assert!(planner.batches_created >= 1, "{planner:?}");
        assert_eq!(planner.batches_guarded, 0, "{planner:?}");
        assert!(planner.batch_lines_expired > 0, "{planner:?}");
        // Each expired line ran again, on sync, once: its batch attempt
        // was not counted.
        let sync: Vec<&TraceLine> = trace.iter().filter(|t| t.channel == Some("sync")).collect();
        assert_eq!(sync.len(), planner.batch_lines_expired, "{planner:?}");
        assert!(sync.iter().all(|t| t.attempts == 1), "{sync:?}");
        let window = chrono::Duration::hours(24);
        for t in &sync {
            assert!(t.dispatched_at.unwrap() >= t.submitted_at + window, "{t:?}");
            assert!(t.completed_at.unwrap() <= t.deadline, "{t:?}");
        }
        // Lines the provider ran before it expired the batch answered there.
        assert_eq!(
            planner.per_channel.get("batch").copied().unwrap_or(0) + sync.len(),
            100
        );
        let table = render_table(&[planner], None);
        assert!(table.contains("(guarded 0, lines expired "), "{table}");
    }

    /// One simulated provider with a flex channel at half price.
    const FLEX_CONFIG: &str = r#"
[daemon]
safety_margin = "5m"

[[providers]]
name = "flexy"
kind = "simulated"
latency = "1s"
rpm = 600

[providers.flex]
discount = 0.5
FLEX

[[providers.models]]
name = "m1"
input_per_mtok = 1.0
output_per_mtok = 1.0

[classes]
chat = ["flexy/m1"]
"#;

    #[test]
    fn a_flex_refusal_waits_for_flex_when_the_deadline_allows_and_falls_back_when_not() {
        let flex = |f: &str| {
            Config::parse(&FLEX_CONFIG.replace("FLEX", f), "test.toml", Path::new(".")).unwrap()
        };
        // Flex fits a job due in 20m (15m flex timeout + 5m margin) only
        // now, not after the 60 s back-off; one due in 6h can wait.
        let w = |c: &Config, deadline: &str| {
            load_workload(&workload_with(20, deadline, true), c, start()).unwrap()
        };
        // Never refused: every job on flex.
        let c = flex("");
        let (open, _) = run(&c, &w(&c, "6h"), &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!(open.per_channel.get("flex"), Some(&20), "{open:?}");
        assert_eq!(open.flex_refusals, 0);
        let (open_soon, _) = run(&c, &w(&c, "20m"), &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!(
            open_soon.per_channel.get("flex"),
            Some(&20),
            "{open_soon:?}"
        );

        // Always refused, due in 20m: no room to wait, so each request is
        // sent again on the standard row right away (the daemon's
        // `FlexRefusal::of`), one attempt, at the standard price.
        let c = flex("simulated_refusal_fraction = 1.0");
        let (refused, trace) = run(&c, &w(&c, "20m"), &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!(
            (refused.succeeded, refused.deadline_misses, refused.retries),
            (20, 0, 0),
            "{refused:?}"
        );
        assert!(refused.flex_refusals >= 1, "{refused:?}");
        assert_eq!(refused.per_channel.get("sync"), Some(&20), "{refused:?}");
        assert!(
            trace
                .iter()
                .all(|t| t.channel == Some("sync") && t.attempts == 1),
            "{trace:?}"
        );
        assert!((refused.total_cost_usd - 2.0 * open.total_cost_usd).abs() < 1e-12);
        let table = render_table(&[refused], None);
        assert!(table.contains("; flex refused "), "{table}");
        assert!(reliability::is_flex_refusal(&flex_refusal()));

        // Refused half the time, due in 6h: a refused job waits out the
        // back-off and tries flex again rather than paying twice as much;
        // every job ends on flex at the flex price.
        let c = flex("simulated_refusal_fraction = 0.5");
        let (waited, trace) = run(&c, &w(&c, "6h"), &Policy::Planner, &margin(&c)).unwrap();
        assert!(waited.flex_refusals >= 5, "{waited:?}");
        assert_eq!(
            (waited.succeeded, waited.deadline_misses),
            (20, 0),
            "{waited:?}"
        );
        assert_eq!(waited.per_channel.get("flex"), Some(&20), "{waited:?}");
        assert!((waited.total_cost_usd - open.total_cost_usd).abs() < 1e-12);
        let again: Vec<_> = trace.iter().filter(|t| t.attempts > 1).collect();
        assert!(!again.is_empty(), "{trace:?}");
        for t in &again {
            let gap = t.sent[1].sent_at - t.sent[0].sent_at;
            assert!(
                gap >= chrono::Duration::seconds(60),
                "after the back-off: {t:?}"
            );
        }

        // Always refused, due in 6h: it waits while attempts are left, and
        // its last attempt falls back to the standard row: no job lost.
        let c = flex("simulated_refusal_fraction = 1.0");
        let (last, trace) = run(&c, &w(&c, "6h"), &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!((last.succeeded, last.deadline_misses), (20, 0), "{last:?}");
        assert_eq!(last.per_channel.get("sync"), Some(&20), "{last:?}");
        let max = c.daemon.retry.max_attempts;
        assert!(trace.iter().all(|t| t.attempts == max), "{trace:?}");

        // A max_cost_usd only flex meets: no fallback, the job is queued
        // again (the attempt counted) and waits for flex, which refuses it
        // every time, until its attempts run out.
        let mut jobs = w(&c, "6h");
        let standard = c.catalog.models[jobs[0].candidates[0]]
            .standard
            .unwrap_or(0);
        for j in &mut jobs {
            let est =
                c.catalog
                    .cost_at(standard, start(), j.input_tokens, j.expected_output_tokens);
            j.max_cost_usd = Some(0.75 * est);
        }
        let (capped, trace) = run(&c, &jobs, &Policy::Planner, &margin(&c)).unwrap();
        assert_eq!((capped.succeeded, capped.failed), (0, 20), "{capped:?}");
        assert!(
            capped.flex_refusals > 20 && capped.retries > 0,
            "{capped:?}"
        );
        assert_eq!(capped.total_cost_usd, 0.0);
        assert!(trace.iter().all(|t| t.attempts > 1), "{trace:?}");
    }

    #[test]
    fn simulated_expire_and_refusal_fractions_are_bounded_and_simulated_only() {
        let flex = FLEX_CONFIG.replace("FLEX", "simulated_refusal_fraction = 1.5");
        let batch = BATCH_CONFIG.replace("BATCH", "simulated_expire_fraction = -0.1");
        for (text, field) in [
            (flex.as_str(), "flex.simulated_refusal_fraction"),
            (batch.as_str(), "batch.simulated_expire_fraction"),
        ] {
            let e = Config::parse(text, "test.toml", Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("test.toml:")
                    && e.contains(field)
                    && e.contains("not a fraction from 0 to 1"),
                "{e}"
            );
            let real = text
                .replacen(
                    "kind = \"simulated\"",
                    "kind = \"openai\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"X\"",
                    1,
                )
                .replace("1.5", "0.5")
                .replace("-0.1", "0.5");
            let e = Config::parse(&real, "test.toml", Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("test.toml:") && e.contains(field) && e.contains("only a simulated"),
                "{e}"
            );
        }
        let c = batch_config("simulated_expire_fraction = 0.25");
        let terms = c.catalog.providers[0].batch.clone().unwrap();
        assert_eq!(terms.simulated_expire_fraction, 0.25);
    }

    #[test]
    fn workload_errors_name_the_line_and_field() {
        let c = config("");
        let text = format!(
            "{}\n{{\"custom_id\":\"x\",\"submit_at\":\"yesterday\"}}",
            workload(1, "1h")
        );
        let e = load_workload(&text, &c, start()).unwrap_err();
        assert_eq!((e.line, e.error.field.as_deref()), (2, Some("submit_at")));
        assert_eq!(
            parse_submit_at("+2h30m", start()).unwrap().to_rfc3339(),
            "2026-11-24T04:30:00+00:00"
        );
    }
}
