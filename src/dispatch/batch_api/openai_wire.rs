//! OpenAI's files + batches (also Groq, Together, xAI): `base_url` ends in
//! `/v1`, so files are `{base}/files` and batches `{base}/batches`.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{
    BatchError, BatchLine, Http, LineResult, MAX_FIND_PAGES, MAX_RESULTS_BYTES, RemoteBatch,
    RemoteState, TRANSFER_TIMEOUT, answer, checked_json, download_lines, is_success, segment,
};
use crate::dispatch::provider::{parse_usage, with_model};
use crate::dispatch::reliability::{Outcome, Signals};
use crate::domain::pricing::Endpoint;

/// How many of a failed batch's errors its message quotes.
const QUOTED_ERRORS: usize = 5;

pub(super) async fn upload(
    http: &Http<'_>,
    tag: &str,
    endpoint: Endpoint,
    model: &str,
    lines: &[BatchLine],
) -> Result<String, BatchError> {
    let mut jsonl = Vec::new();
    for line in lines {
        let body = with_model(&line.body, model).map_err(|e| BatchError::Refused {
            status: 400,
            message: format!("{}: the body is not a JSON object: {e}", line.custom_id),
        })?;
        let entry = json!({
            "custom_id": line.custom_id,
            "method": "POST",
            "url": endpoint.as_url(),
            "body": body,
        });
        serde_json::to_writer(&mut jsonl, &entry).expect("a JSON value serialises");
        jsonl.push(b'\n');
    }
    let file = reqwest::multipart::Part::bytes(jsonl)
        .file_name(format!("nightshift-{tag}.jsonl"))
        .mime_str("application/jsonl")
        .expect("a valid MIME type");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part("file", file);
    let url = format!("{}/files", http.base_url);
    let a = answer(
        http.post(&url).multipart(form).timeout(TRANSFER_TIMEOUT),
        &url,
    )
    .await?;
    let v = checked_json(&a, &url)?;
    match v["id"].as_str() {
        Some(id) if !id.is_empty() => Ok(id.to_string()),
        _ => Err(BatchError::Transient(format!(
            "{url}: the answer names no file id"
        ))),
    }
}

pub(super) async fn create(
    http: &Http<'_>,
    tag: &str,
    file: Option<&str>,
    endpoint: Endpoint,
    completion_window: &str,
) -> Result<RemoteBatch, BatchError> {
    let Some(file) = file else {
        return Err(BatchError::Refused {
            status: 400,
            message: "an OpenAI batch needs an uploaded input file".into(),
        });
    };
    let url = format!("{}/batches", http.base_url);
    let body = json!({
        "input_file_id": file,
        "endpoint": endpoint.as_url(),
        "completion_window": completion_window,
        "metadata": {"nightshift_batch": tag},
    });
    let a = answer(http.post(&url).json(&body), &url).await?;
    let v = checked_json(&a, &url)?;
    http.remote(&v, &url)
}

pub(super) async fn get(http: &Http<'_>, id: &str) -> Result<RemoteBatch, BatchError> {
    let url = format!("{}/batches/{}", http.base_url, segment(id));
    http.get_batch(&url).await
}

/// Newest first, stopping at the first batch created before `since`.
pub(super) async fn find(
    http: &Http<'_>,
    tag: &str,
    since: DateTime<Utc>,
) -> Result<Option<RemoteBatch>, BatchError> {
    let since = since.timestamp();
    let mut after: Option<String> = None;
    for _ in 0..MAX_FIND_PAGES {
        let mut url = format!("{}/batches?limit=100", http.base_url);
        if let Some(a) = &after {
            url.push_str(&format!("&after={}", segment(a)));
        }
        let page = http.get_json(&url).await?;
        let data = page["data"]
            .as_array()
            .ok_or_else(|| BatchError::Transient(format!("{url}: the answer is not a list")))?;
        for b in data {
            if b["created_at"].as_i64().is_some_and(|c| c < since) {
                return Ok(None);
            }
            if b["metadata"]["nightshift_batch"].as_str() == Some(tag) {
                return http.remote(b, &url).map(Some);
            }
        }
        let next = page["last_id"]
            .as_str()
            .or_else(|| data.last().and_then(|b| b["id"].as_str()));
        match next {
            Some(next) if page["has_more"] == true && after.as_deref() != Some(next) => {
                after = Some(next.to_string());
            }
            _ => return Ok(None),
        }
    }
    tracing::warn!(
        pages = MAX_FIND_PAGES,
        tag,
        "batch lookup stopped before reaching the batches created before the daemon's"
    );
    Ok(None)
}

/// An OpenAI batch object.
pub(super) fn remote(v: &Value) -> Option<RemoteBatch> {
    let id = v["id"].as_str()?;
    let status = v["status"].as_str()?;
    let file = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let state = match status {
        "validating" | "in_progress" | "finalizing" => RemoteState::Running,
        "cancelling" => RemoteState::Cancelling,
        "completed" | "expired" | "cancelled" => RemoteState::Ended {
            output: file("output_file_id"),
            errors: file("error_file_id"),
        },
        "failed" => RemoteState::Failed {
            message: failure(v),
        },
        other => {
            tracing::warn!(
                batch = id,
                status = other,
                "unknown batch status; taken as running"
            );
            RemoteState::Running
        }
    };
    let count = |k: &str| v["request_counts"][k].as_u64().unwrap_or(0);
    Some(RemoteBatch {
        id: id.to_string(),
        state,
        status: status.to_string(),
        total: count("total"),
        finished: count("completed").saturating_add(count("failed")),
    })
}

/// Why a batch failed: its `errors.data[].message` (with their line).
fn failure(v: &Value) -> String {
    let errors = v["errors"]["data"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut parts: Vec<String> = errors
        .iter()
        .take(QUOTED_ERRORS)
        .map(|e| {
            let message = e["message"]
                .as_str()
                .or(e["code"].as_str())
                .unwrap_or("no message");
            match e["line"].as_u64() {
                Some(line) => format!("line {line}: {message}"),
                None => message.to_string(),
            }
        })
        .collect();
    if errors.len() > QUOTED_ERRORS {
        parts.push(format!("and {} more", errors.len() - QUOTED_ERRORS));
    }
    if parts.is_empty() {
        "the provider failed the batch and gave no reason".into()
    } else {
        parts.join("; ")
    }
}

pub(super) async fn results(
    http: &Http<'_>,
    batch: &str,
    (output, errors): (Option<String>, Option<String>),
) -> Result<Vec<LineResult>, BatchError> {
    let mut out = Vec::new();
    let mut budget = MAX_RESULTS_BYTES;
    for (which, file) in [("output", output), ("error", errors)] {
        let Some(file) = file else { continue };
        let url = format!("{}/files/{}/content", http.base_url, segment(&file));
        download_lines(
            http.get(&url),
            &url,
            batch,
            &mut budget,
            |n, line| match result_line(line) {
                Ok(r) => out.push(r),
                Err(why) => tracing::warn!(
                    batch,
                    file = which,
                    line = n,
                    "batch result line skipped: {why}"
                ),
            },
        )
        .await?;
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Line<'a> {
    custom_id: String,
    #[serde(default, borrow)]
    response: Option<LineResponse<'a>>,
    #[serde(default)]
    error: Option<LineError>,
}

#[derive(Deserialize)]
struct LineResponse<'a> {
    status_code: u16,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Deserialize)]
struct LineError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// One line of an output or error file.
fn result_line(line: &[u8]) -> Result<LineResult, String> {
    let l: Line = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let outcome = match (l.response, l.error) {
        (Some(r), _) => {
            let body = r.body.get().to_string();
            if !is_success(r.status_code) {
                Some(Outcome::HttpError {
                    status: r.status_code,
                    request_id: r.request_id,
                    body,
                    signals: Signals::default(),
                })
            } else {
                Some(match parse_usage(&body) {
                    Some(usage) => Outcome::Success {
                        status: r.status_code,
                        request_id: r.request_id,
                        body,
                        usage,
                        signals: Signals::default(),
                    },
                    None => Outcome::NoAnswer {
                        code: "malformed_response",
                        message: format!(
                            "{}: HTTP {} without a JSON body carrying usage",
                            l.custom_id, r.status_code
                        ),
                    },
                })
            }
        }
        (None, Some(e)) => match e.code.as_deref() {
            // Not run before the batch expired or was cancelled: not billed.
            Some("batch_expired" | "batch_cancelled") => None,
            code => Some(Outcome::NoAnswer {
                code: "batch_line_error",
                message: format!(
                    "{}: {}: {}",
                    l.custom_id,
                    code.unwrap_or("error"),
                    e.message.as_deref().unwrap_or("no message")
                ),
            }),
        },
        (None, None) => return Err(format!("{}: neither a response nor an error", l.custom_id)),
    };
    Ok(LineResult {
        custom_id: l.custom_id,
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_states() {
        for (status, running) in [
            ("validating", true),
            ("in_progress", true),
            ("finalizing", true),
            ("completed", false),
        ] {
            let b = remote(&json!({"id": "b", "status": status})).unwrap();
            assert_eq!(b.state == RemoteState::Running, running, "{status}");
        }
        let b = remote(&json!({"id": "b", "status": "cancelling",
            "request_counts": {"total": 5, "completed": 2, "failed": 1}}))
        .unwrap();
        assert_eq!(
            (b.state, b.total, b.finished),
            (RemoteState::Cancelling, 5, 3)
        );
        let b = remote(&json!({"id": "b", "status": "expired",
            "output_file_id": "file-o", "error_file_id": null}))
        .unwrap();
        assert_eq!(
            b.state,
            RemoteState::Ended {
                output: Some("file-o".into()),
                errors: None
            }
        );
        let b = remote(
            &json!({"id": "b", "status": "failed", "errors": {"object": "list",
            "data": [{"code": "invalid_json_line", "message": "not JSON", "line": 3}]}}),
        )
        .unwrap();
        assert_eq!(
            b.state,
            RemoteState::Failed {
                message: "line 3: not JSON".into()
            }
        );
        assert_eq!(remote(&json!({"status": "completed"})), None);
    }

    #[test]
    fn result_lines_become_outcomes() {
        let ok = br#"{"id":"r1","custom_id":"a","response":{"status_code":200,"request_id":"q","body":{"usage":{"prompt_tokens":7,"completion_tokens":2}}},"error":null}"#;
        let r = result_line(ok).unwrap();
        assert!(
            matches!(r.outcome, Some(Outcome::Success { usage, .. }) if usage.input_tokens == 7)
        );
        let failed = br#"{"custom_id":"b","response":{"status_code":500,"body":{"error":{"message":"x"}}},"error":null}"#;
        assert!(matches!(
            result_line(failed).unwrap().outcome,
            Some(Outcome::HttpError { status: 500, ref body, .. }) if body == r#"{"error":{"message":"x"}}"#
        ));
        let expired =
            br#"{"custom_id":"c","response":null,"error":{"code":"batch_expired","message":"m"}}"#;
        assert_eq!(result_line(expired).unwrap().outcome, None);
        let other = br#"{"custom_id":"d","response":null,"error":{"code":"boom","message":"m"}}"#;
        assert!(matches!(
            result_line(other).unwrap().outcome,
            Some(Outcome::NoAnswer {
                code: "batch_line_error",
                ..
            })
        ));
        assert!(result_line(br#"{"custom_id":"e"}"#).is_err());
        assert!(result_line(b"not json").is_err());
    }
}
