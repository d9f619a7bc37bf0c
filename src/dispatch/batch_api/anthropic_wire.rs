//! Anthropic's Message Batches: `base_url` has no `/v1`; the requests go
//! inline with the create, results come from the batch's `results_url`.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{
    BatchError, BatchLine, Http, LineResult, MAX_FIND_PAGES, MAX_RESULTS_BYTES, RemoteBatch,
    RemoteState, TRANSFER_TIMEOUT, answer, checked_json, download_lines, segment,
};
use crate::dispatch::provider::{Answer, anthropic_success, with_model};
use crate::dispatch::reliability::{Outcome, Signals};
use crate::domain::anthropic;
use crate::domain::pricing::Endpoint;

pub(super) async fn create(
    http: &Http<'_>,
    endpoint: Endpoint,
    model: &str,
    lines: &[BatchLine],
) -> Result<RemoteBatch, BatchError> {
    if endpoint != Endpoint::ChatCompletions {
        return Err(BatchError::Refused {
            status: 400,
            message: format!("Anthropic's API does not serve {}", endpoint.as_url()),
        });
    }
    let mut requests = Vec::with_capacity(lines.len());
    for line in lines {
        let refused = |message: String| BatchError::Refused {
            status: 400,
            message: format!("{}: {message}", line.custom_id),
        };
        let body = with_model(&line.body, model)
            .map_err(|e| refused(format!("the body is not a JSON object: {e}")))?;
        let params = anthropic::request(&body, model).map_err(|e| refused(e.to_string()))?;
        requests.push(json!({"custom_id": line.custom_id, "params": params}));
    }
    let url = format!("{}/v1/messages/batches", http.base_url);
    let body = json!({ "requests": requests });
    let a = answer(http.post(&url).json(&body).timeout(TRANSFER_TIMEOUT), &url).await?;
    let v = checked_json(&a, &url)?;
    http.remote(&v, &url)
}

pub(super) async fn get(http: &Http<'_>, id: &str) -> Result<RemoteBatch, BatchError> {
    let url = format!("{}/v1/messages/batches/{}", http.base_url, segment(id));
    http.get_batch(&url).await
}

/// Newest first: the last match seen before the batches created before
/// `since` is the earliest one after it.
pub(super) async fn find(
    http: &Http<'_>,
    since: DateTime<Utc>,
    requests: u64,
    taken: &[String],
) -> Result<Option<RemoteBatch>, BatchError> {
    let mut found = None;
    let mut after: Option<String> = None;
    for _ in 0..MAX_FIND_PAGES {
        let mut url = format!("{}/v1/messages/batches?limit=100", http.base_url);
        if let Some(a) = &after {
            url.push_str(&format!("&after_id={}", segment(a)));
        }
        let page = http.get_json(&url).await?;
        let data = page["data"]
            .as_array()
            .ok_or_else(|| BatchError::Transient(format!("{url}: the answer is not a list")))?;
        for v in data {
            let created = v["created_at"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
            let Some(created) = created else { continue };
            if created < since {
                return Ok(found);
            }
            let Some(b) = remote(v) else { continue };
            if b.total == requests && !taken.contains(&b.id) {
                found = Some(b);
            }
        }
        let next = page["last_id"]
            .as_str()
            .or_else(|| data.last().and_then(|b| b["id"].as_str()));
        match next {
            Some(next) if page["has_more"] == true && after.as_deref() != Some(next) => {
                after = Some(next.to_string());
            }
            _ => return Ok(found),
        }
    }
    tracing::warn!(
        pages = MAX_FIND_PAGES,
        "batch lookup stopped before reaching the batches created before the daemon's"
    );
    Ok(found)
}

/// A Message Batch object.
pub(super) fn remote(v: &Value) -> Option<RemoteBatch> {
    let id = v["id"].as_str()?;
    let status = v["processing_status"].as_str()?;
    let state = match status {
        "in_progress" => RemoteState::Running,
        "canceling" => RemoteState::Cancelling,
        "ended" => RemoteState::Ended {
            output: v["results_url"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            errors: None,
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
    let total = ["processing", "succeeded", "errored", "canceled", "expired"]
        .iter()
        .fold(0u64, |sum, k| sum.saturating_add(count(k)));
    Some(RemoteBatch {
        id: id.to_string(),
        state,
        status: status.to_string(),
        total,
        finished: count("succeeded").saturating_add(count("errored")),
    })
}

pub(super) async fn results(
    http: &Http<'_>,
    batch: &str,
    results_url: Option<String>,
) -> Result<Vec<LineResult>, BatchError> {
    let own = format!(
        "{}/v1/messages/batches/{}/results",
        http.base_url,
        segment(batch)
    );
    // The API key goes only to the configured provider.
    let url = match results_url {
        Some(u) if u.starts_with(&format!("{}/", http.base_url)) => u,
        Some(u) => {
            tracing::warn!(
                batch,
                results_url = %u,
                "results_url is not on the provider's base_url; using {own}"
            );
            own
        }
        None => own,
    };
    let mut out = Vec::new();
    let mut budget = MAX_RESULTS_BYTES;
    download_lines(
        http.get(&url),
        &url,
        batch,
        &mut budget,
        |n, line| match result_line(line, batch) {
            Ok(r) => out.push(r),
            Err(why) => tracing::warn!(batch, line = n, "batch result line skipped: {why}"),
        },
    )
    .await?;
    Ok(out)
}

#[derive(Deserialize)]
struct Line<'a> {
    custom_id: String,
    #[serde(borrow)]
    result: LineBody<'a>,
}

#[derive(Deserialize)]
struct LineBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
}

/// The HTTP status a Messages API error type is answered with.
pub(super) fn error_status(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        // api_error, and any type this client does not know.
        _ => 500,
    }
}

/// One line of a batch's results.
fn result_line(line: &[u8], batch: &str) -> Result<LineResult, String> {
    let l: Line = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let outcome = match l.result.kind.as_str() {
        "succeeded" => {
            let message = l
                .result
                .message
                .ok_or_else(|| format!("{}: succeeded without a message", l.custom_id))?;
            let a = Answer {
                status: 200,
                request_id: None,
                body: message.get().to_string(),
                signals: Signals::default(),
            };
            Some(anthropic_success(
                a,
                &format!("batch {batch}, line {}", l.custom_id),
            ))
        }
        "errored" => {
            let error = l.result.error.unwrap_or(Value::Null);
            // The error response as the synchronous API answers it:
            // {"type": "error", "error": {"type", "message"}}.
            let body = if error["type"] == "error" {
                error
            } else {
                json!({"type": "error", "error": error})
            };
            Some(Outcome::HttpError {
                status: error_status(body["error"]["type"].as_str().unwrap_or_default()),
                request_id: body["request_id"].as_str().map(str::to_owned),
                body: body.to_string(),
                signals: Signals::default(),
            })
        }
        // Not run: not billed.
        "canceled" | "expired" => None,
        other => return Err(format!("{}: unknown result type {other:?}", l.custom_id)),
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
    fn batch_objects_and_result_lines_translate() {
        let b = remote(&json!({"id": "msgbatch_1", "type": "message_batch",
            "processing_status": "ended", "results_url": "http://x/v1/messages/batches/msgbatch_1/results",
            "request_counts": {"processing": 0, "succeeded": 3, "errored": 1, "canceled": 1, "expired": 2}}))
        .unwrap();
        assert_eq!((b.total, b.finished), (7, 4));
        assert!(matches!(
            b.state,
            RemoteState::Ended {
                output: Some(_),
                errors: None
            }
        ));
        let b = remote(&json!({"id": "m", "processing_status": "canceling"})).unwrap();
        assert_eq!(b.state, RemoteState::Cancelling);

        let ok = json!({"custom_id": "a", "result": {"type": "succeeded", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 100,
                      "cache_creation_input_tokens": 30}}}});
        let r = result_line(ok.to_string().as_bytes(), "b").unwrap();
        let Some(Outcome::Success { body, usage, .. }) = r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!((usage.input_tokens, usage.cached_input_tokens), (150, 100));
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["object"], "chat.completion");

        let errored = json!({"custom_id": "e", "result": {"type": "errored", "error":
            {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}}});
        let r = result_line(errored.to_string().as_bytes(), "b").unwrap();
        assert!(matches!(
            r.outcome,
            Some(Outcome::HttpError { status: 529, .. })
        ));
        // The bare error object is wrapped as the synchronous API's.
        let bare = json!({"custom_id": "e", "result": {"type": "errored", "error":
            {"type": "invalid_request_error", "message": "bad"}}});
        let r = result_line(bare.to_string().as_bytes(), "b").unwrap();
        let Some(Outcome::HttpError { status, body, .. }) = r.outcome else {
            panic!()
        };
        assert_eq!(status, 400);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})
        );
        for kind in ["canceled", "expired"] {
            let l = json!({"custom_id": "c", "result": {"type": kind}});
            assert_eq!(
                result_line(l.to_string().as_bytes(), "b").unwrap().outcome,
                None
            );
        }
        assert!(result_line(br#"{"custom_id":"c","result":{"type":"new"}}"#, "b").is_err());
    }
}
