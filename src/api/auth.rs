//! Who may use the TCP listener (the Unix socket needs nothing: its file
//! mode guards it).
//!
//! - `Authorization: Bearer <token>` opens every route: scripts, SDKs,
//!   `nightshift` over TCP.
//! - A dashboard session (the cookie `nightshift ui`'s one-time link sets)
//!   opens the API the page uses, with two guards against other web pages
//!   the browser has open. State-changing requests must carry the
//!   session's CSRF token in `X-Nightshift-CSRF` (another page cannot read
//!   it) and come from the dashboard's own origin (`Origin`,
//!   `Sec-Fetch-Site`). And the `Host` must be an IP literal or
//!   `localhost`, so a page on a DNS-rebinding domain cannot talk to the
//!   listener at all. `SameSite=Strict` does not suffice on its own: every
//!   port of 127.0.0.1 is the same site, so another local server's page
//!   would still send the cookie.
//! - `/healthz`, the dashboard's static files and its login page need
//!   neither: they hold no data.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use super::ui::sessions::{CSRF_HEADER, Session, cookie, cookie_name};
use super::{ApiError, S, router};

/// What the TCP listener checks requests against.
struct Guard {
    token: String,
    state: S,
}

/// Constant-time comparison, so a secret cannot be guessed byte by byte.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 7235 section 2.1): `bearer` and `BEARER` too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Paths anyone may fetch: liveness, and the dashboard's shell (static
/// files and the login page, which checks its own code).
fn is_public(path: &str) -> bool {
    path == "/healthz" || super::ui::is_public(path)
}

/// Routes a dashboard session may not use: minting login codes needs the
/// token (or the socket), so a stolen cookie cannot extend itself.
fn bearer_only(path: &str) -> bool {
    path == "/v1/ui/login-codes"
}

/// Whether the `Host` names this listener by IP literal or as
/// `localhost`: a DNS-rebinding page has its own domain here.
fn host_is_literal(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name == "localhost"
        || name.parse::<std::net::IpAddr>().is_ok()
        || name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .is_some_and(|n| n.parse::<std::net::Ipv6Addr>().is_ok())
}

/// The cross-site checks of a session's state-changing request: its CSRF
/// header, and — where the browser says — its origin.
fn same_origin_write(headers: &HeaderMap, session: &Session) -> Result<(), ApiError> {
    let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    if !csrf.is_some_and(|c| same(c.as_bytes(), session.csrf.as_bytes())) {
        return Err(ApiError::forbidden(
            "cross-site request refused: a dashboard session's POST needs the X-Nightshift-CSRF header the page sends",
            "csrf_failed",
        ));
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
    {
        return Err(ApiError::forbidden(
            format!("cross-site request refused (Sec-Fetch-Site: {site})"),
            "csrf_failed",
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if origin != format!("http://{host}") {
            return Err(ApiError::forbidden(
                "cross-site request refused: Origin is not the dashboard's",
                "csrf_failed",
            ));
        }
    }
    Ok(())
}

async fn authorize(State(guard): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if is_public(path) {
        return next.run(req).await;
    }
    let headers = req.headers();
    if let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
    {
        return if same(given.as_bytes(), guard.token.as_bytes()) {
            next.run(req).await
        } else {
            ApiError::unauthorized("incorrect bearer token").into_response()
        };
    }
    let port = guard.state.ui.port().unwrap_or(0);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let session = cookie(headers, &cookie_name(port))
        .and_then(|id| guard.state.ui.sessions.lookup(id, now_ms));
    let Some(session) = session else {
        return ApiError::unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' (`nightshift token` prints it), or log in to the dashboard with the link `nightshift ui` prints",
        )
        .into_response();
    };
    if !host_is_literal(headers) {
        return ApiError::forbidden(
            "the dashboard answers only on an IP address or localhost (Host header)",
            "invalid_host",
        )
        .into_response();
    }
    if bearer_only(path) {
        return ApiError::forbidden("this route needs the bearer token", "token_required")
            .into_response();
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    if !safe && let Err(e) = same_origin_write(headers, &session) {
        return e.into_response();
    }
    req.extensions_mut().insert(session);
    next.run(req).await
}

/// The router for the TCP listener: the bearer token or a dashboard
/// session, as above.
pub fn router_with_token(state: S, token: String) -> Router {
    router(state.clone()).layer(middleware::from_fn_with_state(
        Arc::new(Guard { token, state }),
        authorize,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer ns-1", "bearer ns-1", "BEARER ns-1", "bEaReR  ns-1 "] {
            assert_eq!(bearer_token(v), Some("ns-1"), "{v:?}");
        }
        for v in ["Basic ns-1", "Bearerns-1", "ns-1", "", "Bearer"] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cookies_are_found_by_exact_name_in_any_cookie_header() {
        let h = headers(&[
            ("cookie", "a=1; nightshift_session_80=x"),
            ("cookie", "nightshift_session_8088=sid; b=2"),
        ]);
        assert_eq!(cookie(&h, "nightshift_session_8088"), Some("sid"));
        assert_eq!(cookie(&h, "nightshift_session_80"), Some("x"));
        assert_eq!(cookie(&h, "nightshift_session_8"), None);
    }

    #[test]
    fn only_ip_literals_and_localhost_are_accepted_hosts() {
        for ok in [
            "127.0.0.1:8088",
            "localhost:8088",
            "[::1]:8088",
            "127.0.0.1",
        ] {
            assert!(host_is_literal(&headers(&[("host", ok)])), "{ok}");
        }
        for bad in [
            "evil.example:8088",
            "127.0.0.1.nip.io:8088",
            "localhost.evil:1",
        ] {
            assert!(!host_is_literal(&headers(&[("host", bad)])), "{bad}");
        }
        assert!(!host_is_literal(&HeaderMap::new()));
    }

    #[test]
    fn a_sessions_write_needs_its_csrf_token_and_its_own_origin() {
        let s = Session {
            csrf: "tok".into(),
            expires_ms: 1,
        };
        let host = ("host", "127.0.0.1:8088");
        let ok = headers(&[
            host,
            (CSRF_HEADER, "tok"),
            ("origin", "http://127.0.0.1:8088"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(same_origin_write(&ok, &s).is_ok());
        // Older clients send neither Origin nor Sec-Fetch-Site: the token decides.
        assert!(same_origin_write(&headers(&[host, (CSRF_HEADER, "tok")]), &s).is_ok());
        for bad in [
            headers(&[host]),
            headers(&[host, (CSRF_HEADER, "tok2")]),
            headers(&[
                host,
                (CSRF_HEADER, "tok"),
                ("origin", "http://127.0.0.1:3000"),
            ]),
            headers(&[host, (CSRF_HEADER, "tok"), ("origin", "null")]),
            headers(&[host, (CSRF_HEADER, "tok"), ("sec-fetch-site", "same-site")]),
            headers(&[host, (CSRF_HEADER, "tok"), ("sec-fetch-site", "cross-site")]),
        ] {
            let e = same_origin_write(&bad, &s).unwrap_err();
            assert_eq!(e.code, Some("csrf_failed"), "{bad:?}");
        }
    }
}
