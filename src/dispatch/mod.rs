//! The dispatcher: the loop that plans the queue, takes the jobs the plan
//! says run now, leases them, sends them, and records the results.
//!
//! Its shape: sleep until the next thing is due or something changes (jobs
//! arrive, a request finishes, the plan's first slot ends), then do
//! everything that is due now. The decisions are pure and shared with the
//! simulator: the plan ([`crate::plan`]), what starts now ([`decide::step`]),
//! what an answer means ([`reliability::classify`],
//! [`reliability::next_attempt`]) and how it is booked ([`decide::settle`]).
//! This module reads the queue, applies those decisions to it, and runs the
//! requests.

pub mod batch_api;
pub mod batches;
pub mod budget;
pub mod decide;
pub mod explain;
mod fleet;
pub mod limits;
pub mod live;
pub mod provider;
pub mod reliability;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::decide::{Action, Answer, Attempt, Candidate, CurrentPlan, IDLE, Observed};
use self::reliability::{Health, Outcome, RetryPolicy, Signals, Verdict};
use crate::dispatch::limits::RateLimits;
use crate::dispatch::provider::{ProviderClient, Request};
use crate::domain::job::Options;
use crate::domain::pricing::{Catalog, Channel, Endpoint, ModelId};
use crate::plan::{self, PlanSettings, Quotas};
use crate::shared::Shared;
use crate::store::{DueJob, Finish, QueueError, Recorded, Start, Store};

/// Re-plan at least this often (new observations, the clock moving on).
const REPLAN_EVERY: Duration = Duration::from_secs(60);
/// How often the planner of a shared queue re-plans at least: each daemon
/// takes its share of the first slot's quotas, and a share that one daemon
/// cannot use (it died, or its limiter is full) must come back to the
/// others soon, not a minute later.
const REPLAN_EVERY_SHARED: Duration = Duration::from_secs(5);
/// How often a daemon on a shared queue re-reads the budgets' spend.
const BUDGET_SYNC: Duration = Duration::from_secs(2);
/// How long a daemon on a shared queue waits after a pass some of whose
/// starts were refused or taken by another daemon.
const SHARED_REFUSED_WAIT: Duration = Duration::from_millis(20);
/// ... and at most this often, however many events ask for it.
const REPLAN_AT_MOST: Duration = Duration::from_millis(500);
/// How often leases of jobs whose request task is gone are recovered.
const RECOVER_EVERY: Duration = Duration::from_secs(30);
/// The same on a shared queue, where a dead daemon's running jobs are
/// recovered once its heartbeat is older than
/// [`crate::store::pg::coord::DEAD_AFTER_MS`].
const RECOVER_EVERY_SHARED: Duration = Duration::from_secs(2);
/// The live view of the providers is published at most this often, and
/// right away when a provider's availability changes.
const LIVE_EVERY: Duration = Duration::from_millis(250);

/// Shared handles the dispatcher works with.
pub struct Dispatcher {
    /// The daemon's handle: the store, the reloadable configuration
    /// (SIGHUP), telemetry, `wake` (jobs arrived: look again now) and
    /// `finished` (jobs became final: the outbox writes).
    pub shared: Shared,
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
    /// For building provider clients on a reload.
    pub request_timeout: Duration,
    /// Requests in flight at most, over all providers (`daemon.max_in_flight`).
    pub max_in_flight: u32,
}

/// The current plan, and when and how fast it was made.
struct Current {
    plan: CurrentPlan,
    made: Instant,
    /// How long making it took: events re-plan at most every 10× this.
    took: Duration,
    /// A provider excluded from this plan (open circuit) may be probed from
    /// then: re-plan to include it.
    reconsider_at: Option<DateTime<Utc>>,
}

/// A finished request, reported back to the loop.
struct Done {
    /// Names find the provider and model again if the configuration was
    /// reloaded while the request ran.
    provider_name: String,
    model_name: String,
    attempt: Attempt,
    answer: Answer,
    list_cost: f64,
    status: Option<u16>,
}

/// What the loop keeps of a request in flight, by task id: enough to give
/// its capacity back and return its job to the queue if the task dies.
struct InFlight {
    provider_name: String,
    model_name: String,
    attempt: Attempt,
}

/// The loop's state between passes.
struct Loop {
    limits: RateLimits,
    observed: Observed,
    current: Option<Current>,
    replan: bool,
    tasks: JoinSet<Done>,
    in_flight: HashMap<tokio::task::Id, InFlight>,
    /// The global cap on requests in flight.
    /// Where request tasks record their outcomes.
    recorder: Recorder,
    next_recovery: Instant,
    /// The earliest deadline of a queued job, when known: nothing expires
    /// before it (a job queued since is an event that clears it).
    earliest_deadline: Option<i64>,
    /// When the live view was last published, and whether something it
    /// shows changed since (publish after this pass, not [`LIVE_EVERY`] later).
    live_published: Option<Instant>,
    live_changed: bool,
    /// Provider batches being followed to their end, one task each.
    batch_tasks: JoinSet<batches::BatchDone>,
    /// The other daemons on a shared queue.
    fleet: fleet::Fleet,
    /// When the budgets are next re-read from the shared queue.
    next_budget_sync: Option<Instant>,
    /// The provider batches a task of this loop follows.
    followed_batches: std::collections::HashSet<i64>,
}

/// A provider's client as configured: a simulated provider's batches end
/// after its batch channel's `expected_turnaround`.
pub fn client_for(p: &crate::domain::pricing::ProviderInfo, c: ProviderClient) -> ProviderClient {
    let c = c.with_simulated_channels(
        p.flex.map_or(0.0, |f| f.simulated_refusal_fraction),
        p.batch
            .as_ref()
            .map_or(0.0, |b| b.simulated_expire_fraction),
    );
    match &p.batch {
        Some(b) => c.with_batch_turnaround(b.expected_turnaround),
        None => c,
    }
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

fn instant_at(t: DateTime<Utc>, now: DateTime<Utc>) -> Instant {
    Instant::now() + (t - now).to_std().unwrap_or_default()
}

impl Dispatcher {
    /// Dispatches until `shutdown` turns true, then waits up to `grace` for
    /// in-flight requests and returns the rest to the queue.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let now = Utc::now();
        let mut st = Loop {
            limits: RateLimits::for_catalog(&self.catalog, now.timestamp_millis())
                .with_cap(self.max_in_flight),
            observed: Observed::new(&self.initial_latency, self.load_budgets().await),
            current: None,
            replan: true,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            recorder: Recorder::start(self.shared.store.clone(), self.owner.clone()),
            next_recovery: Instant::now()
                + if self.shared.store.is_shared() {
                    RECOVER_EVERY_SHARED
                } else {
                    RECOVER_EVERY
                },
            earliest_deadline: None,
            live_published: None,
            live_changed: true,
            batch_tasks: JoinSet::new(),
            fleet: fleet::Fleet::default(),
            next_budget_sync: None,
            followed_batches: Default::default(),
        };
        // Before the seeding: a send made between the two counts twice
        // (early), never not at all.
        self.join_fleet(&mut st).await;
        // What earlier runs (and other daemons) sent still counts against
        // the rate limits.
        self.seed_limits(&mut st.limits, now).await;
        // Start from what finished jobs taught earlier runs.
        match blocking(&self.shared.store, |s| s.learned_token_ratios(7)).await {
            Ok((inputs, outputs)) => {
                for (provider, ratio) in inputs {
                    if let Some(p) = self.catalog.provider_id(&provider) {
                        st.observed.input_ratio[p] = decide::Ewma::new(ratio);
                    }
                }
                for (route, ratio) in outputs {
                    st.observed
                        .output_ratio
                        .insert(route, decide::Ewma::new(ratio));
                }
            }
            Err(e) => warn!("could not read token statistics of finished jobs: {e}"),
        }
        for p in 0..self.catalog.providers.len() {
            self.publish_health(p, &st.observed);
        }
        // Batches an earlier run left open: follow them where they stood.
        match blocking(&self.shared.store, |s| s.open_provider_batches()).await {
            Ok(open) => {
                if !open.is_empty() {
                    info!(
                        batches = open.len(),
                        "resuming provider batches left open by an earlier run"
                    );
                }
                for b in open {
                    self.spawn_batch(&mut st, b, 0.0);
                }
            }
            Err(e) => warn!("could not read the open provider batches: {e}"),
        }
        loop {
            if self.shared.live.has_changed().unwrap_or(false) {
                self.apply_reload(&mut st).await;
                st.current = None;
                st.live_changed = true;
            }
            let next = match self.pass(&mut st).await {
                Ok(next) => next,
                Err(e) => {
                    warn!("dispatch pass failed: {e}");
                    Instant::now() + IDLE
                }
            };
            self.publish_live(&mut st);
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.shared.wake.notified() => {
                    st.replan = true;
                    st.earliest_deadline = None;
                }
                _ = tokio::time::sleep_until(next) => {}
                Some(done) = st.batch_tasks.join_next() => {
                    st.replan = true;
                    st.earliest_deadline = None;
                    if let Ok(done) = &done {
                        st.followed_batches.remove(&done.batch);
                    }
                    if let Ok(done) = done
                        && self.account_batch(&mut st, done)
                    {
                        st.current = None;
                        st.live_changed = true;
                    }
                }
                Some(done) = st.tasks.join_next_with_id() => {
                    st.replan = true;
                    let mut changed = self.account(&mut st, done).await;
                    while let Some(done) = st.tasks.try_join_next_with_id() {
                        changed |= self.account(&mut st, done).await;
                    }
                    if changed {
                        // Availability changed: re-plan now, not after the throttle.
                        st.current = None;
                        st.live_changed = true;
                    }
                }
            }
        }
        let waiting = st.tasks.len();
        if waiting > 0 {
            info!(
                in_flight = waiting,
                grace_s = grace.as_secs_f64(),
                "shutting down: waiting for in-flight requests"
            );
            let deadline = Instant::now() + grace;
            loop {
                match tokio::time::timeout_at(deadline, st.tasks.join_next_with_id()).await {
                    Ok(Some(done)) => {
                        self.account(&mut st, done).await;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        st.tasks.abort_all();
                        break;
                    }
                }
            }
        }
        let owner = self.owner.clone();
        match blocking(&self.shared.store, move |s| s.release_running(&owner)).await {
            Ok(0) => {}
            Ok(n) => info!(released = n, "returned unfinished jobs to the queue"),
            Err(e) => warn!("could not release running jobs (their leases will expire): {e}"),
        }
        self.shared.finished.notify_one();
    }

    /// Seeds the rate limits with the sends the store recorded in the last
    /// 24 hours (by earlier runs, or other daemons on the same database), so
    /// a restart does not begin with full allowances.
    async fn seed_limits(&self, limits: &mut RateLimits, now: DateTime<Utc>) {
        let now_ms = now.timestamp_millis();
        let sends = match blocking(&self.shared.store, move |s| {
            s.recent_sends(now_ms, limits::MINUTE_MS + limits::ARRIVAL_MARGIN_MS)
        })
        .await
        {
            Ok(sends) => sends,
            Err(e) => {
                warn!("could not read the recent sends (the rate limits start empty): {e}");
                return;
            }
        };
        let models: HashMap<(&str, &str), ModelId> = (0..self.catalog.models.len())
            .map(|m| {
                let model = &self.catalog.models[m];
                let provider = self.catalog.providers[model.provider].name.as_str();
                ((provider, model.name.as_str()), m)
            })
            .collect();
        let mut seeded = 0u64;
        for g in &sends {
            let Some(p) = self.catalog.provider_id(&g.provider) else {
                continue;
            };
            let model = models
                .get(&(g.provider.as_str(), g.model.as_str()))
                .copied();
            let sent = crate::dispatch::limits::Sent {
                at_ms: g.at_ms,
                requests: g.requests,
                tokens: g.tokens,
            };
            limits.seed(p, model, sent, now_ms);
            seeded += g.requests;
        }
        if seeded > 0 {
            info!(
                requests = seeded,
                "rate limits count the requests sent in the last 24 hours"
            );
        }
    }

    /// Books a request task that ended: its answer, or (it panicked) its
    /// capacity given back and its job returned to the queue. Returns true
    /// if a provider's availability changed.
    async fn account(
        &self,
        st: &mut Loop,
        done: Result<(tokio::task::Id, Done), tokio::task::JoinError>,
    ) -> bool {
        let now = Utc::now();
        match done {
            Ok((id, d)) => {
                st.in_flight.remove(&id);
                if d.answer.retry_at.is_some() {
                    // Queued again, maybe with an earlier deadline than any
                    // queued job: check expiry on the next pass. (A final
                    // answer adds no queued job, so it costs the pass nothing.)
                    st.earliest_deadline = None;
                }
                let Some(attempt) = self.relocate(&d.provider_name, &d.model_name, d.attempt)
                else {
                    st.limits.release_gone();
                    return false;
                };
                let changed =
                    decide::settle(&mut st.limits, &mut st.observed, &attempt, &d.answer, now);
                if changed {
                    let name = &self.catalog.providers[attempt.provider].name;
                    warn!(provider = %name, health = %crate::domain::units::escaped(&st.observed.health[attempt.provider].describe(now)),
                          "provider availability changed; re-planning");
                }
                self.record_metrics(&attempt, &d.answer, d.list_cost, d.status, &st.observed);
                self.shared.finished.notify_one();
                changed
            }
            Err(e) => {
                let Some(lost) = st.in_flight.remove(&e.id()) else {
                    return false;
                };
                st.earliest_deadline = None;
                if e.is_panic() {
                    warn!(job = lost.attempt.job, provider = %lost.provider_name,
                          "a request task panicked; its job returns to the queue");
                }
                let job = lost.attempt.job;
                let owner = self.owner.clone();
                match blocking(&self.shared.store, move |s| s.requeue_running(job, &owner)).await {
                    Ok(_) => {}
                    Err(err) => {
                        warn!(
                            job,
                            "could not return the job to the queue (its lease will expire): {err}"
                        )
                    }
                }
                let Some(attempt) =
                    self.relocate(&lost.provider_name, &lost.model_name, lost.attempt)
                else {
                    st.limits.release_gone();
                    return false;
                };
                decide::settle_lost(&mut st.limits, &mut st.observed, &attempt, now)
            }
        }
    }

    /// The attempt's provider and model in the catalog now (a reload may
    /// have moved or removed them); `None` if its provider is gone.
    fn relocate(&self, provider: &str, model: &str, mut attempt: Attempt) -> Option<Attempt> {
        attempt.provider = self.catalog.provider_id(provider)?;
        attempt.model = self.catalog.model_id(model);
        Some(attempt)
    }

    /// One pass: expire overdue jobs, recover dead leases, re-plan if due,
    /// then apply what [`decide::step`] starts or fails. Returns when to
    /// look again if nothing else happens.
    async fn pass(&self, st: &mut Loop) -> Result<Instant, QueueError> {
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        if !self.run_after_deadline && st.earliest_deadline.is_none_or(|d| d <= now_ms) {
            let (expired, earliest) = blocking(&self.shared.store, move |s| {
                let expired = s.expire_overdue(now_ms)?;
                Ok::<_, QueueError>((expired, s.earliest_queued_deadline()?))
            })
            .await?;
            st.earliest_deadline = earliest;
            if !expired.is_empty() {
                for (id, custom_id) in &expired {
                    debug!(job = id, custom_id = %crate::domain::units::escaped(custom_id), "job expired");
                }
                info!(
                    expired = expired.len(),
                    "jobs passed their deadline before dispatch"
                );
                self.shared.finished.notify_one();
            }
        }
        if Instant::now() >= st.next_recovery {
            // A request task that died leaves its job running under our
            // lease: once the lease expires, the job is queued again.
            st.next_recovery = Instant::now()
                + if self.shared.store.is_shared() {
                    // Another daemon's jobs come back soon after it dies.
                    RECOVER_EVERY_SHARED
                } else {
                    RECOVER_EVERY
                };
            let owner = self.owner.clone();
            let n = blocking(&self.shared.store, move |s| {
                s.recover_leases(now_ms, &owner)
            })
            .await?;
            if n > 0 {
                warn!(recovered = n, "re-queued running jobs whose lease expired");
                st.replan = true;
            }
            if self.shared.store.is_shared() {
                self.adopt_batches(st, now_ms).await?;
            }
        }
        if st.observed.budget.roll_over(now) {
            info!("a budget period renewed");
            st.current = None;
            st.live_changed = true;
        }
        if self.sync_fleet(st, now).await {
            st.current = None;
            st.live_changed = true;
        }
        self.sync_budgets(st).await;
        let retry_due = st.observed.next_retry.is_some_and(|t| t <= now);
        if retry_due {
            st.observed.next_retry = None;
        }
        let role = *self.shared.coordination.borrow();
        let follower = self.shared.store.is_shared() && !role.planner;
        let replan_every = if self.shared.store.is_shared() {
            REPLAN_EVERY_SHARED
        } else {
            REPLAN_EVERY
        };
        let stale = match &st.current {
            None => true,
            // A follower re-reads the plan when the planner republishes
            // it (the planner re-plans on the events), not on its own.
            Some(_) if follower && st.fleet_following() => {
                self.published_newer(st).await
                    || st.current.as_ref().is_some_and(|c| {
                        c.made.elapsed() >= REPLAN_EVERY
                            || c.plan.quotas.until.is_some_and(|u| now >= u)
                    })
            }
            Some(_) if retry_due => true,
            Some(c) => {
                c.made.elapsed() >= replan_every
                    || c.plan.quotas.until.is_some_and(|u| now >= u)
                    || c.reconsider_at.is_some_and(|t| now >= t)
                    || (st.replan && c.made.elapsed() >= REPLAN_AT_MOST.max(c.took * 10))
            }
        };
        if stale {
            let followed = if follower {
                self.follow(st, role.live).await
            } else {
                st.fleet.stop_following();
                None
            };
            st.current = Some(match followed {
                Some(c) => c,
                None => {
                    let mut c = self.make_plan(&st.observed, &mut st.limits).await?;
                    if self.shared.store.is_shared() {
                        if role.planner {
                            self.publish(&c).await;
                        }
                        fleet::share_quotas(&mut c.plan, role.live);
                    }
                    c
                }
            });
            st.replan = false;
        }
        let Some(cur) = st.current.as_mut() else {
            return Ok(Instant::now() + IDLE);
        };
        // Planning and the store took time: the rate limits stamp each send
        // with the instant it leaves, not the one the pass began (a stale
        // stamp lets the window reopen early on the provider's clock).
        let now = Utc::now();
        let now_ms = now.timestamp_millis();

        // The queued jobs each planned group may start now, in one read.
        let wanted = cur
            .plan
            .wanted(&self.catalog, &mut st.limits, &st.observed, now);
        let reads: Vec<(usize, String, i64, i64, i64, usize)> = wanted
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(g, &n)| {
                let group = &cur.plan.groups[g];
                (
                    g,
                    group.route_key.clone(),
                    group.size_bin,
                    group.deadline_from,
                    group.deadline_to,
                    n,
                )
            })
            .collect();
        let fetched = blocking(&self.shared.store, move |s| {
            reads
                .into_iter()
                .map(|(g, key, bin, from, to, n)| {
                    Ok((g, s.queued_in_route(&key, bin, from, to, now_ms, n)?))
                })
                .collect::<Result<Vec<_>, QueueError>>()
        })
        .await?;
        let mut due = vec![Vec::new(); cur.plan.groups.len()];
        let mut jobs: HashMap<i64, DueJob> = HashMap::new();
        for (g, list) in fetched {
            due[g] = list.iter().map(candidate).collect();
            jobs.extend(list.into_iter().map(|j| (j.id, j)));
        }
        let step = decide::step(decide::StepInput {
            catalog: &self.catalog,
            plan: &mut cur.plan,
            wanted,
            due,
            limits: &mut st.limits,
            observed: &mut st.observed,
            safety_margin: self.plan_settings.safety_margin,
            now,
        });
        let next = if step.more {
            Instant::now() + Duration::from_millis(1)
        } else {
            step.next.map_or(Instant::now() + IDLE, |t| {
                instant_at(t, now).min(Instant::now() + IDLE)
            })
        };
        let (starts, failures): (Vec<Action>, Vec<Action>) = step
            .actions
            .into_iter()
            .partition(|a| matches!(a, Action::Start { .. }));
        if !failures.is_empty() {
            let n = failures.len();
            blocking(&self.shared.store, move |s| {
                for a in failures {
                    if let Action::Fail { job, code, message } = a {
                        s.fail_queued(job, now_ms, code, &message)?;
                    }
                }
                Ok::<_, QueueError>(())
            })
            .await?;
            info!(
                failed = n,
                "jobs failed without dispatch (max_cost_usd or budget)"
            );
            self.shared.finished.notify_one();
        }
        let (batched, starts): (Vec<Action>, Vec<Action>) = starts.into_iter().partition(
            |a| matches!(a, Action::Start { model, .. } if self.catalog.is_batch(*model)),
        );
        if !batched.is_empty() {
            self.open_batches(st, batched, now).await;
        }
        let Some(cur) = st.current.as_mut() else {
            return Ok(next);
        };
        if starts.is_empty() {
            return Ok(next);
        }
        let records: Vec<Start> = starts
            .iter()
            .filter_map(|a| match a {
                Action::Start {
                    job, model, tokens, ..
                } => {
                    let m = &self.catalog.models[*model];
                    Some(Start {
                        job_id: *job,
                        provider: self.catalog.providers[m.provider].name.clone(),
                        provider_model: m.name.clone(),
                        channel: m.channel.as_str(),
                        tokens: *tokens,
                    })
                }
                Action::Fail { .. } => None,
            })
            .collect();
        let lease_until = now_ms + self.lease.as_millis() as i64;
        let owner = self.owner.clone();
        let started = blocking(&self.shared.store, move |s| {
            if crate::faults::fire("dispatch.start_attempts") {
                return Err(QueueError::Injected("dispatch.start_attempts"));
            }
            s.start_attempts(&records, now_ms, lease_until, &owner)
        })
        .await;
        let sent_ms = Utc::now().timestamp_millis().max(now_ms);
        let started: std::collections::HashSet<i64> = match started {
            Ok(ids) => {
                // The requests leave now, not when the step took them.
                st.limits.restamp(now_ms, sent_ms);
                ids.into_iter().collect()
            }
            Err(e) => {
                // Nothing was started: give back everything the step took.
                for a in &starts {
                    decide::undo_start(&self.catalog, &mut st.limits, &mut st.observed, a, now);
                }
                return Err(e);
            }
        };
        // Thousands a second under load: debug, not info.
        debug!(dispatched = started.len(), "dispatch batch");
        // On a shared queue, what was not started was taken by another
        // daemon or refused by the shared limits: look again shortly, not
        // at once (this daemon's limiter learns the others' sends within
        // the fleet's sync interval).
        let next = if self.shared.store.is_shared() && started.len() < starts.len() {
            next.max(Instant::now() + SHARED_REFUSED_WAIT)
        } else {
            next
        };
        for action in starts {
            let Action::Start {
                job: id,
                model,
                reference,
                tokens,
                cost,
                group,
            } = action
            else {
                continue;
            };
            let (Some(job), true) = (jobs.remove(&id), started.contains(&id)) else {
                // Cancelled between the read and the lease: give the capacity back.
                decide::undo_start(
                    &self.catalog,
                    &mut st.limits,
                    &mut st.observed,
                    &action,
                    now,
                );
                continue;
            };
            let provider = self.catalog.models[model].provider;
            debug!(job = id, custom_id = %crate::domain::units::escaped(&job.custom_id), provider = %self.catalog.providers[provider].name,
                   model = %self.catalog.models[model].name, estimated_cost = cost, "job running");
            let attempt = Attempt {
                job: id,
                provider,
                model: Some(model),
                route_key: cur.plan.groups[group].route_key.clone(),
                tokens,
                cost,
                est_input_tokens: job.est_input_tokens,
                est_output_tokens: job.est_output_tokens,
                sent_ms,
            };
            let ctx = RequestContext {
                store: self.shared.store.clone(),
                catalog: self.catalog.clone(),
                client: self.clients[provider].clone(),
                retry: self.retry,
                margin: self.plan_settings.safety_margin,
                recorder: st.recorder.clone(),
            };
            let provider_name = self.catalog.providers[provider].name.clone();
            let model_name = self.catalog.qualified_name(model);
            let task_attempt = attempt.clone();
            let (pn, mn) = (provider_name.clone(), model_name.clone());
            let handle = st.tasks.spawn(async move {
                if crate::faults::fire("dispatch.request_panic") {
                    panic!("injected fault: dispatch.request_panic");
                }
                let executed = ctx.execute(job, model, reference, now).await;
                Done {
                    provider_name: pn,
                    model_name: mn,
                    attempt: task_attempt,
                    answer: executed.answer,
                    list_cost: executed.list_cost,
                    status: executed.status,
                }
            });
            st.in_flight.insert(
                handle.id(),
                InFlight {
                    provider_name,
                    model_name,
                    attempt,
                },
            );
        }
        Ok(next)
    }

    /// Records the batch starts of a step as provider batches (one model
    /// each, within the provider's requests and bytes per batch), then
    /// follows each in its own task.
    async fn open_batches(&self, st: &mut Loop, starts: Vec<Action>, now: DateTime<Utc>) {
        let Some(cur) = st.current.as_ref() else {
            return;
        };
        let capacity = st.observed.capacities(&self.catalog, now);
        // The jobs' deadlines, sizes and endpoints, in one read.
        let ids: Vec<i64> = starts
            .iter()
            .filter_map(|a| match a {
                Action::Start { job, .. } => Some(*job),
                Action::Fail { .. } => None,
            })
            .collect();
        let jobs = match blocking(&self.shared.store, move |s| s.batch_jobs_by_id(&ids)).await {
            Ok(j) => j
                .into_iter()
                .map(|j| (j.id, j))
                .collect::<HashMap<i64, crate::store::BatchJob>>(),
            Err(e) => {
                warn!("could not read the jobs of a new provider batch: {e}");
                for a in &starts {
                    decide::undo_start(&self.catalog, &mut st.limits, &mut st.observed, a, now);
                }
                return;
            }
        };
        // One model and one endpoint per batch (as OpenAI's Batch API asks).
        let mut by_model: std::collections::BTreeMap<(ModelId, String), Vec<Action>> =
            Default::default();
        for a in starts {
            if let Action::Start { model, job, .. } = a {
                let endpoint = jobs
                    .get(&job)
                    .map(|j| j.endpoint.clone())
                    .unwrap_or_default();
                by_model.entry((model, endpoint)).or_default().push(a);
            }
        }
        let mut opened = Vec::new();
        for ((model, _), actions) in by_model {
            let m = &self.catalog.models[model];
            let p = m.provider;
            let Some(terms) = self.catalog.providers[p].batch.clone() else {
                continue;
            };
            // Cut into batches within the provider's limits.
            let mut chunks: Vec<Vec<Action>> = vec![Vec::new()];
            let mut bytes = 0u64;
            for a in actions {
                let Action::Start { job, .. } = &a else {
                    continue;
                };
                let size = jobs.get(job).map_or(0, |j| j.body.len() as u64 + 256);
                let last = chunks.last_mut().expect("one chunk at least");
                if !last.is_empty()
                    && (last.len() >= terms.max_requests as usize || bytes + size > terms.max_bytes)
                {
                    chunks.push(Vec::new());
                    bytes = 0;
                }
                bytes += size;
                chunks.last_mut().expect("one chunk at least").push(a);
            }
            for chunk in chunks.into_iter().filter(|c| !c.is_empty()) {
                let mut earliest = DateTime::<Utc>::MAX_UTC;
                let mut tokens = 0u64;
                let mut candidates: Vec<ModelId> = Vec::new();
                let mut estimated = 0.0;
                let mut endpoint = None;
                for a in &chunk {
                    if let Action::Start {
                        job, group, cost, ..
                    } = a
                    {
                        estimated += cost;
                        if let Some(j) = jobs.get(job) {
                            earliest = earliest.min(
                                DateTime::<Utc>::from_timestamp_millis(j.deadline).unwrap_or(now),
                            );
                            tokens =
                                tokens.saturating_add(j.est_input_tokens + j.est_output_tokens);
                            endpoint.get_or_insert_with(|| j.endpoint.clone());
                        }
                        if let Some(g) = cur.plan.groups.get(*group) {
                            for &c in &g.group.candidates {
                                if !candidates.contains(&c) {
                                    candidates.push(c);
                                }
                            }
                        }
                    }
                }
                let fallback_at = batches::rules::fallback_at(
                    &self.catalog,
                    &capacity,
                    &candidates,
                    chunk.len() as u64,
                    tokens,
                    earliest,
                    self.plan_settings.safety_margin,
                    terms.window,
                    now,
                );
                // The guard's instant, early for a batch that runs overdue.
                let fallback_at =
                    batches::rules::guard_at(fallback_at, now, capacity[p].batch_turnaround);
                let ids: Vec<i64> = chunk
                    .iter()
                    .filter_map(|a| match a {
                        Action::Start { job, .. } => Some(*job),
                        Action::Fail { .. } => None,
                    })
                    .collect();
                let provider = self.catalog.providers[p].name.clone();
                let wire = m.name.clone();
                let endpoint =
                    endpoint.unwrap_or_else(|| Endpoint::ChatCompletions.as_url().into());
                let now_ms = now.timestamp_millis();
                let created = blocking(&self.shared.store, move |s| {
                    s.create_provider_batch(
                        &crate::store::NewProviderBatch {
                            provider: &provider,
                            model: &wire,
                            endpoint: &endpoint,
                            fallback_at,
                            now_ms,
                        },
                        &ids,
                    )
                })
                .await;
                let started: std::collections::HashSet<i64> = match &created {
                    Ok(Some((_, started))) => started.iter().copied().collect(),
                    Ok(None) => Default::default(),
                    Err(e) => {
                        warn!("could not record a provider batch: {e}");
                        Default::default()
                    }
                };
                for a in &chunk {
                    if let Action::Start { job, cost, .. } = a
                        && !started.contains(job)
                    {
                        // Cancelled meanwhile, or not recorded.
                        estimated -= cost;
                        decide::undo_start(&self.catalog, &mut st.limits, &mut st.observed, a, now);
                    }
                }
                if let Ok(Some((id, _))) = created {
                    opened.push((id, estimated));
                }
            }
        }
        for (id, estimated) in opened {
            match blocking(&self.shared.store, move |s| s.provider_batch(id)).await {
                Ok(Some(b)) => {
                    info!(batch = b.id, provider = %b.provider, model = %b.model, requests = b.requests,
                          "provider batch recorded");
                    self.spawn_batch(st, b, estimated);
                }
                Ok(None) => {}
                Err(e) => warn!(batch = id, "could not read the new provider batch: {e}"),
            }
        }
    }

    /// Follows one provider batch in its own task.
    fn spawn_batch(&self, st: &mut Loop, b: crate::store::ProviderBatch, estimated: f64) {
        // Its provider may have left the configuration: the task abandons it.
        let client = self
            .catalog
            .provider_id(&b.provider)
            .map(|p| self.clients[p].clone());
        let ctx = batches::BatchContext {
            shared: self.shared.clone(),
            catalog: self.catalog.clone(),
            client,
            retry: self.retry,
            estimated,
        };
        st.followed_batches.insert(b.id);
        st.batch_tasks.spawn(ctx.run(b));
    }

    /// On a shared queue: follows the open provider batches of daemons that
    /// are gone (their deadline guard and results would otherwise wait for
    /// a restart).
    async fn adopt_batches(&self, st: &mut Loop, now_ms: i64) -> Result<(), QueueError> {
        let adopted = blocking(&self.shared.store, move |s| {
            let ids = s.adopt_orphaned_batches(now_ms)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            Ok::<_, QueueError>(
                s.open_provider_batches()?
                    .into_iter()
                    .filter(|b| ids.contains(&b.id))
                    .collect::<Vec<_>>(),
            )
        })
        .await?;
        for b in adopted {
            if st.followed_batches.contains(&b.id) {
                continue;
            }
            info!(batch = b.id, provider = %b.provider, "following a provider batch of a daemon that is gone");
            self.spawn_batch(st, b, 0.0);
        }
        Ok(())
    }

    /// Books a provider batch that ended: its turnaround, a refused
    /// creation (batches of that provider pause), the budget corrected
    /// from the estimate to what was billed. True if a provider's
    /// availability changed.
    fn account_batch(&self, st: &mut Loop, done: batches::BatchDone) -> bool {
        let Some(p) = self.catalog.provider_id(&done.provider) else {
            return false;
        };
        debug!(batch = done.batch, provider = %done.provider, billed_usd = done.billed, "provider batch task ended");
        let now = Utc::now();
        st.observed.budget.charge(p, done.billed - done.estimated);
        let seen = &mut st.observed.batches[p];
        if let Some(t) = done.turnaround {
            seen.observe(t);
        }
        self.shared.finished.notify_one();
        match done.refused {
            Some(pause) => {
                let until = crate::domain::bounds::add(now, pause);
                seen.refused_until = Some(seen.refused_until.map_or(until, |t| t.max(until)));
                warn!(provider = %done.provider, until = %until.to_rfc3339(),
                      "batch creation refused; this provider's batches pause (its synchronous channel is unaffected)");
                true
            }
            None => false,
        }
    }

    /// Takes a reloaded configuration: new catalog, clients and budgets;
    /// what was learned and the limits' in-flight counts carry over by
    /// provider name. Requests in flight finish on their old clients.
    async fn apply_reload(&mut self, st: &mut Loop) {
        let live = self.shared.live.borrow_and_update().clone();
        let mut clients = Vec::new();
        for (p, t) in live.catalog.providers.iter().zip(&live.transports) {
            match ProviderClient::new(&p.name, t, self.request_timeout) {
                Ok(c) => clients.push(Arc::new(client_for(p, c))),
                Err(e) => {
                    warn!(provider = %p.name, "reload not applied: cannot build the HTTP client: {e}");
                    return;
                }
            }
        }
        let now = Utc::now();
        let old = std::mem::replace(&mut self.catalog, live.catalog.clone());
        let old_index = |name: &str| old.provider_id(name);
        let mut new_limits = RateLimits::for_catalog(&self.catalog, now.timestamp_millis())
            .with_cap(self.max_in_flight);
        new_limits.carry_in_flight(st.limits.in_flight());
        // What was sent still counts against the (maybe new) limits.
        new_limits.carry_history(
            &st.limits,
            |p| old.provider_id(&self.catalog.providers[p].name),
            |m| old.model_id(&self.catalog.qualified_name(m)),
        );
        let n = self.catalog.providers.len();
        let (limits, observed) = (&mut st.limits, &mut st.observed);
        let mut fresh = Observed {
            latency_s: Vec::with_capacity(n),
            success: Vec::with_capacity(n),
            input_ratio: Vec::with_capacity(n),
            output_ratio: std::mem::take(&mut observed.output_ratio),
            health: Vec::with_capacity(n),
            flex_until: Vec::with_capacity(n),
            batches: Vec::with_capacity(n),
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
                    fresh
                        .flex_until
                        .push(observed.flex_until.get(o).copied().flatten());
                    fresh
                        .batches
                        .push(observed.batches.get(o).cloned().unwrap_or_default());
                    let idx = fresh.health.len() - 1;
                    new_limits
                        .provider(idx)
                        .carry_in_flight(limits.provider(o).in_flight());
                }
                None => {
                    fresh
                        .latency_s
                        .push(decide::Ewma::new(t.typical_latency().as_secs_f64()));
                    fresh.success.push(decide::SuccessRate::new());
                    fresh.input_ratio.push(decide::Ewma::new(1.0));
                    fresh.health.push(Health::default());
                    fresh.flex_until.push(None);
                    fresh.batches.push(Default::default());
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
        if self.shared.store.is_shared() {
            self.shared.store.share_limits(&self.catalog);
        }
        st.observed.budget = self.load_budgets().await;
        for p in 0..n {
            self.publish_health(p, &st.observed);
        }
        info!(config = %live.origin, providers = n, models = self.catalog.models.len(),
              classes = self.catalog.classes.len(), "configuration reloaded: re-planning");
    }

    /// Counts a finished request in the metrics, and publishes the
    /// provider's health as the dispatcher now sees it.
    fn record_metrics(
        &self,
        attempt: &Attempt,
        answer: &Answer,
        list_cost: f64,
        status: Option<u16>,
        observed: &Observed,
    ) {
        use crate::telemetry::{OutcomeLabel, provider as label};
        let t = &self.shared.telemetry;
        let name = &self.catalog.providers[attempt.provider].name;
        let p = label(name);
        let outcome = match (&answer.verdict, answer.retry_at) {
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
        if status == Some(429) && answer.flex_refused.is_none() {
            t.rate_limited.get_or_create(&p).inc();
        }
        if matches!(answer.verdict, Verdict::Retry { pause: Some(_) })
            || answer.signals.pause().is_some()
        {
            t.pauses.get_or_create(&p).inc();
        }
        t.latency
            .get_or_create(&p)
            .observe(answer.latency.as_secs_f64());
        if let Some((input, output)) = answer.usage {
            t.input_tokens.get_or_create(&p).inc_by(input);
            t.output_tokens.get_or_create(&p).inc_by(output);
        }
        if answer.billed > 0.0 {
            t.spend_usd.get_or_create(&p).inc_by(answer.billed);
            t.list_usd.get_or_create(&p).inc_by(list_cost);
            t.savings_usd
                .get_or_create(&p)
                .inc_by((list_cost - answer.billed).max(0.0));
        }
        self.publish_health(attempt.provider, observed);
    }

    /// Publishes the live view of every provider if something it shows
    /// changed, or [`LIVE_EVERY`] after the last: at most one snapshot per
    /// pass, none per job.
    fn publish_live(&self, st: &mut Loop) {
        let due = st.live_changed || st.live_published.is_none_or(|t| t.elapsed() >= LIVE_EVERY);
        if !due {
            return;
        }
        st.live_changed = false;
        st.live_published = Some(Instant::now());
        let mut view = live::snapshot(&self.catalog, &mut st.limits, &st.observed, Utc::now());
        view.run_after_deadline = self.run_after_deadline;
        self.shared.telemetry.publish_live(view);
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
        self.shared.telemetry.set_health(
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
        blocking(&self.shared.store, move |s| {
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

    /// On a shared queue, every [`BUDGET_SYNC`]: the budgets' spend is what
    /// every daemon recorded (one sum over the shared jobs) plus what this
    /// daemon has in flight; the other daemons' requests in flight are the
    /// most a budget can be passed by. (An answer recorded but not yet
    /// settled here counts twice until the next sync: early, never late.)
    async fn sync_budgets(&self, st: &mut Loop) {
        if !self.shared.store.is_shared()
            || self.budgets.is_empty()
            || st.next_budget_sync.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        st.next_budget_sync = Some(Instant::now() + BUDGET_SYNC);
        let mut fresh = self.load_budgets().await;
        for f in st.in_flight.values() {
            fresh.charge(f.attempt.provider, f.attempt.cost);
        }
        st.observed.budget = fresh;
    }

    /// Re-plans the queue from its summary in SQLite.
    async fn make_plan(
        &self,
        observed: &Observed,
        limits: &mut RateLimits,
    ) -> Result<Current, QueueError> {
        let buckets = blocking(&self.shared.store, |s| s.queued_buckets()).await?;
        let now = Utc::now();
        let catalog = self.catalog.clone();
        let capacities = observed.plan_capacities(&catalog, limits, now);
        let published_capacities = capacities.clone();
        let output_scale: HashMap<String, f64> = observed
            .output_ratio
            .keys()
            .map(|k| (k.clone(), observed.output_scale(k)))
            .collect();
        let published_scale = output_scale.clone();
        let budget_remaining_usd: Vec<Option<f64>> = (0..catalog.providers.len())
            .map(|p| {
                let r = observed.budget.remaining(p);
                r.is_finite().then_some(r.max(0.0))
            })
            .collect();
        let settings = self.plan_settings;
        let disabled: Vec<Option<String>> =
            observed.health.iter().map(|h| h.disabled.clone()).collect();
        let started = std::time::Instant::now();
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
        self.shared
            .telemetry
            .publish_plan(crate::telemetry::PublishedPlan {
                queue: q.clone(),
                catalog: self.catalog.clone(),
                capacities: published_capacities,
                output_scale: published_scale,
                budget_remaining_usd,
            });
        let crate::plan::QueuePlan {
            groups,
            plan,
            unroutable,
        } = q;
        for (route_key, reason) in unroutable {
            let message = format!("no eligible model in the current configuration: {reason}");
            let now_ms = now.timestamp_millis();
            let n = blocking(&self.shared.store, move |s| {
                s.fail_route(&route_key, now_ms, "not_routable", &message)
            })
            .await?;
            warn!(
                jobs = n,
                "failed queued jobs that no configured model can serve"
            );
            self.shared.finished.notify_one();
        }
        self.shared.telemetry.planned_now.clear();
        for &(_, m, n) in &quotas.entries {
            let name = &self.catalog.providers[self.catalog.models[m].provider].name;
            self.shared
                .telemetry
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
            plan: CurrentPlan { groups, quotas },
            made: Instant::now(),
            took: started.elapsed(),
            reconsider_at: observed.health.iter().filter_map(Health::probe_due).min(),
        })
    }
}

/// What a request task needs.
struct RequestContext {
    store: Arc<Store>,
    catalog: Arc<Catalog>,
    client: Arc<ProviderClient>,
    retry: RetryPolicy,
    /// The safety margin (whether a refused flex job may wait for flex).
    margin: Duration,
    recorder: Recorder,
}

/// Records attempts' outcomes in batches: request tasks hand their result
/// over and wait for it to be durable; one task commits whatever has
/// accumulated in one transaction, so the store is not the limit at
/// thousands of answers a second.
#[derive(Clone)]
struct Recorder {
    tx: mpsc::UnboundedSender<(Recorded, oneshot::Sender<Result<bool, String>>)>,
}

/// The most outcomes one transaction records.
const RECORD_BATCH: usize = 512;

/// How long answers wait for an unavailable database before their record
/// fails (the jobs' leases then bring them back).
const RECORD_RETRY_FOR: Duration = Duration::from_secs(60);

impl Recorder {
    fn start(store: Arc<Store>, owner: String) -> Recorder {
        let (tx, mut rx) =
            mpsc::unbounded_channel::<(Recorded, oneshot::Sender<Result<bool, String>>)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < RECORD_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (items, replies): (Vec<Recorded>, Vec<_>) = batch.into_iter().unzip();
                // While the database is unreachable, keep the answers and
                // try again with backoff (up to RECORD_RETRY_FOR): an answer
                // the provider was paid for is not dropped for a blip.
                let items = Arc::new(items);
                let mut wait = Duration::from_millis(100);
                let given_up_at = Instant::now() + RECORD_RETRY_FOR;
                let recorded = loop {
                    let (owner, its) = (owner.clone(), items.clone());
                    match blocking(&store, move |s| s.record_attempts(&owner, &its)).await {
                        Err(e) if e.is_unavailable() && Instant::now() + wait < given_up_at => {
                            warn!(
                                answers = items.len(),
                                retry_in_ms = wait.as_millis() as u64,
                                "could not record answers, the database is unavailable: {e}"
                            );
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(5));
                        }
                        other => break other,
                    }
                };
                match recorded {
                    Ok(flags) => {
                        for (reply, flag) in replies.into_iter().zip(flags) {
                            let _ = reply.send(Ok(flag));
                        }
                    }
                    Err(e) => {
                        let message = e.to_string();
                        for reply in replies {
                            let _ = reply.send(Err(message.clone()));
                        }
                    }
                }
            }
        });
        Recorder { tx }
    }

    /// Records one outcome; true if the job was still this owner's.
    async fn record(&self, r: Recorded) -> Result<bool, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((r, tx))
            .map_err(|_| "the recorder stopped".to_string())?;
        rx.await.map_err(|_| "the recorder stopped".to_string())?
    }
}

/// What a request task reports back to the loop.
struct Executed {
    answer: Answer,
    /// What the answer would have cost at the reference model's list price.
    list_cost: f64,
    status: Option<u16>,
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
        let flex = (m.channel == Channel::Flex)
            .then_some(self.catalog.providers[m.provider].flex)
            .flatten();
        let request = Request {
            endpoint,
            model: &m.name,
            body: &job.body,
            custom_id: &job.custom_id,
            flex_timeout: flex.map(|f| f.timeout),
        };
        // Latency is the provider call's alone, not the store's time around it.
        let sent = Instant::now();
        let mut outcome = self.client.send(request).await;
        // The row that answered: a refused flex request goes once more to
        // the standard channel right away, unless the job can wait for flex
        // (or its max_cost_usd forbids the standard price).
        let mut answered = model;
        let mut flex_refused = None;
        if let Some((fallback, refusal)) = reliability::is_flex_refusal(&outcome)
            .then(|| {
                let wait = decide::FlexWait {
                    attempts: job.attempts + 1,
                    retry: &self.retry,
                    margin: self.margin,
                };
                decide::FlexRefusal::of(&self.catalog, model, &candidate(&job), dispatched_at, wait)
            })
            .flatten()
        {
            info!(job = job.id, provider = %self.catalog.providers[m.provider].name, model = %m.name,
                  backoff = ?refusal.backoff, fallback = fallback.is_some(),
                  "flex refused the request (429 resource_unavailable); not a rate limit");
            if let Some(s) = fallback {
                answered = s;
                outcome = self
                    .client
                    .send(Request {
                        endpoint,
                        model: &self.catalog.models[s].name,
                        body: &job.body,
                        custom_id: &job.custom_id,
                        flex_timeout: None,
                    })
                    .await;
            }
            flex_refused = Some(refusal);
        }
        let latency = sent.elapsed();
        let verdict =
            decide::FlexRefusal::verdict(flex_refused, || reliability::classify(&outcome));
        let model = answered;
        let m = &self.catalog.models[model];
        let now = Utc::now();
        let completed_at = now.timestamp_millis();
        let attempts = job.attempts + 1; // this one included
        let (mut finish, usage, signals) = finish_of(
            &self.catalog,
            outcome,
            &Booking {
                job: job.id,
                custom_id: &job.custom_id,
                model,
                reference,
                dispatched_at,
                submitted_ms: job.submitted_at,
                completed_at,
                attempts,
                verdict: &verdict,
            },
        );
        // The store has the channel the attempt started on; a fallback
        // answered on another.
        finish.channel = flex_refused.map(|_| m.channel.as_str());
        let deadline = DateTime::<Utc>::from_timestamp_millis(job.deadline).unwrap_or(now);
        let retry_at = reliability::next_attempt(
            &verdict,
            attempts,
            &self.retry,
            deadline,
            now,
            reliability::unit_draw(job.id as u64, attempts),
        );
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
        let id = job.id;
        let recorded = self
            .recorder
            .record(Recorded {
                job_id: id,
                retry_at: retry_at.map(|t| t.timestamp_millis()),
                finish,
            })
            .await;
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
            answer: Answer {
                verdict,
                signals,
                usage,
                billed,
                latency,
                retry_at,
                flex_refused,
            },
            list_cost,
            status,
        }
    }
}

/// The attempt an outcome is booked for.
pub(crate) struct Booking<'a> {
    pub job: i64,
    pub custom_id: &'a str,
    /// The row that answered, and the one its list cost refers to.
    pub model: ModelId,
    pub reference: ModelId,
    pub dispatched_at: DateTime<Utc>,
    /// When the job was submitted (Unix ms): its list cost is priced then.
    pub submitted_ms: i64,
    /// Now (Unix ms).
    pub completed_at: i64,
    /// Attempts so far, this one included.
    pub attempts: u32,
    pub verdict: &'a Verdict,
}

/// What an outcome records (the job's final columns, or the last error of
/// one queued again), the tokens the provider reported and its signals; a
/// synchronous answer and a batch line are booked alike.
pub(crate) fn finish_of(
    catalog: &Catalog,
    outcome: Outcome,
    b: &Booking<'_>,
) -> (Finish, Option<(u64, u64)>, Signals) {
    let (catalog, model, reference, dispatched_at, completed_at, attempts, verdict) = (
        catalog,
        b.model,
        b.reference,
        b.dispatched_at,
        b.completed_at,
        b.attempts,
        b.verdict,
    );
    let provider = &catalog.providers[catalog.models[model].provider].name;
    match outcome {
        Outcome::Success {
            status,
            request_id,
            body,
            usage,
            signals,
        } => {
            let cost = catalog.billed_cost_at(model, dispatched_at, &usage);
            let submitted =
                DateTime::<Utc>::from_timestamp_millis(b.submitted_ms).unwrap_or(dispatched_at);
            let list = catalog.billed_cost_at(reference, submitted, &usage);
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
            warn!(job = b.job, custom_id = %crate::domain::units::escaped(b.custom_id), %provider, status, attempts, ?verdict,
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
            warn!(job = b.job, custom_id = %crate::domain::units::escaped(b.custom_id), %provider, code, attempts, ?verdict,
                  "request failed: {}", crate::domain::units::escaped(&message));
            let finish = Finish {
                succeeded: false,
                completed_at,
                error_code: Some(code.to_string()),
                error_message: Some(message),
                ..Finish::default()
            };
            (finish, None, Signals::default())
        }
    }
}

/// The view of a queued job that the dispatch step decides on.
fn candidate(j: &DueJob) -> Candidate {
    Candidate {
        id: j.id,
        est_input_tokens: j.est_input_tokens,
        est_output_tokens: j.est_output_tokens,
        deadline_ms: j.deadline,
        max_cost_usd: j
            .options
            .as_deref()
            .and_then(|o| Options::parse(o).ok())
            .and_then(|o| o.max_cost_usd),
    }
}
