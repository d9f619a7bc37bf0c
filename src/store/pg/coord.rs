//! What only a shared queue needs: the daemons' heartbeats, the planner
//! lock, the published plan, and admission against the shared rate limits.

/// A daemon whose heartbeat is older than this is gone: its running jobs
/// are queued again by the others.
pub const DEAD_AFTER_MS: i64 = 10_000;
