//! What daemons sharing one queue tell each other, behind
//! [`Store`](super::Store) (its methods are in `backend.rs`): who is
//! alive, who plans, the plan the others follow, the sends every daemon's
//! rate limits count, and provider pauses.
//!
//! On SQLite there is one daemon (the state directory's lock sees to it):
//! it is alive, it plans, and there is nobody to tell, so every method
//! here has the trivial answer. On PostgreSQL the answers come from the
//! shared database ([`super::pg::coord`]).

use std::collections::HashMap;

use crate::domain::pricing::Catalog;

/// One daemon's heartbeat.
#[derive(Debug, Clone)]
pub struct Beat {
    /// The lease owner id of this daemon run.
    pub owner: String,
    pub node: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: i64,
    pub now_ms: i64,
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coordination {
    /// This daemon plans the queue (holds the planner lock).
    pub planner: bool,
    /// Daemons whose heartbeat is recent, this one included.
    pub live: usize,
    /// The newest source in the queue: when it changes, another daemon
    /// queued jobs and the planner looks again.
    pub latest_source: i64,
}

/// A daemon sharing the queue, as `nightshift status` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonRow {
    pub owner: String,
    pub node: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub planner: bool,
    /// Its heartbeat is recent (not yet presumed dead).
    pub alive: bool,
}

/// The plan the planning daemon published for the others.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedPlan {
    pub owner: String,
    pub made_at: i64,
    /// [`catalog_fingerprint`] of the planner's catalog: a daemon whose
    /// catalog differs cannot follow model ids it does not have.
    pub catalog: String,
    /// [`crate::dispatch::decide::CurrentPlan`] as JSON.
    pub plan: String,
}

/// A provider paused by some daemon (a 429's `retry-after`, an open circuit).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedPause {
    pub provider: String,
    pub until_ms: i64,
    pub reason: String,
    pub owner: String,
}

/// Where a daemon has read other daemons' sends up to, per provider.
pub type SendCursors = HashMap<String, i64>;

/// Names a catalog's models in order (qualified name and channel), so that
/// two daemons can tell whether their `ModelId`s mean the same models.
pub fn catalog_fingerprint(catalog: &Catalog) -> String {
    use std::hash::{Hash, Hasher};
    // Not a security hash: equal catalogs give equal strings, in one build.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (m, model) in catalog.models.iter().enumerate() {
        catalog.qualified_name(m).hash(&mut h);
        model.channel.as_str().hash(&mut h);
    }
    for p in &catalog.providers {
        p.name.hash(&mut h);
    }
    format!("{:016x}/{}", h.finish(), catalog.models.len())
}
