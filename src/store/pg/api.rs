//! PostgreSQL: api (the same methods as the SQLite store's, see `store::backend`).

#![allow(unused_variables, unused_imports, clippy::useless_conversion)]

use std::collections::BTreeMap;

use super::{Postgres, unsupported};
use crate::store::api::*;
use crate::store::batches::*;
use crate::store::maintenance::{Checkpoint, CheckpointMode, Purged};
use crate::store::*;

impl Postgres {
    pub fn job_detail(&self, id: i64) -> Result<Option<JobDetail>> {
        Err(unsupported("job_detail").into())
    }

    pub fn job_body(&self, id: i64) -> Result<Option<String>> {
        Err(unsupported("job_body").into())
    }

    pub fn list_jobs(
        &self,
        filter: &JobFilter,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobDetail>> {
        Err(unsupported("list_jobs").into())
    }

    pub fn job_ids_of(&self, source_id: i64) -> Result<Vec<(i64, String, i64)>> {
        Err(unsupported("job_ids_of").into())
    }

    pub fn cancel_job(&self, id: i64, now_ms: i64) -> Result<CancelOutcome> {
        Err(unsupported("cancel_job").into())
    }

    pub fn source_info(&self, id: i64) -> Result<Option<SourceInfo>> {
        Err(unsupported("source_info").into())
    }

    pub fn list_sources(&self, before: Option<i64>, limit: usize) -> Result<Vec<SourceInfo>> {
        Err(unsupported("list_sources").into())
    }

    pub fn queue_stats(&self) -> Result<QueueStats> {
        Err(unsupported("queue_stats").into())
    }

    pub fn recent_outcomes(&self, since_ms: i64) -> Result<BTreeMap<String, RecentOutcomes>> {
        Err(unsupported("recent_outcomes").into())
    }

    pub fn insert_file(
        &self,
        purpose: &str,
        filename: &str,
        content: &[u8],
        now_ms: i64,
    ) -> Result<FileRow> {
        Err(unsupported("insert_file").into())
    }

    pub fn file(&self, id: i64) -> Result<Option<FileRow>> {
        Err(unsupported("file").into())
    }

    pub fn file_content(
        &self,
        id: i64,
        chunk: usize,
        on_chunk: impl FnMut(Vec<u8>) -> std::io::Result<()>,
    ) -> Result<()> {
        Err(unsupported("file_content").into())
    }

    pub fn create_batch(&self, b: &NewBatch) -> Result<i64> {
        Err(unsupported("create_batch").into())
    }

    pub fn start_batch(
        &self,
        batch_id: i64,
        source_id: Option<i64>,
        failed: bool,
        errors: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        Err(unsupported("start_batch").into())
    }

    pub fn ingest_batch(
        &self,
        batch_id: i64,
        source: &NewSource,
        lines: impl Iterator<Item = std::io::Result<LineOutcome>>,
    ) -> Result<IngestSummary> {
        Err(unsupported("ingest_batch").into())
    }

    pub fn validating_batches(&self) -> Result<Vec<(BatchRow, Option<i64>)>> {
        Err(unsupported("validating_batches").into())
    }

    pub fn batch(&self, id: i64) -> Result<Option<BatchRow>> {
        Err(unsupported("batch").into())
    }

    pub fn list_batches(&self, before: Option<i64>, limit: usize) -> Result<Vec<BatchRow>> {
        Err(unsupported("list_batches").into())
    }

    pub fn batch_counts(&self, source_id: i64) -> Result<SourceCounts> {
        Err(unsupported("batch_counts").into())
    }

    pub fn done_batches(&self) -> Result<Vec<DoneBatch>> {
        Err(unsupported("done_batches").into())
    }

    pub fn close_batch(&self, batch_id: i64, close: &BatchClose) -> Result<bool> {
        Err(unsupported("close_batch").into())
    }

    pub fn cancel_batch(&self, batch_id: i64, now_ms: i64) -> Result<Option<usize>> {
        Err(unsupported("cancel_batch").into())
    }
}
