//! JSON shapes of the API's objects, and the plan as the handlers see it
//! (computed the way `nightshift plan` computes it, cached for a moment).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::dispatch::explain::{self, Explanation, JobFacts, Placement};
use crate::domain::job::RouteKey;
use crate::domain::pricing::Catalog;
use crate::plan;
use crate::results::{job_public_id, result_line};
use crate::store::{BatchRow, FileRow, JobDetail, JobState, SourceCounts, SourceInfo, Store};

use super::ApiState;

/// Unix ms as RFC 3339 (millisecond precision, `Z`).
pub fn rfc3339(ms: i64) -> Value {
    crate::results::rfc3339(Some(ms))
}

pub fn rfc3339_opt(ms: Option<i64>) -> Value {
    crate::results::rfc3339(ms)
}

/// Unix ms as Unix seconds (OpenAI's timestamps).
fn secs(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| json!(ms.div_euclid(1000)))
}

/// USD rounded to a picodollar, as in result lines.
pub fn usd(x: f64) -> Value {
    crate::results::usd(Some(x))
}

pub fn submission_id(source_id: i64) -> String {
    format!("sub_{source_id}")
}
pub fn file_id(id: i64) -> String {
    format!("file-{id}")
}
pub fn batch_id(id: i64) -> String {
    format!("batch_{id}")
}

pub fn counts_json(c: &SourceCounts) -> Value {
    let mut m = serde_json::Map::new();
    for s in JobState::ALL {
        m.insert(s.as_str().into(), json!(c.count(s)));
    }
    Value::Object(m)
}

/// A job: state, where it ran, its plan while queued, why it is where it
/// is (`GET /v1/jobs/{id}`), its result once final.
pub fn job_json(
    d: &JobDetail,
    plan: Option<Value>,
    explanation: Option<&Explanation>,
    with_result: bool,
) -> Value {
    let j = &d.job;
    json!({
        "id": job_public_id(j.id),
        "object": "job",
        "custom_id": j.custom_id,
        "state": j.state.as_str(),
        "submission_id": d.source_id.map(submission_id),
        "line": j.line,
        "endpoint": d.endpoint,
        "model": d.model,
        "priority": d.priority,
        "submitted_at": rfc3339(d.submitted_at),
        "deadline": rfc3339(d.deadline),
        "not_before": if d.not_before > 0 { rfc3339(d.not_before) } else { Value::Null },
        "attempts": j.attempts,
        "provider": j.provider,
        "provider_model": j.provider_model,
        "channel": j.channel(),
        "batch_id": j.provider_batch,
        "dispatched_at": rfc3339_opt(j.dispatched_at),
        "completed_at": rfc3339_opt(j.completed_at),
        "cost_usd": j.cost_usd.map(usd),
        "list_cost_usd": j.list_cost_usd.map(usd),
        "plan": plan,
        "explanation": explanation.map(|e| json!({"code": e.code, "text": e.text})),
        "result": if with_result && j.state.is_final() { result_line(j) } else { Value::Null },
    })
}

pub fn submission_json(s: &SourceInfo) -> Value {
    let id = submission_id(s.id);
    json!({
        "id": id,
        "object": "submission",
        "origin": s.origin,
        "name": s.name,
        "created_at": rfc3339(s.ingested_at),
        "jobs": s.counts.jobs(),
        "invalid_lines": s.counts.invalid_lines,
        "counts": counts_json(&s.counts),
        "done": s.counts.open() == 0,
        "output_url": format!("/v1/submissions/{id}/output"),
        "errors_url": format!("/v1/submissions/{id}/errors"),
    })
}

pub fn file_json(f: &FileRow) -> Value {
    json!({
        "id": file_id(f.id),
        "object": "file",
        "bytes": f.bytes,
        "created_at": secs(Some(f.created_at)),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

pub fn batch_json(b: &BatchRow, counts: Option<&SourceCounts>) -> Value {
    let (total, completed, failed) = counts.map_or((0, 0, 0), |c| {
        let completed = c.count(JobState::Succeeded);
        let failed = c.count(JobState::Failed)
            + c.count(JobState::Expired)
            + c.count(JobState::Cancelled)
            + c.invalid_lines;
        (c.jobs() + c.invalid_lines, completed, failed)
    });
    let errors = b
        .errors
        .as_deref()
        .and_then(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|e| e.as_array().is_some_and(|a| !a.is_empty()))
        .map_or(Value::Null, |data| json!({"object": "list", "data": data}));
    let metadata = b
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str::<Value>(m).ok())
        .unwrap_or(Value::Null);
    json!({
        "id": batch_id(b.id),
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": errors,
        "input_file_id": file_id(b.input_file_id),
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id.map(file_id),
        "error_file_id": b.error_file_id.map(file_id),
        "created_at": secs(Some(b.created_at)),
        "in_progress_at": secs(b.in_progress_at),
        "expires_at": secs(Some(b.expires_at)),
        "finalizing_at": secs(b.finalizing_at),
        "completed_at": secs(b.completed_at),
        "failed_at": secs(b.failed_at),
        "expired_at": secs(b.expired_at),
        "cancelling_at": secs(b.cancelling_at),
        "cancelled_at": secs(b.cancelled_at),
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": metadata,
    })
}

// ---- the dispatcher's live view ---------------------------------------------

fn instant(t: DateTime<Utc>) -> Value {
    rfc3339(t.timestamp_millis())
}

/// One limit's use: `limit` as configured, `usable` what nightshift sends
/// at most (pacing and reserve), `used` in the window now, and
/// `free_in_ms` until one more unit fits.
fn window_json(
    limit: Option<u64>,
    w: Option<crate::dispatch::limits::WindowUse>,
    window_s: u64,
) -> Value {
    match (limit, w) {
        (Some(limit), Some(w)) => json!({
            "limit": limit, "usable": w.usable, "used": w.used,
            "window_s": window_s, "free_in_ms": w.free_in_ms,
        }),
        _ => Value::Null,
    }
}

/// A limiter's use against each limit, which are full, and when the next
/// request may start.
fn usage_json(
    limits: &crate::domain::pricing::Limits,
    u: &crate::dispatch::limits::LimiterUse,
    at: DateTime<Utc>,
) -> Value {
    let mut full = Vec::new();
    let window_full =
        |w: Option<crate::dispatch::limits::WindowUse>| w.is_some_and(|w| w.free_in_ms > 0);
    if window_full(u.minute_requests) {
        full.push("rpm");
    }
    if window_full(u.minute_tokens) {
        full.push("tpm");
    }
    if window_full(u.day_requests) {
        full.push("rpd");
    }
    if u.concurrency.is_some_and(|c| u.in_flight >= c) {
        full.push("concurrency");
    }
    json!({
        "rpm": window_json(limits.rpm.map(u64::from), u.minute_requests, 60),
        "tpm": window_json(limits.tpm, u.minute_tokens, 60),
        "rpd": window_json(limits.rpd.map(u64::from), u.day_requests, 86_400),
        "concurrency": u.concurrency.map_or(Value::Null, |c| json!({"limit": c, "in_flight": u.in_flight})),
        "in_flight": u.in_flight,
        "full": full,
        "next_start_in_ms": u.next_start_in_ms,
        "next_start": u.next_start_in_ms.map_or(Value::Null, |ms| instant(at + chrono::Duration::milliseconds(ms))),
    })
}

/// A provider as the dispatcher saw it: circuit, pause and why, use of
/// each limit, budgets.
pub fn live_json(
    view: &crate::dispatch::live::LiveView,
    p: &crate::dispatch::live::ProviderLive,
) -> Value {
    use crate::dispatch::live::{CircuitView, PauseReason};
    let at = view.at;
    let budgets: Vec<Value> = p
        .budgets
        .iter()
        .map(|b| {
            json!({
                "name": b.name(),
                "provider": b.provider,
                "period": b.period.name(),
                "cap_usd": usd(b.cap_usd),
                "spent_usd": usd(b.spent_usd),
                "remaining_usd": usd(b.remaining_usd()),
                "exhausted": b.exhausted(),
                "renews_at": instant(b.renews_at),
            })
        })
        .collect();
    let paused = p.pause.as_ref().map_or(Value::Null, |pause| {
        let detail = match &pause.reason {
            PauseReason::Disabled(why) => Value::from(why.as_str()),
            PauseReason::Budget(i) => p
                .budgets
                .get(*i)
                .map_or(Value::Null, |b| Value::from(b.name())),
            _ => Value::Null,
        };
        json!({
            "until": pause.until.map_or(Value::Null, instant),
            "reason": pause.reason.as_str(),
            "detail": detail,
        })
    });
    let until = match p.circuit {
        CircuitView::Open { until } => instant(until),
        _ => Value::Null,
    };
    // When a request may start: after the pause, under the limits; unknown
    // (null) while that waits on an event (a reload, a probe, an answer).
    let by_limits = p
        .usage
        .next_start_in_ms
        .map(|ms| at + chrono::Duration::milliseconds(ms));
    let next_start = match &p.pause {
        None => by_limits,
        Some(pause) => pause.until.zip(by_limits).map(|(u, l)| u.max(l)),
    };
    json!({
        "at": instant(at),
        "next_start": next_start.map_or(Value::Null, instant),
        "circuit": {"state": p.circuit.as_str(), "until": until, "consecutive_failures": p.consecutive_failures},
        "paused": paused,
        "limits": usage_json(&p.limits, &p.usage, at),
        "models": p.models.iter().map(|m| json!({"name": m.name, "limits": usage_json(&m.limits, &m.usage, at)})).collect::<Vec<_>>(),
        "budgets": budgets,
        "flex_backoff_until": p.flex_off_until.map_or(Value::Null, instant),
    })
}

// ---- the plan -------------------------------------------------------------

/// The plan for the queue at one moment.
pub type PlanSnapshot = plan::QueuePlan;

/// The last plan, reused for a second (plans of a big queue take a while).
#[derive(Default)]
pub struct PlanCache(Mutex<Option<(Instant, Arc<PlanSnapshot>)>>);

const PLAN_TTL: Duration = Duration::from_secs(1);

impl PlanCache {
    pub fn invalidate(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The plan the dispatcher follows (with its observed latencies, success
/// rates, health and budgets), as it published it; if the queue changed
/// since, the plan it makes next from the same inputs. Before its first plan
/// (or with no dispatcher, as in API-only tests) the plan is computed here
/// from the configured capacities, cached for a second.
/// Returned with the catalog it was made with (a reload may have changed
/// the one in force).
pub fn current_plan(state: &ApiState) -> crate::store::Result<(Arc<PlanSnapshot>, Arc<Catalog>)> {
    current_plan_with_capacities(state).map(|(p, c, _)| (p, c))
}

/// [`current_plan`], with the provider capacities it was made with
/// (parallel to its catalog's providers).
pub fn current_plan_with_capacities(
    state: &ApiState,
) -> crate::store::Result<(Arc<PlanSnapshot>, Arc<Catalog>, Vec<plan::ProviderCapacity>)> {
    if let Some(p) = state.shared.telemetry.plan() {
        let buckets = state.shared.store.queued_buckets()?;
        let queued: u64 = buckets.iter().map(|b| b.jobs).sum();
        let planned: u64 = p.queue.groups.iter().map(|g| g.group.jobs).sum();
        if queued == planned {
            return Ok((
                Arc::new(p.queue.clone()),
                p.catalog.clone(),
                p.capacities.clone(),
            ));
        }
        // Jobs arrived or finished since: the plan the dispatcher makes on
        // its next pass, from its own inputs.
        let q = plan::plan_queue(
            &buckets,
            &p.catalog,
            &p.capacities,
            Utc::now(),
            &state.plan_settings,
            |key| p.output_scale.get(key).copied().unwrap_or(1.0),
            |_| None,
        );
        return Ok((Arc::new(q), p.catalog.clone(), p.capacities.clone()));
    }
    let catalog = state.catalog();
    let capacities = state.capacities();
    if let Some((made, p)) = &*state.plan_cache.0.lock().unwrap_or_else(|e| e.into_inner())
        && made.elapsed() < PLAN_TTL
    {
        return Ok((p.clone(), catalog, capacities));
    }
    let snapshot = Arc::new(compute_plan(
        &state.shared.store,
        &catalog,
        &capacities,
        &state.plan_settings,
        Utc::now(),
    )?);
    *state.plan_cache.0.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((Instant::now(), snapshot.clone()));
    Ok((snapshot, catalog, capacities))
}

/// Why a job is where it is now: for a queued job, from its group's part of
/// `plan` (made with `catalog` and `capacities`); for every job, from the
/// dispatcher's last live view of the providers.
pub fn job_explanation(
    state: &ApiState,
    d: &JobDetail,
    plan: Option<(&PlanSnapshot, &Catalog, &[plan::ProviderCapacity])>,
) -> Explanation {
    let live = state
        .shared
        .telemetry
        .live::<crate::dispatch::live::LiveView>();
    let fallback;
    let (placement, catalog) = match plan {
        Some((p, catalog, capacities)) => (
            explain::placement(
                p,
                catalog,
                capacities,
                &d.route_key,
                crate::domain::estimate::size_bin(d.est_output_tokens),
                d.deadline,
            ),
            catalog,
        ),
        None => {
            fallback = state.catalog();
            (Placement::NotPlanned, &*fallback)
        }
    };
    explain::explain(
        &JobFacts::from_detail(d),
        &explain::Context {
            catalog,
            placement: &placement,
            live: live.as_deref(),
            now: Utc::now(),
        },
    )
}

fn compute_plan(
    store: &Store,
    catalog: &crate::domain::pricing::Catalog,
    capacity: &[plan::ProviderCapacity],
    settings: &plan::PlanSettings,
    now: DateTime<Utc>,
) -> crate::store::Result<PlanSnapshot> {
    let buckets = store.queued_buckets()?;
    Ok(plan::plan_queue(
        &buckets,
        catalog,
        capacity,
        now,
        settings,
        |_| 1.0,
        |_| None,
    ))
}

fn provider_model(catalog: &crate::domain::pricing::Catalog, model: usize) -> (String, String) {
    let m = &catalog.models[model];
    (catalog.providers[m.provider].name.clone(), m.name.clone())
}

/// What the plan assumed of each provider: observed latency, success rate
/// and token ratio, and until when it has no capacity (health or budget).
pub fn capacities_json(catalog: &Catalog, capacities: &[plan::ProviderCapacity]) -> Value {
    catalog
        .providers
        .iter()
        .zip(capacities)
        .map(|(p, c)| {
            json!({
                "provider": p.name,
                "latency_s": c.latency.as_secs_f64(),
                "success_rate": c.success_rate,
                "input_token_ratio": c.input_token_ratio,
                "unavailable_until": c.unavailable_until.map(|t| {
                    if t == DateTime::<Utc>::MAX_UTC { Value::from("indefinitely") } else { rfc3339(t.timestamp_millis()) }
                }),
            })
        })
        .collect()
}

/// The whole plan: per (provider, model, slot), jobs and expected cost.
pub fn plan_json(p: &PlanSnapshot, catalog: &crate::domain::pricing::Catalog) -> Value {
    let queued: u64 = p.groups.iter().map(|g| g.group.jobs).sum();
    let allocations: Vec<Value> = p
        .plan
        .allocations
        .iter()
        .map(|a| {
            let (provider, model) = provider_model(catalog, a.model);
            let slot = &p.plan.slots[a.slot];
            json!({
                "provider": provider, "model": model,
                "start": rfc3339(slot.start.timestamp_millis()), "end": rfc3339(slot.end.timestamp_millis()),
                "jobs": a.jobs, "expected_cost_usd": usd(a.jobs * a.cost_per_job),
                "route": RouteKey::decode(&p.groups[a.group].route_key),
            })
        })
        .collect();
    let overflow: f64 = p.plan.overflow.iter().map(|o| o.1).sum();
    json!({
        "object": "plan",
        "planned_at": rfc3339(p.plan.now.timestamp_millis()),
        "method": format!("{:?}", p.plan.method).to_lowercase(),
        "queued_jobs": queued,
        "groups": p.groups.len(),
        "expected_cost_usd": usd(p.plan.expected_cost),
        "dispatch_now_cost_usd": usd(p.plan.dispatch_now_cost),
        "expected_savings_usd": usd(p.plan.dispatch_now_cost - p.plan.expected_cost),
        "overflow_jobs": overflow,
        "allocations": allocations,
        "unroutable": p.unroutable.iter().map(|(k, r)| json!({"route": k, "reason": r})).collect::<Vec<_>>(),
    })
}

/// A queued job's part of the plan: the slots and models its group is
/// planned on (the dispatcher takes a group's most urgent jobs first).
pub fn job_plan_json(
    p: &PlanSnapshot,
    catalog: &crate::domain::pricing::Catalog,
    d: &JobDetail,
) -> Value {
    let bin = crate::domain::estimate::size_bin(d.est_output_tokens);
    let Some(gi) = p.groups.iter().position(|g| {
        g.route_key == d.route_key
            && g.size_bin == bin
            && g.deadline_from <= d.deadline
            && d.deadline < g.deadline_to
    }) else {
        return Value::Null;
    };
    let g = &p.groups[gi];
    let mut allocations: Vec<(i64, Value)> = p
        .plan
        .allocations
        .iter()
        .filter(|a| a.group == gi)
        .map(|a| {
            let (provider, model) = provider_model(catalog, a.model);
            let slot = &p.plan.slots[a.slot];
            (
                slot.start.timestamp_millis(),
                json!({"provider": provider, "model": model,
                       "start": rfc3339(slot.start.timestamp_millis()), "end": rfc3339(slot.end.timestamp_millis()),
                       "jobs": a.jobs, "expected_cost_per_job_usd": usd(a.cost_per_job)}),
            )
        })
        .collect();
    allocations.sort_by_key(|a| a.0);
    let overflow: f64 = p
        .plan
        .overflow
        .iter()
        .filter(|o| o.0 == gi)
        .map(|o| o.1)
        .sum();
    json!({
        "planned_at": rfc3339(p.plan.now.timestamp_millis()),
        "group_jobs": g.group.jobs,
        "group_deadline": rfc3339(g.group.deadline.timestamp_millis()),
        "earliest_start": allocations.first().map(|a| a.1["start"].clone()),
        "allocations": allocations.into_iter().map(|a| a.1).collect::<Vec<_>>(),
        "overflow_jobs": overflow,
    })
}

/// A batch nightshift sent to a provider's Batch API, as `/v1/providers`
/// shows it.
pub fn provider_batch_json(b: &crate::store::ProviderBatch) -> Value {
    let at = |ms: Option<i64>| {
        ms.and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis)
            .map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
    };
    json!({
        "id": b.id,
        "remote_id": b.remote_id,
        "model": b.model,
        "endpoint": b.endpoint,
        "state": b.stage.as_str(),
        "remote_status": b.remote_status,
        "requests": b.requests,
        "created_at": at(Some(b.created_at)),
        "submitted_at": at(b.submitted_at),
        "fallback_at": at(Some(b.fallback_at)),
        "ended_at": at(b.ended_at),
        "succeeded": b.succeeded,
        "failed": b.failed,
        "requeued": b.requeued,
        "late": b.late,
        "error": b.error,
    })
}
