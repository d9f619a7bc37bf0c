//! The dispatcher: the loop that takes due jobs from the queue, routes each
//! (pure, in [`crate::plan`]), leases it, sends it, and records the result.
//!
//! Its shape: sleep until the next thing is due or something changes (a job
//! arrives, a request finishes), then do everything that is due now.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::job::{self, Options};
use crate::limits::RateLimits;
use crate::plan::{self, Decision};
use crate::pricing::{Catalog, Endpoint, ModelId};
use crate::provider::{Outcome, ProviderClient, Request};
use crate::queue::{DueJob, Finish, Start, Store};

/// How many due jobs one pass considers.
const BATCH: usize = 512;
/// How long an idle dispatcher sleeps before looking again.
const IDLE: Duration = Duration::from_secs(1);

/// Shared handles the dispatcher works with.
pub struct Dispatcher {
    pub store: Arc<Store>,
    pub catalog: Arc<Catalog>,
    /// Parallel to `catalog.providers`.
    pub clients: Vec<Arc<ProviderClient>>,
    /// This instance's lease owner id.
    pub owner: String,
    /// Lease on a running job: the request timeout plus a margin.
    pub lease: Duration,
    /// A job whose deadline is closer than this does not wait for the
    /// cheapest provider's capacity.
    pub urgency: Duration,
    /// Notified when jobs arrive (ingest) to dispatch them at once.
    pub wake: Arc<Notify>,
    /// Notified when jobs become final, for the outbox writer.
    pub finished: Arc<Notify>,
}

/// A finished request, reported back to the loop for rate-limit accounting.
struct Done {
    provider: usize,
    estimated_tokens: u64,
    actual_tokens: Option<u64>,
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
    /// Dispatches until `shutdown` turns true, then waits up to `grace` for
    /// in-flight requests and returns the rest to the queue.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let now_ms = Utc::now().timestamp_millis();
        let mut limits = RateLimits::new(self.catalog.providers.iter().map(|p| p.limits), now_ms);
        let mut in_flight: JoinSet<Done> = JoinSet::new();
        loop {
            let next = match self.pass(&mut limits, &mut in_flight).await {
                Ok(next) => next,
                Err(e) => {
                    warn!("dispatch pass failed: {e}");
                    IDLE
                }
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(next) => {}
                Some(done) = in_flight.join_next() => {
                    self.account(&mut limits, done);
                    while let Some(done) = in_flight.try_join_next() {
                        self.account(&mut limits, done);
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
                    self.account(&mut limits, done);
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

    fn account(&self, limits: &mut RateLimits, done: Result<Done, tokio::task::JoinError>) {
        match done {
            Ok(d) => {
                limits.provider(d.provider).release(
                    d.estimated_tokens,
                    d.actual_tokens,
                    Utc::now().timestamp_millis(),
                );
                self.finished.notify_one();
            }
            Err(e) if e.is_panic() => warn!("a request task panicked: {e}"),
            Err(_) => {}
        }
    }

    /// One pass: expire overdue jobs, route and start due ones. Returns how
    /// long to sleep if nothing else happens.
    async fn pass(
        &self,
        limits: &mut RateLimits,
        in_flight: &mut JoinSet<Done>,
    ) -> Result<Duration, crate::queue::QueueError> {
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        let expired = blocking(&self.store, move |s| s.expire_overdue(now_ms)).await?;
        if expired > 0 {
            info!(expired, "jobs passed their deadline before dispatch");
            self.finished.notify_one();
        }
        let due = blocking(&self.store, move |s| s.due_jobs(now_ms, BATCH)).await?;
        if due.is_empty() {
            return Ok(IDLE);
        }
        let full = due.len() == BATCH;
        let mut starts = Vec::new();
        let mut routed = Vec::new();
        let mut next = IDLE;
        let mut failures = Vec::new();
        for job in due {
            match self.decide(&job, now, limits) {
                Ok((model, estimated_cost, reference)) => {
                    let m = &self.catalog.models[model];
                    starts.push(Start {
                        job_id: job.id,
                        provider: self.catalog.providers[m.provider].name.clone(),
                        provider_model: m.name.clone(),
                    });
                    routed.push((job, model, estimated_cost, reference));
                }
                Err(Some((code, message))) => failures.push((job.id, code, message)),
                Err(None) => {
                    // Waiting for capacity: look again when the soonest provider frees up.
                    next = next.min(Duration::from_millis(50));
                }
            }
        }
        if !failures.is_empty() {
            let n = failures.len();
            blocking(&self.store, move |s| {
                for (id, code, message) in failures {
                    s.fail_queued(id, now_ms, code, &message)?;
                }
                Ok::<_, crate::queue::QueueError>(())
            })
            .await?;
            info!(failed = n, "jobs failed without dispatch");
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
        for (job, model, estimated_cost, reference) in routed {
            let provider = self.catalog.models[model].provider;
            let estimated_tokens = job.est_input_tokens + job.est_output_tokens;
            if !started.contains(&job.id) {
                // Cancelled between the read and the lease: give the capacity back.
                limits
                    .provider(provider)
                    .release(estimated_tokens, Some(0), now_ms);
                continue;
            }
            debug!(job = job.id, custom_id = %job.custom_id, provider = %self.catalog.providers[provider].name,
                   model = %self.catalog.models[model].name, estimated_cost, "job running");
            let ctx = RequestContext {
                store: self.store.clone(),
                catalog: self.catalog.clone(),
                client: self.clients[provider].clone(),
                owner: self.owner.clone(),
            };
            in_flight.spawn(async move {
                let actual_tokens = ctx.execute(job, model, reference, now).await;
                Done {
                    provider,
                    estimated_tokens,
                    actual_tokens,
                }
            });
        }
        // A full batch may have left more due jobs behind: look again at once.
        Ok(if full && !started.is_empty() {
            Duration::ZERO
        } else {
            next
        })
    }

    /// Routes one job. `Ok` = send it (taking capacity); `Err(None)` = wait;
    /// `Err(Some(code, message))` = fail it now.
    #[allow(clippy::type_complexity)]
    fn decide(
        &self,
        job: &DueJob,
        now: DateTime<Utc>,
        limits: &mut RateLimits,
    ) -> Result<(ModelId, f64, ModelId), Option<(&'static str, String)>> {
        let endpoint = Endpoint::from_url(&job.endpoint).ok_or_else(|| {
            Some((
                "not_routable",
                format!("unsupported endpoint {}", job.endpoint),
            ))
        })?;
        let options = match &job.options {
            Some(o) => Options::parse(o).map_err(|e| Some(("not_routable", e.to_string())))?,
            None => Options::default(),
        };
        let candidates =
            job::eligible(&self.catalog, &job.model, endpoint, &options).map_err(|e| {
                Some((
                    "not_routable",
                    format!("no eligible model in the current configuration: {e}"),
                ))
            })?;
        let estimate = crate::estimate::TokenEstimate {
            input: job.est_input_tokens,
            output: job.est_output_tokens,
        };
        let urgent = job.deadline - now.timestamp_millis() < self.urgency.as_millis() as i64;
        let now_ms = now.timestamp_millis();
        let tokens = estimate.input + estimate.output;
        match plan::route(
            &self.catalog,
            &candidates.models,
            estimate,
            options.max_cost_usd,
            now,
            urgent,
            |p| limits.provider(p).try_acquire(tokens, now_ms),
        ) {
            Decision::Send {
                model,
                estimated_cost,
            } => Ok((model, estimated_cost, candidates.reference)),
            Decision::Wait => Err(None),
            Decision::TooExpensive { cheapest } => Err(Some((
                "max_cost_exceeded",
                format!(
                    "the cheapest eligible model costs an estimated ${cheapest:.6}, above max_cost_usd ${:.6}",
                    options.max_cost_usd.unwrap_or_default()
                ),
            ))),
        }
    }
}

/// What a request task needs.
struct RequestContext {
    store: Arc<Store>,
    catalog: Arc<Catalog>,
    client: Arc<ProviderClient>,
    owner: String,
}

impl RequestContext {
    /// Sends the job and records its final state. Returns the tokens the
    /// provider reported, if any.
    async fn execute(
        self,
        job: DueJob,
        model: ModelId,
        reference: ModelId,
        dispatched_at: DateTime<Utc>,
    ) -> Option<u64> {
        let endpoint = Endpoint::from_url(&job.endpoint).unwrap_or(Endpoint::ChatCompletions);
        let m = &self.catalog.models[model];
        let request = Request {
            endpoint,
            model: &m.name,
            body: &job.body,
            custom_id: &job.custom_id,
        };
        let outcome = self.client.send(request).await;
        let completed_at = Utc::now().timestamp_millis();
        let (finish, tokens) = match outcome {
            Outcome::Success {
                status,
                request_id,
                body,
                usage,
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
                (
                    Finish {
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
                    },
                    Some(usage.input_tokens + usage.output_tokens),
                )
            }
            Outcome::HttpError {
                status,
                request_id,
                body,
            } => {
                warn!(job = job.id, custom_id = %job.custom_id, provider = %self.catalog.providers[m.provider].name,
                      status, "provider answered with an error");
                (
                    Finish {
                        succeeded: false,
                        completed_at,
                        status_code: Some(status),
                        request_id,
                        response: Some(body),
                        ..Finish::default()
                    },
                    None,
                )
            }
            Outcome::NoAnswer { code, message } => {
                warn!(job = job.id, custom_id = %job.custom_id, provider = %self.catalog.providers[m.provider].name,
                      code, "request failed: {message}");
                (
                    Finish {
                        succeeded: false,
                        completed_at,
                        error_code: Some(code.to_string()),
                        error_message: Some(message),
                        ..Finish::default()
                    },
                    None,
                )
            }
        };
        let (id, owner) = (job.id, self.owner.clone());
        match blocking(&self.store, move |s| s.finish(id, &owner, &finish)).await {
            Ok(true) => debug!(job = id, "job final"),
            Ok(false) => warn!(
                job = id,
                "late answer for a job whose lease was recovered; result not recorded"
            ),
            Err(e) => warn!(
                job = id,
                "could not record the result (the lease will expire and the job re-run): {e}"
            ),
        }
        tokens
    }
}
