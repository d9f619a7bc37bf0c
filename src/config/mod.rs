//! Configuration: parsed from TOML once, validated with precise messages
//! (file, line, field), then handed to the rest of the program as a [`Config`].
//!
//! The embedded default (`src/default_config.toml`) goes through the same
//! path, so it doubles as the reference example of the format.

pub mod database;
pub mod live;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc, Weekday};
use chrono_tz::Tz;
use serde::Deserialize;
use toml::Spanned;

use crate::domain::bounds;
use crate::domain::pricing::{
    ALL_DAYS, BatchTerms, Catalog, Channel, DailyRange, Endpoint, FlexTerms, Limits, Model,
    ModelId, Price, PriceWindow, ProviderId, ProviderInfo, WindowEffect, Wire, weekday_set,
};
use crate::domain::units::{parse_duration, parse_duration_within};

/// `base_url` of a `kind = "anthropic"` provider by default.
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// The configuration compiled into the binary.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// `daemon.maintenance` by default: nightly at 03:17:00 UTC.
pub const DEFAULT_MAINTENANCE: &str = "0 17 3 * * *";

/// A configuration problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{}: {}: {}",
                self.file, line, self.field, self.message
            ),
            None => write!(f, "{}: {}: {}", self.file, self.field, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// An API key. Its `Debug` never shows the value, so it cannot reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The key itself, for the Authorization header and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// How requests to a provider are carried.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// An HTTP API: OpenAI-compatible (`kind = "openai"`, `base_url` ends
    /// in `/v1`) or Anthropic's Messages API (`kind = "anthropic"`, `base_url`
    /// without `/v1`), as `wire` says.
    OpenAi {
        wire: Wire,
        base_url: String,
        /// Read from `key` by [`Config::resolve_keys`]; `None` until then
        /// (parsing never reads a key, so `check-config` works without them).
        api_key: Option<Secret>,
        key: KeyRef,
        /// Where the key came from (`env OPENAI_API_KEY`, `file ...`), for display.
        key_source: String,
        /// Whole request, from connect to the last byte (default: `daemon.request_timeout`).
        timeout: Option<Duration>,
        connect_timeout: Option<Duration>,
    },
    /// Answered in-process with deterministic completions.
    Simulated {
        latency: Duration,
        ms_per_output_token: f64,
        /// Fraction of requests answered with HTTP 500.
        failure_rate: f64,
    },
}

impl Transport {
    /// A provider's typical time to answer, before any is observed: the
    /// simulator's latency plus ~100 output tokens, or 2 s for a real API.
    pub fn typical_latency(&self) -> Duration {
        match self {
            Transport::Simulated {
                latency,
                ms_per_output_token,
                ..
            } => latency.saturating_add(
                Duration::try_from_secs_f64(ms_per_output_token * 100.0 / 1000.0)
                    .unwrap_or_default(),
            ),
            Transport::OpenAi { .. } => Duration::from_secs(2),
        }
    }

    /// The fraction of requests expected to fail: configured for a
    /// simulated provider, unknown (0) for a real one until observed.
    pub fn failure_rate(&self) -> f64 {
        match self {
            Transport::Simulated { failure_rate, .. } => *failure_rate,
            Transport::OpenAi { .. } => 0.0,
        }
    }
}

/// Where a provider's API key is read from, and where the config says so
/// (for a `file:line: field` error if it cannot be read).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRef {
    pub source: KeySource,
    pub file: String,
    pub line: Option<usize>,
    pub field: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// An environment variable.
    Env(String),
    /// A file; a relative path resolves against `$CREDENTIALS_DIRECTORY`
    /// (systemd's `LoadCredential=`) when it is set.
    File(PathBuf),
}

impl KeyRef {
    fn err(&self, message: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line,
            field: self.field.clone(),
            message,
        }
    }

    /// The key file's path as it is read: a relative one under
    /// `$CREDENTIALS_DIRECTORY` when that is set.
    fn file_path(path: &Path) -> PathBuf {
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) if path.is_relative() => Path::new(&dir).join(path),
            _ => path.to_path_buf(),
        }
    }

    /// A warning if the key is in a file that its group or others may read
    /// (never its content); `None` for keys in the environment.
    pub fn loose_permissions(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let KeySource::File(path) = &self.source else {
            return None;
        };
        let full = KeyRef::file_path(path);
        let mode = std::fs::metadata(&full).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "{}:{}: {}: the API key file {} has mode {mode:o}: its group or others can read \
                 it; chmod 600 it",
                self.file,
                self.line.unwrap_or(0),
                self.field,
                full.display()
            )
        })
    }

    /// Reads the key. A key file others can read is warned about, once per
    /// file and process.
    pub fn read(&self) -> Result<Secret, ConfigError> {
        match &self.source {
            KeySource::Env(var) => std::env::var(var)
                .map(Secret::new)
                .map_err(|_| self.err(format!("environment variable {var} is not set"))),
            KeySource::File(path) => {
                let full = KeyRef::file_path(path);
                let key = std::fs::read_to_string(&full)
                    .map(|s| Secret::new(s.trim()))
                    .map_err(|e| self.err(format!("cannot read {}: {e}", full.display())))?;
                if let Some(warning) = self.loose_permissions() {
                    static WARNED: std::sync::Mutex<BTreeSet<PathBuf>> =
                        std::sync::Mutex::new(BTreeSet::new());
                    let first = WARNED
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(full.clone());
                    if first {
                        tracing::warn!("{warning}");
                    }
                }
                Ok(key)
            }
        }
    }
}

/// Daemon settings: paths and timings.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSettings {
    pub state_dir: PathBuf,
    pub jobs_dir: PathBuf,
    /// The queue: a SQLite file (default `<state_dir>/nightshift.db`) or a
    /// PostgreSQL URL that several daemons share.
    pub database: database::Database,
    /// This daemon's name among those sharing a PostgreSQL queue (default:
    /// the host name): the files its inbox receives are its to answer.
    pub node: String,
    pub default_deadline: Duration,
    pub rescan_interval: Duration,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    /// The planner aims to finish every job this long before its deadline.
    pub safety_margin: Duration,
    /// A queued job whose deadline passes: `false` expires it (the default),
    /// `true` still runs it, on the fastest eligible provider.
    pub run_after_deadline: bool,
    /// Retries of failed requests: attempts and backoff.
    pub retry: crate::domain::policy::RetryPolicy,
    /// Bodies and results of finished, delivered jobs are purged this long
    /// after they completed; `None` (`"off"`): kept forever.
    pub retention: Option<Duration>,
    /// When retention and a TRUNCATE WAL checkpoint run: a cron expression
    /// with seconds, in UTC.
    pub maintenance: String,
    /// How often a PASSIVE WAL checkpoint runs; `None` (`"off"`): only
    /// SQLite's automatic ones.
    pub checkpoint_every: Option<Duration>,
    /// Requests in flight at most, over all providers (each is a socket):
    /// the cap that holds when providers set no `concurrency` of their own.
    pub max_in_flight: u32,
}

/// `daemon.max_in_flight` at most this.
pub const MAX_IN_FLIGHT_LIMIT: i64 = 65_536;

/// The local HTTP API: where it listens and how much it accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// The Unix domain socket (mode 0660); no token needed on it.
    pub socket: PathBuf,
    /// An optional TCP address; requests on it need the bearer token.
    pub tcp: Option<std::net::SocketAddr>,
    /// Whether `tcp` may be a non-loopback address.
    pub allow_non_loopback: bool,
    /// The bearer token file (mode 0600), created at first start.
    pub token_file: PathBuf,
    /// Largest request body in bytes, except uploads to `/v1/files`.
    pub max_body: u64,
    /// Largest upload to `/v1/files` in bytes.
    pub max_upload: u64,
    /// A request's head (request line and headers) must be complete this
    /// long after its first byte arrives, or the connection is closed.
    pub header_timeout: Duration,
    /// A request's body must be complete this long after its head, or the
    /// request is answered 408 and the connection closed.
    pub body_timeout: Duration,
    /// A connection with no request in flight and none begun is closed
    /// after this long (from its accept, or from its last response).
    pub idle_timeout: Duration,
    /// Connections each listener (the socket; TCP) serves at once. More
    /// wait in the kernel's accept queue until one closes.
    pub max_connections: usize,
}

/// `[http]` bounds: a timeout shorter than this cuts off honest clients on
/// a busy machine, and one longer lets idle clients hold descriptors for
/// hours.
pub const HTTP_TIMEOUT_MIN: Duration = Duration::from_millis(100);
pub const HTTP_TIMEOUT_MAX: Duration = Duration::from_secs(3600);
/// `http.max_connections` at most this (each connection is a descriptor).
pub const HTTP_MAX_CONNECTIONS: i64 = 65_536;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from: a path, or `<embedded default>`.
    pub origin: String,
    pub daemon: DaemonSettings,
    pub http: HttpSettings,
    pub catalog: Catalog,
    /// Parallel to `catalog.providers`.
    pub transports: Vec<Transport>,
    /// Spending caps, global and per provider.
    pub budgets: Vec<crate::domain::policy::Budget>,
}

impl Config {
    /// The embedded default configuration (simulated providers only).
    pub fn embedded_default() -> Config {
        Config::parse(EMBEDDED_DEFAULT, "<embedded default>", Path::new("."))
            .expect("the embedded default configuration is valid")
    }

    /// Reads and validates a configuration file. Relative paths in it are
    /// relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &path.display().to_string(), base)
    }

    /// Parses and validates configuration text. `file` names it in errors.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = {
            let de = toml::Deserializer::parse(text).map_err(|e| toml_error(file, text, &e, ""))?;
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                toml_error(file, text, e.inner(), &path)
            })?
        };
        Validator { file, text }.config(raw, base_dir)
    }

    /// Reads every provider's API key (environment or file). Parsing never
    /// does, so that `check-config`, `plan` and the CLI client work where the
    /// keys are not; the daemon calls this before it starts and on reload.
    pub fn resolve_keys(&mut self) -> Result<(), ConfigError> {
        for t in &mut self.transports {
            if let Transport::OpenAi { api_key, key, .. } = t {
                *api_key = Some(key.read()?);
            }
        }
        Ok(())
    }

    /// What is accepted but unsafe: key files others can read. For
    /// `check-config`; the daemon logs the same when it reads the keys.
    pub fn warnings(&self) -> Vec<String> {
        self.transports
            .iter()
            .filter_map(|t| match t {
                Transport::OpenAi { key, .. } => key.loose_permissions(),
                Transport::Simulated { .. } => None,
            })
            .collect()
    }

    /// Whether every provider is simulated.
    pub fn all_simulated(&self) -> bool {
        self.transports
            .iter()
            .all(|t| matches!(t, Transport::Simulated { .. }))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

fn toml_error(file: &str, text: &str, e: &toml::de::Error, path: &str) -> ConfigError {
    // A `Spanned` value adds a private field to serde's path; the user wrote none.
    let path = path.replace(".$__serde_spanned_private_value", "");
    let path = path.as_str();
    ConfigError {
        file: file.to_string(),
        line: e.span().map(|s| line_of(text, s.start)),
        field: if path.is_empty() || path == "." {
            "(document)".into()
        } else {
            // A `Spanned` value's inner field is serde_spanned's, not the user's.
            path.replace(".$__serde_spanned_private_value", "")
        },
        message: e.message().trim().to_string(),
    }
}

// ---- raw TOML shape -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    budget: RawBudget,
    #[serde(default)]
    providers: Vec<RawProvider>,
    #[serde(default)]
    classes: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    state_dir: Option<PathBuf>,
    jobs_dir: Option<PathBuf>,
    database: Option<Spanned<String>>,
    database_password_file: Option<PathBuf>,
    node: Option<Spanned<String>>,
    default_deadline: Option<Spanned<String>>,
    rescan_interval: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    safety_margin: Option<Spanned<String>>,
    after_deadline: Option<Spanned<String>>,
    max_attempts: Option<Spanned<u32>>,
    retry_base: Option<Spanned<String>>,
    retry_max: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
    maintenance: Option<Spanned<String>>,
    checkpoint_every: Option<Spanned<String>>,
    max_in_flight: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    socket: Option<PathBuf>,
    tcp: Option<Spanned<String>>,
    #[serde(default)]
    allow_non_loopback: bool,
    token_file: Option<PathBuf>,
    max_body: Option<Spanned<String>>,
    max_upload: Option<Spanned<String>>,
    header_timeout: Option<Spanned<String>>,
    body_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
}

/// Global spending caps (USD).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    daily_usd: Option<Spanned<f64>>,
    monthly_usd: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: Spanned<String>,
    kind: Spanned<String>,
    base_url: Option<Spanned<String>>,
    api_key_env: Option<Spanned<String>>,
    api_key_file: Option<Spanned<PathBuf>>,
    region: Option<String>,
    #[serde(default)]
    markup: f64,
    rpm: Option<u32>,
    tpm: Option<u64>,
    rpd: Option<u32>,
    concurrency: Option<u32>,
    #[serde(default)]
    reserve: f64,
    /// Spending caps on this provider (USD per UTC day / month).
    daily_budget_usd: Option<f64>,
    monthly_budget_usd: Option<f64>,
    /// The date the prices were last checked against the provider's page.
    #[allow(dead_code)]
    prices_checked: Option<String>,
    /// OpenAI-compatible providers: total and connect timeouts per request.
    timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    /// Simulated providers: base latency per request.
    latency: Option<Spanned<String>>,
    /// Simulated providers: extra latency per output token.
    ms_per_output_token: Option<f64>,
    /// Simulated providers: fraction of requests that fail with HTTP 500.
    #[serde(default)]
    failure_rate: f64,
    #[serde(default)]
    price_windows: Vec<RawWindow>,
    #[serde(default)]
    models: Vec<RawModel>,
    /// The flex channel: the same API with `"service_tier": "flex"`.
    flex: Option<Spanned<RawFlex>>,
    /// The batch channel: the provider's asynchronous Batch API.
    batch: Option<Spanned<RawBatch>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    /// Batch price = standard price × this (0 < discount <= 1).
    discount: Option<Spanned<f64>>,
    /// The models offered in batches (default: every model).
    models: Option<Spanned<Vec<Spanned<String>>>>,
    /// What the provider promises (default "24h").
    completion_window: Option<Spanned<String>>,
    /// The planner's prior for a batch's turnaround (default 1h).
    expected_turnaround: Option<Spanned<String>>,
    /// Requests per batch at most (default 50000).
    max_requests: Option<Spanned<u64>>,
    /// Bytes per batch at most (default "200MB").
    max_bytes: Option<Spanned<String>>,
    /// How often an open batch is polled (default 30s).
    poll_every: Option<Spanned<String>>,
    /// Simulated providers only: a batch's turnaround, uniform in
    /// `[from, to]` (default expected_turnaround x [0.25, 1.5]).
    simulated_turnaround: Option<Spanned<Vec<String>>>,
    /// Simulated providers only: the fraction of batches that take the
    /// whole completion window (default 0).
    simulated_late_fraction: Option<Spanned<f64>>,
    /// Simulated providers only: the fraction of batches the provider
    /// expires at the end of the completion window, a drawn share (possibly
    /// all) of their lines not run (default 0).
    simulated_expire_fraction: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlex {
    /// Flex price = standard price × this (0 < discount <= 1).
    discount: Option<Spanned<f64>>,
    /// The models offered on flex (default: every chat model).
    models: Option<Spanned<Vec<Spanned<String>>>>,
    /// Per-request timeout of a flex request (default 15m).
    timeout: Option<Spanned<String>>,
    /// No flex on this provider this long after a refusal (default 60s).
    backoff: Option<Spanned<String>>,
    /// Simulated providers only: the fraction of flex requests refused
    /// (429 `resource_unavailable`; default 0).
    simulated_refusal_fraction: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Spanned<String>,
    input_per_mtok: f64,
    output_per_mtok: f64,
    /// Input tokens read from the prompt cache (default: the input price).
    cached_input_per_mtok: Option<f64>,
    /// Input tokens written to the prompt cache (Anthropic; default: the input price).
    cache_write_per_mtok: Option<f64>,
    endpoints: Option<Spanned<Vec<String>>>,
    /// Prices on the flex channel instead of the provider's flex discount.
    flex_input_per_mtok: Option<f64>,
    flex_output_per_mtok: Option<f64>,
    /// Prices on the batch channel instead of the provider's batch discount.
    batch_input_per_mtok: Option<f64>,
    batch_output_per_mtok: Option<f64>,
    #[serde(default)]
    price_windows: Vec<RawWindow>,
    /// Per-model limits, for providers that limit each model separately.
    rpm: Option<u32>,
    tpm: Option<u64>,
    rpd: Option<u32>,
    concurrency: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    name: Spanned<String>,
    days: Option<Spanned<Vec<String>>>,
    hours: Option<Spanned<Vec<String>>>,
    timezone: Option<Spanned<String>>,
    dates: Option<Spanned<Vec<String>>>,
    except_dates: Option<Spanned<Vec<String>>>,
    start: Option<Spanned<String>>,
    end: Option<Spanned<String>>,
    multiplier: Option<f64>,
    input_per_mtok: Option<f64>,
    output_per_mtok: Option<f64>,
}

/// The host name, as `[daemon] node`'s default (`localhost` if unreadable).
fn default_node() -> String {
    rustix::system::uname()
        .nodename()
        .to_str()
        .ok()
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .take(64)
                .collect()
        })
        .unwrap_or_else(|| "localhost".to_string())
}

// ---- validation -----------------------------------------------------------

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Validator<'_> {
    fn err(
        &self,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: span.map(|s| line_of(self.text, s.start)),
            field: field.into(),
            message: message.into(),
        }
    }

    /// A whole number in `1..=max`, `default` if absent.
    fn count(
        &self,
        v: &Option<Spanned<i64>>,
        field: &str,
        max: i64,
        default: i64,
    ) -> Result<i64, ConfigError> {
        match v {
            None => Ok(default),
            Some(v) if (1..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(self.err(
                Some(v.span()),
                field,
                format!("{} is not between 1 and {max}", v.get_ref()),
            )),
        }
    }

    /// A duration of at most [`bounds::MAX_CONFIG_DURATION`].
    fn duration(
        &self,
        value: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.duration_within(value, field, default, bounds::MAX_CONFIG_DURATION)
    }

    /// A duration of at most `max`.
    fn duration_within(
        &self,
        value: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration_within(v.get_ref(), max)
                .map_err(|m| self.err(Some(v.span()), field, m)),
        }
    }

    /// A duration above zero and at most `max`.
    fn positive_duration(
        &self,
        value: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        match self.duration_within(value, field, default, max)? {
            d if d.is_zero() => {
                Err(self.err(value.as_ref().map(|v| v.span()), field, "must be positive"))
            }
            d => Ok(d),
        }
    }

    /// A number from outside that must be finite and in `[min, max]`.
    fn number(
        &self,
        v: f64,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        min: f64,
        max: f64,
        what: &str,
    ) -> Result<f64, ConfigError> {
        if v.is_finite() && v >= min && v <= max {
            Ok(v)
        } else {
            Err(self.err(
                span,
                field,
                format!("{v} is not {what} from {min} to {max}"),
            ))
        }
    }

    /// An optional limit: positive (omit it for no limit) and at most `max`.
    fn limit(
        &self,
        v: Option<u64>,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        max: u64,
    ) -> Result<(), ConfigError> {
        match v {
            Some(0) => Err(self.err(span, field, "must be positive (omit it for no limit)")),
            Some(v) if v > max => {
                Err(self.err(span, field, format!("{v} is above the limit of {max}")))
            }
            _ => Ok(()),
        }
    }

    /// A duration of at least `min` and at most `max`, or `"off"` (`None`).
    fn duration_or_off(
        &self,
        value: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Option<Duration>, ConfigError> {
        match value {
            Some(v) if v.get_ref().trim() == "off" => Ok(None),
            Some(v) => match self.duration_within(value, field, default, max)? {
                d if d < min => Err(self.err(
                    Some(v.span()),
                    field,
                    format!(
                        "must be at least {}, or \"off\"",
                        humantime::format_duration(min)
                    ),
                )),
                d => Ok(Some(d)),
            },
            None => Ok(Some(default)),
        }
    }

    fn config(&self, raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
        let d = &raw.daemon;
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let state_dir = abs(d.state_dir.as_deref().unwrap_or(Path::new("state")));
        let daemon = DaemonSettings {
            jobs_dir: abs(d.jobs_dir.as_deref().unwrap_or(Path::new("jobs"))),
            database: match &d.database {
                None => database::Database::Sqlite(state_dir.join("nightshift.db")),
                Some(v) if database::Database::is_postgres_url(v.get_ref()) => {
                    let file = d.database_password_file.as_deref().map(abs);
                    database::Database::Postgres(Box::new(
                        database::Target::parse(v.get_ref(), file.as_deref())
                            .map_err(|m| self.err(Some(v.span()), "daemon.database", m))?,
                    ))
                }
                Some(v) if v.get_ref().is_empty() => {
                    return Err(self.err(
                        Some(v.span()),
                        "daemon.database",
                        "is empty: give a file path or a postgresql:// URL",
                    ));
                }
                Some(v) => database::Database::Sqlite(abs(Path::new(v.get_ref()))),
            },
            node: match &d.node {
                None => default_node(),
                Some(v) => {
                    let n = v.get_ref();
                    if n.is_empty()
                        || n.len() > 64
                        || !n
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    {
                        return Err(self.err(
                            Some(v.span()),
                            "daemon.node",
                            format!(
                                "{:?} is not 1 to 64 letters, digits, '-', '_' or '.'",
                                crate::domain::units::escaped(n)
                            ),
                        ));
                    }
                    n.clone()
                }
            },
            state_dir,
            default_deadline: self.positive_duration(
                &d.default_deadline,
                "daemon.default_deadline",
                Duration::from_secs(86_400),
                bounds::MAX_DEADLINE,
            )?,
            rescan_interval: self.duration(
                &d.rescan_interval,
                "daemon.rescan_interval",
                Duration::from_secs(10),
            )?,
            request_timeout: self.positive_duration(
                &d.request_timeout,
                "daemon.request_timeout",
                Duration::from_secs(120),
                bounds::MAX_CONFIG_DURATION,
            )?,
            shutdown_grace: self.duration(
                &d.shutdown_grace,
                "daemon.shutdown_grace",
                Duration::from_secs(10),
            )?,
            safety_margin: self.duration(
                &d.safety_margin,
                "daemon.safety_margin",
                Duration::from_secs(600),
            )?,
            run_after_deadline: match d.after_deadline.as_ref().map(|v| (v, v.get_ref().as_str())) {
                None | Some((_, "expire")) => false,
                Some((_, "run")) => true,
                Some((v, other)) => {
                    return Err(self.err(
                        Some(v.span()),
                        "daemon.after_deadline",
                        format!("'{other}' is not \"expire\" or \"run\""),
                    ));
                }
            },
            retry: crate::domain::policy::RetryPolicy {
                max_attempts: match &d.max_attempts {
                    Some(n) if u64::from(*n.get_ref()) > bounds::MAX_ATTEMPTS => {
                        return Err(self.err(
                            Some(n.span()),
                            "daemon.max_attempts",
                            format!(
                                "{} is above the limit of {}",
                                n.get_ref(),
                                bounds::MAX_ATTEMPTS
                            ),
                        ));
                    }
                    n => n.as_ref().map_or(8, |n| *n.get_ref()).max(1),
                },
                base: self.duration(&d.retry_base, "daemon.retry_base", Duration::from_secs(1))?,
                cap: self.duration(&d.retry_max, "daemon.retry_max", Duration::from_secs(300))?,
            },
            retention: self.duration_or_off(
                &d.retention,
                "daemon.retention",
                Duration::from_secs(30 * 86_400),
                Duration::from_secs(1),
                bounds::MAX_RETENTION,
            )?,
            maintenance: match &d.maintenance {
                None => DEFAULT_MAINTENANCE.to_string(),
                Some(v) => {
                    let expr = v.get_ref().trim();
                    crate::domain::units::check_cron(expr, Utc::now())
                        .map_err(|m| self.err(Some(v.span()), "daemon.maintenance", m))?;
                    expr.to_string()
                }
            },
            checkpoint_every: self.duration_or_off(
                &d.checkpoint_every,
                "daemon.checkpoint_every",
                Duration::from_secs(600),
                Duration::from_secs(1),
                bounds::MAX_CONFIG_DURATION,
            )?,
            max_in_flight: self.count(
                &d.max_in_flight,
                "daemon.max_in_flight",
                MAX_IN_FLIGHT_LIMIT,
                1024,
            )? as u32,
        };
        let http = self.http(&raw.http, &daemon.state_dir, &abs)?;
        if daemon.rescan_interval.is_zero() {
            return Err(self.err(
                d.rescan_interval.as_ref().map(|s| s.span()),
                "daemon.rescan_interval",
                "must be positive",
            ));
        }

        let mut catalog = Catalog::default();
        let mut flex_pending: Vec<(ModelId, Price)> = Vec::new();
        let mut batch_pending: Vec<(ModelId, Price)> = Vec::new();
        let mut transports = Vec::new();
        let mut budgets = Vec::new();
        if raw.providers.is_empty() {
            return Err(self.err(
                None,
                "providers",
                "at least one [[providers]] entry is required",
            ));
        }
        for (pi, p) in raw.providers.into_iter().enumerate() {
            let field = |f: &str| format!("providers[{pi}].{f}");
            let name = p.name.get_ref().trim().to_string();
            if name.is_empty() || name.contains('/') {
                return Err(self.err(
                    Some(p.name.span()),
                    field("name"),
                    "must be non-empty and contain no '/'",
                ));
            }
            if catalog.provider_id(&name).is_some() {
                return Err(self.err(
                    Some(p.name.span()),
                    field("name"),
                    format!("duplicate provider '{name}'"),
                ));
            }
            if !(0.0..=0.9).contains(&p.reserve) {
                return Err(self.err(
                    Some(p.name.span()),
                    field("reserve"),
                    "must be between 0.0 and 0.9",
                ));
            }
            self.number(
                p.markup,
                Some(p.name.span()),
                field("markup"),
                0.0,
                bounds::MAX_MARKUP,
                "a markup",
            )?;
            for (v, f, max) in [
                (p.rpm.map(u64::from), "rpm", bounds::MAX_RPM),
                (p.tpm, "tpm", bounds::MAX_TPM),
                (p.rpd.map(u64::from), "rpd", bounds::MAX_RPD),
                (
                    p.concurrency.map(u64::from),
                    "concurrency",
                    bounds::MAX_CONCURRENCY,
                ),
            ] {
                self.limit(v, Some(p.name.span()), field(f), max)?;
            }
            let transport = match p.kind.get_ref().as_str() {
                kind @ ("openai" | "anthropic") => {
                    let wire = if kind == "anthropic" {
                        Wire::Anthropic
                    } else {
                        Wire::OpenAi
                    };
                    let (url, span) = match (&p.base_url, wire) {
                        (Some(b), _) => (
                            b.get_ref().trim_end_matches('/').to_string(),
                            Some(b.span()),
                        ),
                        (None, Wire::Anthropic) => (ANTHROPIC_BASE_URL.to_string(), None),
                        (None, Wire::OpenAi) => {
                            return Err(self.err(
                                Some(p.kind.span()),
                                field("base_url"),
                                "required for kind = \"openai\"",
                            ));
                        }
                    };
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(self.err(
                            span,
                            field("base_url"),
                            "must start with http:// or https://",
                        ));
                    }
                    let key = self.api_key(&p, pi)?;
                    let opt = |v: &Option<Spanned<String>>, f: &str| {
                        v.as_ref()
                            .map(|_| {
                                self.positive_duration(
                                    v,
                                    &field(f),
                                    Duration::ZERO,
                                    bounds::MAX_CONFIG_DURATION,
                                )
                            })
                            .transpose()
                    };
                    Transport::OpenAi {
                        wire,
                        base_url: url,
                        api_key: None,
                        key,
                        key_source: match (&p.api_key_env, &p.api_key_file) {
                            (Some(v), _) => format!("env {}", v.get_ref()),
                            (_, Some(f)) => format!("file {}", f.get_ref().display()),
                            _ => String::new(),
                        },
                        timeout: opt(&p.timeout, "timeout")?,
                        connect_timeout: opt(&p.connect_timeout, "connect_timeout")?,
                    }
                }
                "simulated" => Transport::Simulated {
                    latency: self.duration(
                        &p.latency,
                        &field("latency"),
                        Duration::from_millis(150),
                    )?,
                    ms_per_output_token: self.number(
                        p.ms_per_output_token.unwrap_or(1.0),
                        Some(p.name.span()),
                        field("ms_per_output_token"),
                        0.0,
                        bounds::MAX_MS_PER_OUTPUT_TOKEN,
                        "a number of milliseconds",
                    )?,
                    failure_rate: if (0.0..=1.0).contains(&p.failure_rate) {
                        p.failure_rate
                    } else {
                        return Err(self.err(
                            Some(p.name.span()),
                            field("failure_rate"),
                            "must be between 0.0 and 1.0",
                        ));
                    },
                },
                other => {
                    return Err(self.err(
                        Some(p.kind.span()),
                        field("kind"),
                        format!(
                            "unknown kind '{other}' (expected \"openai\", \"anthropic\" or \"simulated\")"
                        ),
                    ));
                }
            };
            let mut windows = Vec::new();
            for (wi, w) in p.price_windows.iter().enumerate() {
                windows.push(self.window(w, &field(&format!("price_windows[{wi}]")))?);
            }
            let provider_id = catalog.providers.len();
            for (cap, period, f) in [
                (
                    p.daily_budget_usd,
                    crate::domain::policy::Period::Day,
                    "daily_budget_usd",
                ),
                (
                    p.monthly_budget_usd,
                    crate::domain::policy::Period::Month,
                    "monthly_budget_usd",
                ),
            ] {
                if let Some(cap) = cap {
                    self.number(
                        cap,
                        Some(p.name.span()),
                        field(f),
                        0.0,
                        bounds::MAX_BUDGET_USD,
                        "a number of USD",
                    )?;
                    budgets.push(crate::domain::policy::Budget {
                        provider: Some(provider_id),
                        period,
                        cap_usd: cap,
                    });
                }
            }
            catalog.providers.push(ProviderInfo {
                name: name.clone(),
                region: p.region.clone(),
                markup: p.markup,
                windows,
                limits: Limits {
                    rpm: p.rpm,
                    rpd: p.rpd,
                    tpm: p.tpm,
                    concurrency: p.concurrency,
                    reserve: p.reserve,
                },
                simulated: matches!(transport, Transport::Simulated { .. }),
                wire: match &transport {
                    Transport::OpenAi { wire, .. } => *wire,
                    Transport::Simulated { .. } => Wire::OpenAi,
                },
                flex: None,
                batch: None,
            });
            transports.push(transport);
            if p.models.is_empty() {
                return Err(self.err(
                    Some(p.name.span()),
                    field("models"),
                    "a provider needs at least one [[providers.models]]",
                ));
            }
            for (mi, m) in p.models.iter().enumerate() {
                let mfield = |f: &str| field(&format!("models[{mi}].{f}"));
                let mname = m.name.get_ref().trim().to_string();
                if mname.is_empty() {
                    return Err(self.err(Some(m.name.span()), mfield("name"), "must be non-empty"));
                }
                if catalog
                    .models
                    .iter()
                    .any(|x| x.provider == provider_id && x.name == mname)
                {
                    return Err(self.err(
                        Some(m.name.span()),
                        mfield("name"),
                        format!("duplicate model '{mname}' in provider '{name}'"),
                    ));
                }
                for (v, f) in [
                    (m.input_per_mtok, "input_per_mtok"),
                    (m.output_per_mtok, "output_per_mtok"),
                    (
                        m.cached_input_per_mtok.unwrap_or(0.0),
                        "cached_input_per_mtok",
                    ),
                    (
                        m.cache_write_per_mtok.unwrap_or(0.0),
                        "cache_write_per_mtok",
                    ),
                ] {
                    self.number(
                        v,
                        Some(m.name.span()),
                        mfield(f),
                        0.0,
                        bounds::MAX_PRICE_PER_MTOK,
                        "a price in USD per million tokens",
                    )?;
                }
                let endpoints = match &m.endpoints {
                    None => [Endpoint::ChatCompletions].into_iter().collect(),
                    Some(list) => {
                        let mut set = BTreeSet::new();
                        for e in list.get_ref() {
                            set.insert(Endpoint::from_url(e).ok_or_else(|| {
                                self.err(
                                    Some(list.span()),
                                    mfield("endpoints"),
                                    format!("unsupported endpoint '{e}' (expected /v1/chat/completions or /v1/embeddings)"),
                                )
                            })?);
                        }
                        set
                    }
                };
                if catalog.providers[provider_id].wire == Wire::Anthropic
                    && endpoints.contains(&Endpoint::Embeddings)
                {
                    return Err(self.err(
                        Some(m.name.span()),
                        mfield("endpoints"),
                        "Anthropic's API has no /v1/embeddings",
                    ));
                }
                let mut mwindows = Vec::new();
                for (wi, w) in m.price_windows.iter().enumerate() {
                    mwindows.push(self.window(w, &mfield(&format!("price_windows[{wi}]")))?);
                }
                for (v, f, table) in [
                    (
                        m.flex_input_per_mtok,
                        "flex_input_per_mtok",
                        p.flex.is_some(),
                    ),
                    (
                        m.flex_output_per_mtok,
                        "flex_output_per_mtok",
                        p.flex.is_some(),
                    ),
                    (
                        m.batch_input_per_mtok,
                        "batch_input_per_mtok",
                        p.batch.is_some(),
                    ),
                    (
                        m.batch_output_per_mtok,
                        "batch_output_per_mtok",
                        p.batch.is_some(),
                    ),
                ] {
                    if let Some(v) = v {
                        if !table {
                            let channel = f.split('_').next().unwrap_or_default();
                            return Err(self.err(
                                Some(m.name.span()),
                                mfield(f),
                                format!("needs a [providers.{channel}] table on its provider"),
                            ));
                        }
                        self.number(
                            v,
                            Some(m.name.span()),
                            mfield(f),
                            0.0,
                            bounds::MAX_PRICE_PER_MTOK,
                            "a price in USD per million tokens",
                        )?;
                    }
                }
                catalog.models.push(Model {
                    channel: Channel::Sync,
                    standard: None,
                    provider: provider_id,
                    name: mname,
                    cached_input_per_mtok: m.cached_input_per_mtok,
                    cache_write_per_mtok: m.cache_write_per_mtok,
                    list: Price {
                        input_per_mtok: m.input_per_mtok,
                        output_per_mtok: m.output_per_mtok,
                    },
                    windows: mwindows,
                    endpoints,
                    limits: if m.rpm.is_some()
                        || m.tpm.is_some()
                        || m.rpd.is_some()
                        || m.concurrency.is_some()
                    {
                        for (v, f, max) in [
                            (m.rpm.map(u64::from), "rpm", bounds::MAX_RPM),
                            (m.tpm, "tpm", bounds::MAX_TPM),
                            (m.rpd.map(u64::from), "rpd", bounds::MAX_RPD),
                            (
                                m.concurrency.map(u64::from),
                                "concurrency",
                                bounds::MAX_CONCURRENCY,
                            ),
                        ] {
                            self.limit(v, Some(m.name.span()), mfield(f), max)?;
                        }
                        Some(Limits {
                            rpm: m.rpm,
                            tpm: m.tpm,
                            rpd: m.rpd,
                            concurrency: m.concurrency,
                            reserve: p.reserve,
                        })
                    } else {
                        None
                    },
                });
            }
            if let Some(flex) = &p.flex {
                let (terms, rows) = self.flex(flex, &p, provider_id, &catalog, &field)?;
                catalog.providers[provider_id].flex = Some(terms);
                flex_pending.extend(rows);
            }
            if let Some(batch) = &p.batch {
                let (terms, rows) = self.batch(batch, &p, provider_id, &catalog, &field)?;
                catalog.providers[provider_id].batch = Some(terms);
                batch_pending.extend(rows);
            }
        }
        // Flex rows, then batch rows, come after every standard row, so a
        // configuration without them numbers its models as before.
        for (std, price) in flex_pending {
            let row = catalog.flex_row(std, price);
            catalog.models.push(row);
        }
        for (std, price) in batch_pending {
            let row = catalog.batch_row(std, price);
            catalog.models.push(row);
        }

        for (class, members) in &raw.classes {
            let field = format!("classes.{class}");
            if catalog.classes.contains_key(class) || class.contains('/') {
                return Err(self.err(
                    Some(members.span()),
                    field,
                    "class names must be unique and contain no '/'",
                ));
            }
            if members.get_ref().is_empty() {
                return Err(self.err(
                    Some(members.span()),
                    field,
                    "a class needs at least one model",
                ));
            }
            let mut ids = Vec::new();
            for member in members.get_ref() {
                let (provider, model) = member.get_ref().split_once('/').ok_or_else(|| {
                    self.err(
                        Some(member.span()),
                        &field,
                        format!("'{}' must be written provider/model", member.get_ref()),
                    )
                })?;
                let id = catalog
                    .models
                    .iter()
                    .position(|m| m.name == model && catalog.providers[m.provider].name == provider)
                    .ok_or_else(|| {
                        self.err(
                            Some(member.span()),
                            &field,
                            format!("no model '{}' is configured", member.get_ref()),
                        )
                    })?;
                ids.push(id);
            }
            // Each member's flex and batch rows join the class after every
            // standard member (the reference stays first).
            let flex: Vec<ModelId> = ids.iter().filter_map(|&id| catalog.flex_of(id)).collect();
            let batch: Vec<ModelId> = ids.iter().filter_map(|&id| catalog.batch_of(id)).collect();
            ids.extend(flex);
            ids.extend(batch);
            catalog.classes.insert(class.clone(), ids);
        }

        for (cap, period, f) in [
            (
                raw.budget.daily_usd,
                crate::domain::policy::Period::Day,
                "budget.daily_usd",
            ),
            (
                raw.budget.monthly_usd,
                crate::domain::policy::Period::Month,
                "budget.monthly_usd",
            ),
        ] {
            if let Some(cap) = cap {
                let span = cap.span();
                let cap = *cap.get_ref();
                self.number(
                    cap,
                    Some(span),
                    f,
                    0.0,
                    bounds::MAX_BUDGET_USD,
                    "a number of USD",
                )?;
                budgets.push(crate::domain::policy::Budget {
                    provider: None,
                    period,
                    cap_usd: cap,
                });
            }
        }
        Ok(Config {
            origin: self.file.to_string(),
            daemon,
            http,
            catalog,
            transports,
            budgets,
        })
    }

    /// A flex or batch channel's `discount`: a fraction above 0 and at most
    /// 1, or NaN where it is not set (every model then sets its own prices,
    /// which `channel_rows` checks).
    fn channel_discount(
        &self,
        value: &Option<Spanned<f64>>,
        field: &str,
    ) -> Result<f64, ConfigError> {
        match value {
            Some(d) => {
                let v = *d.get_ref();
                if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                    return Err(self.err(
                        Some(d.span()),
                        field,
                        format!("{v} is not a fraction above 0 and at most 1 (0.5: half price)"),
                    ));
                }
                Ok(v)
            }
            None => Ok(f64::NAN),
        }
    }

    /// The price of each `offered` model (by its standard row) on a flex or
    /// batch `channel`: the model's own channel prices (`prices` reads them
    /// from its table), else its list price × `discount`, which is then
    /// required.
    #[allow(clippy::too_many_arguments)]
    fn channel_rows(
        &self,
        p: &RawProvider,
        catalog: &Catalog,
        offered: Vec<ModelId>,
        discount: f64,
        prices: impl Fn(&RawModel) -> (Option<f64>, Option<f64>),
        channel: &str,
        span: Option<Range<usize>>,
        discount_field: &str,
    ) -> Result<Vec<(ModelId, Price)>, ConfigError> {
        let raw = |id: ModelId| {
            p.models
                .iter()
                .find(|r| r.name.get_ref().trim() == catalog.models[id].name)
        };
        let priced = |id: ModelId| raw(id).is_some_and(|r| matches!(prices(r), (Some(_), Some(_))));
        if discount.is_nan() && !offered.iter().all(|&id| priced(id)) {
            return Err(self.err(
                span,
                discount_field,
                format!(
                    "required unless every {channel} model sets {channel}_input_per_mtok and {channel}_output_per_mtok"
                ),
            ));
        }
        Ok(offered
            .into_iter()
            .map(|id| {
                let list = catalog.models[id].list;
                let (input, output) = raw(id).map_or((None, None), &prices);
                let price = Price {
                    input_per_mtok: input.unwrap_or(list.input_per_mtok * discount),
                    output_per_mtok: output.unwrap_or(list.output_per_mtok * discount),
                };
                (id, price)
            })
            .collect())
    }

    /// `[providers.flex]`: its terms, and the flex price of each model
    /// offered there (by its standard row).
    fn flex(
        &self,
        flex: &Spanned<RawFlex>,
        p: &RawProvider,
        provider: ProviderId,
        catalog: &Catalog,
        field: &dyn Fn(&str) -> String,
    ) -> Result<(FlexTerms, Vec<(ModelId, Price)>), ConfigError> {
        let f = flex.get_ref();
        let span = Some(flex.span());
        if catalog.providers[provider].wire == Wire::Anthropic {
            return Err(self.err(
                span,
                field("flex"),
                "Anthropic's API has no flex tier (service_tier \"flex\" is OpenAI's and Gemini's)",
            ));
        }
        let discount = self.channel_discount(&f.discount, &field("flex.discount"))?;
        let timeout = self.positive_duration(
            &f.timeout,
            &field("flex.timeout"),
            Duration::from_secs(15 * 60),
            bounds::MAX_CONFIG_DURATION,
        )?;
        let backoff = self.duration(&f.backoff, &field("flex.backoff"), Duration::from_secs(60))?;
        let simulated_refusal_fraction = self.simulated_fraction(
            &f.simulated_refusal_fraction,
            p,
            "flex.simulated_refusal_fraction",
            field,
        )?;
        let own: Vec<ModelId> = (0..catalog.models.len())
            .filter(|&m| catalog.models[m].provider == provider)
            .collect();
        let offered: Vec<ModelId> = match &f.models {
            None => own
                .iter()
                .copied()
                .filter(|&m| {
                    catalog.models[m]
                        .endpoints
                        .contains(&Endpoint::ChatCompletions)
                })
                .collect(),
            Some(list) => {
                let mut ids = Vec::new();
                for name in list.get_ref() {
                    let id = own
                        .iter()
                        .copied()
                        .find(|&m| catalog.models[m].name == name.get_ref().trim())
                        .ok_or_else(|| {
                            self.err(
                                Some(name.span()),
                                field("flex.models"),
                                format!("no model '{}' in this provider", name.get_ref()),
                            )
                        })?;
                    if !catalog.models[id]
                        .endpoints
                        .contains(&Endpoint::ChatCompletions)
                    {
                        return Err(self.err(
                            Some(name.span()),
                            field("flex.models"),
                            format!(
                                "'{}' serves no /v1/chat/completions: flex is for chat",
                                name.get_ref()
                            ),
                        ));
                    }
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                ids
            }
        };
        let rows = self.channel_rows(
            p,
            catalog,
            offered,
            discount,
            |r| (r.flex_input_per_mtok, r.flex_output_per_mtok),
            "flex",
            span,
            &field("flex.discount"),
        )?;
        Ok((
            FlexTerms {
                discount: if discount.is_nan() { 1.0 } else { discount },
                timeout,
                backoff,
                simulated_refusal_fraction,
            },
            rows,
        ))
    }

    /// A simulated-only fraction of `[providers.flex]` or `[providers.batch]`
    /// (`name`, e.g. "batch.simulated_late_fraction"): 0 by default, from 0
    /// to 1, refused on a provider that is not `kind = "simulated"`.
    fn simulated_fraction(
        &self,
        v: &Option<Spanned<f64>>,
        p: &RawProvider,
        name: &str,
        field: &dyn Fn(&str) -> String,
    ) -> Result<f64, ConfigError> {
        let Some(v) = v else { return Ok(0.0) };
        if p.kind.get_ref().trim() != "simulated" {
            return Err(self.err(
                Some(v.span()),
                field(name),
                "only a simulated provider (kind = \"simulated\") takes this",
            ));
        }
        self.number(
            *v.get_ref(),
            Some(v.span()),
            field(name),
            0.0,
            1.0,
            "a fraction",
        )
    }

    /// `[providers.batch]`: its terms, and the batch price of each model
    /// offered there (by its standard row).
    fn batch(
        &self,
        batch: &Spanned<RawBatch>,
        p: &RawProvider,
        provider: ProviderId,
        catalog: &Catalog,
        field: &dyn Fn(&str) -> String,
    ) -> Result<(BatchTerms, Vec<(ModelId, Price)>), ConfigError> {
        let b = batch.get_ref();
        let span = Some(batch.span());
        let discount = self.channel_discount(&b.discount, &field("batch.discount"))?;
        let (completion_window, window) = match &b.completion_window {
            None => ("24h".to_string(), Duration::from_secs(86_400)),
            Some(w) => {
                let d = self.positive_duration(
                    &b.completion_window,
                    &field("batch.completion_window"),
                    Duration::from_secs(86_400),
                    Duration::from_secs(7 * 86_400),
                )?;
                (w.get_ref().trim().to_string(), d)
            }
        };
        let expected_turnaround = self.positive_duration(
            &b.expected_turnaround,
            &field("batch.expected_turnaround"),
            Duration::from_secs(3600).min(window),
            window,
        )?;
        let max_requests = match &b.max_requests {
            None => 50_000,
            Some(n) => {
                let v = *n.get_ref();
                if !(1..=100_000).contains(&v) {
                    return Err(self.err(
                        Some(n.span()),
                        field("batch.max_requests"),
                        format!("{v} is not from 1 to 100000"),
                    ));
                }
                v as u32
            }
        };
        let max_bytes = match &b.max_bytes {
            None => 200_000_000,
            Some(v) => match parse_size(v.get_ref()) {
                Ok(n) if (1024..=1 << 30).contains(&n) => n,
                Ok(n) => {
                    return Err(self.err(
                        Some(v.span()),
                        field("batch.max_bytes"),
                        format!("{n} bytes is not from 1KiB to 1GiB"),
                    ));
                }
                Err(m) => return Err(self.err(Some(v.span()), field("batch.max_bytes"), m)),
            },
        };
        let poll_every = self.duration_within(
            &b.poll_every,
            &field("batch.poll_every"),
            Duration::from_secs(30),
            Duration::from_secs(3600),
        )?;
        if poll_every < Duration::from_millis(100) {
            return Err(self.err(
                b.poll_every.as_ref().map(|v| v.span()),
                field("batch.poll_every"),
                "must be at least 100ms",
            ));
        }
        let simulated = p.kind.get_ref().trim() == "simulated";
        let not_simulated = |span: Range<usize>, name: &str| {
            self.err(
                Some(span),
                field(name),
                "only a simulated provider (kind = \"simulated\") takes this",
            )
        };
        let simulated_turnaround = match &b.simulated_turnaround {
            None => (
                expected_turnaround.mul_f64(0.25),
                expected_turnaround.mul_f64(1.5),
            ),
            Some(v) if !simulated => {
                return Err(not_simulated(v.span(), "batch.simulated_turnaround"));
            }
            Some(v) => {
                let bad =
                    |m: String| self.err(Some(v.span()), field("batch.simulated_turnaround"), m);
                let [from, to] = v.get_ref().as_slice() else {
                    return Err(bad("must be two durations, [from, to]".into()));
                };
                let from = crate::domain::units::parse_duration(from).map_err(bad)?;
                let to = crate::domain::units::parse_duration(to).map_err(bad)?;
                if from > to || to > window {
                    return Err(bad(format!(
                        "needs from <= to <= the completion window ({completion_window})"
                    )));
                }
                (from, to)
            }
        };
        let simulated_late_fraction = self.simulated_fraction(
            &b.simulated_late_fraction,
            p,
            "batch.simulated_late_fraction",
            field,
        )?;
        let simulated_expire_fraction = self.simulated_fraction(
            &b.simulated_expire_fraction,
            p,
            "batch.simulated_expire_fraction",
            field,
        )?;
        let own: Vec<ModelId> = (0..catalog.models.len())
            .filter(|&m| catalog.models[m].provider == provider)
            .collect();
        let offered: Vec<ModelId> = match &b.models {
            None => own,
            Some(list) => {
                let mut ids = Vec::new();
                for name in list.get_ref() {
                    let id = own
                        .iter()
                        .copied()
                        .find(|&m| catalog.models[m].name == name.get_ref().trim())
                        .ok_or_else(|| {
                            self.err(
                                Some(name.span()),
                                field("batch.models"),
                                format!("no model '{}' in this provider", name.get_ref()),
                            )
                        })?;
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                ids
            }
        };
        let rows = self.channel_rows(
            p,
            catalog,
            offered,
            discount,
            |r| (r.batch_input_per_mtok, r.batch_output_per_mtok),
            "batch",
            span,
            &field("batch.discount"),
        )?;
        Ok((
            BatchTerms {
                discount: if discount.is_nan() { 1.0 } else { discount },
                completion_window,
                window,
                expected_turnaround,
                max_requests,
                max_bytes,
                poll_every,
                simulated_turnaround,
                simulated_late_fraction,
                simulated_expire_fraction,
            },
            rows,
        ))
    }

    fn http(
        &self,
        h: &RawHttp,
        state_dir: &Path,
        abs: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<HttpSettings, ConfigError> {
        let tcp = match &h.tcp {
            None => None,
            Some(v) => {
                let addr: std::net::SocketAddr = v.get_ref().trim().parse().map_err(|_| {
                    self.err(
                        Some(v.span()),
                        "http.tcp",
                        format!(
                            "'{}' is not an IP address and port like 127.0.0.1:8088 or [::1]:8088",
                            v.get_ref()
                        ),
                    )
                })?;
                if !addr.ip().is_loopback() && !h.allow_non_loopback {
                    return Err(self.err(
                        Some(v.span()),
                        "http.tcp",
                        format!(
                            "{addr} is not a loopback address; set http.allow_non_loopback = true \
                             to expose the API beyond this machine"
                        ),
                    ));
                }
                Some(addr)
            }
        };
        let size = |v: &Option<Spanned<String>>, field: &str, default: u64| match v {
            None => Ok(default),
            Some(v) => match parse_size(v.get_ref()) {
                Ok(0) => Err(self.err(Some(v.span()), field, "must be positive")),
                Ok(n) if n > bounds::MAX_HTTP_BODY => Err(self.err(
                    Some(v.span()),
                    field,
                    format!(
                        "{n} bytes is above the limit of {} bytes (512MiB)",
                        bounds::MAX_HTTP_BODY
                    ),
                )),
                Ok(n) => Ok(n),
                Err(m) => Err(self.err(Some(v.span()), field, m)),
            },
        };
        let timeout = |v: &Option<Spanned<String>>, field: &str, default_secs: u64| match v {
            None => Ok(Duration::from_secs(default_secs)),
            Some(v) => match parse_duration(v.get_ref()) {
                Ok(d) if (HTTP_TIMEOUT_MIN..=HTTP_TIMEOUT_MAX).contains(&d) => Ok(d),
                Ok(_) => Err(self.err(
                    Some(v.span()),
                    field,
                    format!(
                        "must be between {} and {}",
                        humantime::format_duration(HTTP_TIMEOUT_MIN),
                        humantime::format_duration(HTTP_TIMEOUT_MAX)
                    ),
                )),
                Err(m) => Err(self.err(Some(v.span()), field, m)),
            },
        };
        Ok(HttpSettings {
            socket: h
                .socket
                .as_deref()
                .map(abs)
                .unwrap_or_else(|| state_dir.join("nightshift.sock")),
            tcp,
            allow_non_loopback: h.allow_non_loopback,
            token_file: h
                .token_file
                .as_deref()
                .map(abs)
                .unwrap_or_else(|| state_dir.join("api-token")),
            max_body: size(&h.max_body, "http.max_body", 10_000_000)?,
            max_upload: size(&h.max_upload, "http.max_upload", 100_000_000)?,
            header_timeout: timeout(&h.header_timeout, "http.header_timeout", 10)?,
            body_timeout: timeout(&h.body_timeout, "http.body_timeout", 60)?,
            idle_timeout: timeout(&h.idle_timeout, "http.idle_timeout", 60)?,
            max_connections: self.count(
                &h.max_connections,
                "http.max_connections",
                HTTP_MAX_CONNECTIONS,
                256,
            )? as usize,
        })
    }

    fn api_key(&self, p: &RawProvider, pi: usize) -> Result<KeyRef, ConfigError> {
        let field = |f: &str| format!("providers[{pi}].{f}");
        let at = |span: Range<usize>, f: &str, source: KeySource| KeyRef {
            source,
            file: self.file.to_string(),
            line: Some(line_of(self.text, span.start)),
            field: field(f),
        };
        match (&p.api_key_env, &p.api_key_file) {
            (Some(var), None) if !is_env_name(var.get_ref()) => Err(self.err(
                Some(var.span()),
                field("api_key_env"),
                // Never the value: it may be the key itself, pasted here.
                "is not the name of an environment variable (letters, digits and '_', not \
                 starting with a digit); if it is the key itself, put the key in that \
                 variable's value or in api_key_file, and its name here",
            )),
            (Some(var), None) => Ok(at(
                var.span(),
                "api_key_env",
                KeySource::Env(var.get_ref().clone()),
            )),
            (None, Some(path)) => Ok(at(
                path.span(),
                "api_key_file",
                KeySource::File(path.get_ref().clone()),
            )),
            (Some(var), Some(_)) => Err(self.err(
                Some(var.span()),
                field("api_key_env"),
                "set api_key_env or api_key_file, not both",
            )),
            (None, None) => Err(self.err(
                Some(p.kind.span()),
                field("api_key_env"),
                format!(
                    "kind = \"{}\" needs api_key_env or api_key_file",
                    p.kind.get_ref()
                ),
            )),
        }
    }

    fn window(&self, w: &RawWindow, field: &str) -> Result<PriceWindow, ConfigError> {
        let f = |x: &str| format!("{field}.{x}");
        let price = |v: f64| v.is_finite() && (0.0..=bounds::MAX_PRICE_PER_MTOK).contains(&v);
        let effect = match (w.multiplier, w.input_per_mtok, w.output_per_mtok) {
            (Some(m), None, None)
                if m.is_finite() && (0.0..=bounds::MAX_MULTIPLIER).contains(&m) =>
            {
                WindowEffect::Multiplier(m)
            }
            (None, Some(i), Some(o)) if price(i) && price(o) => WindowEffect::Prices(Price {
                input_per_mtok: i,
                output_per_mtok: o,
            }),
            _ => {
                return Err(self.err(
                    Some(w.name.span()),
                    f("multiplier"),
                    format!(
                        "a window needs either a multiplier from 0 to {}, or input_per_mtok and \
                         output_per_mtok from 0 to {}",
                        bounds::MAX_MULTIPLIER,
                        bounds::MAX_PRICE_PER_MTOK
                    ),
                ));
            }
        };
        let timezone = match &w.timezone {
            None => Tz::UTC,
            Some(tz) => tz.get_ref().parse::<Tz>().map_err(|_| {
                self.err(
                    Some(tz.span()),
                    f("timezone"),
                    format!("unknown IANA time zone '{}'", tz.get_ref()),
                )
            })?,
        };
        let days = match &w.days {
            None => weekday_set(&ALL_DAYS),
            Some(list) => weekday_set(
                &list
                    .get_ref()
                    .iter()
                    .map(|d| {
                        d.parse::<Weekday>().map_err(|_| {
                            self.err(
                                Some(list.span()),
                                f("days"),
                                format!("'{d}' is not a weekday"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let hours = match &w.hours {
            None => Vec::new(),
            Some(list) => list
                .get_ref()
                .iter()
                .map(|h| parse_range(h).map_err(|m| self.err(Some(list.span()), f("hours"), m)))
                .collect::<Result<_, _>>()?,
        };
        let dates = |v: &Option<Spanned<Vec<String>>>,
                     name: &str|
         -> Result<Option<BTreeSet<NaiveDate>>, ConfigError> {
            v.as_ref()
                .map(|list| {
                    list.get_ref()
                        .iter()
                        .map(|d| {
                            NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|_| {
                                self.err(
                                    Some(list.span()),
                                    f(name),
                                    format!("'{d}' is not a YYYY-MM-DD date"),
                                )
                            })
                        })
                        .collect()
                })
                .transpose()
        };
        let instant = |v: &Spanned<String>, name: &str| {
            DateTime::parse_from_rfc3339(v.get_ref())
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    self.err(
                        Some(v.span()),
                        f(name),
                        format!("'{}' is not an RFC 3339 timestamp", v.get_ref()),
                    )
                })
        };
        let absolute = match (&w.start, &w.end) {
            (None, None) => None,
            (Some(s), Some(e)) => {
                let (s_t, e_t) = (instant(s, "start")?, instant(e, "end")?);
                if e_t <= s_t {
                    return Err(self.err(Some(e.span()), f("end"), "must be after start"));
                }
                Some((s_t, e_t))
            }
            (Some(s), None) => Some((instant(s, "start")?, DateTime::<Utc>::MAX_UTC)),
            (None, Some(e)) => Some((DateTime::<Utc>::MIN_UTC, instant(e, "end")?)),
        };
        Ok(PriceWindow {
            name: w.name.get_ref().clone(),
            days,
            hours,
            timezone,
            dates: dates(&w.dates, "dates")?,
            except_dates: dates(&w.except_dates, "except_dates")?.unwrap_or_default(),
            absolute,
            effect,
        })
    }
}

/// Whether `s` can name an environment variable as shells write them.
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 256
}

/// Parses `HH:MM-HH:MM` (end may be `24:00`; end before start crosses midnight).
fn parse_range(s: &str) -> Result<DailyRange, String> {
    let bad = || format!("'{s}' is not a HH:MM-HH:MM range");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let minute = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
    };
    let (start, end) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
    if start == end || start == 1440 {
        return Err(format!("'{s}' is empty"));
    }
    Ok(DailyRange {
        start_minute: start,
        end_minute: end,
    })
}

/// Parses a size in bytes: `1048576`, `512KB`, `10MB`, `1GB` (powers of
/// 1000) or `512KiB`, `10MiB`, `1GiB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("'{s}' is not a size like 10MB, 512KiB or 1048576");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(factor).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_simulated() {
        let c = Config::embedded_default();
        assert!(c.all_simulated());
        assert!(c.catalog.classes.contains_key("cheap-chat"));
        assert_eq!(c.daemon.default_deadline, Duration::from_secs(86_400));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "[daemon]\ndefault_deadline = \"soon\"\n";
        let e = Config::parse(text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(2), "daemon.default_deadline"),
            "{e}"
        );

        let text = "[[providers]]\nname = \"a\"\nkind = \"simulated\"\nrpm = \"many\"\n";
        let e = Config::parse(text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.field.contains("providers[0].rpm"), "{e}");

        let text = "[daemon]\ndefault_deadline = 5\n";
        let e = Config::parse(text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(2), "daemon.default_deadline"),
            "{e}"
        );

        let text = "[[providers]]\nname = \"a\"\nkind = \"simulated\"\nbogus = 1\n";
        let e = Config::parse(text, "x.toml", Path::new(".")).unwrap_err();
        assert!(e.message.contains("bogus"), "{e}");

        let text = "[[providers]]\nname = \"a\"\nkind = \"simulated\"\n[[providers.models]]\nname = \"m\"\n\
                    input_per_mtok = 1.0\noutput_per_mtok = 2.0\n[classes]\nc = [\"a/m\", \"a/nope\"]\n";
        let e = Config::parse(text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (Some(9), "classes.c"), "{e}");
        assert!(e.message.contains("a/nope"), "{e}");
        assert!(e.to_string().starts_with("x.toml:9: classes.c: "), "{e}");
    }

    #[test]
    fn missing_api_key_env_is_reported_without_the_value() {
        let text = "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
                    api_key_env = \"NIGHTSHIFT_TEST_SURELY_UNSET\"\n[[providers.models]]\nname = \"m\"\n\
                    input_per_mtok = 1.0\noutput_per_mtok = 2.0\n";
        // Parsing does not read keys; resolving them does, with the same error.
        let mut c = Config::parse(text, "x.toml", Path::new(".")).unwrap();
        let e = c.resolve_keys().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("x.toml:5: providers[0].api_key_env: "),
            "{e}"
        );
        assert!(!e.to_string().contains("sk-"), "{e}");
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(5), "providers[0].api_key_env"),
            "{e}"
        );
    }

    #[test]
    fn http_settings_default_under_the_state_dir_and_refuse_public_tcp() {
        let c = Config::embedded_default();
        assert_eq!(c.http.socket, Path::new("./state/nightshift.sock"));
        assert_eq!(c.http.token_file, Path::new("./state/api-token"));
        assert_eq!(
            (c.http.max_body, c.http.max_upload),
            (10_000_000, 100_000_000)
        );
        // The dashboard's listener: loopback, on a port the OS picks.
        assert_eq!(c.http.tcp, Some("127.0.0.1:0".parse().unwrap()));

        let providers = "[[providers]]\nname = \"a\"\nkind = \"simulated\"\n[[providers.models]]\nname = \"m\"\n\
                         input_per_mtok = 1.0\noutput_per_mtok = 2.0\n";
        let text = format!("[http]\ntcp = \"127.0.0.1:8088\"\nmax_body = \"1MiB\"\n{providers}");
        let c = Config::parse(&text, "x.toml", Path::new("/etc/ns")).unwrap();
        assert_eq!(c.http.tcp, Some("127.0.0.1:8088".parse().unwrap()));
        assert_eq!(c.http.max_body, 1 << 20);

        let text = format!("[http]\ntcp = \"0.0.0.0:8088\"\n{providers}");
        let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (Some(2), "http.tcp"), "{e}");
        assert!(e.message.contains("allow_non_loopback"), "{e}");
        let text =
            format!("[http]\ntcp = \"0.0.0.0:8088\"\nallow_non_loopback = true\n{providers}");
        assert!(Config::parse(&text, "x.toml", Path::new(".")).is_ok());

        let text = format!("[http]\ntcp = \"localhost\"\n{providers}");
        let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (Some(2), "http.tcp"), "{e}");
        // A value of the wrong type names the key as written.
        let text = format!("[http]\ntcp = 8088\n{providers}");
        let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (Some(2), "http.tcp"), "{e}");
        let text = format!("[http]\nmax_upload = \"lots\"\n{providers}");
        let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(2), "http.max_upload"),
            "{e}"
        );
    }

    #[test]
    fn http_connection_limits_default_and_are_bounded_with_file_line_and_field() {
        let c = Config::embedded_default();
        assert_eq!(
            (
                c.http.header_timeout,
                c.http.body_timeout,
                c.http.idle_timeout,
                c.http.max_connections
            ),
            (
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(60),
                256
            )
        );
        let providers = "[[providers]]\nname = \"a\"\nkind = \"simulated\"\n[[providers.models]]\nname = \"m\"\n\
                         input_per_mtok = 1.0\noutput_per_mtok = 2.0\n";
        let parse = |http: &str| {
            Config::parse(
                &format!("[http]\n{http}\n{providers}"),
                "x.toml",
                Path::new("."),
            )
        };
        let c = parse(
            "header_timeout = \"2s\"\nbody_timeout = \"100ms\"\nidle_timeout = \"1h\"\nmax_connections = 1",
        )
        .unwrap();
        assert_eq!(
            (
                c.http.header_timeout,
                c.http.body_timeout,
                c.http.idle_timeout,
                c.http.max_connections
            ),
            (
                Duration::from_secs(2),
                Duration::from_millis(100),
                Duration::from_secs(3600),
                1
            )
        );
        for (line, field) in [
            ("header_timeout = \"0s\"", "http.header_timeout"),
            ("body_timeout = \"99ms\"", "http.body_timeout"),
            ("idle_timeout = \"61m\"", "http.idle_timeout"),
            ("idle_timeout = \"forever\"", "http.idle_timeout"),
            ("max_connections = 0", "http.max_connections"),
            ("max_connections = -5", "http.max_connections"),
            ("max_connections = 65537", "http.max_connections"),
        ] {
            let e = parse(&format!("socket = \"s.sock\"\n{line}")).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (Some(3), field), "{line}: {e}");
            assert!(
                e.to_string().starts_with(&format!("x.toml:3: {field}: ")),
                "{e}"
            );
        }
        let e = parse("header_timeout = \"0s\"").unwrap_err();
        assert!(e.message.contains("between 100ms and 1h"), "{e}");
        let e = parse("max_connections = \"many\"").unwrap_err();
        assert_eq!(e.field, "http.max_connections", "{e}");
    }

    #[test]
    fn maintenance_keys_default_parse_and_name_file_line_and_field() {
        let c = Config::embedded_default();
        assert_eq!(c.daemon.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(c.daemon.maintenance, "0 17 3 * * *");
        assert_eq!(c.daemon.checkpoint_every, Some(Duration::from_secs(600)));
        assert_eq!(c.daemon.max_in_flight, 1024);

        let providers = "[[providers]]\nname = \"a\"\nkind = \"simulated\"\n[[providers.models]]\nname = \"m\"\n\
                         input_per_mtok = 1.0\noutput_per_mtok = 2.0\n";
        let parse = |daemon: &str| {
            Config::parse(
                &format!("[daemon]\n{daemon}\n{providers}"),
                "x.toml",
                Path::new("."),
            )
        };
        let c = parse(
            "retention = \"7d\"\nmaintenance = \"0 0 4 * * Sun\"\ncheckpoint_every = \"off\"",
        )
        .unwrap();
        assert_eq!(c.daemon.retention, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(c.daemon.maintenance, "0 0 4 * * Sun");
        assert_eq!(c.daemon.checkpoint_every, None);
        let c = parse("retention = \"off\"").unwrap();
        assert_eq!(c.daemon.retention, None);

        for (daemon, field, says) in [
            (
                "retention = \"a month\"",
                "daemon.retention",
                "not a duration",
            ),
            (
                "retention = \"0s\"",
                "daemon.retention",
                "at least 1s, or \"off\"",
            ),
            (
                "maintenance = \"17 3 * * *\"",
                "daemon.maintenance",
                "with seconds",
            ),
            (
                "maintenance = \"0 0 25 * * *\"",
                "daemon.maintenance",
                "not a cron expression",
            ),
            (
                "checkpoint_every = \"500ms\"",
                "daemon.checkpoint_every",
                "at least 1s",
            ),
            (
                "checkpoint_every = \"often\"",
                "daemon.checkpoint_every",
                "not a duration",
            ),
            (
                "max_in_flight = 0",
                "daemon.max_in_flight",
                "not between 1 and 65536",
            ),
            (
                "max_in_flight = 65537",
                "daemon.max_in_flight",
                "not between 1 and 65536",
            ),
        ] {
            let e = parse(&format!("state_dir = \"s\"\n{daemon}")).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (Some(3), field), "{e}");
            assert!(e.message.contains(says), "{e}");
            assert!(
                e.to_string().starts_with(&format!("x.toml:3: {field}: ")),
                "{e}"
            );
        }
    }

    const ONE_PROVIDER: &str = "[[providers]]\nname = \"a\"\nkind = \"simulated\"\n";
    const ONE_MODEL: &str =
        "[[providers.models]]\nname = \"m\"\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n";

    #[test]
    fn every_number_and_duration_is_bounded_with_file_line_and_field() {
        // (daemon lines, provider lines, model lines, field, message, line)
        let cases: &[(&str, &str, &str, &str, &str, usize)] = &[
            (
                "default_deadline = \"100000000y\"",
                "",
                "",
                "daemon.default_deadline",
                "longer than the limit of 365d",
                2,
            ),
            (
                "default_deadline = \"0s\"",
                "",
                "",
                "daemon.default_deadline",
                "must be positive",
                2,
            ),
            (
                "safety_margin = \"100000000y\"",
                "",
                "",
                "daemon.safety_margin",
                "longer than the limit of 365d",
                2,
            ),
            (
                "request_timeout = \"100000000y\"",
                "",
                "",
                "daemon.request_timeout",
                "longer than the limit",
                2,
            ),
            (
                "request_timeout = \"0s\"",
                "",
                "",
                "daemon.request_timeout",
                "must be positive",
                2,
            ),
            (
                "shutdown_grace = \"1000y\"",
                "",
                "",
                "daemon.shutdown_grace",
                "longer than the limit",
                2,
            ),
            (
                "rescan_interval = \"1000y\"",
                "",
                "",
                "daemon.rescan_interval",
                "longer than the limit",
                2,
            ),
            (
                "retry_base = \"1000y\"",
                "",
                "",
                "daemon.retry_base",
                "longer than the limit",
                2,
            ),
            (
                "retry_max = \"1000y\"",
                "",
                "",
                "daemon.retry_max",
                "longer than the limit",
                2,
            ),
            (
                "retention = \"1000y\"",
                "",
                "",
                "daemon.retention",
                "longer than the limit of 3650d",
                2,
            ),
            (
                "checkpoint_every = \"1000y\"",
                "",
                "",
                "daemon.checkpoint_every",
                "longer than the limit",
                2,
            ),
            (
                "default_deadline = \"99999999999999999999999y\"",
                "",
                "",
                "daemon.default_deadline",
                "not a duration",
                2,
            ),
            (
                "max_attempts = 4000000000",
                "",
                "",
                "daemon.max_attempts",
                "above the limit of 1000",
                2,
            ),
            (
                "",
                "ms_per_output_token = inf",
                "",
                "providers[0].ms_per_output_token",
                "inf is not",
                4,
            ),
            (
                "",
                "ms_per_output_token = nan",
                "",
                "providers[0].ms_per_output_token",
                "NaN is not",
                4,
            ),
            (
                "",
                "ms_per_output_token = -1.0",
                "",
                "providers[0].ms_per_output_token",
                "-1 is not",
                4,
            ),
            (
                "",
                "ms_per_output_token = 1e300",
                "",
                "providers[0].ms_per_output_token",
                "from 0 to 10000",
                4,
            ),
            (
                "",
                "latency = \"100000000y\"",
                "",
                "providers[0].latency",
                "longer than the limit",
                6,
            ),
            (
                "",
                "failure_rate = nan",
                "",
                "providers[0].failure_rate",
                "between 0.0 and 1.0",
                4,
            ),
            (
                "",
                "markup = inf",
                "",
                "providers[0].markup",
                "inf is not a markup",
                4,
            ),
            (
                "",
                "markup = 1e9",
                "",
                "providers[0].markup",
                "from 0 to 100",
                4,
            ),
            (
                "",
                "reserve = nan",
                "",
                "providers[0].reserve",
                "between 0.0 and 0.9",
                4,
            ),
            (
                "",
                "tpm = 18446744073709551615",
                "",
                "providers[0].tpm",
                "above the limit of 1000000000000",
                4,
            ),
            (
                "",
                "concurrency = 4000000000",
                "",
                "providers[0].concurrency",
                "above the limit of 1000000",
                4,
            ),
            (
                "",
                "rpm = 4000000000",
                "",
                "providers[0].rpm",
                "above the limit of 1000000000",
                4,
            ),
            (
                "",
                "daily_budget_usd = inf",
                "",
                "providers[0].daily_budget_usd",
                "inf is not a number of USD",
                4,
            ),
            (
                "",
                "monthly_budget_usd = -1.0",
                "",
                "providers[0].monthly_budget_usd",
                "not a number of USD",
                4,
            ),
            (
                "",
                "",
                "input_per_mtok = inf",
                "providers[0].models[0].input_per_mtok",
                "inf is not a price",
                8,
            ),
            (
                "",
                "",
                "output_per_mtok = 1e300",
                "providers[0].models[0].output_per_mtok",
                "from 0 to 100000",
                8,
            ),
            (
                "",
                "",
                "tpm = 18446744073709551615",
                "providers[0].models[0].tpm",
                "above the limit",
                8,
            ),
            (
                "",
                "",
                "concurrency = 0",
                "providers[0].models[0].concurrency",
                "must be positive",
                8,
            ),
        ];
        for (daemon, provider, model, field, says, line) in cases {
            let model_lines = if model.is_empty() {
                ONE_MODEL.to_string()
            } else {
                // Replace the key the case sets, keep the others.
                let key = model.split(" =").next().unwrap();
                let kept: Vec<&str> = ONE_MODEL
                    .lines()
                    .filter(|l| !l.starts_with(&format!("{key} =")))
                    .collect();
                format!("{}\n{model}\n", kept.join("\n"))
            };
            let text = format!("[daemon]\n{daemon}\n{ONE_PROVIDER}{provider}\n{model_lines}");
            let e = Config::parse(&text, "x.toml", Path::new("."))
                .map(|_| ())
                .expect_err(&text);
            assert_eq!(e.field, *field, "{text}\n{e}");
            assert!(e.message.contains(says), "{text}\n{e}");
            assert_eq!(e.line, Some(*line), "{text}\n{e}");
        }
        // The limits themselves are accepted.
        let text = format!(
            "[daemon]\ndefault_deadline = \"365d\"\nsafety_margin = \"365d\"\nretention = \"3650d\"\n\
             {ONE_PROVIDER}ms_per_output_token = 10000.0\nmarkup = 100.0\ntpm = 1000000000000\n{ONE_MODEL}"
        );
        Config::parse(&text, "x.toml", Path::new(".")).unwrap();
    }

    #[test]
    fn http_sizes_and_window_prices_are_bounded() {
        let providers = format!("{ONE_PROVIDER}{ONE_MODEL}");
        let text = format!("[http]\nmax_upload = \"1000GB\"\n{providers}");
        let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(2), "http.max_upload"),
            "{e}"
        );
        assert!(e.message.contains("above the limit"), "{e}");
        let text = format!("[http]\nmax_body = \"99999999999999999999\"\n{providers}");
        let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!(e.field, "http.max_body", "{e}");
        for window in [
            "multiplier = inf",
            "multiplier = 1e9",
            "input_per_mtok = inf\noutput_per_mtok = 1.0",
            "input_per_mtok = 1.0\noutput_per_mtok = nan",
        ] {
            let text = format!(
                "{ONE_PROVIDER}[[providers.price_windows]]\nname = \"w\"\n{window}\n{ONE_MODEL}"
            );
            let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
            assert_eq!(
                e.field, "providers[0].price_windows[0].multiplier",
                "{window}: {e}"
            );
            assert_eq!(e.line, Some(5), "{window}: {e}");
        }
        let text = format!("[budget]\ndaily_usd = inf\n{providers}");
        let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(2), "budget.daily_usd"),
            "{e}"
        );
    }

    #[test]
    fn a_key_pasted_into_api_key_env_is_not_echoed() {
        let openai = |key_line: &str| {
            format!(
                "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
                 {key_line}\n{ONE_MODEL}"
            )
        };
        for value in ["sk-proj-AbC123xyz", "1ABC", "", "MY KEY", "sk_live=1"] {
            let text = openai(&format!("api_key_env = \"{value}\""));
            let e = Config::parse(&text, "x.toml", Path::new(".")).unwrap_err();
            assert_eq!(
                (e.line, e.field.as_str()),
                (Some(5), "providers[0].api_key_env"),
                "{e}"
            );
            assert!(
                e.message
                    .contains("not the name of an environment variable"),
                "{e}"
            );
            if !value.is_empty() {
                assert!(!e.to_string().contains(value), "{e}");
            }
        }
        let c = Config::parse(
            &openai("api_key_env = \"OPENAI_API_KEY_2\""),
            "x.toml",
            Path::new("."),
        );
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn a_key_file_others_can_read_is_warned_about_without_its_content() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "sk-secret-value\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
             api_key_file = \"{}\"\n{ONE_MODEL}",
            key.display()
        );
        let mut c = Config::parse(&text, "x.toml", Path::new(".")).unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains(&key.display().to_string()) && w[0].contains("644"),
            "{w:?}"
        );
        assert!(
            w[0].starts_with("x.toml:5: providers[0].api_key_file: "),
            "{w:?}"
        );
        assert!(!w[0].contains("sk-secret"), "{w:?}");
        c.resolve_keys().unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn batch_adds_a_row_per_model_at_the_discount_and_names_file_line_field_when_bad() {
        let text = "[[providers]]\nname = \"o\"\nkind = \"simulated\"\n\
                    [providers.batch]\ndiscount = 0.5\nexpected_turnaround = \"5m\"\n\
                    [[providers.models]]\nname = \"a\"\ninput_per_mtok = 1.0\noutput_per_mtok = 4.0\n\
                    [[providers.models]]\nname = \"b\"\ninput_per_mtok = 2.0\noutput_per_mtok = 8.0\n\
                    batch_input_per_mtok = 0.3\nbatch_output_per_mtok = 1.0\n\
                    [classes]\nc = [\"o/b\", \"o/a\"]\n";
        let c = Config::parse(text, "f.toml", Path::new(".")).unwrap();
        let cat = &c.catalog;
        let a = cat.model_id("o/a@batch").unwrap();
        let b = cat.model_id("o/b@batch").unwrap();
        assert_eq!((a, b), (2, 3));
        assert_eq!(cat.models[a].channel, Channel::Batch);
        assert_eq!(cat.batch_of(0), Some(a));
        assert_eq!(cat.models[a].list.output_per_mtok, 2.0);
        // Explicit batch prices win over the discount.
        assert_eq!(cat.models[b].list.input_per_mtok, 0.3);
        assert_eq!(cat.classes["c"], vec![1, 0, 3, 2]);
        let terms = cat.providers[0].batch.clone().unwrap();
        assert_eq!(terms.completion_window, "24h");
        assert_eq!(terms.expected_turnaround, Duration::from_secs(300));
        assert_eq!((terms.max_requests, terms.max_bytes), (50_000, 200_000_000));

        for (from, to, field) in [
            ("discount = 0.5", "discount = 1.5", "batch.discount"),
            (
                "discount = 0.5",
                "discount = 0.5\nmax_requests = 0",
                "batch.max_requests",
            ),
            (
                "discount = 0.5",
                "discount = 0.5\nmax_requests = 100001",
                "batch.max_requests",
            ),
            (
                "discount = 0.5",
                "discount = 0.5\nmax_bytes = \"10\"",
                "batch.max_bytes",
            ),
            (
                "discount = 0.5",
                "discount = 0.5\npoll_every = \"10ms\"",
                "batch.poll_every",
            ),
            (
                "discount = 0.5",
                "discount = 0.5\ncompletion_window = \"30d\"",
                "batch.completion_window",
            ),
            (
                "expected_turnaround = \"5m\"",
                "expected_turnaround = \"25h\"",
                "batch.expected_turnaround",
            ),
            ("discount = 0.5\n", "models = [\"a\"]\n", "batch.discount"),
            (
                "discount = 0.5\n",
                "discount = 0.5\nmodels = [\"zz\"]\n",
                "batch.models",
            ),
        ] {
            let e = Config::parse(&text.replace(from, to), "f.toml", Path::new(".")).unwrap_err();
            assert_eq!(e.field, format!("providers[0].{field}"), "{to}: {e}");
            assert!(e.line.is_some(), "{to}: {e}");
        }
        // Batch prices without a [providers.batch] table.
        let e = Config::parse(
            &text.replace(
                "[providers.batch]\ndiscount = 0.5\nexpected_turnaround = \"5m\"\n",
                "",
            ),
            "f.toml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(
            e.field, "providers[0].models[1].batch_input_per_mtok",
            "{e}"
        );
        assert!(
            e.to_string().contains("needs a [providers.batch] table"),
            "{e}"
        );
    }

    #[test]
    fn flex_adds_a_row_per_model_at_the_discount_and_names_file_line_field_when_bad() {
        let text = "[[providers]]\nname = \"o\"\nkind = \"simulated\"\n\
                    [providers.flex]\ndiscount = 0.5\n\
                    [[providers.models]]\nname = \"a\"\ninput_per_mtok = 1.0\noutput_per_mtok = 4.0\n\
                    cached_input_per_mtok = 0.1\n\
                    [[providers.models]]\nname = \"b\"\ninput_per_mtok = 2.0\noutput_per_mtok = 8.0\n\
                    flex_input_per_mtok = 0.3\nflex_output_per_mtok = 1.0\n\
                    [[providers.models]]\nname = \"e\"\ninput_per_mtok = 0.02\noutput_per_mtok = 0.0\n\
                    endpoints = [\"/v1/embeddings\"]\n\
                    [classes]\nc = [\"o/b\", \"o/a\"]\n";
        let c = Config::parse(text, "f.toml", Path::new(".")).unwrap();
        let cat = &c.catalog;
        // Standard rows keep their ids; flex rows follow, embeddings get none.
        assert_eq!(cat.models.len(), 5);
        let a = cat.model_id("o/a@flex").unwrap();
        let b = cat.model_id("o/b@flex").unwrap();
        assert_eq!((a, b), (3, 4));
        assert_eq!(cat.models[a].channel, Channel::Flex);
        assert_eq!(
            (cat.models[a].standard, cat.models[a].name.as_str()),
            (Some(0), "a")
        );
        assert_eq!(
            cat.models[a].list,
            Price {
                input_per_mtok: 0.5,
                output_per_mtok: 2.0
            }
        );
        assert_eq!(cat.models[a].cached_input_per_mtok, Some(0.05));
        // Explicit flex prices win over the discount.
        assert_eq!(
            cat.models[b].list,
            Price {
                input_per_mtok: 0.3,
                output_per_mtok: 1.0
            }
        );
        // Classes gain the flex rows after the standard members; the reference stays.
        assert_eq!(cat.classes["c"], vec![1, 0, 4, 3]);
        assert_eq!(
            cat.resolve("a", Endpoint::ChatCompletions).unwrap().models,
            vec![0, 3]
        );
        let terms = cat.providers[0].flex.unwrap();
        assert_eq!(
            (terms.discount, terms.timeout),
            (0.5, Duration::from_secs(900))
        );

        for bad in ["0", "1.5", "-0.5", "nan"] {
            let e = Config::parse(
                &text.replace("discount = 0.5", &format!("discount = {bad}")),
                "f.toml",
                Path::new("."),
            )
            .unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("f.toml:5: providers[0].flex.discount: "),
                "{bad}: {e}"
            );
        }
        let e = Config::parse(
            &text.replace("discount = 0.5\n", "models = [\"zz\"]\n"),
            "f.toml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(5), "providers[0].flex.models"),
            "{e}"
        );
        let e = Config::parse(
            &text.replace("[providers.flex]\ndiscount = 0.5\n", ""),
            "f.toml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(e.field, "providers[0].models[1].flex_input_per_mtok", "{e}");
        let e = Config::parse(
            &text.replace("discount = 0.5", "discount = 0.5\ntimeout = \"0s\""),
            "f.toml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(6), "providers[0].flex.timeout"),
            "{e}"
        );
        // Only the listed models go on flex.
        let c = Config::parse(
            &text.replace("discount = 0.5", "discount = 0.5\nmodels = [\"b\"]"),
            "f.toml",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.catalog.models.len(), 4);
        assert_eq!(c.catalog.flex_of(1), Some(3));
        assert_eq!(c.catalog.flex_of(0), None);
    }

    #[test]
    fn kind_anthropic_defaults_its_base_url_and_takes_cached_prices() {
        let text = "[[providers]]\nname = \"a\"\nkind = \"anthropic\"\napi_key_env = \"K\"\n\
                    [[providers.models]]\nname = \"claude-haiku-4-5\"\ninput_per_mtok = 1.0\noutput_per_mtok = 5.0\n\
                    cached_input_per_mtok = 0.1\ncache_write_per_mtok = 1.25\n";
        let c = Config::parse(text, "t.toml", Path::new(".")).unwrap();
        assert!(matches!(
            &c.transports[0],
            Transport::OpenAi { wire: Wire::Anthropic, base_url, .. } if base_url == ANTHROPIC_BASE_URL
        ));
        assert_eq!(c.catalog.providers[0].wire, Wire::Anthropic);
        assert_eq!(c.catalog.models[0].cached_input_per_mtok, Some(0.1));
        assert_eq!(c.catalog.models[0].cache_write_per_mtok, Some(1.25));
        let e = Config::parse(
            &text.replace("cached_input_per_mtok = 0.1", "cached_input_per_mtok = -1"),
            "t.toml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cached_input_per_mtok"), "{e}");
        let e = Config::parse(
            &format!("{text}endpoints = [\"/v1/embeddings\"]\n"),
            "t.toml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("endpoints"), "{e}");
        let e = Config::parse(
            &text.replace("api_key_env = \"K\"\n", ""),
            "t.toml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("kind = \"anthropic\" needs api_key_env"),
            "{e}"
        );
    }

    #[test]
    fn secret_debug_is_redacted() {
        assert_eq!(format!("{:?}", Secret::new("sk-123")), "Secret([redacted])");
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(
            parse_range("16:30-00:30").unwrap(),
            DailyRange {
                start_minute: 990,
                end_minute: 30
            }
        );
        assert_eq!(
            parse_range("00:00-24:00").unwrap(),
            DailyRange {
                start_minute: 0,
                end_minute: 1440
            }
        );
        assert!(parse_range("10:00-10:00").is_err());
        assert!(parse_range("25:00-01:00").is_err());
    }
}
