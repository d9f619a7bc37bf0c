//! PostgreSQL: batches (the same methods as the SQLite store's, see `store::backend`).

#![allow(unused_variables, unused_imports, clippy::useless_conversion)]

use std::collections::BTreeMap;

use super::{Postgres, unsupported};
use crate::store::api::*;
use crate::store::batches::*;
use crate::store::maintenance::{Checkpoint, CheckpointMode, Purged};
use crate::store::*;

impl Postgres {
    pub fn create_provider_batch(
        &self,
        b: &NewProviderBatch,
        job_ids: &[i64],
    ) -> Result<Option<(i64, Vec<i64>)>> {
        Err(unsupported("create_provider_batch").into())
    }

    pub fn open_provider_batches(&self) -> Result<Vec<ProviderBatch>> {
        Err(unsupported("open_provider_batches").into())
    }

    pub fn provider_batch(&self, id: i64) -> Result<Option<ProviderBatch>> {
        Err(unsupported("provider_batch").into())
    }

    pub fn recent_provider_batches(&self, limit: usize) -> Result<Vec<ProviderBatch>> {
        Err(unsupported("recent_provider_batches").into())
    }

    pub fn provider_batch_counts(&self) -> Result<Vec<(String, String, u64)>> {
        Err(unsupported("provider_batch_counts").into())
    }

    pub fn provider_batch_jobs(&self, batch: i64) -> Result<Vec<BatchJob>> {
        Err(unsupported("provider_batch_jobs").into())
    }

    pub fn batch_jobs_by_id(&self, ids: &[i64]) -> Result<Vec<BatchJob>> {
        Err(unsupported("batch_jobs_by_id").into())
    }

    pub fn provider_batch_creating(&self, batch: i64, file_id: Option<&str>) -> Result<()> {
        Err(unsupported("provider_batch_creating").into())
    }

    pub fn provider_batch_submitted(
        &self,
        batch: i64,
        remote_id: &str,
        status: &str,
        now_ms: i64,
    ) -> Result<()> {
        Err(unsupported("provider_batch_submitted").into())
    }

    pub fn provider_batch_status(&self, batch: i64, status: &str) -> Result<()> {
        Err(unsupported("provider_batch_status").into())
    }

    pub fn provider_batch_cancelling(&self, batch: i64, status: &str) -> Result<u64> {
        Err(unsupported("provider_batch_cancelling").into())
    }

    pub fn provider_batch_abandoned(&self, batch: i64, error: &str, now_ms: i64) -> Result<u64> {
        Err(unsupported("provider_batch_abandoned").into())
    }

    pub fn apply_provider_batch(
        &self,
        batch: &ProviderBatch,
        lines: &[LineRecord],
        status: &str,
        now_ms: i64,
    ) -> Result<Applied> {
        Err(unsupported("apply_provider_batch").into())
    }

    pub fn purge_before(
        &self,
        cutoff_ms: i64,
        batch: usize,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Purged> {
        Err(unsupported("purge_before").into())
    }

    pub fn wal_checkpoint(&self, mode: CheckpointMode) -> Result<Checkpoint> {
        Err(unsupported("wal_checkpoint").into())
    }
}
