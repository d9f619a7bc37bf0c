//! The local HTTP API: a Unix domain socket (no token: its file mode
//! guards it) and, optionally, a loopback TCP address that needs
//! `Authorization: Bearer <token>`.
//!
//! Two surfaces share one router:
//!
//! - the native API (`native`): jobs, plan, providers, stats;
//! - OpenAI's Batch API (`openai`): files and batches, so the official
//!   SDKs work with `base_url` pointed here.
//!
//! Handlers are thin: validation is [`crate::domain::job::parse_line`], storage is
//! [`crate::store::Store`] (every write one transaction, and a 2xx only after
//! it commits), planning is [`crate::plan`]. [`ROUTES`] lists what the
//! router serves; `docs/openapi.json` describes the same routes (a test
//! keeps them in step). `serve` owns the connections: how many each
//! listener holds, and how long a client may be idle or slow.

mod auth;
pub mod client;
mod error;
pub mod listen;
mod native;
mod objects;
mod openai;
mod result_files;
mod serve;
pub mod ui;
mod views;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, Method, header};
use axum::routing::{MethodRouter, get, post};
use tokio::sync::watch;
use tracing::{info, warn};

pub use auth::router_with_token;
pub use error::{ApiError, ApiResult};

use crate::config::Config;
use crate::domain::pricing::Catalog;
use crate::plan::{PlanSettings, ProviderCapacity};
use crate::shared::Shared;

/// Every route the router serves: (method, path). `docs/openapi.json`
/// must describe exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/submissions/{id}"),
    ("GET", "/v1/submissions/{id}/output"),
    ("GET", "/v1/submissions/{id}/errors"),
    ("GET", "/v1/plan"),
    ("GET", "/v1/providers"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/prices"),
    ("GET", "/v1/sources"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/{id}"),
    ("GET", "/v1/files/{id}/content"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches"),
    ("GET", "/v1/batches/{id}"),
    ("POST", "/v1/batches/{id}/cancel"),
    ("POST", "/v1/ui/login-codes"),
];

/// What the handlers share.
pub struct ApiState {
    /// The daemon's handle: the store, the reloadable configuration (read
    /// through [`ApiState::catalog`]), telemetry, and the dispatcher's wake-up.
    pub shared: Shared,
    /// The deadline of jobs that name none.
    pub default_deadline: Duration,
    pub plan_settings: PlanSettings,
    pub max_body: u64,
    pub max_upload: u64,
    plan_cache: objects::PlanCache,
    submissions: AtomicU64,
    /// Dashboard logins and the TCP address it is served on.
    pub ui: ui::UiState,
}

impl ApiState {
    pub fn new(config: &Config, shared: Shared) -> Self {
        ApiState {
            shared,
            default_deadline: config.daemon.default_deadline,
            plan_settings: PlanSettings {
                safety_margin: config.daemon.safety_margin,
                ..PlanSettings::default()
            },
            max_body: config.http.max_body,
            max_upload: config.http.max_upload,
            plan_cache: objects::PlanCache::default(),
            submissions: AtomicU64::new(0),
            ui: ui::UiState::default(),
        }
    }

    /// The catalog in force now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.shared.live.borrow().catalog.clone()
    }

    /// The planner's view of provider capacity (configured limits) now.
    pub fn capacities(&self) -> Vec<ProviderCapacity> {
        let live = self.shared.live.borrow();
        crate::plan::configured_capacities(&live.catalog, &live.transports)
    }

    /// Runs a closure against the store off the async threads.
    async fn db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ApiState) -> T + Send + 'static,
    ) -> ApiResult<T> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(ApiError::internal)
    }

    /// New jobs are queued (or cancelled): plan again, and tell the dispatcher.
    fn queue_changed(&self) {
        self.plan_cache.invalidate();
        self.shared.wake.notify_one();
    }
}

type S = Arc<ApiState>;

fn route_for(method: &str, path: &str) -> MethodRouter<S> {
    use native as n;
    use openai as o;
    match (method, path) {
        ("GET", "/healthz") => get(n::healthz),
        ("GET", "/metrics") => get(n::metrics),
        ("POST", "/v1/jobs") => post(n::submit),
        ("GET", "/v1/jobs") => get(n::list_jobs),
        ("GET", "/v1/jobs/{id}") => get(n::get_job),
        ("POST", "/v1/jobs/{id}/cancel") => post(n::cancel_job),
        ("GET", "/v1/submissions/{id}") => get(n::get_submission),
        ("GET", "/v1/submissions/{id}/output") => get(n::submission_output),
        ("GET", "/v1/submissions/{id}/errors") => get(n::submission_errors),
        ("GET", "/v1/plan") => get(n::get_plan),
        ("GET", "/v1/providers") => get(n::providers),
        ("GET", "/v1/stats") => get(n::stats),
        ("GET", "/v1/prices") => get(views::prices),
        ("GET", "/v1/sources") => get(views::sources),
        ("POST", "/v1/files") => post(o::upload_file),
        ("GET", "/v1/files/{id}") => get(o::get_file),
        ("GET", "/v1/files/{id}/content") => get(o::file_content),
        ("POST", "/v1/batches") => post(o::create_batch),
        ("GET", "/v1/batches") => get(o::list_batches),
        ("GET", "/v1/batches/{id}") => get(o::get_batch),
        ("POST", "/v1/batches/{id}/cancel") => post(o::cancel_batch),
        ("POST", "/v1/ui/login-codes") => post(ui::create_login_code),
        _ => unreachable!("ROUTES lists {method} {path} without a handler"),
    }
}

/// The router over [`ROUTES`], without authentication (the Unix socket's).
pub fn router(state: S) -> Router {
    let mut router: Router<S> = Router::new();
    let mut paths: Vec<&str> = ROUTES.iter().map(|r| r.1).collect();
    paths.dedup();
    paths.sort();
    paths.dedup();
    for path in paths {
        let mut methods: Option<MethodRouter<S>> = None;
        for (m, _) in ROUTES.iter().filter(|r| r.1 == path) {
            let r = route_for(m, path);
            methods = Some(match methods {
                None => r,
                Some(prev) => prev.merge(r),
            });
        }
        let methods = methods.expect("every path has a method").fallback(
            |method: Method, uri: axum::http::Uri| async move {
                ApiError::method_not_allowed(method.as_str(), uri.path())
            },
        );
        router = router.route(path, methods);
    }
    ui::add_routes(router)
        .fallback(|method: Method, uri: axum::http::Uri| async move {
            ApiError::unknown_route(method.as_str(), uri.path())
        })
        // Limits are enforced per route (see `read_body`), with 413s in OpenAI's shape.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Reads a whole body of at most `limit` bytes; 413 beyond.
async fn read_body(headers: &HeaderMap, body: Body, limit: u64, setting: &str) -> ApiResult<Bytes> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit, setting));
    }
    axum::body::to_bytes(body, limit as usize)
        .await
        .map_err(|e| {
            let is_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if is_limit {
                ApiError::too_large(limit, setting)
            } else {
                ApiError::bad_request(format!("reading the body: {e}"), None, "invalid_body")
            }
        })
}

/// A query string, or a 400 that says what is wrong with it.
fn query<T>(
    q: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<T> {
    q.map(|axum::extract::Query(q)| q).map_err(|e| {
        ApiError::bad_request(
            format!("invalid query string: {}", e.body_text()),
            None,
            "invalid_query",
        )
    })
}

/// How much of a bad value an error message quotes.
const ECHO_CHARS: usize = 64;

/// A value quoted in an error message: at most [`ECHO_CHARS`] characters.
fn echo(v: &str) -> String {
    match v.char_indices().nth(ECHO_CHARS) {
        Some((at, _)) => format!("{}...", &v[..at]),
        None => v.to_string(),
    }
}

/// An optional id parameter (`after=job_12`): `None` when absent or empty,
/// else exactly `prefix` and a number, or a 400 naming `field`.
fn id_param(v: Option<&str>, prefix: &str, field: &str, what: &str) -> ApiResult<Option<i64>> {
    match v.filter(|x| !x.is_empty()) {
        None => Ok(None),
        Some(x) => parse_id(x, prefix).map(Some).ok_or_else(|| {
            ApiError::bad_request(
                format!("{field} '{}' is not {what}", echo(x)),
                Some(field),
                "invalid_value",
            )
        }),
    }
}

/// An optional count parameter (`limit=50`) within `range`; `default` when
/// absent; a 400 naming `field` otherwise.
fn count_param(
    v: Option<&str>,
    field: &str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> ApiResult<usize> {
    match v {
        None => Ok(default),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| range.contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    format!(
                        "{field} '{}' is not a number from {} to {}",
                        echo(l),
                        range.start(),
                        range.end()
                    ),
                    Some(field),
                    "invalid_value",
                )
            }),
    }
}

/// Parses an id as the API writes it: exactly `prefix` and a positive
/// decimal number (`job_12`, `file-3`, `batch_7`). Nothing else names the
/// same object: no bare number, sign, leading zero or space.
fn parse_id(s: &str, prefix: &str) -> Option<i64> {
    let digits = s.strip_prefix(prefix)?;
    let canonical = !digits.is_empty()
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit());
    canonical.then(|| digits.parse::<i64>().ok()).flatten()
}

/// The listeners, bound and ready to serve.
pub struct Server {
    state: S,
    unix: listen::BoundSocket,
    tcp: Option<(tokio::net::TcpListener, String)>,
    limits: serve::ConnectionLimits,
    /// How long requests in progress may take to finish once stopped.
    grace: Duration,
}

impl Server {
    /// Binds the Unix socket (replacing a stale one) and the TCP address if
    /// configured, and finishes batches a crash left in `validating`.
    pub async fn bind(config: &Config, shared: Shared) -> anyhow::Result<Server> {
        let state = Arc::new(ApiState::new(config, shared));
        let recovered = state
            .db(openai::recover_validating)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))??;
        if recovered > 0 {
            warn!(recovered, "finished validating batches a crash interrupted");
        }
        let unix = listen::bind_unix(&config.http.socket)?;
        info!(socket = %config.http.socket.display(), "HTTP API listening on the Unix socket (mode 0660)");
        let tcp = match config.http.tcp {
            None => None,
            Some(addr) => {
                let token = listen::ensure_token(&config.http.token_file)?;
                let listener = listen::bind_tcp(addr)?;
                let bound = listener.local_addr()?;
                state.ui.set_tcp(bound);
                info!(tcp = %bound, token_file = %config.http.token_file.display(),
                      "HTTP API listening on TCP (bearer token required)");
                Some((listener, token))
            }
        };
        let mut limits = serve::ConnectionLimits::new(&config.http);
        let listeners = 1 + usize::from(tcp.is_some());
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let cap = serve::connection_cap(limits.max_connections, listeners, soft);
        if cap < limits.max_connections {
            warn!(
                http.max_connections = limits.max_connections,
                cap,
                rlimit_nofile = soft,
                "http.max_connections lowered so that the listeners leave descriptors to the rest of the daemon"
            );
            limits.max_connections = cap;
        }
        Ok(Server {
            state,
            unix,
            tcp,
            limits,
            grace: config.daemon.shutdown_grace,
        })
    }

    /// Serves until `stop` turns true, then stops accepting, lets requests
    /// in progress finish (for up to `daemon.shutdown_grace`), and removes
    /// the socket file. Each listener has its own connection cap and
    /// timeouts (see `api/serve.rs`).
    pub async fn serve(self, stop: watch::Receiver<bool>) {
        let listen::BoundSocket { listener, path } = self.unix;
        let unix = tokio::spawn(serve::serve(
            listener,
            "unix",
            router(self.state.clone()),
            self.limits,
            self.grace,
            stop.clone(),
        ));
        let tcp = self.tcp.map(|(listener, token)| {
            tokio::spawn(serve::serve(
                listener,
                "tcp",
                router_with_token(self.state.clone(), token),
                self.limits,
                self.grace,
                stop.clone(),
            ))
        });
        if let Err(e) = unix.await {
            warn!("HTTP API (Unix socket) stopped: {e}");
        }
        if let Some(tcp) = tcp
            && let Err(e) = tcp.await
        {
            warn!("HTTP API (TCP) stopped: {e}");
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_exactly_the_prefix_and_a_canonical_positive_number() {
        assert_eq!(parse_id("job_1", "job_"), Some(1));
        assert_eq!(parse_id("job_1234567", "job_"), Some(1_234_567));
        assert_eq!(parse_id("file-3", "file-"), Some(3));
        for bad in [
            "job_+1",
            "job_-1",
            "job_01",
            "job_0",
            "job_",
            " job_1",
            "job_1 ",
            "job_ 1",
            "1",
            "+1",
            "JOB_1",
            "batch_1",
            "job_1x",
            "job_1.0",
            "job_١",
            "job_99999999999999999999",
        ] {
            assert_eq!(parse_id(bad, "job_"), None, "{bad:?}");
        }
    }
}
