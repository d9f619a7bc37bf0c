//! PostgreSQL: queue (the same methods as the SQLite store's, see `store::backend`).

#![allow(
    unused_variables,
    unused_imports,
    clippy::useless_conversion,
    clippy::type_complexity
)]

use std::collections::BTreeMap;

use super::{Postgres, unsupported};
use crate::store::api::*;
use crate::store::batches::*;
use crate::store::maintenance::{Checkpoint, CheckpointMode, Purged};
use crate::store::*;

impl Postgres {
    pub fn inbox_source_by_hash(&self, sha256: &str) -> Result<Option<(i64, String)>> {
        Err(unsupported("inbox_source_by_hash").into())
    }

    pub fn ingest(
        &self,
        source: &NewSource,
        lines: impl Iterator<Item = std::io::Result<LineOutcome>>,
    ) -> Result<IngestSummary> {
        Err(unsupported("ingest").into())
    }

    pub fn learned_token_ratios(
        &self,
        days: i64,
    ) -> Result<(Vec<(String, f64)>, Vec<(String, f64)>)> {
        Err(unsupported("learned_token_ratios").into())
    }

    pub fn queued_by_route(&self) -> Result<Vec<(String, u64)>> {
        Err(unsupported("queued_by_route").into())
    }

    pub fn queued_buckets(&self) -> Result<Vec<crate::plan::QueuedBucket>> {
        Err(unsupported("queued_buckets").into())
    }

    pub fn queued_in_route(
        &self,
        route_key: &str,
        size_bin: i64,
        from: i64,
        to: i64,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<DueJob>> {
        Err(unsupported("queued_in_route").into())
    }

    pub fn fail_route(
        &self,
        route_key: &str,
        now_ms: i64,
        code: &str,
        message: &str,
    ) -> Result<usize> {
        Err(unsupported("fail_route").into())
    }

    pub fn start_attempts(
        &self,
        starts: &[Start],
        now_ms: i64,
        lease_until: i64,
        owner: &str,
    ) -> Result<Vec<i64>> {
        Err(unsupported("start_attempts").into())
    }

    pub fn recent_sends(&self, now_ms: i64, minute_held: i64) -> Result<Vec<SentGroup>> {
        Err(unsupported("recent_sends").into())
    }

    pub fn finish(&self, job_id: i64, owner: &str, f: &Finish) -> Result<bool> {
        Err(unsupported("finish").into())
    }

    pub fn retry_later(
        &self,
        job_id: i64,
        owner: &str,
        not_before: i64,
        last: &Finish,
    ) -> Result<bool> {
        Err(unsupported("retry_later").into())
    }

    pub fn record_attempts(&self, owner: &str, attempts: &[Recorded]) -> Result<Vec<bool>> {
        Err(unsupported("record_attempts").into())
    }

    pub fn record_late_answer(&self, job_id: i64, cost_usd: f64) -> Result<()> {
        Err(unsupported("record_late_answer").into())
    }

    pub fn fail_queued(&self, job_id: i64, now_ms: i64, code: &str, message: &str) -> Result<bool> {
        Err(unsupported("fail_queued").into())
    }

    pub fn expire_overdue(&self, now_ms: i64) -> Result<Vec<(i64, String)>> {
        Err(unsupported("expire_overdue").into())
    }

    pub fn earliest_queued_deadline(&self) -> Result<Option<i64>> {
        Err(unsupported("earliest_queued_deadline").into())
    }

    pub fn recover_leases(&self, now_ms: i64, owner: &str) -> Result<usize> {
        Err(unsupported("recover_leases").into())
    }

    pub fn requeue_running(&self, job_id: i64, owner: &str) -> Result<bool> {
        Err(unsupported("requeue_running").into())
    }

    pub fn release_running(&self, owner: &str) -> Result<usize> {
        Err(unsupported("release_running").into())
    }

    pub fn sources_ready_for_outbox(&self) -> Result<Vec<SourceRow>> {
        Err(unsupported("sources_ready_for_outbox").into())
    }

    pub fn for_each_job_of(
        &self,
        source_id: i64,
        on_job: impl FnMut(FinishedJob) -> std::io::Result<()>,
    ) -> std::result::Result<(), ResultsError> {
        Err(unsupported("for_each_job_of").into())
    }

    pub fn line_errors_of(&self, source_id: i64) -> Result<Vec<StoredLineError>> {
        Err(unsupported("line_errors_of").into())
    }

    pub fn mark_outbox_written(&self, source_id: i64, now_ms: i64) -> Result<()> {
        Err(unsupported("mark_outbox_written").into())
    }

    pub fn spent_since(&self, provider: Option<&str>, since_ms: i64) -> Result<f64> {
        Err(unsupported("spent_since").into())
    }

    pub fn spend(&self, since_ms: i64, by: SpendBy) -> Result<Vec<SpendRow>> {
        Err(unsupported("spend").into())
    }

    pub fn counts(&self) -> Result<BTreeMap<JobState, u64>> {
        Err(unsupported("counts").into())
    }

    pub fn job(&self, id: i64) -> Result<Option<FinishedJob>> {
        Err(unsupported("job").into())
    }
}
