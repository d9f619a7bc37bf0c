//! The simulated providers' batches: in memory, answered with the
//! synchronous simulator's completions, on the wall clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use super::{BatchError, BatchLine, LineResult, RemoteBatch, RemoteState};
pub use crate::dispatch::provider::SimBatch;
use crate::dispatch::provider::{
    Request, simulated_fails, simulated_failure, simulated_success, stable_hash, with_model,
};
use crate::dispatch::reliability::Outcome;
use crate::domain::pricing::Endpoint;

/// How long an ended simulated batch is kept for its results to be read;
/// after that it is forgotten, as after a restart.
const KEPT_AFTER_END: TimeDelta = TimeDelta::hours(24);

impl SimBatch {
    /// When line `i` finishes (if the batch is not cancelled first).
    fn line_done(&self, i: usize) -> DateTime<Utc> {
        let n = self.lines.len().max(1) as f64;
        let at = self.turnaround.mul_f64((i + 1) as f64 / n);
        TimeDelta::from_std(at)
            .ok()
            .and_then(|d| self.created.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    fn ends(&self) -> DateTime<Utc> {
        let natural = TimeDelta::from_std(self.turnaround)
            .ok()
            .and_then(|d| self.created.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.cancelled.map_or(natural, |c| c.min(natural))
    }

    /// Lines finished by `now` (an expired batch runs only its first ones).
    fn finished(&self, now: DateTime<Utc>) -> usize {
        let cut = now.min(self.ends());
        (0..self.lines.len())
            .take_while(|&i| self.line_done(i) <= cut)
            .count()
            .min(self.expired_after.unwrap_or(usize::MAX))
    }

    fn remote(&self, id: &str, now: DateTime<Utc>) -> RemoteBatch {
        let ended = now >= self.ends();
        let (state, status) = match (ended, self.cancelled.is_some()) {
            (false, _) => (RemoteState::Running, "in_progress"),
            (true, cancelled) => (
                RemoteState::Ended {
                    output: Some(id.to_string()),
                    errors: None,
                },
                match (cancelled, self.expired_after) {
                    (true, _) => "cancelled",
                    (false, Some(_)) => "expired",
                    (false, None) => "completed",
                },
            ),
        };
        RemoteBatch {
            id: id.to_string(),
            state,
            status: status.to_string(),
            total: self.lines.len() as u64,
            finished: self.finished(now) as u64,
        }
    }
}

/// The next simulated batch number. It starts at the Unix time in
/// milliseconds of the first batch, so a restarted daemon does not hand
/// out an id its previous run recorded (that one must be not found).
fn next_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(1);
    let _ = NEXT.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A simulated provider's batch side.
pub(super) struct Sim<'a> {
    pub(super) name: &'a str,
    pub(super) failure_rate: f64,
    pub(super) turnaround: Duration,
    /// The fraction of batches expired when they end (at their turnaround
    /// here, not the completion window: the daemon's simulated batches are
    /// short), a drawn share (possibly none, never all) of their lines run.
    pub(super) expire_fraction: f64,
    pub(super) batches: &'a Mutex<HashMap<String, SimBatch>>,
}

impl Sim<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimBatch>> {
        // The map stays consistent whatever a panicking holder did.
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn create(
        &self,
        endpoint: Endpoint,
        model: &str,
        lines: &[BatchLine],
    ) -> RemoteBatch {
        let now = Utc::now();
        let id = format!("sim_batch_{}", next_number());
        let expired_after = simulated_fails(self.expire_fraction, &[self.name, &id, "expire"])
            .then(|| {
                (stable_hash(&[self.name, &id, "expire-share"]) % (lines.len().max(1) as u64))
                    as usize
            });
        let batch = SimBatch {
            created: now,
            turnaround: self.turnaround,
            cancelled: None,
            expired_after,
            endpoint,
            model: model.to_string(),
            lines: lines.to_vec(),
        };
        let remote = batch.remote(&id, now);
        let mut batches = self.lock();
        batches.retain(|_, b| {
            b.ends()
                .checked_add_signed(KEPT_AFTER_END)
                .is_none_or(|t| t > now)
        });
        batches.insert(id, batch);
        remote
    }

    pub(super) fn get(&self, id: &str) -> Result<RemoteBatch, BatchError> {
        let batches = self.lock();
        let batch = batches.get(id).ok_or(BatchError::NotFound)?;
        Ok(batch.remote(id, Utc::now()))
    }

    /// Ends the batch now: lines not finished are not run.
    pub(super) fn cancel(&self, id: &str) -> Result<RemoteBatch, BatchError> {
        let now = Utc::now();
        let mut batches = self.lock();
        let batch = batches.get_mut(id).ok_or(BatchError::NotFound)?;
        if now < batch.ends() {
            batch.cancelled = Some(now);
        }
        Ok(batch.remote(id, now))
    }

    /// Each finished line answered as the synchronous simulator answers it
    /// (a deterministic share of them, by `custom_id`, failing with HTTP
    /// 500), the others `None`.
    pub(super) fn results(&self, id: &str) -> Result<Vec<LineResult>, BatchError> {
        let now = Utc::now();
        let (finished, endpoint, model, lines) = {
            let batches = self.lock();
            let batch = batches.get(id).ok_or(BatchError::NotFound)?;
            if now < batch.ends() {
                return Err(BatchError::Transient(format!("batch {id} has not ended")));
            }
            (
                batch.finished(now),
                batch.endpoint,
                batch.model.clone(),
                batch.lines.clone(),
            )
        };
        Ok(lines
            .iter()
            .enumerate()
            .map(|(i, line)| LineResult {
                custom_id: line.custom_id.clone(),
                outcome: (i < finished).then(|| self.answer(endpoint, &model, line)),
            })
            .collect())
    }

    fn answer(&self, endpoint: Endpoint, model: &str, line: &BatchLine) -> Outcome {
        if simulated_fails(self.failure_rate, &[self.name, &line.custom_id, "batch"]) {
            return simulated_failure(format!("sim-fail-{}", line.custom_id));
        }
        match with_model(&line.body, model) {
            Ok(body) => simulated_success(
                self.name,
                Request {
                    endpoint,
                    model,
                    body: &line.body,
                    custom_id: &line.custom_id,
                    flex_timeout: None,
                },
                &body,
            ),
            Err(e) => Outcome::NoAnswer {
                code: "invalid_body",
                message: e.to_string(),
            },
        }
    }
}
