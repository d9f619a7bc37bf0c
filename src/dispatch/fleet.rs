//! The dispatcher as one of several daemons on a shared queue
//! (PostgreSQL). On SQLite none of this runs: the store has nobody to
//! share with.
//!
//! - **Plan.** The daemon holding the planner lock plans the whole queue
//!   and publishes the plan ([`Dispatcher::publish`]); the others follow it
//!   ([`Dispatcher::follow`]) instead of planning, re-reading it when it is
//!   republished. Every daemon, planner included, takes `1 / live` of each
//!   quota (rounded up), so together they start what the plan asks. A
//!   daemon whose catalog differs from the planner's (other models) cannot
//!   follow its model ids and plans for itself, with a warning.
//! - **Limits.** Admission in the store keeps the sum over every daemon
//!   within each limit; this daemon's limiter also counts the others' sends
//!   ([`Dispatcher::sync_fleet`]), so it does not ask for what it would be
//!   refused.
//! - **Pauses.** A provider this daemon sees paused (a 429's `retry-after`,
//!   an open circuit) is paused for all; the others' pauses pause it here.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tracing::{info, warn};

use super::decide::CurrentPlan;
use super::reliability::PauseCause;
use super::{Current, Dispatcher, Loop, blocking};
use crate::store::coord::{SendCursors, SharedPause, SharedPlan, catalog_fingerprint};

/// How often the others' sends and pauses are read.
const SYNC_EVERY: Duration = Duration::from_millis(250);

/// How often a follower looks for a newer published plan.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// A published plan older than this is the plan of a planner that stopped
/// publishing: a follower plans for itself rather than follow it.
const PLAN_STALE_MS: i64 = 3 * 60_000;

/// What the loop keeps of the fleet between passes.
#[derive(Default)]
pub(super) struct Fleet {
    cursors: SendCursors,
    next_sync: Option<Instant>,
    next_follow: Option<Instant>,
    /// `made_at` of the published plan followed now.
    followed: Option<i64>,
    /// The pause this daemon last shared, per provider (Unix ms).
    shared_until: HashMap<String, i64>,
    /// Whether the last failed follow was already logged.
    warned: bool,
}

impl Fleet {
    /// Planning for itself now (the planner, or no plan to follow).
    pub(super) fn stop_following(&mut self) {
        self.followed = None;
    }
}

impl Loop {
    /// Whether the plan in force is the planner's published one.
    pub(super) fn fleet_following(&self) -> bool {
        self.fleet.followed.is_some()
    }
}

impl Dispatcher {
    fn is_shared(&self) -> bool {
        self.shared.store.is_shared()
    }

    /// On a shared queue: places the send cursors at the newest sends (what
    /// came before is in the seeded history) and tells the store the
    /// limits to admit against.
    pub(super) async fn join_fleet(&self, st: &mut Loop) {
        if !self.is_shared() {
            return;
        }
        self.shared.store.share_limits(&self.catalog);
        let owner = self.owner.clone();
        match blocking(&self.shared.store, move |s| {
            let mut cursors = SendCursors::new();
            s.sends_of_others(&owner, &mut cursors).map(|_| cursors)
        })
        .await
        {
            Ok(c) => st.fleet.cursors = c,
            Err(e) => warn!("could not read the other daemons' sends: {e}"),
        }
    }

    /// Every [`SYNC_EVERY`]: counts the other daemons' sends in this
    /// daemon's limiter, shares this daemon's pauses, and takes the
    /// others'. Returns true if a provider's availability changed here.
    pub(super) async fn sync_fleet(&self, st: &mut Loop, now: DateTime<Utc>) -> bool {
        if !self.is_shared() || st.fleet.next_sync.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        st.fleet.next_sync = Some(Instant::now() + SYNC_EVERY);
        let now_ms = now.timestamp_millis();
        // Pauses this daemon sees that it has not shared yet.
        let mut mine = Vec::new();
        for (p, h) in st.observed.health.iter().enumerate() {
            let name = &self.catalog.providers[p].name;
            let Some(until) = h.available_from(now).filter(|t| *t > now) else {
                continue;
            };
            let until_ms = until.timestamp_millis();
            if st
                .fleet
                .shared_until
                .get(name)
                .is_some_and(|&u| u >= until_ms)
            {
                continue;
            }
            st.fleet.shared_until.insert(name.clone(), until_ms);
            mine.push(SharedPause {
                provider: name.clone(),
                until_ms,
                reason: h.describe(now),
                owner: self.owner.clone(),
            });
        }
        let owner = self.owner.clone();
        let mut cursors = std::mem::take(&mut st.fleet.cursors);
        let read = blocking(&self.shared.store, move |s| {
            for p in &mine {
                s.share_pause(p)?;
            }
            let sends = s.sends_of_others(&owner, &mut cursors)?;
            let pauses = s.shared_pauses(now_ms)?;
            Ok::<_, crate::store::QueueError>((cursors, sends, pauses))
        })
        .await;
        let (cursors, sends, pauses) = match read {
            Ok(r) => r,
            Err(e) => {
                warn!("could not read the other daemons' sends and pauses: {e}");
                return false;
            }
        };
        st.fleet.cursors = cursors;
        for g in &sends {
            let Some(p) = self.catalog.provider_id(&g.provider) else {
                continue;
            };
            let model = (0..self.catalog.models.len()).find(|&m| {
                let model = &self.catalog.models[m];
                model.provider == p && model.name == g.model
            });
            let sent = super::limits::Sent {
                at_ms: g.at_ms,
                requests: g.requests,
                tokens: g.tokens,
            };
            st.limits.seed(p, model, sent, now_ms);
        }
        let mut changed = false;
        for pause in pauses.iter().filter(|p| p.owner != self.owner) {
            let Some(p) = self.catalog.provider_id(&pause.provider) else {
                continue;
            };
            let Some(until) = DateTime::<Utc>::from_timestamp_millis(pause.until_ms) else {
                continue;
            };
            let h = &mut st.observed.health[p];
            if h.paused_until.is_none_or(|t| t < until) {
                h.paused_until = Some(until);
                h.pause_cause = Some(PauseCause::RetryAfter);
                warn!(provider = %pause.provider, until = %until.to_rfc3339(),
                      reason = %crate::domain::units::escaped(&pause.reason),
                      "another daemon paused this provider");
                changed = true;
            }
        }
        if changed {
            for p in 0..self.catalog.providers.len() {
                self.publish_health(p, &st.observed);
            }
        }
        changed
    }

    /// For a follower: whether the planner published a plan newer than the
    /// one followed (checked every [`FOLLOW_EVERY`]).
    pub(super) async fn published_newer(&self, st: &mut Loop) -> bool {
        if st.fleet.next_follow.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        st.fleet.next_follow = Some(Instant::now() + FOLLOW_EVERY);
        match blocking(&self.shared.store, |s| s.published_plan()).await {
            Ok(Some(p)) => st.fleet.followed != Some(p.made_at),
            Ok(None) => false,
            Err(e) => {
                warn!("could not read the published plan: {e}");
                false
            }
        }
    }

    /// The planner's published plan, with this daemon's share of its
    /// quotas; `None` if there is none this daemon can follow.
    pub(super) async fn follow(&self, st: &mut Loop, live: usize) -> Option<Current> {
        let published = match blocking(&self.shared.store, |s| s.published_plan()).await {
            Ok(p) => p,
            Err(e) => {
                warn!("could not read the published plan: {e}");
                None
            }
        };
        let now_ms = Utc::now().timestamp_millis();
        let why_not = match &published {
            None => Some("none is published yet".to_string()),
            Some(p) if p.catalog != catalog_fingerprint(&self.catalog) => Some(format!(
                "the planning daemon ({}) has another catalog: configure every daemon alike",
                p.owner
            )),
            Some(p) if now_ms - p.made_at > PLAN_STALE_MS => {
                Some(format!("it is {} s old", (now_ms - p.made_at) / 1000))
            }
            Some(_) => None,
        };
        if let Some(why) = why_not {
            if !st.fleet.warned {
                info!("not following the published plan ({why}): planning for this daemon");
                st.fleet.warned = true;
            }
            return None;
        }
        let published = published?;
        let mut plan: CurrentPlan = match serde_json::from_str(&published.plan) {
            Ok(p) => p,
            Err(e) => {
                warn!("the published plan does not parse ({e}): planning for this daemon");
                return None;
            }
        };
        // Model ids index this catalog (the fingerprints agree); a group
        // naming one out of range is refused rather than followed.
        let n = self.catalog.models.len();
        if plan
            .quotas
            .entries
            .iter()
            .any(|e| e.1 >= n || e.0 >= plan.groups.len())
            || plan.groups.iter().any(|g| g.reference >= n)
        {
            warn!(
                "the published plan names models this daemon does not have: planning for this daemon"
            );
            return None;
        }
        share_quotas(&mut plan, live);
        st.fleet.followed = Some(published.made_at);
        st.fleet.warned = false;
        Some(Current {
            plan,
            made: Instant::now(),
            took: Duration::ZERO,
            reconsider_at: None,
        })
    }

    /// The planner publishes what it planned (before taking its own share).
    pub(super) async fn publish(&self, cur: &Current) {
        let plan = match serde_json::to_string(&cur.plan) {
            Ok(p) => p,
            Err(e) => {
                warn!("could not serialize the plan to publish: {e}");
                return;
            }
        };
        let shared = SharedPlan {
            owner: self.owner.clone(),
            made_at: Utc::now().timestamp_millis(),
            catalog: catalog_fingerprint(&self.catalog),
            plan,
        };
        if let Err(e) = blocking(&self.shared.store, move |s| s.publish_plan(&shared)).await {
            warn!("could not publish the plan (the other daemons keep the last one): {e}");
        }
    }
}

/// This daemon's share of each quota when `live` daemons follow one plan.
pub(super) fn share_quotas(plan: &mut CurrentPlan, live: usize) {
    let live = live.max(1) as u64;
    for e in &mut plan.quotas.entries {
        e.2 = e.2.div_ceil(live);
    }
}
