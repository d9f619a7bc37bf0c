//! Aggregate views the dashboard draws (and scripts may read): each class's
//! cheapest price over the coming hours, the newest sources with their
//! progress, and what every budget has left.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiResult;
use super::objects::{self, rfc3339, usd};
use super::{ApiState, S, count_param, id_param};
use crate::domain::policy::Period;
use crate::domain::pricing::{TYPICAL_INPUT, TYPICAL_OUTPUT};

#[derive(Deserialize, Default)]
pub struct PricesQuery {
    hours: Option<String>,
}

/// How far ahead `/v1/prices` looks at most: a week.
const MAX_HOURS: usize = 168;

/// `GET /v1/prices?hours=48`: for each class, its cheapest effective price
/// (markup included) for a typical job, as steps from now that change only
/// where a price window opens or closes.
pub async fn prices(
    State(s): State<S>,
    q: Result<Query<PricesQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = super::query(q)?;
    let hours = count_param(q.hours.as_deref(), "hours", 48, 1..=MAX_HOURS)? as i64;
    let catalog = s.catalog();
    let from = Utc::now();
    let to = from + Duration::hours(hours);
    let classes: Vec<Value> = catalog
        .classes
        .keys()
        .map(|class| {
            let steps: Vec<Value> = catalog
                .cheapest_steps(class, from, to, TYPICAL_INPUT, TYPICAL_OUTPUT)
                .iter()
                .map(|st| {
                    let m = &catalog.models[st.model];
                    json!({
                        "from": rfc3339(st.from.timestamp_millis()),
                        "to": rfc3339(st.to.timestamp_millis()),
                        "provider": catalog.providers[m.provider].name,
                        "model": m.name,
                        "input_per_mtok": st.input_per_mtok,
                        "output_per_mtok": st.output_per_mtok,
                        "typical_job_usd": st.job_usd,
                    })
                })
                .collect();
            json!({"class": class, "steps": steps})
        })
        .collect();
    Ok(Json(json!({
        "object": "prices",
        "from": rfc3339(from.timestamp_millis()),
        "to": rfc3339(to.timestamp_millis()),
        "typical_job": {"input_tokens": TYPICAL_INPUT, "output_tokens": TYPICAL_OUTPUT},
        "classes": classes,
    })))
}

#[derive(Deserialize, Default)]
pub struct SourcesQuery {
    before: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/sources?before=&limit=`: the newest sources (dropped files,
/// API submissions, batches), newest first, with their jobs by state.
pub async fn sources(
    State(s): State<S>,
    q: Result<Query<SourcesQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = super::query(q)?;
    let before = id_param(q.before.as_deref(), "sub_", "before", "a submission id")?;
    let limit = count_param(q.limit.as_deref(), "limit", 20, 1..=200)?;
    let mut rows = s
        .db(move |s| s.shared.store.list_sources(before, limit + 1))
        .await??;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    let data: Vec<Value> = rows.iter().map(objects::submission_json).collect();
    Ok(Json(json!({
        "object": "list",
        "first_id": data.first().map(|d| d["id"].clone()),
        "last_id": data.last().map(|d| d["id"].clone()),
        "has_more": has_more,
        "data": data,
    })))
}

/// Every configured budget with what its current period has spent (jobs
/// finished since the period began, late answers included) and when it
/// renews. Blocking: reads the store.
pub fn budgets_json(state: &ApiState, now: DateTime<Utc>) -> crate::store::Result<Value> {
    let live = state.shared.live.borrow().clone();
    let mut out = Vec::new();
    for b in &live.budgets {
        let provider = b.provider.map(|p| live.catalog.providers[p].name.clone());
        let start = b.period.start(now);
        let spent = state
            .shared
            .store
            .spent_since(provider.as_deref(), start.timestamp_millis())?;
        out.push(json!({
            "provider": provider,
            "period": match b.period { Period::Day => "day", Period::Month => "month" },
            "cap_usd": usd(b.cap_usd),
            "spent_usd": usd(spent),
            "remaining_usd": usd((b.cap_usd - spent).max(0.0)),
            "renews_at": rfc3339(b.period.next_start(now).timestamp_millis()),
        }));
    }
    Ok(Value::Array(out))
}
