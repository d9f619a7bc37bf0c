//! The shared test harness: a loopback provider that speaks the OpenAI wire
//! format, the real `nightshift` binary in a temporary directory, and
//! condition waits with timeouts (never bare sleeps).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use nightshift::api::client::{Client, Target};
use nightshift::config::{Config, HttpSettings};
use serde_json::{Value, json};

/// The API key the test configs read from the environment.
pub const TEST_KEY: &str = "sk-test-loopback-0123456789";
pub const KEY_ENV: &str = "NIGHTSHIFT_TEST_API_KEY";

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] for a condition that must itself await (a request): polls
/// every 20 ms until it holds or `timeout` passes. Each poll is cut off at
/// the deadline (plus one 20 ms tick), so a request that never gets an
/// answer cannot hang the wait.
pub async fn wait_until_async(
    what: &str,
    timeout: Duration,
    mut condition: impl AsyncFnMut() -> bool,
) {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if tokio::time::timeout(left + Duration::from_millis(20), condition())
            .await
            .unwrap_or(false)
        {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request as the loopback provider saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
    /// Anthropic's `x-api-key` and `anthropic-version` headers.
    pub x_api_key: Option<String>,
    pub anthropic_version: Option<String>,
    pub body: Value,
    /// When the request arrived.
    pub at: Instant,
}

impl Seen {
    pub fn model(&self) -> &str {
        self.body["model"].as_str().unwrap_or_default()
    }
    /// The text of the last message (chat) — tests put markers there.
    pub fn text(&self) -> String {
        self.body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string()
    }
}

/// How the loopback provider answers a request.
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub delay: Duration,
    /// Extra response headers (Retry-After, rate limits).
    pub headers: Vec<(&'static str, String)>,
    /// Sent instead of `body` when set: a malformed answer.
    pub raw_body: Option<&'static str>,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            delay: Duration::ZERO,
            headers: Vec::new(),
            raw_body: None,
        }
    }
}

type Behaviour = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A loopback HTTP server speaking OpenAI's chat-completions and
/// embeddings formats, with its rate-limit headers and error bodies.
pub struct LoopbackProvider {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Clone)]
struct ServerState {
    seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Behaviour,
    /// Answers with Anthropic's headers instead of OpenAI's.
    anthropic: bool,
}

/// A successful chat completion with this usage, as OpenAI returns it.
pub fn completion(model: &str, content: &str, prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": 1_795_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": 0}}
    })
}

/// A Messages API answer with this text, stop reason and usage, as
/// Anthropic returns it (`input_tokens` excludes the cached tokens).
pub fn anthropic_message(
    model: &str,
    text: &str,
    stop_reason: &str,
    usage: [u64; 4], // input, cache read, cache creation, output
) -> Value {
    json!({
        "id": "msg_loopback", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason, "stop_sequence": null,
        "usage": {"input_tokens": usage[0], "cache_read_input_tokens": usage[1],
                  "cache_creation_input_tokens": usage[2], "output_tokens": usage[3]}
    })
}

/// Anthropic's error body shape.
pub fn anthropic_error(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// The usual Anthropic answer: `echo: <text>`, `end_turn`, 20 input, 100
/// cache-read, 30 cache-creation and 7 output tokens.
pub fn anthropic_reply(seen: &Seen) -> Reply {
    Reply::json(
        200,
        anthropic_message(
            seen.model(),
            &format!("echo: {}", seen.text()),
            "end_turn",
            [20, 100, 30, 7],
        ),
    )
}

/// OpenAI's error body shape.
pub fn openai_error(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// The default behaviour: 200 with usage 100 prompt / 10 completion tokens,
/// or for embeddings 8 prompt tokens; a message containing `status:NNN`
/// gets that status with an OpenAI error body instead.
pub fn default_reply(seen: &Seen) -> Reply {
    let text = seen.text();
    if let Some(i) = text.find("status:") {
        let status: u16 = text[i + 7..i + 10].parse().unwrap();
        let body = match status {
            400 => openai_error(
                "Invalid value for 'temperature': must be <= 2.",
                "invalid_request_error",
                None,
            ),
            _ => openai_error(
                "The server had an error while processing your request.",
                "server_error",
                None,
            ),
        };
        return Reply::json(status, body);
    }
    if seen.path.ends_with("/embeddings") {
        let body = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                          "model": seen.model(), "usage": {"prompt_tokens": 8, "total_tokens": 8}});
        return Reply::json(200, body);
    }
    Reply::json(
        200,
        completion(seen.model(), &format!("echo: {text}"), 100, 10),
    )
}

async fn handle(
    State(state): State<ServerState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let seen = Seen {
        path: uri.path().to_string(),
        authorization: header("authorization"),
        x_api_key: header("x-api-key"),
        anthropic_version: header("anthropic-version"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    };
    let reply = (state.behaviour)(&seen);
    state.seen.lock().unwrap().push(seen);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let status = StatusCode::from_u16(reply.status).unwrap();
    let mut response = match reply.raw_body {
        Some(raw) => (status, raw).into_response(),
        None => (status, axum::Json(reply.body)).into_response(),
    };
    let h = response.headers_mut();
    if state.anthropic {
        // Anthropic's: request-id, and limits with RFC 3339 resets.
        let reset = (chrono::Utc::now() + chrono::Duration::seconds(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        h.insert("request-id", "req_anthropic_loopback".parse().unwrap());
        for (kind, limit, remaining) in [
            ("requests", "4000", "3999"),
            ("tokens", "480000", "479000"),
            ("input-tokens", "400000", "399000"),
            ("output-tokens", "80000", "79900"),
        ] {
            h.insert(
                axum::http::HeaderName::try_from(format!("anthropic-ratelimit-{kind}-limit"))
                    .unwrap(),
                limit.parse().unwrap(),
            );
            h.insert(
                axum::http::HeaderName::try_from(format!("anthropic-ratelimit-{kind}-remaining"))
                    .unwrap(),
                remaining.parse().unwrap(),
            );
            h.insert(
                axum::http::HeaderName::try_from(format!("anthropic-ratelimit-{kind}-reset"))
                    .unwrap(),
                reset.parse().unwrap(),
            );
        }
    } else {
        h.insert("x-request-id", "req_loopback".parse().unwrap());
        h.insert("x-ratelimit-limit-requests", "10000".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "9999".parse().unwrap());
        h.insert("x-ratelimit-reset-requests", "6ms".parse().unwrap());
        h.insert("x-ratelimit-limit-tokens", "2000000".parse().unwrap());
        h.insert("x-ratelimit-remaining-tokens", "1999890".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "3ms".parse().unwrap());
    }
    for (name, value) in &reply.headers {
        h.insert(*name, value.parse().unwrap());
    }
    response
}

impl LoopbackProvider {
    /// Starts a provider with [`default_reply`].
    pub async fn start() -> LoopbackProvider {
        LoopbackProvider::with(default_reply).await
    }

    /// Starts a provider answering with `behaviour`.
    pub async fn with(
        behaviour: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> LoopbackProvider {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = ServerState {
            seen: seen.clone(),
            behaviour: Arc::new(behaviour),
            anthropic: false,
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/embeddings", post(handle))
            .with_state(state);
        LoopbackProvider::serve(app, seen).await
    }

    /// Starts a provider speaking Anthropic's Messages API
    /// (`POST /v1/messages`, Anthropic's rate-limit headers) answering with
    /// `behaviour`; [`anthropic_reply`] is the usual one.
    pub async fn anthropic(
        behaviour: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> LoopbackProvider {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = ServerState {
            seen: seen.clone(),
            behaviour: Arc::new(behaviour),
            anthropic: true,
        };
        let app = Router::new()
            .route("/v1/messages", post(handle))
            .with_state(state);
        LoopbackProvider::serve(app, seen).await
    }

    async fn serve(app: Router, seen: Arc<Mutex<Vec<Seen>>>) -> LoopbackProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        LoopbackProvider { addr, seen }
    }

    /// The base URL as configured (ends in /v1, like the SDKs').
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A provider entry for a test config.
pub struct ProviderSpec<'a> {
    pub name: &'a str,
    pub base_url: String,
    pub model: &'a str,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Extra TOML lines inside the [[providers]] table.
    pub extra: &'a str,
}

/// A config with these providers, a class `chat` over all their models (in
/// order), and the state and job folders inside `dir`.
pub fn config_toml(dir: &Path, providers: &[ProviderSpec]) -> String {
    let mut s = format!(
        "[daemon]\nstate_dir = \"{}\"\njobs_dir = \"{}\"\nrescan_interval = \"1s\"\nrequest_timeout = \"10s\"\nshutdown_grace = \"2s\"\n\
         max_attempts = 3\nretry_base = \"50ms\"\nretry_max = \"200ms\"\n\n",
        dir.join("state").display(),
        dir.join("jobs").display()
    );
    for p in providers {
        s.push_str(&format!(
            "[[providers]]\nname = \"{}\"\nkind = \"openai\"\nbase_url = \"{}\"\napi_key_env = \"{KEY_ENV}\"\n{}\n\
             [[providers.models]]\nname = \"{}\"\ninput_per_mtok = {:?}\noutput_per_mtok = {:?}\n\
             endpoints = [\"/v1/chat/completions\", \"/v1/embeddings\"]\n\n",
            p.name, p.base_url, p.extra, p.model, p.input_per_mtok, p.output_per_mtok
        ));
    }
    let members: Vec<String> = providers
        .iter()
        .map(|p| format!("\"{}/{}\"", p.name, p.model))
        .collect();
    s.push_str(&format!("[classes]\nchat = [{}]\n", members.join(", ")));
    s
}

/// The real `nightshift` binary running in a test directory.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The API's socket and token file as the daemon's configuration puts
    /// them (or why that configuration could not be read).
    http: Result<HttpSettings, String>,
}

static LOG_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Daemon {
    /// Writes `config` to `dir/nightshift.toml` and starts `nightshift serve --config` on it.
    pub fn start(dir: &Path, config: &str) -> Daemon {
        let path = dir.join("nightshift.toml");
        fs::write(&path, config).unwrap();
        Daemon::spawn(dir, &["serve", "--config", path.to_str().unwrap()])
    }

    /// [`Daemon::start`] with extra environment variables (e.g. `NIGHTSHIFT_FAULTS`).
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Daemon {
        let path = dir.join("nightshift.toml");
        fs::write(&path, config).unwrap();
        Daemon::spawn_with_env(dir, &["serve", "--config", path.to_str().unwrap()], env)
    }

    /// Waits (up to `timeout`) for the daemon to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("daemon running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "the daemon did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts `nightshift` with `args`, working directory `dir`.
    pub fn spawn(dir: &Path, args: &[&str]) -> Daemon {
        Daemon::spawn_with_env(dir, args, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables.
    pub fn spawn_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_command(dir, args, env, |_| {})
    }

    /// [`Daemon::start`] with the descriptor limit (`RLIMIT_NOFILE`, soft
    /// and hard) at `limit` from before the daemon runs, so that raising
    /// its soft limit to the hard one gains it nothing.
    pub fn start_with_fd_limit(dir: &Path, config: &str, limit: u64) -> Daemon {
        use std::os::unix::process::CommandExt;
        let path = dir.join("nightshift.toml");
        fs::write(&path, config).unwrap();
        let args = ["serve", "--config", path.to_str().unwrap()];
        Daemon::spawn_command(dir, &args, &[], |command| {
            let nofile = rustix::process::Rlimit {
                current: Some(limit),
                maximum: Some(limit),
            };
            // SAFETY: the closure only makes one system call (setrlimit),
            // which is async-signal-safe, and allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, nofile)
                        .map_err(std::io::Error::from)
                });
            }
        })
    }

    /// Starts `nightshift ARGS` in `dir` with `env`, after `customize` has
    /// adjusted the command.
    fn spawn_command(
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        customize: impl FnOnce(&mut Command),
    ) -> Daemon {
        let http = http_settings(dir, args);
        let n = LOG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = dir.join(format!("daemon-{n}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_nightshift"));
        command
            .args(args)
            .current_dir(dir)
            .env(KEY_ENV, TEST_KEY)
            .env("RUST_LOG", "nightshift=debug")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        customize(&mut command);
        let child = command.spawn().unwrap();
        Daemon {
            child: Some(child),
            dir: dir.to_path_buf(),
            log,
            http,
        }
    }

    pub fn jobs(&self) -> PathBuf {
        self.dir.join("jobs")
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to 20 s) for the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGHUP (reload the configuration).
    pub fn hup(&self) {
        let child = self.child.as_ref().expect("daemon running");
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // The test failed: show what the daemon said, for the CI log.
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
            eprintln!("--- last daemon log lines ({}) ---", self.log.display());
            for l in &lines[lines.len().saturating_sub(80)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// Drops a job file into the inbox the recommended way: written elsewhere,
/// then renamed in.
pub fn drop_file(jobs: &Path, name: &str, content: &str) {
    let tmp = jobs.join(format!(".{name}.part"));
    fs::create_dir_all(jobs.join("inbox")).unwrap();
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, jobs.join("inbox").join(name)).unwrap();
}

/// The lines of a JSONL file, parsed; empty if it does not exist.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// A chat job line.
pub fn chat_line(custom_id: &str, model: &str, text: &str, nightshift: Option<Value>) -> String {
    let mut line = json!({
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 20}
    });
    if let Some(n) = nightshift {
        line["nightshift"] = n;
    }
    line.to_string()
}

/// `POST /v1/jobs` with a JSONL body: the native API's submission.
pub async fn post_jsonl(
    client: &Client,
    body: String,
) -> Result<Value, nightshift::api::client::CallError> {
    client
        .json(
            hyper::Method::POST,
            "/v1/jobs",
            Some("application/jsonl"),
            body,
        )
        .await
}

/// Both outbox files of `stem`, once they exist.
pub async fn wait_for_outbox(
    jobs: &Path,
    stem: &str,
    timeout: Duration,
) -> (Vec<Value>, Vec<Value>) {
    let out = jobs.join("outbox").join(format!("{stem}.output.jsonl"));
    let err = jobs.join("outbox").join(format!("{stem}.errors.jsonl"));
    wait_until(&format!("outbox files for {stem}"), timeout, || {
        out.exists() && err.exists()
    })
    .await;
    (read_jsonl(&out), read_jsonl(&err))
}

// ---- the local HTTP API -----------------------------------------------------

/// `config_toml` plus an `[http]` table listening on a loopback TCP port
/// chosen by the OS (`127.0.0.1:0`) and these extra lines.
pub fn api_config_toml(dir: &Path, providers: &[ProviderSpec], http_extra: &str) -> String {
    format!(
        "{}\n[http]\ntcp = \"127.0.0.1:0\"\n{http_extra}\n",
        config_toml(dir, providers)
    )
}

/// A log line without ANSI colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The HTTP settings of `nightshift ARGS` run in `dir`, resolved as the
/// daemon and its CLI resolve them: `--config FILE` (relative to `dir`) or
/// the embedded default, whose relative paths are relative to `dir`.
fn http_settings(dir: &Path, args: &[&str]) -> Result<HttpSettings, String> {
    let config = args
        .iter()
        .position(|a| *a == "--config")
        .map(|i| dir.join(args.get(i + 1).expect("--config takes a file")));
    let mut http = match config {
        Some(path) => Config::load(&path).map_err(|e| e.to_string())?.http,
        None => Config::embedded_default().http,
    };
    http.socket = dir.join(&http.socket);
    http.token_file = dir.join(&http.token_file);
    Ok(http)
}

impl Daemon {
    fn http(&self) -> &HttpSettings {
        self.http.as_ref().unwrap_or_else(|e| {
            panic!("the daemon's HTTP settings: {e}");
        })
    }

    /// Waits until the daemon's API answers `GET /healthz` with 200 on its
    /// Unix socket (where its configuration puts it). Until the socket is
    /// bound, a connection failure just means "not yet". The daemon starts
    /// serving once every listener (the TCP one too) is bound and logged.
    pub async fn wait_ready(&self) {
        let socket = self.socket();
        let what = format!(
            "the daemon's API to answer GET /healthz on {}",
            socket.display()
        );
        wait_until_async(&what, Duration::from_secs(30), async || {
            let client = Client::new(Target::Unix(socket.clone()));
            matches!(
                client.send(Method::GET, "/healthz", None, Bytes::new()).await,
                Ok((status, _)) if status == StatusCode::OK
            )
        })
        .await;
    }

    /// The API socket, as the daemon's configuration places it.
    pub fn socket(&self) -> PathBuf {
        self.http().socket.clone()
    }

    /// The bearer token file's content.
    pub fn token(&self) -> String {
        fs::read_to_string(&self.http().token_file)
            .unwrap()
            .trim()
            .to_string()
    }

    /// The TCP address the API bound (from the log), once ready.
    pub async fn tcp_addr(&self) -> SocketAddr {
        self.wait_ready().await;
        let log = strip_ansi(&self.log_text());
        let line = log
            .lines()
            .find(|l| l.contains("HTTP API listening on TCP"))
            .expect("the API listens on TCP");
        let at = line.find("tcp=").expect("the log names the address") + 4;
        line[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A client of the API over the Unix socket, once ready.
    pub async fn unix_client(&self) -> Client {
        self.wait_ready().await;
        Client::new(Target::Unix(self.socket()))
    }

    /// A base URL (`http://127.0.0.1:PORT`) and token for the TCP listener.
    pub async fn tcp_base(&self) -> (String, String) {
        let addr = self.tcp_addr().await;
        (format!("http://{addr}"), self.token())
    }
}

/// A provider behaviour that refuses the first request whose text is
/// `limited` with a 429 and `retry-after-ms: 300` (a rate limit and a
/// pause), then answers every request as `then` does.
pub fn limited_once(
    then: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    let seen: Arc<Mutex<std::collections::HashMap<String, u32>>> = Default::default();
    move |s: &Seen| {
        let n = {
            let mut m = seen.lock().unwrap();
            let n = m.entry(s.text()).or_default();
            *n += 1;
            *n
        };
        if s.text() == "limited" && n == 1 {
            return Reply {
                headers: vec![("retry-after-ms", "300".into())],
                ..Reply::json(
                    429,
                    openai_error(
                        "Rate limit reached.",
                        "requests",
                        Some("rate_limit_exceeded"),
                    ),
                )
            };
        }
        then(s)
    }
}

/// One loopback provider `loop` with model `loop-model` (1 / 2 USD per Mtok).
pub fn one_provider(p: &LoopbackProvider) -> Vec<ProviderSpec<'static>> {
    vec![ProviderSpec {
        name: "loop",
        base_url: p.base_url(),
        model: "loop-model",
        input_per_mtok: 1.0,
        output_per_mtok: 2.0,
        extra: "",
    }]
}
