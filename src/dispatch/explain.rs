//! Why a job is where it is, in one sentence: the pure function behind the
//! `explanation` of `GET /v1/jobs/{id}`.
//!
//! It reads what the job's row says (state, deadline, retry time, attempts,
//! the last error, where it ran and what it cost), its group's part of the
//! plan ([`placement`]), the catalog's prices, and the dispatcher's live
//! view of the providers ([`super::live`]: pauses, the circuit, the use of
//! each limit, budgets), and says which of them holds the job back — with
//! exact figures and UTC times. Nothing here reads the clock: `now` is an
//! argument.
//!
//! A queued job is explained in this order: a deadline that has passed, a
//! route no model serves, the planned provider being paused (circuit,
//! `Retry-After`, disabled, budget), its own retry backoff, a planned start
//! later (a cheaper price window, or capacity taken by other jobs), a full
//! rate limit, a plan that cannot fit its group before the deadline, and
//! else: it starts now.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::dispatch::live::{LiveView, Pause, PauseReason, ProviderLive};
use crate::domain::pricing::{Catalog, ModelId, Price};
use crate::plan::{ProviderCapacity, QueuePlan};
use crate::store::{JobDetail, JobState};

/// A code for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// `price_window`, `capacity`, `due_now`, `not_before`, `at_risk`,
    /// `provider_paused`, `circuit_open`, `provider_disabled`, `budget`,
    /// `rate_limit_full`, `not_planned`, `unroutable`, `running`,
    /// `succeeded`, `failed`, `expired` or `cancelled`.
    pub code: &'static str,
    pub text: String,
}

fn said(code: &'static str, text: String) -> Explanation {
    Explanation { code, text }
}

/// What the store knows of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFacts {
    pub state: JobState,
    pub deadline: DateTime<Utc>,
    /// A retry's earliest time (its backoff), if one is set.
    pub not_before: Option<DateTime<Utc>>,
    pub attempts: u32,
    pub provider: Option<String>,
    pub provider_model: Option<String>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The last answer's HTTP status.
    pub status_code: Option<u16>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The message of the last answer's error body (`error.message`).
    pub answer_message: Option<String>,
    pub cost_usd: Option<f64>,
    pub list_cost_usd: Option<f64>,
    pub est_input_tokens: u64,
    pub est_output_tokens: u64,
}

fn ms(t: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(t).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The longest provider message an explanation quotes (characters).
const QUOTE_MAX: usize = 200;

fn quoted(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(QUOTE_MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl JobFacts {
    /// The facts of a job as the store returns it.
    pub fn from_detail(d: &JobDetail) -> JobFacts {
        let j = &d.job;
        let answer_message = j
            .response
            .as_deref()
            .filter(|_| j.state != JobState::Succeeded)
            .and_then(|r| serde_json::from_str::<Value>(r).ok())
            .and_then(|v| v["error"]["message"].as_str().map(quoted));
        JobFacts {
            state: j.state,
            deadline: ms(d.deadline),
            not_before: (d.not_before > 0).then(|| ms(d.not_before)),
            attempts: j.attempts,
            provider: j.provider.clone(),
            provider_model: j.provider_model.clone(),
            dispatched_at: j.dispatched_at.map(ms),
            completed_at: j.completed_at.map(ms),
            status_code: j.status_code,
            error_code: j.error_code.clone(),
            error_message: j.error_message.as_deref().map(quoted),
            answer_message,
            cost_usd: j.cost_usd,
            list_cost_usd: j.list_cost_usd,
            est_input_tokens: d.est_input_tokens,
            est_output_tokens: d.est_output_tokens,
        }
    }
}

/// Where the plan has a queued job.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// In a planned group.
    Planned(PlanPart),
    /// No configured model can serve its route (why).
    Unroutable(String),
    /// Not in the plan (it arrived after it was made).
    NotPlanned,
}

/// A job's group's part of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanPart {
    pub group_jobs: u64,
    pub group_deadline: DateTime<Utc>,
    /// The models the group may run on.
    pub candidates: Vec<ModelId>,
    /// Its earliest allocation (the most jobs, if several share the slot).
    pub earliest: Option<Slotted>,
    /// Its jobs that fit no slot before their deadline...
    pub overflow: f64,
    /// ... and the model they are sent to now (the fastest).
    pub overflow_model: Option<ModelId>,
}

/// Jobs planned on one model in one slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slotted {
    pub model: ModelId,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub jobs: f64,
}

/// The part of plan `q` (made with `catalog` and `capacities`) of a job of
/// route `route_key` and size bin `size_bin` due at `deadline_ms`.
pub fn placement(
    q: &QueuePlan,
    catalog: &Catalog,
    capacities: &[ProviderCapacity],
    route_key: &str,
    size_bin: i64,
    deadline_ms: i64,
) -> Placement {
    let Some(gi) = q.groups.iter().position(|g| {
        g.route_key == route_key
            && g.size_bin == size_bin
            && g.deadline_from <= deadline_ms
            && deadline_ms < g.deadline_to
    }) else {
        return match q.unroutable.iter().find(|(k, _)| k == route_key) {
            Some((_, why)) => Placement::Unroutable(why.clone()),
            None => Placement::NotPlanned,
        };
    };
    let g = &q.groups[gi];
    let earliest = q
        .plan
        .allocations
        .iter()
        .filter(|a| a.group == gi && a.jobs > 1e-9)
        .filter_map(|a| {
            let slot = q.plan.slots.get(a.slot)?;
            Some(Slotted {
                model: a.model,
                start: slot.start,
                end: slot.end,
                jobs: a.jobs,
            })
        })
        .min_by(|a, b| a.start.cmp(&b.start).then(b.jobs.total_cmp(&a.jobs)));
    let overflow: f64 = q
        .plan
        .overflow
        .iter()
        .filter(|o| o.0 == gi)
        .map(|o| o.1)
        .sum();
    let overflow_model = (overflow > 1e-9 && !g.group.candidates.is_empty())
        .then(|| crate::plan::fastest_model(catalog, capacities, &g.group.candidates));
    Placement::Planned(PlanPart {
        group_jobs: g.group.jobs,
        group_deadline: g.group.deadline,
        candidates: g.group.candidates.clone(),
        earliest,
        overflow,
        overflow_model,
    })
}

/// What the explanation reads besides the job.
pub struct Context<'a> {
    /// The catalog the plan was made with.
    pub catalog: &'a Catalog,
    /// Where the plan has the job (read for queued jobs only).
    pub placement: &'a Placement,
    /// The dispatcher's live view, once it has published one.
    pub live: Option<&'a LiveView>,
    pub now: DateTime<Utc>,
}

/// Why `job` is where it is at `cx.now`. See the module documentation.
pub fn explain(job: &JobFacts, cx: &Context<'_>) -> Explanation {
    let now = cx.now;
    let ran_on = || match (&job.provider, &job.provider_model) {
        (Some(p), Some(m)) => format!("{p}/{m}"),
        (Some(p), None) => p.clone(),
        _ => "no provider".to_string(),
    };
    match job.state {
        JobState::Queued => queued(job, cx),
        JobState::Running => {
            let at = job
                .dispatched_at
                .map_or(String::new(), |t| format!(" at {}", clock(t, now)));
            let before = last_error(job).map_or(String::new(), |e| {
                format!(" (attempt {} got {e})", job.attempts.saturating_sub(1))
            });
            said(
                "running",
                format!(
                    "running: sent to {}{at}, attempt {}{before}",
                    ran_on(),
                    job.attempts
                ),
            )
        }
        JobState::Succeeded => {
            let mut text = format!("succeeded on {}", ran_on());
            if let Some(cost) = job.cost_usd {
                text.push_str(&format!(" for {}", dollars(cost)));
                if let Some(list) = job.list_cost_usd {
                    text.push_str(&format!(", list {}", dollars(list)));
                    if list > cost && list > 0.0 {
                        let saved = (list - cost) / list * 100.0;
                        text.push_str(&format!(" ({saved:.1}% saved)"));
                    }
                }
            }
            if job.attempts > 1 {
                text.push_str(&format!(", after {} attempts", job.attempts));
            }
            said("succeeded", text)
        }
        JobState::Failed => {
            let message = job
                .answer_message
                .as_deref()
                .or(job.error_message.as_deref())
                .unwrap_or("no message recorded");
            match (job.error_code.as_deref(), job.status_code) {
                (Some("not_routable"), _) => said("unroutable", format!("failed: {message}")),
                (_, Some(status)) => said(
                    "failed",
                    format!(
                        "failed: HTTP {status} from {} after {}: {message}",
                        ran_on(),
                        attempts(job.attempts)
                    ),
                ),
                (code, None) => said(
                    "failed",
                    format!("failed ({}): {message}", code.unwrap_or("error")),
                ),
            }
        }
        JobState::Expired => {
            let mut text = format!(
                "expired: no capacity before its deadline {}",
                clock(job.deadline, now)
            );
            if job.attempts > 0 {
                let last = job
                    .status_code
                    .map_or(String::new(), |s| format!("; the last got HTTP {s}"));
                text.push_str(&format!(" (after {}{last})", attempts(job.attempts)));
            }
            if let Some(m) = job
                .error_message
                .as_deref()
                .filter(|m| *m != EXPIRED_MESSAGE)
            {
                text.push_str(&format!(": {m}"));
            }
            said("expired", text)
        }
        JobState::Cancelled => {
            let at = job
                .completed_at
                .map_or(String::new(), |t| format!(" at {}", clock(t, now)));
            let why = job
                .error_message
                .as_deref()
                .unwrap_or("cancelled by request");
            said("cancelled", format!("cancelled{at}: {why}"))
        }
    }
}

/// What the store records for a job that expired in the queue.
const EXPIRED_MESSAGE: &str = "the deadline passed before the job could be dispatched";

fn attempts(n: u32) -> String {
    if n == 1 {
        "1 attempt".into()
    } else {
        format!("{n} attempts")
    }
}

/// The last attempt's failure, short: `HTTP 503` or `timeout`.
fn last_error(job: &JobFacts) -> Option<String> {
    match (job.status_code, job.error_code.as_deref()) {
        (Some(s), _) if !(200..300).contains(&s) => Some(format!("HTTP {s}")),
        (_, Some(code)) => Some(code.to_string()),
        _ => None,
    }
}

fn queued(job: &JobFacts, cx: &Context<'_>) -> Explanation {
    let now = cx.now;
    let catalog = cx.catalog;
    if job.deadline <= now {
        let then = if cx.live.is_some_and(|v| v.run_after_deadline) {
            "after_deadline = \"run\" sends it late, on the fastest provider"
        } else {
            "it expires on the next pass"
        };
        return said(
            "at_risk",
            format!(
                "at risk: its deadline {} has passed with no capacity before it; {then}",
                clock(job.deadline, now)
            ),
        );
    }
    let waiting_retry = job.not_before.filter(|t| *t > now);
    let part = match cx.placement {
        Placement::Unroutable(why) => {
            return said(
                "unroutable",
                format!(
                    "queued: no eligible model can serve it ({why}); it fails on the next pass"
                ),
            );
        }
        Placement::Planned(part) => part,
        Placement::NotPlanned => {
            return match waiting_retry {
                Some(t) => retry_backoff(job, t, now),
                None => said(
                    "not_planned",
                    "queued: it arrived after the current plan; the dispatcher plans it on its next pass"
                        .into(),
                ),
            };
        }
    };
    let at_risk = part.overflow > 1e-9;
    // Where it goes next, and when: its group's allocation that has begun,
    // else (the plan cannot fit all of it) the fastest model now, else the
    // earliest allocation.
    let (model, start) = match (part.earliest, part.overflow_model) {
        (Some(e), _) if e.start <= now => (e.model, now),
        (_, Some(m)) if at_risk => (m, now),
        (Some(e), _) => (e.model, e.start),
        (None, _) => {
            return said(
                "not_planned",
                "queued: its group has no allocation in the current plan; the dispatcher plans it again on its next pass"
                    .into(),
            );
        }
    };
    let risk_note = || {
        if at_risk {
            format!("; its deadline {} is at risk", clock(job.deadline, now))
        } else {
            String::new()
        }
    };
    let provider = &catalog.providers[catalog.models[model].provider].name;
    let live = cx.live.and_then(|v| v.provider(provider).map(|p| (v, p)));
    let (input, output) = (job.est_input_tokens, job.est_output_tokens);
    if let Some((_, lp)) = live {
        if let Some(pause) = &lp.pause
            && (start <= now || pause.until.is_none_or(|u| u >= start))
        {
            let mut e = paused(lp, pause, now);
            e.text.push_str(&risk_note());
            return e;
        }
        // This job's estimate against what each budget has left.
        let cost = catalog.cost_at(model, start, input, output);
        if let Some(b) = lp
            .budgets
            .iter()
            .filter(|b| cost > b.remaining_usd() + 1e-12)
            .max_by_key(|b| b.renews_at)
            .filter(|b| start <= now || b.renews_at >= start)
        {
            return said(
                "budget",
                format!(
                    "waiting: {} has {} left of {}, less than this job's estimated {}; it renews at {}{}",
                    b.name(),
                    dollars(b.remaining_usd()),
                    dollars(b.cap_usd),
                    dollars(cost),
                    clock(b.renews_at, now),
                    risk_note()
                ),
            );
        }
    }
    if let Some(t) = waiting_retry {
        return retry_backoff(job, t, now);
    }
    let name = catalog.qualified_name(model);
    if start > now {
        // Planned later: a cheaper price then, or the capacity before it
        // is planned for other jobs (the plan prefers earlier at equal cost).
        let (i, o) = if input == 0 && output == 0 {
            (1, 1)
        } else {
            (input, output)
        };
        let then = catalog.cost_at(model, start, i, o);
        let best_now = part
            .candidates
            .iter()
            .map(|&m| (m, catalog.cost_at(m, now, i, o)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((best, cost_now)) = best_now
            && then < cost_now * (1.0 - 1e-9)
        {
            let window = catalog
                .window_at(model, start)
                .map_or("list".to_string(), |w| w.name.clone());
            let other = if best == model {
                String::new()
            } else {
                format!(" on {}", catalog.qualified_name(best))
            };
            return said(
                "price_window",
                format!(
                    "queued: planned for {name} at {}, {window} {} vs {} now{other}",
                    clock(start, now),
                    prices(catalog.price_with_markup_at(model, start)),
                    prices(catalog.price_with_markup_at(best, now)),
                ),
            );
        }
        return said(
            "capacity",
            format!(
                "queued: planned for {name} at {}: the capacity before then is planned for other jobs at no lower price ({} in its group)",
                clock(start, now),
                part.group_jobs
            ),
        );
    }
    if let Some((view, lp)) = live
        && let Some(full) = full_limit(view, lp, catalog, model, input.saturating_add(output))
    {
        return said("rate_limit_full", format!("{full}{}", risk_note()));
    }
    if at_risk {
        let to = part
            .overflow_model
            .map_or(name.clone(), |m| catalog.qualified_name(m));
        return said(
            "at_risk",
            format!(
                "at risk: the plan cannot fit {} of its group's {} jobs before their deadline {}; they are sent now to {to}, the fastest",
                count(part.overflow),
                part.group_jobs,
                clock(part.group_deadline, now)
            ),
        );
    }
    let slot = part
        .earliest
        .filter(|e| e.start <= now && e.model == model)
        .map_or(String::new(), |e| {
            format!(
                " ({} of its group's {} jobs there by {})",
                count(e.jobs),
                part.group_jobs,
                clock(e.end, now)
            )
        });
    said(
        "due_now",
        format!("queued: planned to start now on {name}{slot}, on the dispatcher's next pass"),
    )
}

fn retry_backoff(job: &JobFacts, t: DateTime<Utc>, now: DateTime<Utc>) -> Explanation {
    let text = if job.attempts > 0 {
        let last = last_error(job).map_or(String::new(), |e| format!(" ({e})"));
        format!(
            "waiting: retry backoff until {} after attempt {}{last}",
            clock(t, now),
            job.attempts
        )
    } else {
        format!("waiting: not before {}", clock(t, now))
    };
    said("not_before", text)
}

fn paused(lp: &ProviderLive, pause: &Pause, now: DateTime<Utc>) -> Explanation {
    let p = &lp.name;
    let until = || {
        pause
            .until
            .map_or("further notice".into(), |u| clock(u, now))
    };
    match &pause.reason {
        PauseReason::RetryAfter => said(
            "provider_paused",
            format!("waiting: {p} paused until {} by retry-after", until()),
        ),
        PauseReason::LimitReset => said(
            "provider_paused",
            format!(
                "waiting: {p} paused until {}: its rate-limit headers said 0 remaining until then",
                until()
            ),
        ),
        PauseReason::CircuitOpen => said(
            "circuit_open",
            format!(
                "waiting: {p}'s circuit is open until {} after {} failures in a row; one probe then",
                until(),
                lp.consecutive_failures
            ),
        ),
        PauseReason::CircuitHalfOpen => said(
            "circuit_open",
            format!("waiting: {p}'s circuit is half-open: one probe request is in flight"),
        ),
        PauseReason::Disabled(why) => said(
            "provider_disabled",
            format!(
                "waiting: {p} is disabled until the configuration is reloaded ({})",
                quoted(why)
            ),
        ),
        PauseReason::Budget(i) => match lp.budgets.get(*i) {
            Some(b) => said(
                "budget",
                format!(
                    "waiting: {} is exhausted ({} of {} spent) until it renews at {}",
                    b.name(),
                    dollars(b.spent_usd),
                    dollars(b.cap_usd),
                    clock(b.renews_at, now)
                ),
            ),
            None => said(
                "budget",
                format!("waiting: {p}'s budget is exhausted until {}", until()),
            ),
        },
    }
}

/// The first limit of `model` (its provider's, then its own, then the
/// daemon's cap) that admits no request of `tokens` now, as a sentence.
fn full_limit(
    view: &LiveView,
    lp: &ProviderLive,
    catalog: &Catalog,
    model: ModelId,
    tokens: u64,
) -> Option<String> {
    let m = &catalog.models[model];
    let own = lp
        .model(&m.name)
        .map(|ml| (catalog.qualified_name(model), ml.limits, ml.usage));
    let mut scopes = vec![(lp.name.clone(), lp.limits, lp.usage)];
    scopes.extend(own);
    for (who, limits, u) in scopes {
        if let Some(c) = u.concurrency
            && u.in_flight >= c
        {
            return Some(format!(
                "waiting: {who}'s concurrency is full ({}/{c} in flight); next start when one answers",
                u.in_flight
            ));
        }
        let window = |name: &str,
                      limit: Option<u64>,
                      w: Option<crate::dispatch::limits::WindowUse>,
                      span: &str| {
            let (limit, w) = (limit?, w?);
            (w.free_in_ms > 0).then(|| {
                format!(
                    "waiting: {who}'s {name} is full ({}/{limit} in the {span}{}); next start in {}",
                    w.used,
                    usable(w.usable, limit),
                    wait(w.free_in_ms)
                )
            })
        };
        if let Some(s) = window(
            "rpm",
            limits.rpm.map(u64::from),
            u.minute_requests,
            "last 60 s",
        ) {
            return Some(s);
        }
        if let Some(s) = window(
            "rpd",
            limits.rpd.map(u64::from),
            u.day_requests,
            "rolling 24 h",
        ) {
            return Some(s);
        }
        if let (Some(limit), Some(w)) = (limits.tpm, u.minute_tokens)
            && w.used.saturating_add(tokens.min(w.usable)) > w.usable
        {
            return Some(format!(
                "waiting: {who}'s tpm is full ({}/{limit} tokens in the last 60 s{}; this job needs about {tokens}); next start as they leave the window, within 60 s",
                w.used,
                usable(w.usable, limit)
            ));
        }
    }
    if let Some(cap) = view.max_in_flight
        && view.in_flight >= cap
    {
        return Some(format!(
            "waiting: daemon.max_in_flight is reached ({}/{cap} requests in flight over all providers); next start when one answers",
            view.in_flight
        ));
    }
    None
}

fn usable(usable: u64, limit: u64) -> String {
    if usable == limit {
        String::new()
    } else {
        format!(", {usable} usable")
    }
}

// ---- figures ----------------------------------------------------------------

/// `10:00 UTC`, `14:02:11 UTC`, or with the date if not `now`'s:
/// `2026-11-25 00:00 UTC`.
pub fn clock(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let time = if t.timestamp() % 60 == 0 {
        t.format("%H:%M")
    } else {
        t.format("%H:%M:%S")
    };
    if t.date_naive() == now.date_naive() {
        format!("{time} UTC")
    } else {
        format!("{} {time} UTC", t.format("%Y-%m-%d"))
    }
}

/// At least two decimals, at most `max`, trailing zeros dropped.
fn decimals(x: f64, max: usize) -> String {
    let s = format!("{x:.max$}");
    let Some(dot) = s.find('.') else {
        return s;
    };
    let keep = s.trim_end_matches('0').len().max(dot + 3);
    s[..keep].to_string()
}

/// Prices per 1M tokens, input/output: `0.135/0.55`.
fn prices(p: Price) -> String {
    format!(
        "{}/{}",
        decimals(p.input_per_mtok, 6),
        decimals(p.output_per_mtok, 6)
    )
}

/// USD: `$5.00`, `$0.0000132`.
fn dollars(x: f64) -> String {
    format!("${}", decimals(x, 9))
}

/// A job count from the plan (which may be fractional): `12`, `2.5`.
fn count(x: f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    }
}

/// A wait: `250 ms`, `3 s`, `4 min 10 s`, `2 h 5 min`.
fn wait(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let s = (ms + 999) / 1000;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, s % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    //! The explanation of hand-made states: a catalog from a config, the
    //! dispatcher's own limits, health and budgets turned into a live view
    //! by [`crate::dispatch::live::snapshot`]; no store, no clock.
    use super::*;
    use crate::config::Config;
    use crate::dispatch::budget::BudgetState;
    use crate::dispatch::decide::Observed;
    use crate::dispatch::limits::{RateLimits, Sent};
    use crate::dispatch::live;
    use crate::dispatch::reliability::Verdict;
    use std::path::Path;
    use std::time::Duration;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Tuesday noon.
    const NOW: &str = "2026-11-24T12:00:00Z";

    /// `deepseek` (off-peak at half price from 16:30 to 00:30 UTC) and
    /// `openai` (10% markup, rpm 600, tpm 100,000, concurrency 2), a daily
    /// budget of $5 over both.
    const CONFIG: &str = r#"
[budget]
daily_usd = 5.0

[[providers]]
name = "deepseek"
kind = "simulated"

[[providers.price_windows]]
name = "off-peak"
hours = ["16:30-00:30"]
timezone = "UTC"
multiplier = 0.5

[[providers.models]]
name = "deepseek-chat"
input_per_mtok = 0.27
output_per_mtok = 1.10

[[providers]]
name = "openai"
kind = "simulated"
markup = 0.1
rpm = 600
tpm = 100000
concurrency = 2

[[providers.models]]
name = "gpt-4o-mini"
input_per_mtok = 0.15
output_per_mtok = 0.60

[classes]
chat = ["deepseek/deepseek-chat", "openai/gpt-4o-mini"]
"#;

    /// The dispatcher's state at [`NOW`]: nothing sent, all healthy.
    struct World {
        catalog: Catalog,
        limits: RateLimits,
        observed: Observed,
        now: DateTime<Utc>,
    }

    impl World {
        fn new() -> World {
            let config = Config::parse(CONFIG, "explain.toml", Path::new(".")).unwrap();
            let now = at(NOW);
            let limits = RateLimits::for_catalog(&config.catalog, now.timestamp_millis());
            let budget = BudgetState::new(config.budgets, now, |_, _| 0.0);
            World {
                catalog: config.catalog,
                limits,
                observed: Observed::new(&[Duration::from_secs(1); 2], budget),
                now,
            }
        }

        fn model(&self, name: &str) -> ModelId {
            self.catalog.model_id(name).unwrap()
        }

        fn explain(&mut self, job: &JobFacts, placement: &Placement) -> Explanation {
            let view = live::snapshot(&self.catalog, &mut self.limits, &self.observed, self.now);
            explain(
                job,
                &Context {
                    catalog: &self.catalog,
                    placement,
                    live: Some(&view),
                    now: self.now,
                },
            )
        }

        /// A group of `jobs` planned on `model` from `start` for 15 minutes.
        fn planned(&self, model: &str, start: &str, jobs: f64, group_jobs: u64) -> Placement {
            let start = at(start);
            let m = self.model(model);
            Placement::Planned(PlanPart {
                group_jobs,
                group_deadline: self.now + chrono::Duration::hours(24),
                candidates: vec![m],
                earliest: Some(Slotted {
                    model: m,
                    start,
                    end: start + chrono::Duration::minutes(15),
                    jobs,
                }),
                overflow: 0.0,
                overflow_model: None,
            })
        }

        /// Planned on openai in the slot that began at noon.
        fn due_on_openai(&self) -> Placement {
            self.planned("openai/gpt-4o-mini", NOW, 4.0, 10)
        }
    }

    /// A queued job of 1,000 input and 100 output tokens, due in 24 h.
    fn queued_job() -> JobFacts {
        JobFacts {
            state: JobState::Queued,
            deadline: at(NOW) + chrono::Duration::hours(24),
            not_before: None,
            attempts: 0,
            provider: None,
            provider_model: None,
            dispatched_at: None,
            completed_at: None,
            status_code: None,
            error_code: None,
            error_message: None,
            answer_message: None,
            cost_usd: None,
            list_cost_usd: None,
            est_input_tokens: 1000,
            est_output_tokens: 100,
        }
    }

    fn ran(state: JobState) -> JobFacts {
        JobFacts {
            state,
            attempts: 1,
            provider: Some("openai".into()),
            provider_model: Some("gpt-4o-mini".into()),
            dispatched_at: Some(at("2026-11-24T11:59:58Z")),
            ..queued_job()
        }
    }

    #[test]
    fn a_job_held_for_a_price_window_names_it_and_both_prices() {
        let mut w = World::new();
        let placement = w.planned("deepseek/deepseek-chat", "2026-11-24T16:30:00Z", 1.0, 1);
        let e = w.explain(&queued_job(), &placement);
        assert_eq!(e.code, "price_window");
        assert_eq!(
            e.text,
            "queued: planned for deepseek/deepseek-chat at 16:30 UTC, off-peak 0.135/0.55 vs 0.27/1.10 now"
        );
        // Where another candidate is the cheapest now, the comparison is
        // with it, at its price with the markup.
        let Placement::Planned(mut part) = placement else {
            unreachable!()
        };
        part.candidates.push(w.model("openai/gpt-4o-mini"));
        let e = w.explain(&queued_job(), &Placement::Planned(part));
        assert_eq!(
            e.text,
            "queued: planned for deepseek/deepseek-chat at 16:30 UTC, off-peak 0.135/0.55 vs 0.165/0.66 now on openai/gpt-4o-mini"
        );
    }

    #[test]
    fn the_planners_own_plan_holds_a_job_for_the_window_and_says_so() {
        let w = World::new();
        let key = crate::domain::job::RouteKey::new(
            crate::domain::pricing::Endpoint::ChatCompletions,
            "deepseek/deepseek-chat",
            &crate::domain::job::Options::default(),
        )
        .encode();
        let deadline = w.now + chrono::Duration::hours(24);
        let buckets =
            crate::plan::bucket_jobs([(key.as_str(), deadline.timestamp_millis(), 1000, 100)]);
        let capacities: Vec<ProviderCapacity> = w
            .catalog
            .providers
            .iter()
            .map(|p| ProviderCapacity::from_limits(&p.limits, Duration::from_secs(1), 0.0))
            .collect();
        let q = crate::plan::plan_queue(
            &buckets,
            &w.catalog,
            &capacities,
            w.now,
            &crate::plan::PlanSettings::default(),
            |_| 1.0,
            |_| None,
        );
        let placement = placement(
            &q,
            &w.catalog,
            &capacities,
            &key,
            crate::domain::estimate::size_bin(100),
            deadline.timestamp_millis(),
        );
        let Placement::Planned(part) = &placement else {
            panic!("{placement:?}")
        };
        let earliest = part.earliest.unwrap();
        assert_eq!(earliest.start, at("2026-11-24T16:30:00Z"));
        assert_eq!((part.group_jobs, part.overflow), (1, 0.0));
        let e = explain(
            &queued_job(),
            &Context {
                catalog: &w.catalog,
                placement: &placement,
                live: None,
                now: w.now,
            },
        );
        assert_eq!(e.code, "price_window", "{}", e.text);
        assert!(e.text.contains("at 16:30 UTC, off-peak"), "{}", e.text);
        // A route the plan cannot serve, and a job the plan has not seen.
        let mut q = q;
        q.groups.clear();
        q.unroutable
            .push((key.clone(), "no model serves /v1/embeddings".into()));
        assert_eq!(
            placement_of(&q, &w, &key, deadline),
            Placement::Unroutable("no model serves /v1/embeddings".into())
        );
        q.unroutable.clear();
        assert_eq!(placement_of(&q, &w, &key, deadline), Placement::NotPlanned);
    }

    fn placement_of(q: &QueuePlan, w: &World, key: &str, deadline: DateTime<Utc>) -> Placement {
        let bin = crate::domain::estimate::size_bin(100);
        placement(q, &w.catalog, &[], key, bin, deadline.timestamp_millis())
    }

    #[test]
    fn a_later_slot_at_no_lower_price_is_capacity() {
        let mut w = World::new();
        let placement = w.planned("openai/gpt-4o-mini", "2026-11-24T13:00:00Z", 5.0, 50);
        let e = w.explain(&queued_job(), &placement);
        assert_eq!(e.code, "capacity");
        assert_eq!(
            e.text,
            "queued: planned for openai/gpt-4o-mini at 13:00 UTC: the capacity before then is planned for other jobs at no lower price (50 in its group)"
        );
    }

    #[test]
    fn a_full_rate_limit_says_which_with_its_figures_and_the_next_start() {
        let now_ms = at(NOW).timestamp_millis();
        // 600 requests (the whole rpm) 57 s ago: the minute is full for 4 s
        // more (each send counts for 60 s and the limiter's one-second margin).
        let mut w = World::new();
        let sent = Sent {
            at_ms: now_ms - 57_000,
            requests: 600,
            tokens: 600,
        };
        w.limits.seed(1, None, sent, now_ms);
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(e.code, "rate_limit_full");
        assert_eq!(
            e.text,
            "waiting: openai's rpm is full (600/600 in the last 60 s); next start in 4 s"
        );
        // Tokens: 99,000 of the usable 100,000 leave no room for 1,100.
        let mut w = World::new();
        let sent = Sent {
            at_ms: now_ms - 10_000,
            requests: 1,
            tokens: 99_000,
        };
        w.limits.seed(1, None, sent, now_ms);
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(e.code, "rate_limit_full");
        assert_eq!(
            e.text,
            "waiting: openai's tpm is full (99000/100000 tokens in the last 60 s; this job needs about 1100); next start as they leave the window, within 60 s"
        );
        // Both concurrency slots taken.
        let mut w = World::new();
        let m = w.model("openai/gpt-4o-mini");
        assert!(w.limits.try_acquire(1, m, 10, now_ms));
        assert!(w.limits.try_acquire(1, m, 10, now_ms));
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "rate_limit_full",
                "waiting: openai's concurrency is full (2/2 in flight); next start when one answers"
            )
        );
    }

    #[test]
    fn a_paused_provider_says_until_when_and_why() {
        let mut w = World::new();
        let retry = Verdict::Retry {
            pause: Some(Duration::from_secs(30)),
        };
        w.observed.health[1].record(&retry, w.now);
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "provider_paused",
                "waiting: openai paused until 12:00:30 UTC by retry-after"
            )
        );
        // A limit the provider reported at zero, on a success.
        let mut w = World::new();
        w.observed.health[1].pause(w.now, Duration::from_secs(90));
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(e.code, "provider_paused");
        assert_eq!(
            e.text,
            "waiting: openai paused until 12:01:30 UTC: its rate-limit headers said 0 remaining until then"
        );
        // A pause that ends before a later planned start is not the reason.
        let placement = w.planned("openai/gpt-4o-mini", "2026-11-24T13:00:00Z", 5.0, 50);
        assert_eq!(w.explain(&queued_job(), &placement).code, "capacity");
    }

    #[test]
    fn an_open_circuit_and_a_disabled_provider_say_so() {
        let mut w = World::new();
        for _ in 0..5 {
            w.observed.health[1].record(&Verdict::Retry { pause: None }, w.now);
        }
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "circuit_open",
                "waiting: openai's circuit is open until 12:00:10 UTC after 5 failures in a row; one probe then"
            )
        );
        w.observed.health[1].record(
            &Verdict::DisableProvider {
                reason: "HTTP 401: Incorrect API key provided".into(),
            },
            w.now,
        );
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "provider_disabled",
                "waiting: openai is disabled until the configuration is reloaded (HTTP 401: Incorrect API key provided)"
            )
        );
    }

    #[test]
    fn a_spent_budget_says_which_and_when_it_renews() {
        let mut w = World::new();
        w.observed.budget.charge(1, 5.0);
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "budget",
                "waiting: the daily budget is exhausted ($5.00 of $5.00 spent) until it renews at 2026-11-25 00:00 UTC"
            )
        );
        // Not spent, but less left than this job's estimate: $2.70 for
        // 10M input tokens on deepseek.
        let mut w = World::new();
        w.observed.budget.charge(0, 3.0);
        let big = JobFacts {
            est_input_tokens: 10_000_000,
            est_output_tokens: 0,
            ..queued_job()
        };
        let placement = w.planned("deepseek/deepseek-chat", NOW, 1.0, 1);
        let e = w.explain(&big, &placement);
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "budget",
                "waiting: the daily budget has $2.00 left of $5.00, less than this job's estimated $2.70; it renews at 2026-11-25 00:00 UTC"
            )
        );
    }

    #[test]
    fn a_retry_waits_for_its_backoff() {
        let mut w = World::new();
        let job = JobFacts {
            not_before: Some(w.now + chrono::Duration::seconds(20)),
            attempts: 1,
            status_code: Some(503),
            ..queued_job()
        };
        let e = w.explain(&job, &w.due_on_openai());
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "not_before",
                "waiting: retry backoff until 12:00:20 UTC after attempt 1 (HTTP 503)"
            )
        );
        // Past its backoff, it is due.
        w.now += chrono::Duration::seconds(20);
        assert_eq!(w.explain(&job, &w.due_on_openai()).code, "due_now");
    }

    #[test]
    fn a_job_due_now_says_where_and_how_many_of_its_group() {
        let mut w = World::new();
        let e = w.explain(&queued_job(), &w.due_on_openai());
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "due_now",
                "queued: planned to start now on openai/gpt-4o-mini (4 of its group's 10 jobs there by 12:15 UTC), on the dispatcher's next pass"
            )
        );
    }

    #[test]
    fn deadlines_at_risk_passed_and_expired() {
        let mut w = World::new();
        let openai = w.model("openai/gpt-4o-mini");
        // The plan cannot fit 3 of the group's 10 jobs: sent now, on the fastest.
        let part = PlanPart {
            group_jobs: 10,
            group_deadline: at("2026-11-24T12:30:00Z"),
            candidates: vec![openai],
            earliest: None,
            overflow: 3.0,
            overflow_model: Some(openai),
        };
        let e = w.explain(&queued_job(), &Placement::Planned(part.clone()));
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "at_risk",
                "at risk: the plan cannot fit 3 of its group's 10 jobs before their deadline 12:30 UTC; they are sent now to openai/gpt-4o-mini, the fastest"
            )
        );
        // ... and if that provider is paused, the pause is the news, with the risk.
        w.observed.health[1].record(
            &Verdict::Retry {
                pause: Some(Duration::from_secs(5)),
            },
            w.now,
        );
        let job = JobFacts {
            deadline: at("2026-11-24T12:30:00Z"),
            ..queued_job()
        };
        let e = w.explain(&job, &Placement::Planned(part));
        assert_eq!(
            e.text,
            "waiting: openai paused until 12:00:05 UTC by retry-after; its deadline 12:30 UTC is at risk"
        );
        // Its deadline has passed: it expires on the next pass.
        let late = JobFacts {
            deadline: at("2026-11-24T11:59:00Z"),
            ..queued_job()
        };
        let e = w.explain(&late, &w.due_on_openai());
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "at_risk",
                "at risk: its deadline 11:59 UTC has passed with no capacity before it; it expires on the next pass"
            )
        );
        // ... unless the daemon runs late jobs.
        let mut view = live::snapshot(&w.catalog, &mut w.limits, &w.observed, w.now);
        view.run_after_deadline = true;
        let placement = w.due_on_openai();
        let cx = Context {
            catalog: &w.catalog,
            placement: &placement,
            live: Some(&view),
            now: w.now,
        };
        assert!(
            explain(&late, &cx)
                .text
                .ends_with("; after_deadline = \"run\" sends it late, on the fastest provider")
        );
        // Expired, after two attempts that got 503s.
        let expired = JobFacts {
            state: JobState::Expired,
            attempts: 2,
            status_code: Some(503),
            error_code: Some("expired".into()),
            error_message: Some(EXPIRED_MESSAGE.into()),
            ..late
        };
        let e = w.explain(&expired, &Placement::NotPlanned);
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "expired",
                "expired: no capacity before its deadline 11:59 UTC (after 2 attempts; the last got HTTP 503)"
            )
        );
    }

    #[test]
    fn running_succeeded_failed_cancelled_and_unroutable() {
        let mut w = World::new();
        let none = Placement::NotPlanned;
        let e = w.explain(&ran(JobState::Running), &none);
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "running",
                "running: sent to openai/gpt-4o-mini at 11:59:58 UTC, attempt 1"
            )
        );
        let retried = JobFacts {
            attempts: 2,
            status_code: Some(429),
            ..ran(JobState::Running)
        };
        assert_eq!(
            w.explain(&retried, &none).text,
            "running: sent to openai/gpt-4o-mini at 11:59:58 UTC, attempt 2 (attempt 1 got HTTP 429)"
        );

        let succeeded = JobFacts {
            status_code: Some(200),
            cost_usd: Some(0.0000132),
            list_cost_usd: Some(0.0000264),
            ..ran(JobState::Succeeded)
        };
        let e = w.explain(&succeeded, &none);
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "succeeded",
                "succeeded on openai/gpt-4o-mini for $0.0000132, list $0.0000264 (50.0% saved)"
            )
        );

        let failed = JobFacts {
            status_code: Some(400),
            answer_message: Some("Invalid value for 'temperature': must be <= 2.".into()),
            ..ran(JobState::Failed)
        };
        let e = w.explain(&failed, &none);
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "failed",
                "failed: HTTP 400 from openai/gpt-4o-mini after 1 attempt: Invalid value for 'temperature': must be <= 2."
            )
        );
        let budget = JobFacts {
            error_code: Some("budget_exhausted".into()),
            error_message: Some(
                "openai's budget cannot pay the estimated $0.100000 before the deadline".into(),
            ),
            ..queued_job()
        };
        let e = w.explain(
            &JobFacts {
                state: JobState::Failed,
                ..budget
            },
            &none,
        );
        assert_eq!(
            e.text,
            "failed (budget_exhausted): openai's budget cannot pay the estimated $0.100000 before the deadline"
        );

        let cancelled = JobFacts {
            state: JobState::Cancelled,
            completed_at: Some(at("2026-11-24T11:00:00Z")),
            error_code: Some("cancelled".into()),
            error_message: Some("cancelled by request before it was dispatched".into()),
            ..queued_job()
        };
        let e = w.explain(&cancelled, &none);
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "cancelled",
                "cancelled at 11:00 UTC: cancelled by request before it was dispatched"
            )
        );

        let unroutable = Placement::Unroutable("unknown model or class 'gone'".into());
        let e = w.explain(&queued_job(), &unroutable);
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "unroutable",
                "queued: no eligible model can serve it (unknown model or class 'gone'); it fails on the next pass"
            )
        );
        let failed = JobFacts {
            state: JobState::Failed,
            error_code: Some("not_routable".into()),
            error_message: Some(
                "no eligible model in the current configuration: unknown model or class 'gone'"
                    .into(),
            ),
            ..queued_job()
        };
        let e = w.explain(&failed, &none);
        assert_eq!(
            (e.code, e.text.as_str()),
            (
                "unroutable",
                "failed: no eligible model in the current configuration: unknown model or class 'gone'"
            )
        );
    }

    #[test]
    fn facts_come_from_the_stored_row_and_quote_the_providers_message() {
        let row = crate::store::FinishedJob {
            id: 7,
            line: Some(1),
            custom_id: "a".into(),
            state: JobState::Failed,
            attempts: 1,
            provider: Some("openai".into()),
            provider_model: Some("gpt-4o-mini".into()),
            channel: Some("sync".into()),
            dispatched_at: Some(1_795_000_000_000),
            completed_at: Some(1_795_000_001_000),
            status_code: Some(400),
            request_id: None,
            response: Some(format!(
                r#"{{"error": {{"message": "{}", "type": "invalid_request_error"}}}}"#,
                "x".repeat(300)
            )),
            error_code: None,
            error_message: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
            list_cost_usd: None,
            provider_batch: None,
        };
        let d = JobDetail {
            job: row,
            source_id: None,
            endpoint: "/v1/chat/completions".into(),
            model: "chat".into(),
            route_key: String::new(),
            priority: 0,
            submitted_at: 1_794_999_000_000,
            deadline: 1_795_086_400_000,
            not_before: 0,
            est_input_tokens: 12,
            est_output_tokens: 34,
        };
        let f = JobFacts::from_detail(&d);
        assert_eq!(f.not_before, None);
        assert_eq!(f.deadline.timestamp_millis(), 1_795_086_400_000);
        assert_eq!((f.est_input_tokens, f.est_output_tokens), (12, 34));
        let quote = f.answer_message.unwrap();
        assert_eq!(quote, format!("{}…", "x".repeat(QUOTE_MAX)));
    }

    #[test]
    fn figures_are_exact_and_times_utc() {
        let now = at(NOW);
        assert_eq!(clock(at("2026-11-24T10:00:00Z"), now), "10:00 UTC");
        assert_eq!(clock(at("2026-11-24T14:02:11.750Z"), now), "14:02:11 UTC");
        assert_eq!(
            clock(at("2026-11-25T00:00:00Z"), now),
            "2026-11-25 00:00 UTC"
        );
        assert_eq!(decimals(0.135, 6), "0.135");
        assert_eq!(decimals(1.1, 6), "1.10");
        assert_eq!(decimals(0.30000000000000004, 6), "0.30");
        assert_eq!(decimals(2.0, 6), "2.00");
        assert_eq!(dollars(0.0000132), "$0.0000132");
        assert_eq!(wait(250), "250 ms");
        assert_eq!(wait(3_000), "3 s");
        assert_eq!(wait(2_001), "3 s");
        assert_eq!(wait(250_000), "4 min 10 s");
        assert_eq!(wait(7_500_000), "2 h 5 min");
        assert_eq!(count(3.0), "3");
        assert_eq!(count(2.5), "2.5");
    }
}
