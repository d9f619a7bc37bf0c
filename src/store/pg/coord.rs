//! What only a shared queue needs: the daemons' heartbeats, the planner
//! lock, the published plan, and admission against the shared rate limits.
//!
//! **Admission.** Every claim of synchronous work ([`super::Postgres::start_attempts`])
//! first takes a transaction-scoped advisory lock per provider it sends to
//! (in name order, so two daemons never wait on each other in a cycle),
//! then counts what every daemon sent to that provider — the `sends` ledger
//! over the last 61 s for rpm and tpm, over the last 24 h for rpd — and
//! what runs there now (concurrency), and admits only the starts that keep
//! each figure within the configured limit (at the same pacing and reserve
//! as the daemon's own limiter). The sends it admits are written in the
//! same transaction, before the lock is released, so the next claim, from
//! whichever daemon, counts them. The limits therefore hold for the sum
//! over every daemon by construction, in every sliding window, however
//! many daemons dispatch; each daemon's own limiter (seeded with the
//! others' sends, [`super::Postgres::sends_of_others`]) only keeps it from
//! asking for what it would be refused. One transaction admits a whole
//! dispatch pass's starts, not one request.
//!
//! **Liveness and the planner.** Each daemon renews its `daemons` row every
//! heartbeat; one older than [`DEAD_AFTER_MS`] is dead, and the others'
//! lease recovery re-queues its running jobs. The planner is whoever holds
//! the session advisory lock [`PLANNER_LOCK`] on a dedicated connection:
//! PostgreSQL releases it when that session ends, so a planner that dies
//! (SIGKILL, host lost, network cut) hands over at the next heartbeat of
//! another daemon. It publishes its plan through that same session, so a
//! planner that lost its lock cannot publish.

use std::collections::HashMap;

use chrono::Utc;
use postgres::NoTls;

use super::{Conn, Postgres};
use crate::domain::pricing::{
    ARRIVAL_MARGIN_MS, Catalog, Channel, DAY_MS, Limits, MINUTE_MS, window_limit,
};
use crate::store::coord::{Beat, Coordination, DaemonRow, SendCursors, SharedPause, SharedPlan};
use crate::store::{Result, SentGroup, Start};

/// A daemon whose heartbeat is older than this is gone: its running jobs
/// are queued again by the others.
pub const DEAD_AFTER_MS: i64 = 10_000;

/// How often a daemon renews its heartbeat (and a follower tries for the
/// planner lock): a dead planner is replaced within this plus the time
/// PostgreSQL takes to notice its session ended (at once for a killed
/// process; the TCP keepalive for a lost host).
pub const HEARTBEAT_MS: i64 = 2_000;

/// Rows of daemons dead this long are removed (until then `status` shows
/// them as dead).
const FORGET_AFTER_MS: i64 = 60 * 60 * 1000;

/// The session advisory lock of the planner ("nightshift-plan").
pub const PLANNER_LOCK: i64 = 0x6e69_6768_7470_6c6e;

/// The first key of the per-provider admission locks (two-key form, the
/// second is `hashtext(provider)`).
const ADMIT_LOCK_CLASS: i32 = 0x6e73_6164;

/// The limits of one provider and of its models (by wire name), as
/// admission counts them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Share {
    pub limits: Limits,
    pub models: HashMap<String, Limits>,
}

/// Per provider name.
pub type Shares = HashMap<String, Share>;

fn windowed(l: &Limits) -> bool {
    l.rpm.is_some() || l.tpm.is_some() || l.rpd.is_some()
}

fn limited(l: &Limits) -> bool {
    l.rpm.is_some() || l.tpm.is_some() || l.rpd.is_some() || l.concurrency.is_some()
}

/// What admission lets through of a per-minute or per-day figure: what a
/// daemon's own window admits (the limit less the reserve, whole requests,
/// at least one).
fn cap(limit: u64, reserve: f64) -> u64 {
    window_limit(limit as f64, reserve)
}

/// What was sent and runs at one provider or model, and its caps.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    minute_requests: u64,
    minute_tokens: u64,
    day_requests: u64,
    running: u64,
}

impl Tally {
    fn fits(&self, l: &Limits, tokens: u64) -> bool {
        l.rpm
            .is_none_or(|r| self.minute_requests < cap(r as u64, l.reserve))
            && l.tpm.is_none_or(|t| {
                // A request larger than the whole allowance still goes
                // alone (as the daemon's limiter lets it).
                self.minute_tokens == 0 || self.minute_tokens + tokens <= cap(t, l.reserve)
            })
            && l.rpd
                .is_none_or(|r| self.day_requests < cap(r as u64, l.reserve))
            && l.concurrency.is_none_or(|c| self.running < c as u64)
    }

    fn take(&mut self, tokens: u64) {
        self.minute_requests += 1;
        self.minute_tokens += tokens;
        self.day_requests += 1;
        self.running += 1;
    }
}

/// Admits, in order, the starts that keep every shared limit; the others
/// are left queued (the caller claims only what this returns). Runs inside
/// the claim's transaction: the provider locks it takes are held until that
/// commits, with the sends it admitted written.
pub(super) fn admit(
    tx: &mut postgres::Transaction<'_>,
    shares: &Shares,
    starts: &[Start],
    now_ms: i64,
) -> Result<Vec<Start>> {
    let mut providers: Vec<&str> = starts
        .iter()
        .map(|s| s.provider.as_str())
        .filter(|p| {
            shares
                .get(*p)
                .is_some_and(|s| limited(&s.limits) || s.models.values().any(limited))
        })
        .collect();
    providers.sort_unstable();
    providers.dedup();
    if providers.is_empty() {
        return Ok(starts.to_vec());
    }
    for p in &providers {
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&ADMIT_LOCK_CLASS, p],
        )?;
    }
    // Counted from when the locks are held: a send admitted by another
    // daemon just before is in the ledger now.
    let stamp = now_ms.max(Utc::now().timestamp_millis());
    let paused: Vec<String> = tx
        .query(
            "SELECT provider FROM provider_pauses WHERE provider = ANY($1) AND until_ms > $2",
            &[&providers, &stamp],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // (provider, model or "") → tally
    let mut tallies: HashMap<(String, String), Tally> = HashMap::new();
    for p in &providers {
        let share = &shares[*p];
        let day = share.limits.rpd.is_some() || share.models.values().any(|l| l.rpd.is_some());
        let since = if !(windowed(&share.limits) || share.models.values().any(windowed)) {
            // Concurrency only: the ledger has nothing to say.
            0
        } else if day {
            DAY_MS + ARRIVAL_MARGIN_MS
        } else {
            MINUTE_MS + ARRIVAL_MARGIN_MS
        };
        let ledger = if since == 0 {
            Vec::new()
        } else {
            tx.query(
                "SELECT model,
                    COUNT(*) FILTER (WHERE at_ms > $2::BIGINT - $4::BIGINT),
                    COALESCE(SUM(tokens) FILTER (WHERE at_ms > $2::BIGINT - $4::BIGINT), 0)::BIGINT,
                    COUNT(*)
               FROM sends WHERE provider = $1 AND at_ms > $2::BIGINT - $3::BIGINT
              GROUP BY model",
                &[p, &stamp, &since, &(MINUTE_MS + ARRIVAL_MARGIN_MS)],
            )?
        };
        for r in ledger {
            let model: String = r.get(0);
            let t = Tally {
                minute_requests: r.get::<_, i64>(1).max(0) as u64,
                minute_tokens: r.get::<_, i64>(2).max(0) as u64,
                day_requests: r.get::<_, i64>(3).max(0) as u64,
                running: 0,
            };
            add(&mut tallies, p, &model, t);
        }
        let concurrency = share.limits.concurrency.is_some()
            || share.models.values().any(|l| l.concurrency.is_some());
        if concurrency {
            for r in tx.query(
                "SELECT provider_model, COUNT(*) FROM jobs
                  WHERE state = 'running' AND provider_batch_id IS NULL AND provider = $1
                  GROUP BY provider_model",
                &[p],
            )? {
                let model: Option<String> = r.get(0);
                let t = Tally {
                    running: r.get::<_, i64>(1).max(0) as u64,
                    ..Tally::default()
                };
                add(&mut tallies, p, model.as_deref().unwrap_or(""), t);
            }
        }
    }
    let mut admitted = Vec::with_capacity(starts.len());
    for s in starts {
        let Some(share) = shares
            .get(&s.provider)
            .filter(|_| providers.contains(&s.provider.as_str()))
        else {
            admitted.push(s.clone());
            continue;
        };
        if paused.contains(&s.provider) {
            continue;
        }
        let pk = (s.provider.clone(), String::new());
        let mk = (s.provider.clone(), s.provider_model.clone());
        let model_limits = share.models.get(&s.provider_model);
        let p_ok = tallies
            .get(&pk)
            .copied()
            .unwrap_or_default()
            .fits(&share.limits, s.tokens);
        let m_ok = model_limits.is_none_or(|l| {
            tallies
                .get(&mk)
                .copied()
                .unwrap_or_default()
                .fits(l, s.tokens)
        });
        if p_ok && m_ok {
            tallies.entry(pk).or_default().take(s.tokens);
            tallies.entry(mk).or_default().take(s.tokens);
            admitted.push(s.clone());
        }
    }
    Ok(admitted)
}

/// Adds a model's row to its provider's tally and to its own.
fn add(tallies: &mut HashMap<(String, String), Tally>, provider: &str, model: &str, t: Tally) {
    let mut keys = vec![(provider.to_string(), String::new())];
    if !model.is_empty() {
        keys.push((provider.to_string(), model.to_string()));
    }
    for key in keys {
        let e = tallies.entry(key).or_default();
        e.minute_requests += t.minute_requests;
        e.minute_tokens += t.minute_tokens;
        e.day_requests += t.day_requests;
        e.running += t.running;
    }
}

impl Postgres {
    /// The limits admission holds, from this daemon's catalog.
    pub fn share_limits(&self, catalog: &Catalog) {
        let mut shares = Shares::new();
        for p in &catalog.providers {
            shares.insert(
                p.name.clone(),
                Share {
                    limits: p.limits,
                    models: HashMap::new(),
                },
            );
        }
        for m in &catalog.models {
            // A flex row shares its standard row's limits; batches are not
            // admitted here (they never count against rpm/tpm).
            if m.channel != Channel::Sync {
                continue;
            }
            if let Some(l) = m.limits
                && let Some(s) = shares.get_mut(&catalog.providers[m.provider].name)
            {
                s.models.insert(m.name.clone(), l);
            }
        }
        *self.shares.write().unwrap_or_else(|e| e.into_inner()) = shares;
    }

    /// The limits admission holds now.
    pub(super) fn shares(&self) -> Shares {
        self.shares
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Renews this daemon's row, keeps or tries for the planner lock, and
    /// reads how many daemons are alive.
    pub fn heartbeat(&self, beat: &Beat) -> Result<Coordination> {
        let planner = self.hold_planner_lock();
        self.run(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO daemons (owner, node, host, pid, version, started_at, heartbeat_at, planner)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (owner) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at,
                                                   planner = EXCLUDED.planner",
                &[
                    &beat.owner,
                    &beat.node,
                    &beat.host,
                    &(beat.pid as i64),
                    &beat.version,
                    &beat.started_at,
                    &beat.now_ms,
                    &planner,
                ],
            )?;
            if planner {
                tx.execute(
                    "UPDATE daemons SET planner = false WHERE owner <> $1 AND planner",
                    &[&beat.owner],
                )?;
            }
            tx.execute(
                "DELETE FROM daemons WHERE heartbeat_at < $1",
                &[&(beat.now_ms - FORGET_AFTER_MS)],
            )?;
            let live: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM daemons WHERE heartbeat_at >= $1",
                    &[&(beat.now_ms - DEAD_AFTER_MS)],
                )?
                .get(0);
            let latest: Option<i64> = tx.query_one("SELECT MAX(id) FROM sources", &[])?.get(0);
            tx.commit()?;
            Ok(Coordination {
                planner,
                live: (live.max(1)) as usize,
                latest_source: latest.unwrap_or(0),
            })
        })
    }

    /// Whether this daemon holds the planner lock after this call: an
    /// existing session is checked (a session the server dropped lost the
    /// lock with it), otherwise a new one tries for the lock.
    fn hold_planner_lock(&self) -> bool {
        let mut held = self.planner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = held.as_mut() {
            if c.simple_query("SELECT 1").is_ok() {
                return true;
            }
            tracing::warn!("the planner's database session was lost; no longer planning");
            *held = None;
        }
        let Ok(mut c) = self.target.config().connect(NoTls) else {
            return false;
        };
        match c.query_one("SELECT pg_try_advisory_lock($1)", &[&PLANNER_LOCK]) {
            Ok(r) if r.get::<_, bool>(0) => {
                *held = Some(c);
                true
            }
            _ => false,
        }
    }

    /// Leaves the live daemons and gives up the planner lock.
    pub fn leave(&self, owner: &str) -> Result<()> {
        // Closing the session releases the lock.
        self.planner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.run(|c| {
            c.execute("DELETE FROM daemons WHERE owner = $1", &[&owner])?;
            Ok(())
        })
    }

    /// The daemons sharing the queue, newest first.
    pub fn daemons(&self, now_ms: i64) -> Result<Vec<DaemonRow>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT owner, node, host, pid, version, started_at, heartbeat_at, planner
                   FROM daemons ORDER BY started_at DESC, owner",
                &[],
            )?
            .iter()
            .map(|r| {
                let heartbeat_at: i64 = r.get(6);
                DaemonRow {
                    owner: r.get(0),
                    node: r.get(1),
                    host: r.get(2),
                    pid: r.get(3),
                    version: r.get(4),
                    started_at: r.get(5),
                    heartbeat_at,
                    planner: r.get(7),
                    alive: heartbeat_at >= now_ms - DEAD_AFTER_MS,
                }
            })
            .collect())
        })
    }

    /// Publishes the plan through the planner lock's own session: a daemon
    /// that lost the lock (its session is gone) cannot publish.
    pub fn publish_plan(&self, plan: &SharedPlan) -> Result<()> {
        let mut held = self.planner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = held.as_mut() else {
            return Err(crate::store::QueueError::Unsupported(
                "publishing a plan without the planner lock",
            ));
        };
        let published = c.execute(
            "INSERT INTO published_plan (id, owner, made_at, catalog, plan) VALUES (1, $1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, made_at = EXCLUDED.made_at,
                                            catalog = EXCLUDED.catalog, plan = EXCLUDED.plan",
            &[&plan.owner, &plan.made_at, &plan.catalog, &plan.plan],
        );
        if let Err(e) = published {
            *held = None;
            return Err(e.into());
        }
        Ok(())
    }

    /// The plan published last.
    pub fn published_plan(&self) -> Result<Option<SharedPlan>> {
        self.run(|c| {
            Ok(c.query_opt(
                "SELECT owner, made_at, catalog, plan FROM published_plan WHERE id = 1",
                &[],
            )?
            .map(|r| SharedPlan {
                owner: r.get(0),
                made_at: r.get(1),
                catalog: r.get(2),
                plan: r.get(3),
            }))
        })
    }

    /// Other daemons' sends after each provider's cursor, one row each,
    /// in commit order (sends to a provider are written holding its
    /// admission lock, so their ids are in commit order per provider).
    pub fn sends_of_others(
        &self,
        owner: &str,
        cursors: &mut SendCursors,
    ) -> Result<Vec<SentGroup>> {
        let providers: Vec<String> = {
            let shares = self.shares.read().unwrap_or_else(|e| e.into_inner());
            shares
                .iter()
                // Only windows count sends (concurrency counts running jobs).
                .filter(|(_, s)| windowed(&s.limits) || s.models.values().any(windowed))
                .map(|(p, _)| p.clone())
                .collect()
        };
        self.run(|c| {
            let mut out = Vec::new();
            for p in providers {
                match cursors.get(&p).copied() {
                    None => {
                        let newest: Option<i64> = c
                            .query_one("SELECT MAX(id) FROM sends WHERE provider = $1", &[&p])?
                            .get(0);
                        cursors.insert(p, newest.unwrap_or(0));
                    }
                    Some(after) => {
                        let rows = c.query(
                            "SELECT id, model, at_ms, tokens FROM sends
                              WHERE provider = $1 AND id > $2 ORDER BY id LIMIT 100000",
                            &[&p, &after],
                        )?;
                        let mut last = after;
                        for r in &rows {
                            last = r.get(0);
                        }
                        let own = own_sends(c, &p, after, last, owner)?;
                        for r in rows {
                            let id: i64 = r.get(0);
                            if own.contains(&id) {
                                continue;
                            }
                            out.push(SentGroup {
                                provider: p.clone(),
                                model: r.get(1),
                                at_ms: r.get(2),
                                requests: 1,
                                tokens: r.get::<_, i64>(3).max(0) as u64,
                            });
                        }
                        cursors.insert(p, last);
                    }
                }
            }
            out.sort_by_key(|g| g.at_ms);
            Ok(out)
        })
    }

    /// Makes this node the owner of every open provider batch whose owner
    /// node has no live daemon, and returns their ids. One statement: two
    /// daemons adopting at once split the batches, never share one.
    pub fn adopt_orphaned_batches(&self, now_ms: i64) -> Result<Vec<i64>> {
        self.run(|c| {
            Ok(c.query(
                "UPDATE provider_batches b SET owner = $1
                  WHERE b.state <> 'done' AND b.owner <> $1
                    AND NOT EXISTS (SELECT 1 FROM daemons d
                                     WHERE d.node = b.owner AND d.heartbeat_at >= $2)
                 RETURNING b.id",
                &[&self.node(), &(now_ms - DEAD_AFTER_MS)],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    /// Pauses a provider for every daemon (the later of two pauses wins).
    pub fn share_pause(&self, pause: &SharedPause) -> Result<()> {
        self.run(|c| {
            c.execute(
                "INSERT INTO provider_pauses (provider, until_ms, reason, owner) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (provider) DO UPDATE SET until_ms = EXCLUDED.until_ms,
                        reason = EXCLUDED.reason, owner = EXCLUDED.owner
                  WHERE provider_pauses.until_ms < EXCLUDED.until_ms",
                &[&pause.provider, &pause.until_ms, &pause.reason, &pause.owner],
            )?;
            Ok(())
        })
    }

    /// Pauses in force at `now_ms`.
    pub fn shared_pauses(&self, now_ms: i64) -> Result<Vec<SharedPause>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT provider, until_ms, reason, owner FROM provider_pauses WHERE until_ms > $1",
                &[&now_ms],
            )?
            .iter()
            .map(|r| SharedPause {
                provider: r.get(0),
                until_ms: r.get(1),
                reason: r.get(2),
                owner: r.get(3),
            })
            .collect())
        })
    }
}

/// The ids among `(after, last]` that `owner` sent itself.
fn own_sends(c: &mut Conn, provider: &str, after: i64, last: i64, owner: &str) -> Result<Vec<i64>> {
    if last <= after {
        return Ok(Vec::new());
    }
    Ok(c.query(
        "SELECT id FROM sends WHERE provider = $1 AND id > $2 AND id <= $3 AND owner = $4",
        &[&provider, &after, &last, &owner],
    )?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

#[cfg(test)]
mod tests {
    use super::super::queue::tests::{T0, ingest, open, plain, starts};
    use super::*;
    use crate::config::Config;
    use crate::store::pg::testing;
    use crate::store::{JobState, Store};

    /// The embedded default's catalog with `deepseek` limited as given.
    fn catalog(limits: Limits) -> Catalog {
        let mut c = Config::embedded_default().catalog;
        let p = c.provider_id("deepseek").unwrap();
        c.providers[p].limits = limits;
        c
    }

    fn beat(owner: &str, now_ms: i64) -> Beat {
        Beat {
            owner: owner.into(),
            node: owner.into(),
            host: "h".into(),
            pid: 1,
            version: "test".into(),
            started_at: T0,
            now_ms,
        }
    }

    /// Three daemons, each asking for the whole allowance at once: together
    /// they start exactly what the one key allows in a minute.
    #[test]
    fn admission_holds_rpm_summed_over_every_daemon() {
        let url = testing::fresh_database();
        let stores: Vec<Store> = ["a", "b", "c"].iter().map(|n| open(&url, n)).collect();
        ingest(&stores[0], &plain(90), "t", "sha");
        let limits = Limits {
            rpm: Some(30),
            ..Limits::default()
        };
        for s in &stores {
            s.share_limits(&catalog(limits));
        }
        let ids: Vec<i64> = (1..=90).collect();
        let barrier = std::sync::Barrier::new(3);
        let started: Vec<usize> = std::thread::scope(|scope| {
            let handles: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let (ids, barrier) = (&ids, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        let mine = &ids[i * 30..(i + 1) * 30];
                        let mut n = 0;
                        for chunk in mine.chunks(7) {
                            n += s
                                .start_attempts(&starts(chunk), T0, T0 + 60_000, &format!("o{i}"))
                                .unwrap()
                                .len();
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // 30 rpm: 30 in any 61 s (the window and its arrival margin),
        // summed over the daemons.
        assert_eq!(started.iter().sum::<usize>(), 30, "{started:?}");
        let counts = stores[0].counts().unwrap();
        assert_eq!(counts[&JobState::Running], 30);
        assert_eq!(counts[&JobState::Queued], 60);
        // A minute and a margin later the window has room again.
        ingest(&stores[1], &plain(40), "u", "sha2");
        let fresh: Vec<i64> = (91..=130).collect();
        let later = T0 + MINUTE_MS + ARRIVAL_MARGIN_MS + 1;
        let again = stores[1]
            .start_attempts(&starts(&fresh), later, later + 60_000, "o1")
            .unwrap();
        assert_eq!(again.len(), 30);
    }

    /// Concurrency counts every daemon's running jobs; a job that ends
    /// frees its slot for any of them.
    #[test]
    fn admission_holds_concurrency_across_daemons() {
        let url = testing::fresh_database();
        let (a, b) = (open(&url, "a"), open(&url, "b"));
        ingest(&a, &plain(10), "t", "sha");
        let limits = Limits {
            concurrency: Some(3),
            ..Limits::default()
        };
        a.share_limits(&catalog(limits));
        b.share_limits(&catalog(limits));
        assert_eq!(
            a.start_attempts(&starts(&[1, 2]), T0, T0 + 1, "oa")
                .unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            b.start_attempts(&starts(&[3, 4, 5]), T0, T0 + 1, "ob")
                .unwrap(),
            vec![3]
        );
        assert!(
            a.start_attempts(&starts(&[4]), T0, T0 + 1, "oa")
                .unwrap()
                .is_empty()
        );
        assert!(a.requeue_running(1, "oa").unwrap());
        assert_eq!(
            b.start_attempts(&starts(&[4, 5]), T0, T0 + 1, "ob")
                .unwrap(),
            vec![4]
        );
    }

    /// rpd counts a rolling day of every daemon's sends.
    #[test]
    fn admission_holds_rpd_over_a_rolling_day() {
        let url = testing::fresh_database();
        let (a, b) = (open(&url, "a"), open(&url, "b"));
        ingest(&a, &plain(20), "t", "sha");
        let limits = Limits {
            rpd: Some(6),
            ..Limits::default()
        };
        a.share_limits(&catalog(limits));
        b.share_limits(&catalog(limits));
        // 6 per rolling day, over both daemons.
        assert_eq!(
            a.start_attempts(&starts(&[1, 2, 3]), T0, T0 + 1, "oa")
                .unwrap()
                .len(),
            3
        );
        let hours_later = T0 + 12 * 3_600_000;
        let got = b
            .start_attempts(&starts(&[4, 5, 6, 7]), hours_later, hours_later + 1, "ob")
            .unwrap();
        assert_eq!(got, vec![4, 5, 6]);
        let next_day = T0 + DAY_MS + ARRIVAL_MARGIN_MS + 1;
        let got = b
            .start_attempts(&starts(&[8, 9, 10, 11]), next_day, next_day + 1, "ob")
            .unwrap();
        assert_eq!(got, vec![8, 9, 10], "the first three aged out of the day");
    }

    /// A pause one daemon shares stops every daemon's admission until it ends.
    #[test]
    fn a_shared_pause_stops_every_daemon_until_it_ends() {
        let url = testing::fresh_database();
        let (a, b) = (open(&url, "a"), open(&url, "b"));
        ingest(&a, &plain(4), "t", "sha");
        let limits = Limits {
            rpm: Some(1000),
            ..Limits::default()
        };
        a.share_limits(&catalog(limits));
        b.share_limits(&catalog(limits));
        let pause = SharedPause {
            provider: "deepseek".into(),
            until_ms: T0 + 5_000,
            reason: "429 retry-after 5s".into(),
            owner: "oa".into(),
        };
        a.share_pause(&pause).unwrap();
        // An earlier pause does not shorten it.
        a.share_pause(&SharedPause {
            until_ms: T0 + 1_000,
            ..pause.clone()
        })
        .unwrap();
        assert_eq!(b.shared_pauses(T0).unwrap(), vec![pause]);
        assert!(
            b.start_attempts(&starts(&[1]), T0, T0 + 1, "ob")
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            b.start_attempts(&starts(&[1]), T0 + 5_000, T0 + 6_000, "ob")
                .unwrap(),
            vec![1]
        );
        assert!(b.shared_pauses(T0 + 5_000).unwrap().is_empty());
    }

    /// One planner at a time; when it leaves (or its session ends), the
    /// next heartbeat of another daemon takes over; only the planner may
    /// publish.
    #[test]
    fn one_daemon_plans_and_another_takes_over_when_it_leaves() {
        let url = testing::fresh_database();
        let (a, b) = (open(&url, "a"), open(&url, "b"));
        let ca = a.heartbeat(&beat("oa", T0)).unwrap();
        let cb = b.heartbeat(&beat("ob", T0)).unwrap();
        assert!(ca.planner && !cb.planner);
        assert_eq!(cb.live, 2);
        let plan = SharedPlan {
            owner: "oa".into(),
            made_at: T0,
            catalog: "c".into(),
            plan: "{}".into(),
        };
        a.publish_plan(&plan).unwrap();
        assert!(b.publish_plan(&plan).is_err(), "a follower cannot publish");
        assert_eq!(b.published_plan().unwrap(), Some(plan));
        let listed = b.daemons(T0).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(
            listed
                .iter()
                .any(|d| d.owner == "oa" && d.planner && d.alive)
        );
        // Still the planner on its next beat.
        assert!(a.heartbeat(&beat("oa", T0 + 2_000)).unwrap().planner);
        assert!(!b.heartbeat(&beat("ob", T0 + 2_000)).unwrap().planner);
        a.leave("oa").unwrap();
        let cb = b.heartbeat(&beat("ob", T0 + 4_000)).unwrap();
        assert!(cb.planner, "the follower took over");
        assert_eq!(cb.live, 1);
        // A daemon whose heartbeat stopped is listed dead.
        let c = open(&url, "c");
        c.heartbeat(&beat("oc", T0 + 4_000)).unwrap();
        let listed = b.daemons(T0 + 4_000 + DEAD_AFTER_MS + 1).unwrap();
        assert!(listed.iter().any(|d| d.owner == "oc" && !d.alive));
    }

    /// A daemon reads the others' sends, not its own, each once.
    #[test]
    fn a_daemon_reads_the_other_daemons_sends_once() {
        let url = testing::fresh_database();
        let (a, b) = (open(&url, "a"), open(&url, "b"));
        ingest(&a, &plain(6), "t", "sha");
        let limits = Limits {
            rpm: Some(1000),
            ..Limits::default()
        };
        a.share_limits(&catalog(limits));
        b.share_limits(&catalog(limits));
        let mut cursors = SendCursors::new();
        a.start_attempts(&starts(&[1]), T0, T0 + 1, "oa").unwrap();
        assert!(
            b.sends_of_others("ob", &mut cursors).unwrap().is_empty(),
            "placed"
        );
        a.start_attempts(&starts(&[2, 3]), T0, T0 + 1, "oa")
            .unwrap();
        b.start_attempts(&starts(&[4]), T0, T0 + 1, "ob").unwrap();
        let seen = b.sends_of_others("ob", &mut cursors).unwrap();
        assert_eq!(seen.iter().map(|g| g.requests).sum::<u64>(), 2);
        assert!(
            seen.iter()
                .all(|g| g.provider == "deepseek" && g.tokens == 7)
        );
        assert!(b.sends_of_others("ob", &mut cursors).unwrap().is_empty());
    }
}
