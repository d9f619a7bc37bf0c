//! The dispatcher: the loop that plans the queue, takes the jobs the plan
//! says run now, leases them, sends them, and records the results.
//!
//! Its shape: sleep until the next thing is due or something changes (jobs
//! arrive, a request finishes, the plan's first slot ends), then do
//! everything that is due now. Planning itself is pure ([`crate::plan`]);
//! this module only feeds it the queue's summary and what it has observed
//! of the providers (latency, success rate, token counts).

pub mod budget;
pub mod limits;
pub mod provider;
pub mod reliability;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use self::reliability::{Health, Outcome, RetryPolicy, Signals, Verdict};
use crate::dispatch::limits::RateLimits;
use crate::dispatch::provider::{ProviderClient, Request};
use crate::domain::job::Options;
use crate::domain::pricing::{Catalog, Endpoint, ModelId};
use crate::plan::{self, PlanSettings, PlannedGroup, ProviderCapacity, Quotas};
use crate::store::{DueJob, Finish, QueueError, Start, Store};

/// How many jobs of one group one pass takes at most.
const BATCH: usize = 256;
/// How long an idle dispatcher sleeps before looking again.
const IDLE: Duration = Duration::from_secs(1);
/// Re-plan at least this often (new observations, the clock moving on).
const REPLAN_EVERY: Duration = Duration::from_secs(60);
/// ... and at most this often, however many events ask for it.
const REPLAN_AT_MOST: Duration = Duration::from_millis(500);

/// Shared handles the dispatcher works with.
pub struct Dispatcher {
    pub store: Arc<Store>,
    pub catalog: Arc<Catalog>,
    /// Parallel to `catalog.providers`.
    pub clients: Vec<Arc<ProviderClient>>,
    /// Latency to assume for each provider before any is observed.
    pub initial_latency: Vec<Duration>,
    /// This instance's lease owner id.
    pub owner: String,
    /// Lease on a running job: the request timeout plus a margin.
    pub lease: Duration,
    pub plan_settings: PlanSettings,
    /// Run jobs whose deadline has passed (on the fastest provider) instead
    /// of expiring them.
    pub run_after_deadline: bool,
    pub retry: RetryPolicy,
    /// Spending caps.
    pub budgets: Vec<crate::dispatch::budget::Budget>,
    /// Metrics and the live provider health, for the HTTP API.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// The reloadable configuration (SIGHUP); `None` = fixed.
    pub live: Option<crate::config::live::LiveRx>,
    /// For building provider clients on a reload.
    pub request_timeout: Duration,
    /// Notified when jobs arrive (ingest) to re-plan and dispatch at once.
    pub wake: Arc<Notify>,
    /// Notified when jobs become final, for the outbox writer.
    pub finished: Arc<Notify>,
}

/// Exponentially weighted moving average.
#[derive(Debug, Clone, Copy)]
struct Ewma {
    value: f64,
    weight: f64,
}

impl Ewma {
    fn new(value: f64) -> Ewma {
        Ewma {
            value,
            weight: 0.05,
        }
    }
    fn observe(&mut self, x: f64) {
        if x.is_finite() {
            self.value += self.weight * (x - self.value);
        }
    }
}

/// What the dispatcher has learned about providers and routes.
struct Observed {
    latency_s: Vec<Ewma>,
    success: Vec<Ewma>,
    /// Provider-reported input tokens ÷ our estimate, per provider.
    input_ratio: Vec<Ewma>,
    /// Actual output tokens ÷ expected, per route key (model class).
    output_ratio: std::collections::HashMap<String, Ewma>,
    /// Pauses, circuit breakers, disabled providers.
    health: Vec<Health>,
    /// The earliest time a retried job becomes due again: re-plan then.
    next_retry: Option<DateTime<Utc>>,
    /// Spend against the budgets in their current periods.
    budget: crate::dispatch::budget::BudgetState,
}

/// A finished request, reported back to the loop.
struct Done {
    /// Index in the catalog the request was sent under; `provider_name`
    /// finds it again if the configuration was reloaded meanwhile.
    provider: usize,
    provider_name: String,
    /// Likewise for the model (`provider/model`).
    model: usize,
    model_name: String,
    route_key: String,
    estimated_tokens: u64,
    estimated_input: u64,
    estimated_output: u64,
    usage: Option<(u64, u64)>,
    verdict: Verdict,
    signals: Signals,
    latency: Duration,
    /// The job went back to the queue until then.
    retry_at: Option<DateTime<Utc>>,
    /// Charged to the budget at dispatch (estimate), and billed (actual).
    charged_cost: f64,
    actual_cost: f64,
    list_cost: f64,
    status: Option<u16>,
}

/// The current plan: groups, and what may start in its first slot.
struct Current {
    groups: Vec<PlannedGroup>,
    quotas: Quotas,
    made: Instant,
    /// How long making it took: events re-plan at most every 10× this.
    took: Duration,
    /// A provider excluded from this plan (open circuit) may be probed from
    /// then: re-plan to include it.
    reconsider_at: Option<DateTime<Utc>>,
}

/// Runs a closure against the store off the async threads.
pub async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> T + Send + 'static,
) -> T {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .expect("store task panicked")
}

impl Dispatcher {
    fn capacities(&self, observed: &Observed) -> Vec<ProviderCapacity> {
        let now = Utc::now();
        self.catalog
            .providers
            .iter()
            .enumerate()
            .map(|(p, info)| ProviderCapacity {
                latency: Duration::from_secs_f64(observed.latency_s[p].value.max(0.001)),
                success_rate: observed.success[p].value,
                input_token_ratio: observed.input_ratio[p].value.clamp(0.25, 4.0),
                // Out of health, or out of budget until it renews.
                unavailable_until: {
                    let health = observed.health[p].plan_excluded_until(now);
                    let budget = (observed.budget.remaining(p) <= 1e-9)
                        .then(|| observed.budget.renews_at(p, 1e-9, now));
                    health.max(budget)
                },
                ..ProviderCapacity::from_limits(&info.limits, Duration::ZERO, 0.0)
            })
            .collect()
    }

    /// Dispatches until `shutdown` turns true, then waits up to `grace` for
    /// in-flight requests and returns the rest to the queue.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let now_ms = Utc::now().timestamp_millis();
        let mut limits = RateLimits::for_catalog(&self.catalog, now_ms);
        let n = self.catalog.providers.len();
        let mut observed = Observed {
            latency_s: self
                .initial_latency
                .iter()
                .map(|l| Ewma::new(l.as_secs_f64()))
                .collect(),
            success: vec![Ewma::new(1.0); n],
            input_ratio: vec![Ewma::new(1.0); n],
            output_ratio: Default::default(),
            health: vec![Health::default(); n],
            next_retry: None,
            budget: self.load_budgets().await,
        };
        // Start from what finished jobs taught earlier runs.
        match blocking(&self.store, |s| s.learned_token_ratios(7)).await {
            Ok((inputs, outputs)) => {
                for (provider, ratio) in inputs {
                    if let Some(p) = self.catalog.provider_id(&provider) {
                        observed.input_ratio[p] = Ewma::new(ratio);
                    }
                }
                for (route, ratio) in outputs {
                    observed.output_ratio.insert(route, Ewma::new(ratio));
                }
            }
            Err(e) => warn!("could not read token statistics of finished jobs: {e}"),
        }
        for p in 0..n {
            self.publish_health(p, &observed);
        }
        let mut current: Option<Current> = None;
        let mut replan = true;
        let mut in_flight: JoinSet<Done> = JoinSet::new();
        loop {
            if self
                .live
                .as_mut()
                .is_some_and(|rx| rx.has_changed().unwrap_or(false))
            {
                self.apply_reload(&mut limits, &mut observed).await;
                current = None;
            }
            let next = match self
                .pass(
                    &mut limits,
                    &mut observed,
                    &mut current,
                    &mut replan,
                    &mut in_flight,
                )
                .await
            {
                Ok(next) => next,
                Err(e) => {
                    warn!("dispatch pass failed: {e}");
                    IDLE
                }
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.wake.notified() => replan = true,
                _ = tokio::time::sleep(next) => {}
                Some(done) = in_flight.join_next() => {
                    replan = true;
                    let mut changed = self.account(&mut limits, &mut observed, done);
                    while let Some(done) = in_flight.try_join_next() {
                        changed |= self.account(&mut limits, &mut observed, done);
                    }
                    if changed {
                        // Availability changed: re-plan now, not after the throttle.
                        current = None;
                    }
                }
            }
        }
        let waiting = in_flight.len();
        if waiting > 0 {
            info!(
                in_flight = waiting,
                grace_s = grace.as_secs_f64(),
                "shutting down: waiting for in-flight requests"
            );
            let drain = async {
                while let Some(done) = in_flight.join_next().await {
                    self.account(&mut limits, &mut observed, done);
                }
            };
            if tokio::time::timeout(grace, drain).await.is_err() {
                in_flight.abort_all();
            }
        }
        let owner = self.owner.clone();
        match blocking(&self.store, move |s| s.release_running(&owner)).await {
            Ok(0) => {}
            Ok(n) => info!(released = n, "returned unfinished jobs to the queue"),
            Err(e) => warn!("could not release running jobs (their leases will expire): {e}"),
        }
        self.finished.notify_one();
    }

    /// Takes a reloaded configuration: new catalog, clients and budgets;
    /// what was learned and the limits' in-flight counts carry over by
    /// provider name. Requests in flight finish on their old clients.
    async fn apply_reload(&mut self, limits: &mut RateLimits, observed: &mut Observed) {
        let Some(rx) = self.live.as_mut() else { return };
        let live = rx.borrow_and_update().clone();
        let mut clients = Vec::new();
        for (p, t) in live.catalog.providers.iter().zip(&live.transports) {
            match ProviderClient::new(&p.name, t, self.request_timeout) {
                Ok(c) => clients.push(Arc::new(c)),
                Err(e) => {
                    warn!(provider = %p.name, "reload not applied: cannot build the HTTP client: {e}");
                    return;
                }
            }
        }
        let now = Utc::now();
        let old = std::mem::replace(&mut self.catalog, live.catalog.clone());
        let old_index = |name: &str| old.provider_id(name);
        let mut new_limits = RateLimits::for_catalog(&self.catalog, now.timestamp_millis());
        let n = self.catalog.providers.len();
        let mut fresh = Observed {
            latency_s: Vec::with_capacity(n),
            success: Vec::with_capacity(n),
            input_ratio: Vec::with_capacity(n),
            output_ratio: std::mem::take(&mut observed.output_ratio),
            health: Vec::with_capacity(n),
            next_retry: observed.next_retry,
            budget: observed.budget.clone(),
        };
        for (p, t) in self.catalog.providers.iter().zip(&live.transports) {
            match old_index(&p.name) {
                Some(o) => {
                    fresh.latency_s.push(observed.latency_s[o]);
                    fresh.success.push(observed.success[o]);
                    fresh.input_ratio.push(observed.input_ratio[o]);
                    fresh.health.push(observed.health[o].clone());
                    let idx = fresh.health.len() - 1;
                    new_limits
                        .provider(idx)
                        .carry_in_flight(limits.provider(o).in_flight());
                }
                None => {
                    fresh
                        .latency_s
                        .push(Ewma::new(t.typical_latency().as_secs_f64()));
                    fresh.success.push(Ewma::new(1.0));
                    fresh.input_ratio.push(Ewma::new(1.0));
                    fresh.health.push(Health::default());
                }
            }
        }
        self.clients = clients;
        self.initial_latency = live
            .transports
            .iter()
            .map(crate::config::Transport::typical_latency)
            .collect();
        self.budgets = live.budgets.clone();
        *limits = new_limits;
        *observed = fresh;
        observed.budget = self.load_budgets().await;
        for p in 0..n {
            self.publish_health(p, observed);
        }
        info!(config = %live.origin, providers = n, models = self.catalog.models.len(),
              classes = self.catalog.classes.len(), "configuration reloaded: re-planning");
    }

    /// Counts a finished request in the metrics, and publishes the
    /// provider's health as the dispatcher now sees it.
    fn record_metrics(&self, d: &Done, observed: &Observed) {
        use crate::telemetry::{OutcomeLabel, provider as label};
        let t = &self.telemetry;
        let name = &self.catalog.providers[d.provider].name;
        let p = label(name);
        let outcome = match (&d.verdict, d.retry_at) {
            (Verdict::Succeeded, _) => "succeeded",
            (Verdict::DisableProvider { .. }, _) => "provider_disabled",
            (_, Some(_)) => "retried",
            _ => "failed",
        };
        t.requests
            .get_or_create(&OutcomeLabel {
                provider: name.clone(),
                outcome: outcome.into(),
            })
            .inc();
        if d.status == Some(429) {
            t.rate_limited.get_or_create(&p).inc();
        }
        if matches!(d.verdict, Verdict::Retry { pause: Some(_) }) || d.signals.pause().is_some() {
            t.pauses.get_or_create(&p).inc();
        }
        t.latency.get_or_create(&p).observe(d.latency.as_secs_f64());
        if let Some((input, output)) = d.usage {
            t.input_tokens.get_or_create(&p).inc_by(input);
            t.output_tokens.get_or_create(&p).inc_by(output);
        }
        if d.actual_cost > 0.0 {
            t.spend_usd.get_or_create(&p).inc_by(d.actual_cost);
            t.list_usd.get_or_create(&p).inc_by(d.list_cost);
            t.savings_usd
                .get_or_create(&p)
                .inc_by((d.list_cost - d.actual_cost).max(0.0));
        }
        self.publish_health(d.provider, observed);
    }

    fn publish_health(&self, p: usize, observed: &Observed) {
        let h = &observed.health[p];
        let code = if h.disabled.is_some() {
            3
        } else {
            match h.circuit {
                reliability::Circuit::Closed => 0,
                reliability::Circuit::Open { .. } => 1,
                reliability::Circuit::HalfOpen { .. } => 2,
            }
        };
        self.telemetry.set_health(
            &self.catalog.providers[p].name,
            code,
            h.describe(Utc::now()),
        );
    }

    /// The budgets, with what finished jobs already spent in their periods.
    async fn load_budgets(&self) -> crate::dispatch::budget::BudgetState {
        let budgets = self.budgets.clone();
        let names: Vec<String> = self
            .catalog
            .providers
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let now = Utc::now();
        blocking(&self.store, move |s| {
            crate::dispatch::budget::BudgetState::new(budgets, now, |provider, since| {
                let name = provider.map(|p| names[p].as_str());
                s.spent_since(name, since.timestamp_millis())
                    .unwrap_or_else(|e| {
                        warn!(
                            "could not read past spend for the budgets (counting it as zero): {e}"
                        );
                        0.0
                    })
            })
        })
        .await
    }

    /// Books a finished request: rate-limit correction, observations, the
    /// provider's health. Returns true if a provider's availability changed.
    fn account(
        &self,
        limits: &mut RateLimits,
        observed: &mut Observed,
        done: Result<Done, tokio::task::JoinError>,
    ) -> bool {
        match done {
            Ok(mut d) => {
                // The configuration may have been reloaded while it ran.
                match self.catalog.provider_id(&d.provider_name) {
                    Some(p) => d.provider = p,
                    None => return false,
                }
                // (usize::MAX: the model is gone; only the provider's limits apply.)
                d.model = (0..self.catalog.models.len())
                    .find(|&m| self.catalog.qualified_name(m) == d.model_name)
                    .unwrap_or(usize::MAX);
                let now = Utc::now();
                // The budget was charged the estimate; correct it to what was billed.
                observed
                    .budget
                    .charge(d.provider, d.actual_cost - d.charged_cost);
                let health = &mut observed.health[d.provider];
                let mut changed = health.record(&d.verdict, now);
                if let Some(pause) = d
                    .signals
                    .pause()
                    .filter(|_| d.verdict == Verdict::Succeeded)
                {
                    // A success that leaves a limit at zero: wait for its reset.
                    changed |= health.pause(now, pause);
                }
                if changed {
                    let name = &self.catalog.providers[d.provider].name;
                    warn!(provider = %name, health = %health.describe(now), "provider availability changed; re-planning");
                }
                let actual = d.usage.map(|(i, o)| i + o);
                limits.release(
                    d.provider,
                    d.model,
                    d.estimated_tokens,
                    actual,
                    Utc::now().timestamp_millis(),
                );
                self.record_metrics(&d, observed);
                observed.latency_s[d.provider].observe(d.latency.as_secs_f64());
                if let Some(at) = d.retry_at {
                    observed.next_retry = Some(observed.next_retry.map_or(at, |t| t.min(at)));
                }
                let succeeded = d.verdict == Verdict::Succeeded;
                observed.success[d.provider].observe(if succeeded { 1.0 } else { 0.0 });
                if let Some((input, output)) = d.usage {
                    if d.estimated_input > 0 {
                        observed.input_ratio[d.provider]
                            .observe(input as f64 / d.estimated_input as f64);
                    }
                    if d.estimated_output > 0 {
                        observed
                            .output_ratio
                            .entry(d.route_key)
                            .or_insert_with(|| Ewma::new(1.0))
                            .observe(output as f64 / d.estimated_output as f64);
                    }
                }
                self.finished.notify_one();
                changed
            }
            Err(e) if e.is_panic() => {
                warn!("a request task panicked: {e}");
                false
            }
            Err(_) => false,
        }
    }

    /// Re-plans the queue from its summary in SQLite.
    async fn make_plan(&self, observed: &Observed) -> Result<Current, QueueError> {
        let buckets = blocking(&self.store, |s| s.queued_buckets()).await?;
        let now = Utc::now();
        let catalog = self.catalog.clone();
        let capacities = self.capacities(observed);
        let output_scale: std::collections::HashMap<String, f64> = observed
            .output_ratio
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clamp(0.05, 4.0)))
            .collect();
        let settings = self.plan_settings;
        let disabled: Vec<Option<String>> =
            observed.health.iter().map(|h| h.disabled.clone()).collect();
        let started = Instant::now();
        let (q, quotas) = tokio::task::spawn_blocking(move || {
            let q = plan::plan_queue(
                &buckets,
                &catalog,
                &capacities,
                now,
                &settings,
                |key| output_scale.get(key).copied().unwrap_or(1.0),
                // Every eligible provider refused our key: fail now, with why,
                // rather than let the jobs wait for their deadline.
                |models| {
                    let reasons: Vec<String> = models
                        .iter()
                        .filter_map(|&m| {
                            let p = catalog.models[m].provider;
                            disabled[p]
                                .as_ref()
                                .map(|r| format!("{}: {r}", catalog.providers[p].name))
                        })
                        .collect();
                    (reasons.len() == models.len()).then(|| {
                        format!(
                            "every eligible provider is disabled ({})",
                            reasons.join("; ")
                        )
                    })
                },
            );
            let quotas = Quotas::from_plan(&q.plan, &q.job_groups(), &catalog, &capacities);
            (q, quotas)
        })
        .await
        .expect("planner panicked");
        let crate::plan::QueuePlan {
            groups,
            plan,
            unroutable,
        } = q;
        for (route_key, reason) in unroutable {
            let message = format!("no eligible model in the current configuration: {reason}");
            let now_ms = now.timestamp_millis();
            let n = blocking(&self.store, move |s| {
                s.fail_route(&route_key, now_ms, "not_routable", &message)
            })
            .await?;
            warn!(
                jobs = n,
                "failed queued jobs that no configured model can serve"
            );
            self.finished.notify_one();
        }
        self.telemetry.planned_now.clear();
        for &(_, m, n) in &quotas.entries {
            let name = &self.catalog.providers[self.catalog.models[m].provider].name;
            self.telemetry
                .planned_now
                .get_or_create(&crate::telemetry::provider(name))
                .inc_by(n as i64);
        }
        let jobs: u64 = groups.iter().map(|g| g.group.jobs).sum();
        let now_jobs: u64 = quotas.entries.iter().map(|e| e.2).sum();
        if jobs > 0 {
            info!(queued = jobs, groups = groups.len(), slots = plan.slots.len(), run_now = now_jobs,
                  expected_cost_usd = plan.expected_cost, dispatch_now_cost_usd = plan.dispatch_now_cost,
                  method = ?plan.method, took_ms = started.elapsed().as_millis() as u64, "plan");
        }
        Ok(Current {
            groups,
            quotas,
            made: Instant::now(),
            took: started.elapsed(),
            reconsider_at: observed.health.iter().filter_map(Health::probe_due).min(),
        })
    }

    /// One pass: expire overdue jobs, re-plan if due, start what the plan's
    /// first slot allows and the rate limits admit. Returns how long to sleep
    /// if nothing else happens.
    async fn pass(
        &self,
        limits: &mut RateLimits,
        observed: &mut Observed,
        current: &mut Option<Current>,
        replan: &mut bool,
        in_flight: &mut JoinSet<Done>,
    ) -> Result<Duration, QueueError> {
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        let expired = if self.run_after_deadline {
            Vec::new()
        } else {
            blocking(&self.store, move |s| s.expire_overdue(now_ms)).await?
        };
        if !expired.is_empty() {
            for (id, custom_id) in &expired {
                debug!(job = id, %custom_id, "job expired");
            }
            info!(
                expired = expired.len(),
                "jobs passed their deadline before dispatch"
            );
            self.finished.notify_one();
        }
        if observed.budget.roll_over(now) {
            info!("a budget period renewed");
            *current = None;
        }
        let retry_due = observed.next_retry.is_some_and(|t| t <= now);
        if retry_due {
            observed.next_retry = None;
        }
        let stale = match current {
            None => true,
            Some(_) if retry_due => true,
            Some(c) => {
                c.made.elapsed() >= REPLAN_EVERY
                    || c.quotas.until.is_some_and(|u| now >= u)
                    || c.reconsider_at.is_some_and(|t| now >= t)
                    || (*replan && c.made.elapsed() >= REPLAN_AT_MOST.max(c.took * 10))
            }
        };
        if stale {
            *current = Some(self.make_plan(observed).await?);
            *replan = false;
        }
        let Some(cur) = current.as_mut() else {
            return Ok(IDLE);
        };

        let mut starts = Vec::new();
        let mut routed = Vec::new();
        let mut failures = Vec::new();
        let mut next = IDLE;
        let mut blocked = HashSet::new();
        let mut blocked_models = HashSet::new();
        let mut replan_now = false;
        for idx in 0..cur.quotas.entries.len() {
            let (g, model, remaining) = cur.quotas.entries[idx];
            let provider = self.catalog.models[model].provider;
            if remaining == 0 || blocked.contains(&provider) || blocked_models.contains(&model) {
                continue;
            }
            match observed.health[provider].available_from(now) {
                Some(t) if t <= now => {}
                later => {
                    // Paused, circuit open or disabled: the next plan moves its jobs.
                    blocked.insert(provider);
                    if let Some(t) = later {
                        next = next.min(
                            (t - now)
                                .to_std()
                                .unwrap_or_default()
                                .max(Duration::from_millis(1)),
                        );
                    }
                    continue;
                }
            }
            let group = &cur.groups[g];
            let (key, from, to) = (
                group.route_key.clone(),
                group.deadline_from,
                group.deadline_to,
            );
            let limit = (remaining as usize).min(BATCH);
            let jobs = blocking(&self.store, move |s| {
                s.queued_in_route(&key, from, to, now_ms, limit)
            })
            .await?;
            if jobs.len() < limit {
                // The group has fewer queued jobs than planned (some finished or
                // were cancelled meanwhile): what is here is all there is.
                cur.quotas.entries[idx].2 = jobs.len() as u64;
            }
            for job in jobs {
                let estimate = (job.est_input_tokens, job.est_output_tokens);
                let max_cost = job
                    .options
                    .as_deref()
                    .and_then(|o| Options::parse(o).ok())
                    .and_then(|o| o.max_cost_usd);
                let cost = self.catalog.cost_at(model, now, estimate.0, estimate.1);
                if let Some(max) = max_cost
                    && cost > max
                {
                    failures.push((job.id, "max_cost_exceeded", format!(
                        "the planned model {} costs an estimated ${cost:.6}, above max_cost_usd ${max:.6}",
                        self.catalog.qualified_name(model)
                    )));
                    cur.quotas.take(g, model);
                    continue;
                }
                if !observed.budget.fits(provider, cost) {
                    // Over budget here. If another eligible provider still has
                    // budget, re-plan (this one now counts as unavailable);
                    // otherwise wait for the earliest renewal, unless the
                    // deadline comes first.
                    let fits_at = |m: ModelId| {
                        let p = self.catalog.models[m].provider;
                        (p, self.catalog.cost_at(m, now, estimate.0, estimate.1))
                    };
                    let others_fit = group.group.candidates.iter().any(|&m| {
                        let (p, c) = fits_at(m);
                        p != provider && observed.budget.fits(p, c)
                    });
                    if others_fit {
                        blocked.insert(provider);
                        replan_now = true;
                        break;
                    }
                    let renews = group
                        .group
                        .candidates
                        .iter()
                        .map(|&m| {
                            let (p, c) = fits_at(m);
                            observed.budget.renews_at(p, c, now)
                        })
                        .min()
                        .unwrap_or(now);
                    let margin = chrono::Duration::from_std(self.plan_settings.safety_margin)
                        .unwrap_or_default();
                    if job.deadline <= (renews + margin).timestamp_millis() {
                        failures.push((job.id, "budget_exhausted", format!(
                            "{}'s budget cannot pay the estimated ${cost:.6} before the deadline (it renews at {})",
                            self.catalog.providers[provider].name,
                            renews.to_rfc3339()
                        )));
                        cur.quotas.take(g, model);
                        continue;
                    }
                    blocked.insert(provider);
                    next = next.min(
                        (renews - now)
                            .to_std()
                            .unwrap_or_default()
                            .max(Duration::from_millis(1)),
                    );
                    break;
                }
                if !observed.health[provider].admit(now) {
                    // A half-open circuit admits one probe at a time.
                    blocked.insert(provider);
                    break;
                }
                // Charge the rate limiter with the estimate calibrated by what
                // this provider and this route have actually reported.
                let output_scale = observed
                    .output_ratio
                    .get(&group.route_key)
                    .map_or(1.0, |e| e.value.clamp(0.05, 4.0));
                let charge = (estimate.0 as f64
                    * observed.input_ratio[provider].value.clamp(0.25, 4.0)
                    + estimate.1 as f64 * output_scale)
                    .ceil() as u64;
                if !limits.try_acquire(provider, model, charge, now_ms) {
                    // The provider's limits, or only this model's.
                    if limits.provider(provider).ready_in_ms(charge, now_ms) == Some(0) {
                        blocked_models.insert(model);
                    } else {
                        blocked.insert(provider);
                    }
                    if let Some(wait) = limits.ready_in_ms(provider, model, charge, now_ms) {
                        next = next.min(Duration::from_millis(wait.max(1) as u64));
                    }
                    break;
                }
                cur.quotas.take(g, model);
                observed.budget.charge(provider, cost);
                let m = &self.catalog.models[model];
                starts.push(Start {
                    job_id: job.id,
                    provider: self.catalog.providers[m.provider].name.clone(),
                    provider_model: m.name.clone(),
                });
                routed.push((
                    job,
                    model,
                    cost,
                    group.reference,
                    group.route_key.clone(),
                    charge,
                ));
            }
        }
        if replan_now {
            // A provider ran out of budget: the next pass plans without it.
            cur.quotas.until = Some(now);
        }
        if !failures.is_empty() {
            let n = failures.len();
            blocking(&self.store, move |s| {
                for (id, code, message) in failures {
                    s.fail_queued(id, now_ms, code, &message)?;
                }
                Ok::<_, QueueError>(())
            })
            .await?;
            info!(
                failed = n,
                "jobs failed without dispatch (max_cost_usd or budget)"
            );
            self.finished.notify_one();
        }
        if starts.is_empty() {
            return Ok(next);
        }
        let lease_until = now_ms + self.lease.as_millis() as i64;
        let owner = self.owner.clone();
        let started: HashSet<i64> = blocking(&self.store, move |s| {
            s.start_attempts(&starts, now_ms, lease_until, &owner)
        })
        .await?
        .into_iter()
        .collect();
        info!(dispatched = started.len(), "dispatch batch");
        for (job, model, estimated_cost, reference, route_key, charge) in routed {
            let provider = self.catalog.models[model].provider;
            let estimated_tokens = charge;
            if !started.contains(&job.id) {
                // Cancelled between the read and the lease: give the capacity back.
                limits.release(provider, model, estimated_tokens, Some(0), now_ms);
                continue;
            }
            debug!(job = job.id, custom_id = %job.custom_id, provider = %self.catalog.providers[provider].name,
                   model = %self.catalog.models[model].name, estimated_cost, "job running");
            let ctx = RequestContext {
                store: self.store.clone(),
                catalog: self.catalog.clone(),
                client: self.clients[provider].clone(),
                owner: self.owner.clone(),
                retry: self.retry,
            };
            let provider_name = self.catalog.providers[provider].name.clone();
            let model_name = self.catalog.qualified_name(model);
            in_flight.spawn(async move {
                let (estimated_input, estimated_output) =
                    (job.est_input_tokens, job.est_output_tokens);
                let sent = Instant::now();
                let executed = ctx.execute(job, model, reference, now).await;
                Done {
                    provider,
                    provider_name,
                    model,
                    model_name,
                    route_key,
                    estimated_tokens,
                    estimated_input,
                    estimated_output,
                    usage: executed.usage,
                    verdict: executed.verdict,
                    signals: executed.signals,
                    retry_at: executed.retry_at,
                    charged_cost: estimated_cost,
                    actual_cost: executed.cost,
                    list_cost: executed.list_cost,
                    status: executed.status,
                    latency: sent.elapsed(),
                }
            });
        }
        // Quota left and capacity not exhausted: look again soon.
        let more = cur.quotas.entries.iter().any(|e| {
            e.2 > 0
                && !blocked.contains(&self.catalog.models[e.1].provider)
                && !blocked_models.contains(&e.1)
        });
        Ok(if more {
            Duration::from_millis(10)
        } else {
            next
        })
    }
}

/// What a request task needs.
struct RequestContext {
    store: Arc<Store>,
    catalog: Arc<Catalog>,
    client: Arc<ProviderClient>,
    owner: String,
    retry: RetryPolicy,
}

/// What a request task reports back to the loop.
struct Executed {
    /// What this attempt was billed (0 unless it succeeded), and its list cost.
    cost: f64,
    list_cost: f64,
    status: Option<u16>,
    usage: Option<(u64, u64)>,
    verdict: Verdict,
    signals: Signals,
    retry_at: Option<DateTime<Utc>>,
}

impl RequestContext {
    /// Sends the job, then records what the answer means: a final result, or
    /// back to the queue for another attempt (later, maybe elsewhere).
    async fn execute(
        self,
        job: DueJob,
        model: ModelId,
        reference: ModelId,
        dispatched_at: DateTime<Utc>,
    ) -> Executed {
        let endpoint = Endpoint::from_url(&job.endpoint).unwrap_or(Endpoint::ChatCompletions);
        let m = &self.catalog.models[model];
        let request = Request {
            endpoint,
            model: &m.name,
            body: &job.body,
            custom_id: &job.custom_id,
        };
        let outcome = self.client.send(request).await;
        let verdict = reliability::classify(&outcome);
        let now = Utc::now();
        let completed_at = now.timestamp_millis();
        let provider = &self.catalog.providers[m.provider].name;
        let attempts = job.attempts + 1; // this one included
        let (mut finish, usage, signals) = match outcome {
            Outcome::Success {
                status,
                request_id,
                body,
                usage,
                signals,
            } => {
                let cost = self.catalog.cost_at(
                    model,
                    dispatched_at,
                    usage.input_tokens,
                    usage.output_tokens,
                );
                let submitted = DateTime::<Utc>::from_timestamp_millis(job.submitted_at)
                    .unwrap_or(dispatched_at);
                let list = self.catalog.cost_at(
                    reference,
                    submitted,
                    usage.input_tokens,
                    usage.output_tokens,
                );
                let finish = Finish {
                    succeeded: true,
                    completed_at,
                    status_code: Some(status),
                    request_id,
                    response: Some(body),
                    input_tokens: Some(usage.input_tokens),
                    output_tokens: Some(usage.output_tokens),
                    cost_usd: Some(cost),
                    list_cost_usd: Some(list),
                    ..Finish::default()
                };
                (
                    finish,
                    Some((usage.input_tokens, usage.output_tokens)),
                    signals,
                )
            }
            Outcome::HttpError {
                status,
                request_id,
                body,
                signals,
            } => {
                warn!(job = job.id, custom_id = %job.custom_id, %provider, status, attempts, ?verdict,
                      "provider answered with an error");
                let finish = Finish {
                    succeeded: false,
                    completed_at,
                    status_code: Some(status),
                    request_id,
                    response: Some(body),
                    ..Finish::default()
                };
                (finish, None, signals)
            }
            Outcome::NoAnswer { code, message } => {
                warn!(job = job.id, custom_id = %job.custom_id, %provider, code, attempts, ?verdict,
                      "request failed: {message}");
                let finish = Finish {
                    succeeded: false,
                    completed_at,
                    error_code: Some(code.to_string()),
                    error_message: Some(message),
                    ..Finish::default()
                };
                (finish, None, Signals::default())
            }
        };
        // Another attempt if the failure is worth one, attempts remain, and
        // the backoff still leaves time before the deadline.
        let retry_at = match &verdict {
            Verdict::Retry { pause } => {
                let jitter = self.retry.backoff(attempts, unit_draw(job.id, attempts));
                let wait = pause.map_or(jitter, |p| p.max(jitter.min(Duration::from_secs(1))));
                Some(now + chrono::Duration::from_std(wait).unwrap_or_default())
            }
            // The provider is gone for us: straight back to the queue, for another.
            Verdict::DisableProvider { .. } => Some(now),
            Verdict::Succeeded | Verdict::FailJob => None,
        };
        let deadline = DateTime::<Utc>::from_timestamp_millis(job.deadline).unwrap_or(now);
        let retry_at = retry_at.filter(|t| attempts < self.retry.max_attempts && *t < deadline);
        if retry_at.is_none()
            && !finish.succeeded
            && finish.error_code.is_none()
            && verdict != Verdict::FailJob
        {
            finish.error_message = Some(format!("gave up after {attempts} attempts"));
        }
        let list_cost = finish.list_cost_usd.unwrap_or(0.0);
        let status = finish.status_code;
        let billed = finish.cost_usd.unwrap_or(0.0);
        let succeeded = finish.succeeded;
        let (id, owner) = (job.id, self.owner.clone());
        let recorded = match retry_at {
            Some(at) => {
                let not_before = at.timestamp_millis();
                blocking(&self.store, move |s| {
                    s.retry_later(id, &owner, not_before, &finish)
                })
                .await
            }
            None => blocking(&self.store, move |s| s.finish(id, &owner, &finish)).await,
        };
        match recorded {
            Ok(true) => match retry_at {
                Some(at) => {
                    debug!(job = id, retry_at = %at.to_rfc3339(), "job queued again for a retry")
                }
                None if succeeded => debug!(job = id, cost_usd = billed, "job succeeded"),
                None => debug!(job = id, "job failed"),
            },
            Ok(false) => {
                // The lease was recovered and the job may have finished elsewhere:
                // keep that result, but count what this answer cost.
                let cost = usage
                    .map(|(i, o)| self.catalog.cost_at(model, dispatched_at, i, o))
                    .unwrap_or(0.0);
                warn!(
                    job = id,
                    cost_usd = cost,
                    "late answer for a job whose lease was recovered; result not recorded"
                );
                if let Err(e) = blocking(&self.store, move |s| s.record_late_answer(id, cost)).await
                {
                    warn!(job = id, "could not record the late answer's cost: {e}");
                }
            }
            Err(e) => warn!(
                job = id,
                "could not record the result (the lease will expire and the job re-run): {e}"
            ),
        }
        Executed {
            cost: billed,
            list_cost,
            status,
            usage,
            verdict,
            signals,
            retry_at,
        }
    }
}

/// A deterministic draw in [0, 1) per (job, attempt), for backoff jitter.
fn unit_draw(job: i64, attempt: u32) -> f64 {
    let mut x = (job as u64) ^ (u64::from(attempt) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}
