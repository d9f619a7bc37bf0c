//! Who may use the TCP listener: every route but `/healthz` needs
//! `Authorization: Bearer <token>` (the Unix socket needs nothing: its file
//! mode guards it).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use super::{ApiError, S, router};

/// The bearer token the TCP listener requires.
struct Token(String);

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 7235 section 2.1): `bearer` and `BEARER` too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn require_token(State(token): State<Arc<Token>>, req: Request, next: Next) -> Response {
    // Liveness checks need no secret and learn nothing.
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match given {
        None => ApiError::unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' (`nightshift token` prints it)",
        )
        .into_response(),
        Some(t) if same(t.as_bytes(), token.0.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::unauthorized("incorrect bearer token").into_response(),
    }
}

/// The router for the TCP listener: every route but `/healthz` needs the token.
pub fn router_with_token(state: S, token: String) -> Router {
    router(state).layer(middleware::from_fn_with_state(
        Arc::new(Token(token)),
        require_token,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer ns-1", "bearer ns-1", "BEARER ns-1", "bEaReR  ns-1 "] {
            assert_eq!(bearer_token(v), Some("ns-1"), "{v:?}");
        }
        for v in ["Basic ns-1", "Bearerns-1", "ns-1", "", "Bearer"] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }
}
