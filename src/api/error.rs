//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`
//! with the matching HTTP status, so the official SDKs raise their usual
//! exceptions (`BadRequestError`, `NotFoundError`, ...).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tracing::error;

use crate::domain::job::LineError;

/// An error answer of the API.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    /// The offending parameter or field, if one is to blame.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Per-line errors of a job submission, all of them.
    pub lines: Option<Vec<Value>>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            lines: None,
        }
    }

    /// 400: the request is wrong; `param` names the field.
    pub fn bad_request(
        message: impl Into<String>,
        param: Option<&str>,
        code: &'static str,
    ) -> Self {
        ApiError {
            param: param.map(str::to_owned),
            code: Some(code),
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// 400: the body is not JSON.
    pub fn invalid_json(e: &serde_json::Error) -> ApiError {
        ApiError::bad_request(
            format!("the body is not valid JSON: {e}"),
            None,
            "invalid_json",
        )
    }

    /// 400 from a typed body that failed to deserialize: names the field.
    pub fn from_body_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid_json(&inner);
        }
        // serde names a missing field in the message, not the path.
        let missing = inner
            .to_string()
            .strip_prefix("missing field `")
            .and_then(|s| s.split('`').next())
            .map(str::to_owned);
        let param = match (missing, path.as_str()) {
            (Some(m), ".") => Some(m),
            (Some(m), p) => Some(format!("{p}.{m}")),
            (None, ".") => None,
            (None, p) => Some(p.to_string()),
        };
        let code = if inner.to_string().starts_with("missing field") {
            "missing_required_parameter"
        } else {
            "invalid_value"
        };
        let message = inner.to_string();
        ApiError {
            param,
            ..ApiError::bad_request(message, None, code)
        }
    }

    /// 400 for a submission with invalid lines: every line's error, and the
    /// first one's field as `param`.
    pub fn invalid_lines(errors: &[(u64, LineError)], total: usize) -> ApiError {
        let first = &errors[0];
        let more = match errors.len() {
            1 => String::new(),
            n => format!(" (and {} more invalid lines)", n - 1),
        };
        let message = format!(
            "line {}: {}{more}; nothing was queued ({} of {total} lines invalid)",
            first.0,
            first.1,
            errors.len()
        );
        let code = if first.1.field.as_deref() == Some("body.model") {
            "model_not_found"
        } else if first.1.field.is_none() && first.1.message.starts_with("invalid JSON") {
            "invalid_json"
        } else {
            "invalid_line"
        };
        ApiError {
            param: first.1.field.clone(),
            lines: Some(
                errors
                    .iter()
                    .map(|(line, e)| {
                        json!({"line": line, "custom_id": e.custom_id, "field": e.field, "message": e.message})
                    })
                    .collect(),
            ),
            ..ApiError::bad_request(message, None, code)
        }
    }

    /// 404 for an id that does not exist.
    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError {
            code: Some("not_found"),
            param: Some("id".into()),
            ..ApiError::new(StatusCode::NOT_FOUND, format!("no {what} with id '{id}'"))
        }
    }

    /// 404 for a path no route serves.
    pub fn unknown_route(method: &str, path: &str) -> ApiError {
        ApiError {
            code: Some("unknown_url"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown URL: {method} {path}"),
            )
        }
    }

    /// 405 for a known path with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        ApiError {
            code: Some("method_not_allowed"),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} does not support {method}"),
            )
        }
    }

    /// 413 for a body over the configured limit.
    pub fn too_large(limit: u64, setting: &str) -> ApiError {
        ApiError {
            code: Some("request_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {limit} bytes (the limit is {setting})"),
            )
        }
    }

    /// 408 for a request body that did not arrive in time.
    pub fn request_timeout(limit: std::time::Duration) -> ApiError {
        ApiError {
            code: Some("request_timeout"),
            ..ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} (the limit is http.body_timeout)",
                    humantime::format_duration(limit)
                ),
            )
        }
    }

    /// 401 for a missing or wrong bearer token.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(StatusCode::UNAUTHORIZED, message)
        }
    }

    /// 403: authenticated, but this request may not be made this way
    /// (a cross-site request, or a session asking for a bearer-only route).
    pub fn forbidden(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError {
            code: Some(code),
            ..ApiError::new(StatusCode::FORBIDDEN, message)
        }
    }

    /// 409: the request conflicts with the object's state.
    pub fn conflict(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError {
            code: Some(code),
            ..ApiError::new(StatusCode::CONFLICT, message)
        }
    }

    /// 500: logged here (without request data); the client gets no details.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        error!("HTTP API internal error: {e}");
        ApiError {
            kind: "server_error",
            code: Some("internal_error"),
            ..ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error; see the daemon's log",
            )
        }
    }

    pub fn body(&self) -> Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        });
        if let Some(lines) = &self.lines {
            error["lines"] = Value::Array(lines.clone());
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<crate::store::QueueError> for ApiError {
    fn from(e: crate::store::QueueError) -> ApiError {
        if e.is_unavailable() {
            // The shared database is down or unreachable: retry later.
            tracing::warn!("HTTP API: the database is unavailable: {e}");
            return ApiError {
                kind: "server_error",
                code: Some("database_unavailable"),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the queue's database is unavailable; retry later",
                )
            };
        }
        ApiError::internal(e)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
