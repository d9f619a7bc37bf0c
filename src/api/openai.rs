//! OpenAI's Batch API, so the official SDKs work with `base_url` pointed at
//! nightshift: upload a JSONL file (`purpose=batch`), create a batch from
//! it, poll it, download its output and error files.
//!
//! A batch's lines become one source of jobs (origin `upload`), validated by
//! [`crate::domain::job::parse_line`] like every other job, with the deadline
//! `created_at + completion_window` (a line's own `nightshift.deadline`
//! wins). Valid lines are queued and scheduled by the planner across all
//! providers; invalid ones go to the error file, as in the watched folder.
//! A batch none of whose lines is valid is `failed`.
//!
//! Creating a batch validates and queues it before answering, so the answer
//! already says `in_progress` (or `failed`). A crash in between leaves it
//! `validating`; the next start finishes it. A batch's status moves on when
//! it is read and its jobs are all final (`completed`, `expired` if a job
//! expired, `cancelled` after a cancel); its timestamps are when that
//! happened (its last job's completion), not when it was read.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use super::objects::{self, batch_json, file_json};
use super::result_files::streamed;
use super::{ApiState, S, count_param, id_param, parse_id, read_body};
use crate::domain::bounds;
use crate::domain::job::{self, JobContext, LineError};
use crate::domain::pricing::Endpoint;
use crate::results::write_results;
use crate::store::{BatchRow, FileKind, LineOutcome, NewBatch, NewSource, Origin, QueueError};

/// At most this many invalid lines are listed in a batch's `errors`; the
/// error file has them all.
const MAX_LISTED_ERRORS: usize = 1000;

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: u64) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE
        || e.body_text().contains("length limit")
    {
        ApiError::too_large(limit, "http.max_upload")
    } else {
        ApiError::bad_request(
            format!("invalid multipart body: {}", e.body_text()),
            None,
            "invalid_multipart",
        )
    }
}

/// `POST /v1/files` (multipart: `purpose=batch`, `file`).
pub async fn upload_file(State(s): State<S>, req: Request) -> ApiResult<Json<Value>> {
    let limit = s.max_upload;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit, "http.max_upload"));
    }
    let req = req.map(|b| Body::new(http_body_util::Limited::new(b, limit as usize)));
    let mut form = Multipart::from_request(req, &()).await.map_err(|e| {
        ApiError::bad_request(
            format!("expected a multipart/form-data body: {}", e.body_text()),
            None,
            "invalid_multipart",
        )
    })?;
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|e| multipart_error(e, limit))?)
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
                file = Some((name, bytes));
            }
            _ => {}
        }
    }
    let missing = |p: &str| {
        ApiError::bad_request(
            format!("missing required parameter: '{p}'"),
            Some(p),
            "missing_required_parameter",
        )
    };
    let purpose = purpose.ok_or_else(|| missing("purpose"))?;
    if purpose != "batch" {
        return Err(ApiError::bad_request(
            format!("purpose '{purpose}' is not supported: nightshift accepts purpose=batch"),
            Some("purpose"),
            "invalid_value",
        ));
    }
    let (name, bytes) = file.ok_or_else(|| missing("file"))?;
    let now_ms = Utc::now().timestamp_millis();
    let row = s
        .db(move |s| s.shared.store.insert_file("batch", &name, &bytes, now_ms))
        .await??;
    Ok(Json(file_json(&row)))
}

/// `GET /v1/files/{id}`.
pub async fn get_file(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let n = parse_id(&id, "file-").ok_or_else(|| ApiError::not_found("file", &id))?;
    let row = s.db(move |s| s.shared.store.file(n)).await??;
    row.map(|f| Json(file_json(&f)))
        .ok_or_else(|| ApiError::not_found("file", &id))
}

/// `GET /v1/files/{id}/content`: an upload as stored, or a batch's output
/// or error file produced from the database, streamed.
pub async fn file_content(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Response> {
    let n = parse_id(&id, "file-").ok_or_else(|| ApiError::not_found("file", &id))?;
    let found = s
        .db(move |s| -> ApiResult<_> {
            let Some(f) = s.shared.store.file(n)? else {
                return Ok(None);
            };
            let source = match (f.kind, f.batch_id) {
                (FileKind::Input, _) | (_, None) => None,
                (_, Some(b)) => {
                    let source_id = s.shared.store.batch(b)?.and_then(|b| b.source_id);
                    match source_id {
                        Some(sid) => s.shared.store.source_info(sid)?.map(|i| (i.id, i.stem)),
                        None => None,
                    }
                }
            };
            Ok(Some((f, source)))
        })
        .await??;
    let Some((f, source)) = found else {
        return Err(ApiError::not_found("file", &id));
    };
    let body = match (f.kind, source) {
        (FileKind::Input, _) => streamed(s.shared.store.clone(), move |store, w| {
            store
                .file_content(f.id, 1 << 20, |piece| w.write_all(&piece))
                .map_err(|e| match e {
                    QueueError::Read(e) => e,
                    other => std::io::Error::other(other.to_string()),
                })
        }),
        (kind, Some((source_id, stem))) => streamed(s.shared.store.clone(), move |store, w| {
            write_results(store, source_id, &stem, kind, w)
        }),
        (_, None) => Body::empty(),
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/jsonl".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", f.filename.replace('"', "")),
            ),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Value>,
}

/// `POST /v1/batches`: validates the file's lines and queues the valid ones.
pub async fn create_batch(
    State(s): State<S>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let bytes = read_body(&headers, body, s.max_body, "http.max_body").await?;
    let req: CreateBatch =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&bytes))
            .map_err(ApiError::from_body_error)?;
    if Endpoint::from_url(&req.endpoint).is_none() {
        return Err(ApiError::bad_request(
            format!(
                "endpoint '{}' is not supported (expected /v1/chat/completions or /v1/embeddings)",
                req.endpoint
            ),
            Some("endpoint"),
            "invalid_value",
        ));
    }
    let window = crate::domain::units::parse_duration(&req.completion_window)
        .ok()
        .filter(|w| !w.is_zero())
        .ok_or_else(|| {
            ApiError::bad_request(
                format!(
                    "completion_window '{}' is not a duration like 24h, 90m or 2d",
                    req.completion_window
                ),
                Some("completion_window"),
                "invalid_value",
            )
        })?;
    if window > bounds::MAX_DEADLINE {
        return Err(ApiError::bad_request(
            format!(
                "completion_window '{}' is longer than the limit of {}",
                req.completion_window,
                bounds::show(bounds::MAX_DEADLINE)
            ),
            Some("completion_window"),
            "invalid_value",
        ));
    }
    let metadata = match &req.metadata {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            check_metadata(m)?;
            Some(Value::Object(m.clone()).to_string())
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "metadata must be an object of string keys and values",
                Some("metadata"),
                "invalid_value",
            ));
        }
    };
    let file = parse_id(&req.input_file_id, "file-");
    let now = Utc::now();
    let out = s
        .db(move |s| -> ApiResult<Option<Value>> {
            let Some(f) = file.map(|n| s.shared.store.file(n)).transpose()?.flatten() else {
                return Ok(None);
            };
            if f.kind != FileKind::Input || f.purpose != "batch" {
                return Err(ApiError::bad_request(
                    format!(
                        "{} is not an uploaded batch input file",
                        objects::file_id(f.id)
                    ),
                    Some("input_file_id"),
                    "invalid_value",
                ));
            }
            let now_ms = now.timestamp_millis();
            let expires_at = bounds::add(now, window).timestamp_millis();
            let id = s.shared.store.create_batch(&NewBatch {
                input_file_id: f.id,
                endpoint: &req.endpoint,
                completion_window: &req.completion_window,
                metadata: metadata.as_deref(),
                now_ms,
                expires_at,
            })?;
            let batch = s
                .shared
                .store
                .batch(id)?
                .ok_or_else(|| ApiError::internal("a batch vanished after its insert"))?;
            validate_batch(s, &batch, None)?;
            Ok(Some(batch_view(s, id)?.expect("the batch exists")))
        })
        .await??;
    let out = out.ok_or_else(|| ApiError {
        param: Some("input_file_id".into()),
        ..ApiError::not_found("file", &req.input_file_id)
    })?;
    s.queue_changed();
    Ok(Json(out))
}

/// OpenAI's limits on batch metadata: at most 16 pairs, keys of at most 64
/// characters, string values of at most 512.
fn check_metadata(m: &serde_json::Map<String, Value>) -> ApiResult<()> {
    let bad = |message: String| {
        Err(ApiError::bad_request(
            message,
            Some("metadata"),
            "invalid_value",
        ))
    };
    if m.len() > 16 {
        return bad(format!(
            "metadata has {} pairs, above the limit of 16",
            m.len()
        ));
    }
    for (k, v) in m {
        if k.chars().count() > 64 {
            return bad("metadata keys are at most 64 characters".into());
        }
        match v {
            Value::String(v) if v.chars().count() <= 512 => {}
            Value::String(_) => {
                return bad(format!("metadata value of '{k}' is above 512 characters"));
            }
            _ => return bad(format!("metadata value of '{k}' is not a string")),
        }
    }
    Ok(())
}

/// A batch's JSON, its counts read now.
fn batch_view(s: &ApiState, id: i64) -> crate::store::Result<Option<Value>> {
    let Some(b) = s.shared.store.batch(id)? else {
        return Ok(None);
    };
    let counts = b
        .source_id
        .map(|sid| s.shared.store.batch_counts(sid))
        .transpose()?;
    Ok(Some(batch_json(&b, counts.as_ref())))
}

/// Validates a `validating` batch's lines and queues the valid ones (one
/// transaction), then marks it `in_progress` or `failed`. `existing` is the
/// source of its jobs if a crash came after they were queued.
fn validate_batch(s: &ApiState, batch: &BatchRow, existing: Option<i64>) -> ApiResult<()> {
    let now_ms = Utc::now().timestamp_millis();
    let listed = |errors: Vec<Value>| {
        Some(Value::Array(errors.into_iter().take(MAX_LISTED_ERRORS).collect()).to_string())
    };
    let stored_errors = |source_id: i64| -> ApiResult<Vec<Value>> {
        Ok(s.shared.store
            .line_errors_of(source_id)?
            .into_iter()
            .map(|e| {
                let message = match &e.field {
                    Some(f) => format!("line {}: {f}: {}", e.line, e.message),
                    None => format!("line {}: {}", e.line, e.message),
                };
                json!({"code": "invalid_line", "message": message, "param": e.field, "line": e.line})
            })
            .collect())
    };
    let (source_id, failed, errors) = match existing {
        Some(sid) => {
            let counts = s.shared.store.batch_counts(sid)?;
            (Some(sid), counts.jobs() == 0, listed(stored_errors(sid)?))
        }
        None => {
            let mut content = Vec::new();
            s.shared
                .store
                .file_content(batch.input_file_id, 1 << 20, |piece| {
                    content.extend_from_slice(&piece);
                    Ok(())
                })?;
            match std::str::from_utf8(&content) {
                Err(e) => {
                    let line = content[..e.valid_up_to()]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        + 1;
                    let err = json!({"code": "invalid_file", "line": line, "param": null,
                                     "message": format!("line {line}: not valid UTF-8")});
                    (None, true, listed(vec![err]))
                }
                Ok(text) => {
                    let created = DateTime::<Utc>::from_timestamp_millis(batch.created_at)
                        .unwrap_or_else(Utc::now);
                    let catalog = s.catalog();
                    let ctx = JobContext {
                        catalog: &catalog,
                        now: created,
                        default_deadline: std::time::Duration::from_millis(
                            (batch.expires_at - batch.created_at).max(1) as u64,
                        ),
                    };
                    let endpoint = batch.endpoint.as_str();
                    let lines = crate::ingest::jsonl::lines(text).map(|(line, l)| {
                        let job = job::parse_line(l, &ctx).and_then(|j| {
                            if j.endpoint.as_url() == endpoint {
                                Ok(j)
                            } else {
                                Err(LineError {
                                    custom_id: Some(j.custom_id.clone()),
                                    field: Some("url".into()),
                                    message: format!(
                                        "'{}' does not match the batch's endpoint '{endpoint}'",
                                        j.endpoint.as_url()
                                    ),
                                })
                            }
                        });
                        Ok(LineOutcome { line, job })
                    });
                    let name = s
                        .shared
                        .store
                        .file(batch.input_file_id)?
                        .map_or_else(|| "batch.jsonl".to_string(), |f| f.filename);
                    let stem = format!("batch_{}", batch.id);
                    let summary = s.shared.store.ingest_batch(
                        batch.id,
                        &NewSource {
                            origin: Origin::Upload,
                            name: &name,
                            stem: &stem,
                            sha256: None,
                            now_ms: batch.created_at,
                        },
                        lines,
                    )?;
                    let mut errors = stored_errors(summary.source_id)?;
                    if summary.total_lines == 0 {
                        errors.push(json!({"code": "empty_file", "line": null, "param": null,
                                           "message": "the input file holds no request"}));
                    }
                    (Some(summary.source_id), summary.queued == 0, listed(errors))
                }
            }
        }
    };
    s.shared
        .store
        .start_batch(batch.id, source_id, failed, errors.as_deref(), now_ms)?;
    Ok(())
}

/// Finishes the batches a crash left in `validating`. Returns how many.
pub fn recover_validating(s: &ApiState) -> anyhow::Result<usize> {
    let open = s.shared.store.validating_batches()?;
    for (batch, source) in &open {
        validate_batch(s, batch, *source).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    }
    Ok(open.len())
}

/// `GET /v1/batches/{id}`.
pub async fn get_batch(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let n = parse_id(&id, "batch_").ok_or_else(|| ApiError::not_found("batch", &id))?;
    let out = s
        .db(move |s| -> ApiResult<_> { Ok(batch_view(s, n)?) })
        .await??;
    out.map(Json)
        .ok_or_else(|| ApiError::not_found("batch", &id))
}

#[derive(Deserialize, Default)]
pub struct ListBatches {
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/batches?after=&limit=`: newest first; `after` is the last id of
/// the previous page.
pub async fn list_batches(
    State(s): State<S>,
    q: Result<Query<ListBatches>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|e| {
        ApiError::bad_request(
            format!("invalid query string: {}", e.body_text()),
            None,
            "invalid_query",
        )
    })?;
    let after = id_param(q.after.as_deref(), "batch_", "after", "a batch id")?;
    let limit = count_param(q.limit.as_deref(), "limit", 20, 1..=100)?;
    let data = s
        .db(move |s| -> ApiResult<Vec<Value>> {
            let rows = s.shared.store.list_batches(after, limit + 1)?;
            rows.iter()
                .map(|b| {
                    let counts = b
                        .source_id
                        .map(|sid| s.shared.store.batch_counts(sid))
                        .transpose()?;
                    Ok(batch_json(b, counts.as_ref()))
                })
                .collect()
        })
        .await??;
    let has_more = data.len() > limit;
    let data: Vec<Value> = data.into_iter().take(limit).collect();
    Ok(Json(json!({
        "object": "list",
        "first_id": data.first().map(|b| b["id"].clone()),
        "last_id": data.last().map(|b| b["id"].clone()),
        "has_more": has_more,
        "data": data,
    })))
}

/// `POST /v1/batches/{id}/cancel`: cancels its queued jobs at once; the
/// batch is `cancelling` until its running requests finish, then `cancelled`.
pub async fn cancel_batch(State(s): State<S>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let n = parse_id(&id, "batch_").ok_or_else(|| ApiError::not_found("batch", &id))?;
    let now_ms = Utc::now().timestamp_millis();
    let out = s
        .db(move |s| -> ApiResult<Option<Value>> {
            let Some(b) = s.shared.store.batch(n)? else {
                return Ok(None);
            };
            match b.status.as_str() {
                "in_progress" | "finalizing" => {
                    s.shared.store.cancel_batch(n, now_ms)?;
                    // The cancel finished every queued job: the batch may be
                    // done now (a running one ends on the completion path).
                    crate::results::close_finished_batches(&s.shared.store)
                        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
                }
                "cancelling" | "cancelled" => {}
                other => {
                    return Err(ApiError::conflict(
                        format!(
                            "{} is {other} and cannot be cancelled",
                            objects::batch_id(n)
                        ),
                        "batch_not_cancellable",
                    ));
                }
            }
            Ok(batch_view(s, n)?)
        })
        .await??;
    s.queue_changed();
    out.map(Json)
        .ok_or_else(|| ApiError::not_found("batch", &id))
}
