//! The dashboard: a page served by the daemon at `/ui/` on its TCP
//! listener, built from the same JSON API the CLI and SDKs use (stats,
//! plan, prices, jobs, sources, providers).
//!
//! Everything it needs is embedded in the binary (one HTML file, one
//! script, one stylesheet; no CDN, no build step), and its
//! `Content-Security-Policy` lets the page load and fetch only from the
//! daemon itself. Logging in: `nightshift ui` asks the daemon for a
//! one-time code (`POST /v1/ui/login-codes`, socket or token only) and
//! prints `http://ADDR/ui/login?code=…`; opening it sets the session
//! cookie and forwards to `/ui/`. See `api::auth` for what a session may do.

pub mod sessions;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use super::listen::random_hex;
use super::objects::rfc3339;
use super::{ApiState, S};
use sessions::{Session, Sessions, cookie, cookie_name};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The page may load and fetch only from the daemon; no frames, no
/// plugins, no inline script, forms only to itself.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The dashboard's state in the API: logins, and the TCP address the page
/// is served on (known once the listener is bound).
#[derive(Default)]
pub struct UiState {
    pub sessions: Sessions,
    tcp: OnceLock<SocketAddr>,
}

impl UiState {
    pub fn set_tcp(&self, addr: SocketAddr) {
        let _ = self.tcp.set(addr);
    }
    pub fn tcp(&self) -> Option<SocketAddr> {
        self.tcp.get().copied()
    }
    pub fn port(&self) -> Option<u16> {
        self.tcp().map(|a| a.port())
    }
}

/// Paths that hold no data: the page's shell and its login.
pub fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/ui" | "/ui/" | "/ui/app.js" | "/ui/app.css" | "/ui/login"
    )
}

/// The dashboard's routes (not part of the JSON API or `docs/openapi.json`).
pub fn add_routes(router: Router<S>) -> Router<S> {
    router
        .route("/ui", get(|| async { redirect("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/ui/login", get(login))
        .route("/ui/session", get(session))
        .route("/ui/logout", post(logout))
}

/// The headers every dashboard response carries.
fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    secure(
        (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
    )
}

fn redirect(to: &'static str) -> Response {
    secure((StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response())
}

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>nightshift — {title}</title><link rel=\"icon\" href=\"data:,\"></head><body><h1>{title}</h1><p>{text}</p></body></html>"
    );
    secure(
        (
            status,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            html,
        )
            .into_response(),
    )
}

#[derive(Deserialize)]
pub struct LoginQuery {
    code: Option<String>,
}

/// `GET /ui/login?code=…`: redeems a one-time code for a session cookie,
/// then forwards to the dashboard (so the code leaves the address bar).
async fn login(
    State(s): State<S>,
    q: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let code = q.ok().and_then(|Query(q)| q.code).unwrap_or_default();
    let Some(port) = s.ui.port() else {
        return page(
            StatusCode::NOT_FOUND,
            "No dashboard here",
            "The dashboard is served on the daemon's TCP listener.",
        );
    };
    // Bounded before it is hashed: a code is 64 hex digits.
    let fresh = (code.len() <= 128)
        .then(|| Some((random_hex::<32>().ok()?, random_hex::<32>().ok()?)))
        .flatten();
    let opened = fresh.and_then(|(sid, csrf)| {
        s.ui.sessions
            .redeem(&code, sid, csrf, chrono::Utc::now().timestamp_millis())
    });
    let Some(opened) = opened else {
        return page(
            StatusCode::FORBIDDEN,
            "This login link is used or expired",
            "Each link logs in once, within 5 minutes. Run <code>nightshift ui</code> for a new one.",
        );
    };
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        cookie_name(port),
        opened.session_id,
        sessions::SESSION_TTL_MS / 1000
    );
    let mut r = redirect("/ui/");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /ui/session`: the page's CSRF token and when its session ends.
/// Only a session cookie reaches this with a session (see `api::auth`).
async fn session(session: Option<axum::Extension<Session>>) -> ApiResult<Response> {
    let Some(axum::Extension(session)) = session else {
        return Err(ApiError::unauthorized(
            "no dashboard session: open the link `nightshift ui` prints",
        ));
    };
    let body = Json(json!({
        "object": "ui.session",
        "csrf_token": session.csrf,
        "expires_at": rfc3339(session.expires_ms),
    }));
    let mut r = secure(body.into_response());
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `POST /ui/logout`: ends the session and clears its cookie.
async fn logout(
    State(s): State<S>,
    headers: HeaderMap,
    session: Option<axum::Extension<Session>>,
) -> ApiResult<Response> {
    let (Some(_), Some(port)) = (session, s.ui.port()) else {
        return Err(ApiError::unauthorized("no dashboard session"));
    };
    let name = cookie_name(port);
    if let Some(id) = cookie(&headers, &name) {
        s.ui.sessions.end(id);
    }
    let mut r = secure(StatusCode::NO_CONTENT.into_response());
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// `POST /v1/ui/login-codes`: a one-time dashboard login link. Over the
/// Unix socket or with the bearer token only (never a session).
pub async fn create_login_code(State(s): State<Arc<ApiState>>) -> ApiResult<Json<Value>> {
    let Some(addr) = s.ui.tcp() else {
        return Err(ApiError::conflict(
            "the dashboard is served on the TCP listener, and this daemon has none: set [http] tcp = \"127.0.0.1:8088\"",
            "no_tcp_listener",
        ));
    };
    let code = random_hex::<32>().map_err(ApiError::internal)?;
    let expires =
        s.ui.sessions
            .issue_code(&code, chrono::Utc::now().timestamp_millis());
    Ok(Json(json!({
        "object": "ui.login_code",
        "url": format!("http://{addr}/ui/login?code={code}"),
        "expires_at": rfc3339(expires),
    })))
}
