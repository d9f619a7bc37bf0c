//! The native API: jobs in (`POST /v1/jobs`: one job, an array, or JSONL,
//! all or nothing), jobs out (get, list, cancel), the submissions they came
//! in, the plan, providers, statistics.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use super::objects::{self, rfc3339, usd};
use super::{S, count_param, echo, id_param, parse_id, query, read_body};
use crate::domain::job::{self, JobContext, LineError, NewJob};
use crate::results::job_public_id;
use crate::store::{
    CancelOutcome, FileKind, JobFilter, JobState, LineOutcome, NewSource, Origin, SourceFilter,
};

/// `GET /healthz`: the daemon answers, and so does its database (503 when
/// it does not: nothing can be queued or dispatched meanwhile). On a shared
/// queue it also says whether this daemon plans and how many are alive.
pub async fn healthz(State(s): State<S>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let ping = s
        .db(|s| s.shared.store.ping().map_err(|e| e.to_string()))
        .await
        .unwrap_or_else(|_| Err("the database check did not finish".into()));
    let store = &s.shared.store;
    let mut database = json!({"backend": store.kind(), "ok": ping.is_ok()});
    if let Err(e) = &ping {
        database["error"] = json!(e);
    }
    let mut body = json!({
        "status": if ping.is_ok() { "ok" } else { "unavailable" },
        "version": env!("CARGO_PKG_VERSION"),
        "database": database,
    });
    if store.is_shared() {
        let c = *s.shared.coordination.borrow();
        body["planner"] = json!(c.planner);
        body["daemons"] = json!(c.live);
    }
    let code = if ping.is_ok() {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text. Queue gauges are read from SQLite now;
/// counters come from the dispatcher.
pub async fn metrics(State(s): State<S>) -> ApiResult<axum::response::Response> {
    use crate::telemetry::{ClassLabel, StateLabel};
    use axum::response::IntoResponse;
    let (counts, by_route, batches) = s
        .db(|s| -> Result<_, crate::store::QueueError> {
            Ok((
                s.shared.store.counts()?,
                s.shared.store.queued_by_route()?,
                s.shared.store.provider_batch_counts()?,
            ))
        })
        .await?
        .map_err(ApiError::internal)?;
    let t = &s.shared.telemetry;
    let store = &s.shared.store;
    t.daemon
        .get_or_create(&crate::telemetry::DaemonLabel {
            backend: store.kind().to_string(),
            node: store.node().unwrap_or_default().to_string(),
        })
        .set(1);
    let c = *s.shared.coordination.borrow();
    t.planner.set(c.planner as i64);
    t.daemons.set(c.live as i64);
    for (state, n) in counts {
        t.jobs
            .get_or_create(&StateLabel {
                state: state.as_str().to_string(),
            })
            .set(n as i64);
    }
    t.provider_batches.clear();
    for (provider, state, n) in batches {
        t.provider_batches
            .get_or_create(&crate::telemetry::BatchStateLabel { provider, state })
            .set(n as i64);
    }
    t.queued_by_class.clear();
    let mut by_class: std::collections::BTreeMap<String, u64> = Default::default();
    for (key, n) in by_route {
        let class = crate::domain::job::RouteKey::decode(&key).map_or(key, |k| k.model);
        *by_class.entry(class).or_default() += n;
    }
    for (class, n) in by_class {
        t.queued_by_class
            .get_or_create(&ClassLabel { class })
            .set(n as i64);
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        t.render(),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
pub struct SubmitQuery {
    /// Deadline of the jobs that name none: a duration or RFC 3339.
    deadline: Option<String>,
    /// A name for the submission (e.g. the file it came from).
    name: Option<String>,
}

/// The jobs of a body: a JSON array, one JSON object, or JSONL; with their
/// 1-based line (array: element) numbers.
fn split_body(text: &str) -> ApiResult<Vec<(u64, &str)>> {
    // A byte order mark (editors on Windows write one) is not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let t = text.trim_start();
    if t.is_empty() {
        return Err(ApiError::bad_request(
            "the body holds no job: send one job object, an array of them, or JSONL",
            None,
            "empty_body",
        ));
    }
    if t.starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| ApiError::invalid_json(&e))?;
        if items.is_empty() {
            return Err(ApiError::bad_request(
                "the array holds no job",
                None,
                "empty_body",
            ));
        }
        return Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i as u64 + 1, r.get()))
            .collect());
    }
    if let Ok(one) = serde_json::from_str::<&RawValue>(text) {
        return Ok(vec![(1, one.get())]);
    }
    Ok(crate::ingest::jsonl::lines(text).collect())
}

type Validated = Result<Vec<(u64, NewJob)>, Vec<(u64, LineError)>>;

/// Validates every line; all valid, or every error.
pub(super) fn validate_all(lines: &[(u64, &str)], ctx: &JobContext) -> Validated {
    let mut jobs = Vec::with_capacity(lines.len());
    let mut errors = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    for &(line, text) in lines {
        match job::parse_line(text, ctx) {
            Ok(j) => match seen.get(&j.custom_id) {
                Some(first) => errors.push((
                    line,
                    LineError {
                        custom_id: Some(j.custom_id.clone()),
                        field: Some("custom_id".into()),
                        message: format!("duplicate custom_id (first used on line {first})"),
                    },
                )),
                None => {
                    seen.insert(j.custom_id.clone(), line);
                    jobs.push((line, j));
                }
            },
            Err(e) => errors.push((line, e)),
        }
    }
    if errors.is_empty() {
        Ok(jobs)
    } else {
        Err(errors)
    }
}

/// `POST /v1/jobs`: validates every job, then queues them all in one
/// transaction — or none, with every line's error. 200 only after commit.
pub async fn submit(
    State(s): State<S>,
    q: Result<Query<SubmitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let q = query(q)?;
    let bytes = read_body(&headers, body, s.max_body, "http.max_body").await?;
    let now = Utc::now();
    let default_deadline = match &q.deadline {
        None => s.default_deadline,
        Some(d) => {
            let t = job::parse_deadline(d, now)
                .map_err(|m| ApiError::bad_request(m, Some("deadline"), "invalid_value"))?;
            (t - now).to_std().map_err(|_| {
                ApiError::bad_request(
                    format!("deadline '{d}' is not in the future"),
                    Some("deadline"),
                    "invalid_value",
                )
            })?
        }
    };
    let name = q.name.unwrap_or_else(|| "api".into());
    let n = s
        .submissions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = s
        .db(move |s| -> ApiResult<Value> {
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                ApiError::bad_request(
                    format!("the body is not UTF-8 (byte {})", e.valid_up_to() + 1),
                    None,
                    "invalid_body",
                )
            })?;
            let lines = split_body(text)?;
            let catalog = s.catalog();
            let ctx = JobContext {
                catalog: &catalog,
                now,
                default_deadline,
            };
            let jobs = validate_all(&lines, &ctx)
                .map_err(|errors| ApiError::invalid_lines(&errors, lines.len()))?;
            let now_ms = now.timestamp_millis();
            let stem = format!("api-{now_ms}-{n}");
            let source = NewSource {
                origin: Origin::Api,
                name: &name,
                stem: &stem,
                sha256: None,
                now_ms,
            };
            let outcomes = jobs
                .into_iter()
                .map(|(line, job)| Ok(LineOutcome { line, job: Ok(job) }));
            let summary = s.shared.store.ingest(&source, outcomes)?;
            let ids = s.shared.store.job_ids_of(summary.source_id)?;
            Ok(json!({
                "object": "submission",
                "id": objects::submission_id(summary.source_id),
                "name": name,
                "queued": summary.queued,
                "jobs": ids.iter().map(|(id, custom_id, deadline)| json!({
                    "id": job_public_id(*id), "custom_id": custom_id, "state": "queued",
                    "deadline": rfc3339(*deadline),
                })).collect::<Vec<_>>(),
            }))
        })
        .await??;
    s.queue_changed();
    Ok(Json(out))
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    state: Option<String>,
    after: Option<String>,
    limit: Option<String>,
    submission: Option<String>,
    source: Option<String>,
    custom_id: Option<String>,
}

/// `source=`: a kind (`file`: the watched folder, `submission`: `POST
/// /v1/jobs`, `batch`: the Batch API) or one source (`sub_N`, which dropped
/// files have too, or `batch_N`).
fn source_param(v: &str) -> ApiResult<SourceFilter> {
    let parsed = match v {
        "file" => Some(SourceFilter::Origin(Origin::Inbox)),
        "submission" => Some(SourceFilter::Origin(Origin::Api)),
        "batch" => Some(SourceFilter::Origin(Origin::Upload)),
        _ if v.starts_with("sub_") => parse_id(v, "sub_").map(SourceFilter::Source),
        _ if v.starts_with("batch_") => parse_id(v, "batch_").map(SourceFilter::Batch),
        _ => None,
    };
    parsed.ok_or_else(|| {
        ApiError::bad_request(
            format!(
                "source '{}' is not file, submission, batch, a submission id (sub_N) or a batch id (batch_N)",
                echo(v)
            ),
            Some("source"),
            "invalid_value",
        )
    })
}

/// `custom_id=`: an exact custom_id, as long as a job's may be.
fn custom_id_param(v: &str) -> ApiResult<String> {
    let max = crate::domain::bounds::MAX_CUSTOM_ID_BYTES;
    if v.len() > max {
        return Err(ApiError::bad_request(
            format!(
                "custom_id is {} bytes long, above the limit of {max} bytes",
                v.len()
            ),
            Some("custom_id"),
            "invalid_value",
        ));
    }
    Ok(v.to_string())
}

/// `GET /v1/jobs?state=&after=&limit=&submission=&source=&custom_id=`:
/// jobs in id order, each filter answered from an index.
pub async fn list_jobs(
    State(s): State<S>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q)?;
    let state = match q.state.as_deref().filter(|x| !x.is_empty()) {
        None => None,
        Some(x) => Some(JobState::parse(x).ok_or_else(|| {
            ApiError::bad_request(
                format!("state '{}' is not one of queued, running, succeeded, failed, expired, cancelled", echo(x)),
                Some("state"),
                "invalid_value",
            )
        })?),
    };
    let after = id_param(q.after.as_deref(), "job_", "after", "a job id")?.unwrap_or(0);
    let submission = id_param(
        q.submission.as_deref(),
        "sub_",
        "submission",
        "a submission id",
    )?;
    let source = match q.source.as_deref().filter(|x| !x.is_empty()) {
        None => submission.map(SourceFilter::Source),
        Some(_) if submission.is_some() => {
            return Err(ApiError::bad_request(
                "source and submission both say where the jobs came from: give one",
                Some("source"),
                "invalid_value",
            ));
        }
        Some(x) => Some(source_param(x)?),
    };
    let custom_id = match q.custom_id.as_deref().filter(|x| !x.is_empty()) {
        None => None,
        Some(x) => Some(custom_id_param(x)?),
    };
    let limit = count_param(q.limit.as_deref(), "limit", 100, 1..=1000)?;
    let filter = JobFilter {
        state,
        source,
        custom_id,
    };
    let mut rows = s
        .db(move |s| s.shared.store.list_jobs(&filter, after, limit + 1))
        .await??;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    let data: Vec<Value> = rows
        .iter()
        .map(|d| objects::job_json(d, None, None, false))
        .collect();
    Ok(Json(json!({
        "object": "list",
        "first_id": data.first().map(|d| d["id"].clone()),
        "last_id": data.last().map(|d| d["id"].clone()),
        "has_more": has_more,
        "data": data,
    })))
}

/// `GET /v1/jobs/{id}`: state, plan (while queued), why it is where it is,
/// result (once final).
pub async fn get_job(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let n = parse_id(&id, "job_").ok_or_else(|| ApiError::not_found("job", &id))?;
    let out = s
        .db(move |s| -> ApiResult<Option<Value>> {
            let Some(d) = s.shared.store.job_detail(n)? else {
                return Ok(None);
            };
            let (plan, explanation) = if d.job.state == JobState::Queued {
                let (p, catalog, capacities) = objects::current_plan_with_capacities(s)?;
                let why = objects::job_explanation(s, &d, Some((&p, &catalog, &capacities)));
                (Some(objects::job_plan_json(&p, &catalog, &d)), why)
            } else {
                (None, objects::job_explanation(s, &d, None))
            };
            let mut v = objects::job_json(&d, plan, Some(&explanation), true);
            // The request as queued: what the page and `jobs show` print.
            if let Some(body) = s.shared.store.job_body(n)? {
                v["request"] = json!({
                    "method": "POST",
                    "url": d.endpoint,
                    "body": serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body)),
                });
            }
            Ok(Some(v))
        })
        .await??;
    out.map(Json).ok_or_else(|| ApiError::not_found("job", &id))
}

/// `POST /v1/jobs/{id}/cancel`: a queued job is cancelled (one
/// transaction). A running job is not: its request is in flight and cannot
/// be recalled, so the answer is 409 and its result will be recorded.
pub async fn cancel_job(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let n = parse_id(&id, "job_").ok_or_else(|| ApiError::not_found("job", &id))?;
    let now_ms = Utc::now().timestamp_millis();
    let (outcome, detail) = s
        .db(move |s| -> ApiResult<_> {
            let outcome = s.shared.store.cancel_job(n, now_ms)?;
            Ok((outcome, s.shared.store.job_detail(n)?))
        })
        .await??;
    match outcome {
        CancelOutcome::NotFound => Err(ApiError::not_found("job", &id)),
        CancelOutcome::NotQueued(JobState::Running) => Err(ApiError::conflict(
            format!(
                "{} is running: its request is in flight and cannot be recalled; its result will be recorded",
                job_public_id(n)
            ),
            "job_running",
        )),
        CancelOutcome::NotQueued(state) => Err(ApiError::conflict(
            format!("{} is already {}", job_public_id(n), state.as_str()),
            "job_final",
        )),
        CancelOutcome::Cancelled => {
            s.queue_changed();
            let d = detail.ok_or_else(|| ApiError::not_found("job", &id))?;
            let why = objects::job_explanation(&s, &d, None);
            Ok(Json(objects::job_json(&d, None, Some(&why), true)))
        }
    }
}

/// `GET /v1/submissions/{id}`: a submission's jobs by state.
pub async fn get_submission(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let n = parse_id(&id, "sub_").ok_or_else(|| ApiError::not_found("submission", &id))?;
    let info = s.db(move |s| s.shared.store.source_info(n)).await??;
    info.map(|i| Json(objects::submission_json(&i)))
        .ok_or_else(|| ApiError::not_found("submission", &id))
}

async fn submission_results(s: S, id: String, kind: FileKind) -> ApiResult<Response> {
    let n = parse_id(&id, "sub_").ok_or_else(|| ApiError::not_found("submission", &id))?;
    let info = s
        .db(move |s| s.shared.store.source_info(n))
        .await??
        .ok_or_else(|| ApiError::not_found("submission", &id))?;
    let stem = info.stem.clone();
    let body = super::result_files::streamed(s.shared.store.clone(), move |store, w| {
        crate::results::write_results(store, info.id, &stem, kind, w)
    });
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], body).into_response())
}

/// `GET /v1/submissions/{id}/output`: result lines of its succeeded jobs.
pub async fn submission_output(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Response> {
    submission_results(s, id, FileKind::Output).await
}

/// `GET /v1/submissions/{id}/errors`: its failed, expired and cancelled jobs.
pub async fn submission_errors(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Response> {
    submission_results(s, id, FileKind::Errors).await
}

/// `GET /v1/plan`: what the planner intends for the queue.
pub async fn get_plan(State(s): State<S>) -> ApiResult<Json<Value>> {
    let v = s
        .db(|s| -> ApiResult<Value> {
            let (p, catalog) = objects::current_plan(s)?;
            let mut v = objects::plan_json(&p, &catalog);
            if let Some(published) = s.shared.telemetry.plan() {
                v["source"] = "dispatcher".into();
                let mut providers =
                    objects::capacities_json(&published.catalog, &published.capacities);
                if let Some(list) = providers.as_array_mut() {
                    for (p, left) in list.iter_mut().zip(&published.budget_remaining_usd) {
                        p["budget_remaining_usd"] = left.map_or(Value::Null, Value::from);
                    }
                }
                v["providers"] = providers;
            } else {
                v["source"] = "configured".into();
            }
            Ok(v)
        })
        .await??;
    Ok(Json(v))
}

/// How far back `/v1/providers` looks for a provider's health.
const HEALTH_WINDOW_MS: i64 = 15 * 60 * 1000;

/// `GET /v1/providers`: limits, recent health, prices in force now.
pub async fn providers(State(s): State<S>) -> ApiResult<Json<Value>> {
    let now = Utc::now();
    let recent = s
        .db(move |s| {
            s.shared
                .store
                .recent_outcomes(now.timestamp_millis() - HEALTH_WINDOW_MS)
        })
        .await??;
    let batches = s
        .db(|s| s.shared.store.recent_provider_batches(200))
        .await??;
    let c = &s.catalog();
    let next_change = c.next_price_change(now, chrono::Duration::days(8));
    let live = s.shared.telemetry.live::<crate::dispatch::live::LiveView>();
    let data: Vec<Value> = c
        .providers
        .iter()
        .enumerate()
        .map(|(pi, p)| {
            let r = recent.get(&p.name).cloned().unwrap_or_default();
            let total = r.succeeded + r.failed;
            let status = if total == 0 {
                "idle"
            } else if r.failed * 2 > total {
                "failing"
            } else if r.failed > 0 {
                "degraded"
            } else {
                "ok"
            };
            let models: Vec<Value> = c
                .models
                .iter()
                .enumerate()
                .filter(|(_, m)| m.provider == pi && m.standard.is_none())
                .map(|(mi, m)| {
                    let window = c.window_at(mi, now).map(|w| w.name.clone());
                    let price = c.price_with_markup_at(mi, now);
                    // The same model on the flex and batch channels, priced beside it.
                    let channel = |row: Option<usize>| row.map(|f| {
                        let fp = c.price_with_markup_at(f, now);
                        let fl = c.models[f].list;
                        json!({
                            "list_price": {"input_per_mtok": fl.input_per_mtok, "output_per_mtok": fl.output_per_mtok},
                            "current_price": {"input_per_mtok": fp.input_per_mtok, "output_per_mtok": fp.output_per_mtok},
                        })
                    });
                    let flex = channel(c.flex_of(mi));
                    let batch = channel(c.batch_of(mi));
                    json!({
                        "name": m.name,
                        "endpoints": m.endpoints.iter().map(|e| e.as_url()).collect::<Vec<_>>(),
                        "list_price": {"input_per_mtok": m.list.input_per_mtok, "output_per_mtok": m.list.output_per_mtok},
                        "current_price": {
                            "input_per_mtok": price.input_per_mtok,
                            "output_per_mtok": price.output_per_mtok,
                        },
                        "price_window": window,
                        "flex": flex,
                        "batch": batch,
                    })
                })
                .collect();
            json!({
                "name": p.name,
                "simulated": p.simulated,
                "region": p.region,
                "markup": p.markup,
                // The flex channel's terms (null: none).
                "flex": p.flex.map(|f| json!({
                    "discount": f.discount,
                    "timeout_s": f.timeout.as_secs_f64(),
                    "backoff_s": f.backoff.as_secs_f64(),
                })),
                // The batch channel's terms and its recent batches (null: none).
                "batch": p.batch.as_ref().map(|b| json!({
                    "discount": b.discount,
                    "completion_window": b.completion_window,
                    "expected_turnaround_s": b.expected_turnaround.as_secs_f64(),
                    "max_requests": b.max_requests,
                    "max_bytes": b.max_bytes,
                    "poll_every_s": b.poll_every.as_secs_f64(),
                    "recent": batches.iter().filter(|x| x.provider == p.name).take(20)
                        .map(objects::provider_batch_json).collect::<Vec<_>>(),
                })),
                "limits": {"rpm": p.limits.rpm, "tpm": p.limits.tpm, "rpd": p.limits.rpd,
                           "concurrency": p.limits.concurrency, "reserve": p.limits.reserve},
                "health": {
                    "status": status,
                    // The dispatcher's live view: healthy, paused until, circuit open, disabled.
                    "dispatcher": s.shared.telemetry.health(&p.name),
                    "window_minutes": HEALTH_WINDOW_MS / 60_000,
                    "succeeded": r.succeeded,
                    "failed": r.failed,
                    "last_failure": r.last_failure.map(|(at, code, message)| json!({
                        "at": rfc3339(at), "code": code, "message": message})),
                },
                // The dispatcher's live view: circuit, pause and why, use of each limit, budgets.
                "live": live.as_ref().and_then(|v| Some(objects::live_json(v, v.provider(&p.name)?))),
                "models": models,
            })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "at": rfc3339(now.timestamp_millis()),
        "next_price_change": next_change.map(|t| rfc3339(t.timestamp_millis())),
        "dispatcher": live.as_ref().map(|v| json!({
            "at": rfc3339(v.at.timestamp_millis()),
            "in_flight": v.in_flight,
            "max_in_flight": v.max_in_flight,
        })),
        "data": data,
    })))
}

/// `GET /v1/stats`: the queue by state and provider, spend and savings.
pub async fn stats(State(s): State<S>) -> ApiResult<Json<Value>> {
    let now = Utc::now();
    let (st, by_route, budgets, spent_today, spent_month, daemons) = s
        .db(move |s| -> crate::store::Result<_> {
            Ok((
                s.shared.store.queue_stats()?,
                s.shared.store.queued_by_route()?,
                super::views::budgets_json(s, now)?,
                s.shared.store.spent_since(
                    None,
                    crate::domain::policy::Period::Day
                        .start(now)
                        .timestamp_millis(),
                )?,
                s.shared.store.spent_since(
                    None,
                    crate::domain::policy::Period::Month
                        .start(now)
                        .timestamp_millis(),
                )?,
                s.shared.store.daemons(now.timestamp_millis())?,
            ))
        })
        .await??;
    let store = &s.shared.store;
    let daemons: Vec<Value> = daemons
        .into_iter()
        .map(|d| {
            json!({
                "node": d.node, "host": d.host, "pid": d.pid, "version": d.version,
                "started_at": rfc3339(d.started_at), "heartbeat_at": rfc3339(d.heartbeat_at),
                "alive": d.alive, "planner": d.planner && d.alive,
            })
        })
        .collect();
    let database = json!({
        "backend": store.kind(),
        "node": store.node(),
        "planner": s.shared.coordination.borrow().planner,
        "daemons": daemons,
    });
    let mut queued_by_class: BTreeMap<String, u64> = BTreeMap::new();
    for (key, n) in by_route {
        let class = crate::domain::job::RouteKey::decode(&key).map_or(key, |k| k.model);
        *queued_by_class.entry(class).or_default() += n;
    }
    let mut by_state: BTreeMap<&str, u64> = JobState::ALL.iter().map(|x| (x.as_str(), 0)).collect();
    let mut providers: BTreeMap<String, BTreeMap<&str, Value>> = BTreeMap::new();
    let (mut spend, mut list_ok, mut cost_ok) = (st.late_cost_usd, 0.0, 0.0);
    for r in &st.rows {
        *by_state.entry(r.state.as_str()).or_default() += r.jobs;
        spend += r.cost_usd;
        if r.state == JobState::Succeeded {
            list_ok += r.list_cost_usd;
            cost_ok += r.cost_usd;
        }
        let name = r
            .provider
            .clone()
            .unwrap_or_else(|| "(not yet dispatched)".into());
        let e = providers.entry(name).or_default();
        e.insert(r.state.as_str(), json!(r.jobs));
        let add = |e: &mut BTreeMap<&str, Value>, k: &'static str, x: f64| {
            let prev = e.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            e.insert(k, json!(prev + x));
        };
        add(e, "cost_usd", r.cost_usd);
        add(e, "input_tokens", r.input_tokens as f64);
        add(e, "output_tokens", r.output_tokens as f64);
    }
    let providers: Vec<Value> = providers
        .into_iter()
        .map(|(name, mut m)| {
            for s in JobState::ALL {
                m.entry(s.as_str()).or_insert(json!(0));
            }
            if let Some(c) = m.get("cost_usd").and_then(Value::as_f64) {
                m.insert("cost_usd", usd(c));
            }
            let mut v = json!({"provider": name});
            for (k, x) in m {
                v[k] = x;
            }
            v
        })
        .collect();
    // As `nightshift report` counts it: duplicate (late) answers are spend too.
    let savings = list_ok - cost_ok - st.late_cost_usd;
    let next_change = s
        .catalog()
        .next_price_change(now, chrono::Duration::days(8));
    Ok(Json(json!({
        "object": "stats",
        "at": rfc3339(now.timestamp_millis()),
        "jobs": by_state,
        "queued_by_class": queued_by_class,
        "providers": providers,
        "budgets": budgets,
        "spend_usd": usd(spend),
        "spend_today_usd": usd(spent_today),
        "spend_month_usd": usd(spent_month),
        "succeeded_cost_usd": usd(cost_ok),
        "succeeded_list_cost_usd": usd(list_ok),
        "savings_usd": usd(savings),
        "savings_pct": if list_ok > 0.0 { json!((savings / list_ok * 1000.0).round() / 10.0) } else { Value::Null },
        "late_answers": st.late_answers,
        "late_cost_usd": usd(st.late_cost_usd),
        "next_price_change": next_change.map(|t| rfc3339(t.timestamp_millis())),
        "database": database,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_split_as_object_array_or_jsonl() {
        assert_eq!(split_body("{\"a\": 1}").unwrap(), vec![(1, "{\"a\": 1}")]);
        assert_eq!(
            split_body("{\n \"a\": 1\n}\n").unwrap(),
            vec![(1, "{\n \"a\": 1\n}")]
        );
        assert_eq!(
            split_body("[{\"a\":1}, {\"b\":2}]").unwrap(),
            vec![(1, "{\"a\":1}"), (2, "{\"b\":2}")]
        );
        assert_eq!(
            split_body("{\"a\":1}\n\n{\"b\":2}\r\n").unwrap(),
            vec![(1, "{\"a\":1}"), (3, "{\"b\":2}")]
        );
        // A byte order mark before an array, an object or JSONL.
        assert_eq!(
            split_body("\u{feff}[{\"a\":1}]").unwrap(),
            vec![(1, "{\"a\":1}")]
        );
        assert_eq!(
            split_body("\u{feff}{\"a\": 1}").unwrap(),
            vec![(1, "{\"a\": 1}")]
        );
        assert_eq!(split_body("  ").unwrap_err().code, Some("empty_body"));
        assert_eq!(split_body("[1,").unwrap_err().code, Some("invalid_json"));
    }
}
