//! The batch channel's runner: takes one provider batch from "recorded"
//! to "done" — upload, create, poll, the deadline guard, results — with
//! every step at the provider recorded in the store right after it
//! happens (see [`crate::store::BatchStage`]). A daemon killed at any point
//! resumes each open batch where it stood when its dispatcher starts
//! again. A reload (SIGHUP) that drops a batch's channel cancels it at
//! the provider and abandons it: its jobs go back to the queue.
//!
//! The rules are [`rules`] (pure, shared with the simulator): when the
//! deadline guard cancels, how a line's outcome books its job.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::batch_api::{BatchError, BatchLine, LineResult, RemoteBatch, RemoteState};
use super::provider::ProviderClient;
use super::reliability::{self, RetryPolicy};
use super::{Booking, blocking, finish_of};
use crate::domain::pricing::{BatchTerms, Catalog, Endpoint, ModelId};
use crate::shared::Shared;
use crate::store::{BatchJob, BatchStage, LineEffect, LineRecord, ProviderBatch, QueueError};

pub mod rules;

/// Polls of a running batch back off from `poll_every` up to this many
/// times it.
const POLL_BACKOFF_MAX: u32 = 8;
/// A refused batch creation (a 4xx other than 429) keeps this provider's
/// batches off for this long.
const REFUSED_PAUSE: Duration = Duration::from_secs(600);
/// A 429 on create without `retry-after`.
const RATE_LIMITED_PAUSE: Duration = Duration::from_secs(60);

/// What a batch task needs.
pub(super) struct BatchContext {
    pub shared: Shared,
    pub catalog: Arc<Catalog>,
    /// `None`: its provider is no longer configured.
    pub client: Option<Arc<ProviderClient>>,
    pub retry: RetryPolicy,
    /// The estimated cost the dispatch step charged the budget for this
    /// batch in this process (0 for a batch resumed at start).
    pub estimated: f64,
}

/// What a batch task reports when it ends.
#[derive(Debug, Clone)]
pub(super) struct BatchDone {
    pub provider: String,
    pub batch: i64,
    /// Creation to results, for a batch that ended on its own.
    pub turnaround: Option<Duration>,
    /// The provider refused the creation: no batches for this long.
    pub refused: Option<Duration>,
    pub estimated: f64,
    /// What its answers were billed (late ones included).
    pub billed: f64,
}

/// Why a step of the batch could not go on now.
enum Stop {
    /// The store failed: try again after a pause.
    Store(QueueError),
    /// Done (abandoned or applied); `BatchDone` filled in.
    Finished,
}

impl From<QueueError> for Stop {
    fn from(e: QueueError) -> Stop {
        Stop::Store(e)
    }
}

/// `ns<batch>_<job>`: the custom_id a job carries in a provider batch.
pub fn line_id(batch: i64, job: i64) -> String {
    format!("ns{batch}_{job}")
}

/// The job of a line of batch `batch`, if the custom_id is one of its.
pub fn job_of_line(batch: i64, custom_id: &str) -> Option<i64> {
    let (b, j) = custom_id.strip_prefix("ns")?.split_once('_')?;
    (b.parse::<i64>().ok()? == batch)
        .then(|| j.parse().ok())
        .flatten()
}

impl BatchContext {
    fn client(&self) -> &ProviderClient {
        self.client
            .as_deref()
            .expect("advance() abandons a batch whose provider is gone")
    }

    fn terms(&self, b: &ProviderBatch) -> Option<BatchTerms> {
        self.catalog
            .provider_id(&b.provider)
            .and_then(|p| self.catalog.providers[p].batch.clone())
    }

    /// The catalog row of the batch's model (`provider/model@batch`).
    fn row(&self, b: &ProviderBatch) -> Option<ModelId> {
        self.catalog
            .model_id(&format!("{}/{}@batch", b.provider, b.model))
    }

    /// A reloaded configuration (SIGHUP) no longer offers the batch's
    /// channel: its provider, the provider's batch terms or the model's
    /// batch row is gone. The task keeps the catalog and client it was
    /// started with, so it asks the live configuration.
    fn withdrawn(&self, b: &ProviderBatch) -> bool {
        let live = self.shared.live.borrow();
        let c = &live.catalog;
        c.model_id(&format!("{}/{}@batch", b.provider, b.model))
            .is_none()
            || c.provider_id(&b.provider)
                .is_none_or(|p| c.providers[p].batch.is_none())
    }

    /// Runs the batch to its end. Store errors are retried (the batch is
    /// where the store says it is); a daemon stop aborts the task, and the
    /// next start resumes it.
    pub(super) async fn run(self, mut b: ProviderBatch) -> BatchDone {
        let mut done = BatchDone {
            provider: b.provider.clone(),
            batch: b.id,
            turnaround: None,
            refused: None,
            estimated: self.estimated,
            billed: 0.0,
        };
        loop {
            match self.advance(&mut b, &mut done).await {
                Ok(()) => continue,
                Err(Stop::Finished) => return done,
                Err(Stop::Store(e)) => {
                    warn!(
                        batch = b.id,
                        "provider batch: the store failed, trying again: {e}"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let id = b.id;
                    if let Ok(Some(now)) =
                        blocking(&self.shared.store, move |s| s.provider_batch(id)).await
                    {
                        b = now;
                    }
                }
            }
        }
    }

    /// One step from the stage the batch is in.
    async fn advance(&self, b: &mut ProviderBatch, done: &mut BatchDone) -> Result<(), Stop> {
        let (Some(terms), Some(row), Some(_)) = (self.terms(b), self.row(b), &self.client) else {
            return self
                .abandon(b, "its provider or model has no batch channel any more")
                .await;
        };
        if self.withdrawn(b) {
            return self.withdraw(b).await;
        }
        match b.stage {
            BatchStage::Done => Err(Stop::Finished),
            BatchStage::Prepared => self.upload(b, done, row).await,
            BatchStage::Creating => self.create(b, done, &terms, row).await,
            BatchStage::Submitted | BatchStage::Cancelling => {
                self.follow(b, done, &terms, row).await
            }
        }
    }

    async fn jobs(&self, b: &ProviderBatch) -> Result<Vec<BatchJob>, Stop> {
        let id = b.id;
        Ok(blocking(&self.shared.store, move |s| s.provider_batch_jobs(id)).await?)
    }

    fn lines(&self, b: &ProviderBatch, jobs: &[BatchJob]) -> Vec<BatchLine> {
        jobs.iter()
            .map(|j| BatchLine {
                custom_id: line_id(b.id, j.id),
                body: j.body.clone(),
            })
            .collect()
    }

    fn endpoint(b: &ProviderBatch) -> Endpoint {
        Endpoint::from_url(&b.endpoint).unwrap_or(Endpoint::ChatCompletions)
    }

    /// Its jobs back to the queue, the batch done with `why`.
    async fn abandon(&self, b: &mut ProviderBatch, why: &str) -> Result<(), Stop> {
        let (id, why_owned) = (b.id, why.to_string());
        let now_ms = Utc::now().timestamp_millis();
        let n = blocking(&self.shared.store, move |s| {
            s.provider_batch_abandoned(id, &why_owned, now_ms)
        })
        .await?;
        warn!(batch = b.id, provider = %b.provider, requeued = n, "provider batch abandoned: {why}");
        b.stage = BatchStage::Done;
        self.shared.wake.notify_one();
        Err(Stop::Finished)
    }

    /// The reloaded configuration dropped the batch's channel: cancelled at
    /// the provider if it was created there (best effort: its answers
    /// would be billed and never read), then abandoned, so its jobs run on
    /// what the configuration still offers.
    async fn withdraw(&self, b: &mut ProviderBatch) -> Result<(), Stop> {
        if b.stage == BatchStage::Submitted
            && let Some(remote_id) = b.remote_id.clone()
            && let Err(e) = self.client().batch_cancel(&remote_id).await
        {
            warn!(batch = b.id, provider = %b.provider, "provider batch: cancel failed: {e}");
        }
        self.abandon(
            b,
            "the reloaded configuration has no batch channel for its provider and model",
        )
        .await
    }

    /// What a failed provider call means for the batch: a pause of batch
    /// creation (429, a refusal), or try again after `wait` unless the
    /// deadline guard's instant has passed.
    async fn on_error(
        &self,
        b: &mut ProviderBatch,
        done: &mut BatchDone,
        what: &str,
        e: BatchError,
        creating: bool,
    ) -> Result<(), Stop> {
        match e {
            BatchError::RateLimited { retry_after } if creating => {
                done.refused = Some(retry_after.unwrap_or(RATE_LIMITED_PAUSE));
                self.abandon(
                    b,
                    &format!("{what}: rate limited (429); batch creation pauses"),
                )
                .await
            }
            BatchError::Refused { status, message } if creating => {
                done.refused = Some(REFUSED_PAUSE);
                self.abandon(
                    b,
                    &format!(
                        "{what}: refused ({status}): {}",
                        crate::domain::units::escaped(&message)
                    ),
                )
                .await
            }
            BatchError::NotFound => {
                self.abandon(b, &format!("{what}: unknown to the provider"))
                    .await
            }
            e => {
                let now = Utc::now();
                if creating && now.timestamp_millis() >= b.fallback_at {
                    return self
                        .abandon(b, &format!("{what} failed until the deadline guard: {e}"))
                        .await;
                }
                warn!(batch = b.id, provider = %b.provider, "provider batch: {what} failed, trying again: {e}");
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            }
        }
    }

    async fn upload(
        &self,
        b: &mut ProviderBatch,
        done: &mut BatchDone,
        row: ModelId,
    ) -> Result<(), Stop> {
        if !self.client().batch_uploads() {
            let id = b.id;
            blocking(&self.shared.store, move |s| {
                s.provider_batch_creating(id, None)
            })
            .await?;
            b.stage = BatchStage::Creating;
            return Ok(());
        }
        let jobs = self.jobs(b).await?;
        if jobs.is_empty() {
            return self.abandon(b, "none of its jobs is still in it").await;
        }
        let lines = self.lines(b, &jobs);
        let model = self.catalog.models[row].name.clone();
        match self
            .client()
            .batch_upload(&b.tag, Self::endpoint(b), &model, &lines)
            .await
        {
            Ok(file) => {
                let (id, f) = (b.id, file.clone());
                blocking(&self.shared.store, move |s| {
                    s.provider_batch_creating(id, Some(&f))
                })
                .await?;
                crate::faults::die_at("batch.die_after_upload");
                b.file_id = Some(file);
                b.stage = BatchStage::Creating;
                Ok(())
            }
            Err(e) => self.on_error(b, done, "upload", e, true).await,
        }
    }

    async fn create(
        &self,
        b: &mut ProviderBatch,
        done: &mut BatchDone,
        terms: &BatchTerms,
        row: ModelId,
    ) -> Result<(), Stop> {
        // The daemon may have died after "create" and before recording the
        // provider's id: look for the batch before creating it again.
        let taken: Vec<String> = blocking(&self.shared.store, |s| s.open_provider_batches())
            .await?
            .into_iter()
            .filter_map(|o| o.remote_id)
            .collect();
        let since = DateTime::<Utc>::from_timestamp_millis(b.created_at - 60_000)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let found = match self
            .client()
            .batch_find(&b.tag, since, b.requests, &taken)
            .await
        {
            Ok(found) => found,
            Err(e) => return self.on_error(b, done, "looking it up", e, true).await,
        };
        let remote = match found {
            Some(r) => {
                info!(batch = b.id, provider = %b.provider, remote = %r.id, "provider batch found at the provider after a restart");
                r
            }
            None => {
                let jobs = self.jobs(b).await?;
                if jobs.is_empty() {
                    return self.abandon(b, "none of its jobs is still in it").await;
                }
                let lines = self.lines(b, &jobs);
                let model = self.catalog.models[row].name.clone();
                match self
                    .client()
                    .batch_create(
                        &b.tag,
                        b.file_id.as_deref(),
                        Self::endpoint(b),
                        &model,
                        &lines,
                        &terms.completion_window,
                    )
                    .await
                {
                    Ok(r) => {
                        crate::faults::die_at("batch.die_after_create");
                        r
                    }
                    Err(e) => return self.on_error(b, done, "create", e, true).await,
                }
            }
        };
        let now_ms = Utc::now().timestamp_millis();
        let (id, rid, status) = (b.id, remote.id.clone(), remote.status.clone());
        blocking(&self.shared.store, move |s| {
            s.provider_batch_submitted(id, &rid, &status, now_ms)
        })
        .await?;
        info!(batch = b.id, provider = %b.provider, remote = %remote.id, requests = b.requests,
              fallback_at = %rfc3339(b.fallback_at), "provider batch submitted");
        b.remote_id = Some(remote.id);
        b.remote_status = Some(remote.status);
        b.submitted_at.get_or_insert(now_ms);
        b.stage = BatchStage::Submitted;
        Ok(())
    }

    /// Polls until the batch ends (cancelling it at its fallback instant),
    /// then applies its results.
    async fn follow(
        &self,
        b: &mut ProviderBatch,
        done: &mut BatchDone,
        terms: &BatchTerms,
        row: ModelId,
    ) -> Result<(), Stop> {
        let Some(remote_id) = b.remote_id.clone() else {
            return self.abandon(b, "no provider id was recorded").await;
        };
        let mut polls = 0u32;
        // Woken by a reload, so a withdrawn channel is noticed now, not a
        // poll later.
        let mut live = self.shared.live.clone();
        live.borrow_and_update();
        loop {
            if self.withdrawn(b) {
                return self.withdraw(b).await;
            }
            let now = Utc::now();
            if b.stage == BatchStage::Submitted && rules::guard_due(b.fallback_at, now) {
                self.guard(b, &remote_id).await?;
                // At least this long: what the planner learns from, so that
                // batches the provider keeps late are expected late, and
                // guarded later, instead of being re-made every time.
                let from = b.submitted_at.unwrap_or(b.created_at);
                let age = (now.timestamp_millis() - from).max(0) as u64;
                done.turnaround = Some(Duration::from_millis(age));
            }
            let remote = match self.client().batch_get(&remote_id).await {
                Ok(r) => r,
                Err(e) => {
                    self.on_error(b, done, "polling", e, false).await?;
                    continue;
                }
            };
            match &remote.state {
                RemoteState::Failed { message } => {
                    let why = format!(
                        "the provider rejected it: {}",
                        crate::domain::units::escaped(message)
                    );
                    return self.abandon(b, &why).await;
                }
                RemoteState::Ended { .. } => return self.finish(b, done, row, remote).await,
                RemoteState::Running | RemoteState::Cancelling => {
                    if b.remote_status.as_deref() != Some(remote.status.as_str()) {
                        let (id, st) = (b.id, remote.status.clone());
                        blocking(&self.shared.store, move |s| {
                            s.provider_batch_status(id, &st)
                        })
                        .await?;
                        b.remote_status = Some(remote.status.clone());
                    }
                }
            }
            let wait = rules::poll_wait(terms.poll_every, polls, POLL_BACKOFF_MAX);
            polls = polls.saturating_add(1);
            let wait = if b.stage == BatchStage::Submitted {
                // Wake at the fallback instant, not a poll later.
                let to_guard = (b.fallback_at - Utc::now().timestamp_millis()).max(0) as u64;
                wait.min(Duration::from_millis(to_guard))
            } else {
                wait
            };
            tokio::select! {
                _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
                Ok(()) = live.changed() => {
                    live.borrow_and_update();
                }
            }
        }
    }

    /// The deadline guard: cancel at the provider, jobs back to the queue.
    async fn guard(&self, b: &mut ProviderBatch, remote_id: &str) -> Result<(), Stop> {
        let status = match self.client().batch_cancel(remote_id).await {
            Ok(r) => r.status,
            Err(e) => {
                // The jobs go back to the queue regardless: their deadline
                // does not wait for the provider.
                warn!(batch = b.id, provider = %b.provider, "provider batch: cancel failed: {e}");
                "cancel_failed".to_string()
            }
        };
        let id = b.id;
        let st = status.clone();
        let n = blocking(&self.shared.store, move |s| {
            s.provider_batch_cancelling(id, &st)
        })
        .await?;
        warn!(batch = b.id, provider = %b.provider, requeued = n, fallback_at = %rfc3339(b.fallback_at),
              "provider batch not ended by its guard instant (overdue, or its fallback instant): cancelled, its jobs are planned again");
        b.stage = BatchStage::Cancelling;
        b.remote_status = Some(status);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Downloads an ended batch's results and applies them.
    async fn finish(
        &self,
        b: &mut ProviderBatch,
        done: &mut BatchDone,
        row: ModelId,
        remote: RemoteBatch,
    ) -> Result<(), Stop> {
        let results = loop {
            match self.client().batch_results(&remote).await {
                Ok(r) => break r,
                Err(BatchError::NotFound) => break Vec::new(),
                Err(e) => {
                    warn!(batch = b.id, provider = %b.provider, "provider batch: downloading results failed, trying again: {e}");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        crate::faults::die_at("batch.die_after_download");
        // Jobs still in the batch, and (after the guard) jobs that were in
        // it: a line is matched to its job by the id in its custom_id.
        let jobs = self.jobs(b).await?;
        let now = Utc::now();
        let records = self.records(b, row, &jobs, results, now).await?;
        done.billed = records.iter().map(|r| r.cost_usd).sum();
        let batch = b.clone();
        let status = remote.status.clone();
        let now_ms = now.timestamp_millis();
        let applied = blocking(&self.shared.store, move |s| {
            s.apply_provider_batch(&batch, &records, &status, now_ms)
        })
        .await?;
        if b.stage == BatchStage::Submitted {
            let from = b.submitted_at.unwrap_or(b.created_at);
            done.turnaround = Some(Duration::from_millis((now_ms - from).max(0) as u64));
        }
        info!(batch = b.id, provider = %b.provider, remote = %remote.id, status = %remote.status,
              succeeded = applied.succeeded, failed = applied.failed, requeued = applied.requeued,
              late = applied.late, billed_usd = done.billed, "provider batch ended");
        b.stage = BatchStage::Done;
        self.shared.finished.notify_one();
        self.shared.wake.notify_one();
        Err(Stop::Finished)
    }

    /// Books each line: its job's final result, a retry or "not run".
    async fn records(
        &self,
        b: &ProviderBatch,
        row: ModelId,
        running: &[BatchJob],
        results: Vec<LineResult>,
        now: DateTime<Utc>,
    ) -> Result<Vec<LineRecord>, Stop> {
        let mut by_id: std::collections::HashMap<i64, &BatchJob> =
            running.iter().map(|j| (j.id, j)).collect();
        // Lines of jobs the guard re-queued are not in `running`: read them.
        let others: Vec<i64> = results
            .iter()
            .filter_map(|l| job_of_line(b.id, &l.custom_id))
            .filter(|id| !by_id.contains_key(id))
            .collect();
        let extra: Vec<BatchJob> = if others.is_empty() {
            Vec::new()
        } else {
            blocking(&self.shared.store, move |s| s.batch_jobs_by_id(&others)).await?
        };
        by_id.extend(extra.iter().map(|j| (j.id, j)));
        let dispatched_at =
            DateTime::<Utc>::from_timestamp_millis(b.submitted_at.unwrap_or(b.created_at))
                .unwrap_or(now);
        let mut out = Vec::with_capacity(results.len());
        for line in results {
            let Some(job) = job_of_line(b.id, &line.custom_id).and_then(|id| by_id.get(&id)) else {
                warn!(batch = b.id, custom_id = %crate::domain::units::escaped(&line.custom_id),
                      "provider batch: a result line names no job of this batch; ignored");
                continue;
            };
            let Some(outcome) = line.outcome else {
                out.push(LineRecord {
                    job_id: job.id,
                    effect: LineEffect::NotRun,
                    cost_usd: 0.0,
                });
                continue;
            };
            let reference = self.reference(job, row);
            let verdict = reliability::classify(&outcome);
            let attempts = job.attempts.max(1);
            let (finish, _, _) = finish_of(
                &self.catalog,
                outcome,
                &Booking {
                    job: job.id,
                    custom_id: &job.custom_id,
                    model: row,
                    reference,
                    dispatched_at,
                    submitted_ms: job.submitted_at,
                    completed_at: now.timestamp_millis(),
                    attempts,
                    verdict: &verdict,
                },
            );
            let deadline = DateTime::<Utc>::from_timestamp_millis(job.deadline).unwrap_or(now);
            let retry_at = reliability::next_attempt(
                &verdict,
                attempts,
                &self.retry,
                deadline,
                now,
                reliability::unit_draw(job.id as u64, attempts),
            );
            let cost_usd = finish.cost_usd.unwrap_or(0.0);
            let effect = match retry_at {
                Some(at) => LineEffect::Retry {
                    not_before: at.timestamp_millis(),
                    last: finish,
                },
                None => LineEffect::Finish(finish),
            };
            out.push(LineRecord {
                job_id: job.id,
                effect,
                cost_usd,
            });
        }
        Ok(out)
    }

    /// The model a job's list cost refers to: its class's reference model,
    /// else the batch row's standard row.
    fn reference(&self, job: &BatchJob, row: ModelId) -> ModelId {
        let endpoint = Endpoint::from_url(&job.endpoint).unwrap_or(Endpoint::ChatCompletions);
        self.catalog
            .resolve(&job.model, endpoint)
            .map(|c| c.reference)
            .unwrap_or_else(|_| self.catalog.models[row].standard.unwrap_or(row))
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
}
