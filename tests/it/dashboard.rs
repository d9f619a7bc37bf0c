//! The dashboard in a real headless browser (Debian's `chromium` through
//! `chromedriver`, over WebDriver): logging in with `nightshift ui`'s link,
//! the overview's counts and the plan chart's bars against the JSON API, a
//! job's explanation, cancelling from the page, a provider batch on the
//! providers page, cross-site posts refused, and no request to anything
//! but the daemon. Without chromium and
//! chromedriver these tests fail and say how to install them (`.ci/run`
//! installs them).
//!
//! The session checks that need no browser (CSRF header, Origin, Host,
//! one-time codes, bearer-only routes) run against the daemon with reqwest.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::common::*;
use crate::http::later_window;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const WAIT: Duration = Duration::from_secs(30);

/// A chromedriver process and a headless chromium session through it.
/// chromedriver runs in a process group of its own, which the browser it
/// starts inherits: dropping this (a test that ends or fails) kills the
/// whole group, so no chromium outlives its test.
struct Headless {
    browser: Browser,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Headless {
    fn drop(&mut self) {
        kill_group(self.driver.id());
        let _ = self.driver.wait();
    }
}

/// Kills the process group `pgid` leads.
fn kill_group(pgid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pgid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn headless() -> Headless {
    let driver_bin = std::env::var("NIGHTSHIFT_CHROMEDRIVER").unwrap_or(CHROMEDRIVER.into());
    let chromium = std::env::var("NIGHTSHIFT_CHROMIUM").unwrap_or(CHROMIUM.into());
    for (what, path) in [("chromedriver", &driver_bin), ("chromium", &chromium)] {
        assert!(
            Path::new(path).exists(),
            "{what} is not at {path}: the dashboard's browser tests need Debian's chromium and \
             chromium-driver (apt-get install -y chromium chromium-driver; .ci/run installs them)"
        );
    }
    let port = free_port();
    let driver = Command::new(&driver_bin)
        .process_group(0)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromedriver");
    let profile = tempfile::tempdir().unwrap();
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--hide-scrollbars",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
    });
    let caps = caps.as_object().unwrap().clone();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + WAIT;
    let browser = loop {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(b) => break b,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "no WebDriver session from chromedriver on {url} within {WAIT:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Headless {
        browser,
        driver,
        _profile: profile,
    }
}

/// Waits until the element's text is `want` (the page refreshes itself).
async fn wait_text(b: &Browser, css: &str, want: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = String::new();
    while std::time::Instant::now() < deadline {
        if let Ok(e) = b.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
        {
            if t.trim() == want {
                return;
            }
            seen = t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{css}: text {seen:?}, not {want:?}, after {WAIT:?}");
}

const STATES: [&str; 6] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "expired",
    "cancelled",
];

/// Waits until the overview's count of every state is what `/v1/stats`
/// says at the same moment (the page refreshes itself every few seconds;
/// jobs may still be moving).
async fn wait_overview_matches_stats(b: &Browser, api: &nightshift::api::client::Client) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let before = api.get("/v1/stats").await.unwrap();
        let shown = b
            .execute(
                "return Object.fromEntries([...document.querySelectorAll('#jobs-by-state [data-state]')].map(e => [e.dataset.state, Number(e.querySelector('.n').textContent.replace(/,/g, ''))]));",
                vec![],
            )
            .await
            .unwrap_or(Value::Null);
        let after = api.get("/v1/stats").await.unwrap();
        let matches = before["jobs"] == after["jobs"]
            && STATES
                .iter()
                .all(|s| shown[s].as_u64().is_some() && shown[s] == after["jobs"][s]);
        if matches {
            return after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the overview shows {shown}, /v1/stats says {}",
            after["jobs"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `script` (which returns null until what it looks for is on the
/// page) until it returns something else. One script reads the page in one
/// go, so the page's own refresh cannot replace an element between a find
/// and a read (a stale element).
async fn wait_js(b: &Browser, what: &str, script: &str) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = b.execute(script, vec![]).await.unwrap_or(Value::Null);
        if !v.is_null() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every URL the page has loaded or fetched, its own included.
async fn requested_urls(b: &Browser) -> Vec<String> {
    let v = b
        .execute(
            "return [location.href].concat(performance.getEntriesByType('resource').map(e => e.name));",
            vec![],
        )
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect()
}

fn assert_loopback_only(urls: &[String]) {
    assert!(urls.len() > 1, "the page fetched nothing: {urls:?}");
    for u in urls {
        let host = u
            .split("://")
            .nth(1)
            .and_then(|r| r.split(['/', ':']).next())
            .unwrap_or("");
        assert!(
            host == "127.0.0.1" || host == "localhost",
            "the page requested {u}"
        );
    }
}

/// Where screenshots go: `$NIGHTSHIFT_SCREENSHOTS` (README's come from
/// `NIGHTSHIFT_SCREENSHOTS=docs/screenshots cargo test --test it dashboard`),
/// else `target/screenshots`.
fn screenshot_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os("NIGHTSHIFT_SCREENSHOTS")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target/screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn login_url(client: &nightshift::api::client::Client) -> String {
    let v = client
        .post_json("/v1/ui/login-codes", &json!({}))
        .await
        .unwrap();
    v["url"].as_str().unwrap().to_string()
}

/// A daemon whose one provider is 100× cheaper from two hours from now:
/// its jobs (24 h deadline) wait for that window.
async fn held_back_daemon(dir: &Path, provider: &LoopbackProvider) -> Daemon {
    let spec = ProviderSpec {
        name: "later",
        base_url: provider.base_url(),
        model: "later-chat",
        input_per_mtok: 1.0,
        output_per_mtok: 4.0,
        extra: later_window(),
    };
    let daemon = Daemon::start(dir, &api_config_toml(dir, &[spec], ""));
    daemon.wait_ready().await;
    daemon
}

async fn submit(client: &nightshift::api::client::Client, ids: &[&str]) {
    let body: String = ids
        .iter()
        .map(|id| chat_line(id, "chat", "hello", None) + "\n")
        .collect();
    let sub = client
        .json(
            hyper::Method::POST,
            "/v1/jobs",
            Some("application/jsonl"),
            body,
        )
        .await
        .unwrap();
    assert_eq!(sub["queued"], ids.len(), "{sub}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_logs_in_and_its_pages_agree_with_the_api() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = held_back_daemon(dir.path(), &provider).await;
    let api = daemon.unix_client().await;
    submit(&api, &["a", "b", "c"]).await;
    let h = headless().await;
    let b = &h.browser;

    // Before logging in the page says how to.
    let (base, token) = daemon.tcp_base().await;
    b.goto(&format!("{base}/ui/")).await.unwrap();
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#logged-out"))
        .await
        .unwrap();

    // The one-time link logs in and forwards to the overview.
    let url = login_url(&api).await;
    b.goto(&url).await.unwrap();
    let stats = wait_overview_matches_stats(b, &api).await;
    assert_eq!(stats["jobs"]["queued"], 3, "{stats}");
    assert!(
        b.current_url().await.unwrap().as_str().ends_with("/ui/"),
        "the code left the address bar"
    );
    // The cookie is out of the page's reach; the token is nowhere in it.
    let cookie = b.execute("return document.cookie;", vec![]).await.unwrap();
    assert_eq!(cookie, json!(""), "the session cookie is HttpOnly");
    assert!(!b.source().await.unwrap().contains(&token));
    // A used link does not log in again.
    let reuse = reqwest::get(&url).await.unwrap();
    assert_eq!(reuse.status(), 403);

    // The plan chart: one bar per (provider, slot) in the next 48 h, with
    // the jobs /v1/plan allocates there.
    b.goto(&format!("{base}/ui/#/plan")).await.unwrap();
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#plan-chart rect.alloc"))
        .await
        .unwrap();
    let plan = api.get("/v1/plan").await.unwrap();
    let horizon = chrono::DateTime::parse_from_rfc3339(plan["planned_at"].as_str().unwrap())
        .unwrap()
        + chrono::Duration::hours(48);
    let mut want: BTreeMap<(String, String), f64> = BTreeMap::new();
    for a in plan["allocations"].as_array().unwrap() {
        let start = a["start"].as_str().unwrap();
        if chrono::DateTime::parse_from_rfc3339(start).unwrap() < horizon {
            *want
                .entry((a["provider"].as_str().unwrap().into(), start.into()))
                .or_default() += a["jobs"].as_f64().unwrap();
        }
    }
    let bars = b
        .execute(
            "return [...document.querySelectorAll('#plan-chart rect.alloc')].map(r => [r.dataset.provider, r.dataset.start, Number(r.dataset.jobs)]);",
            vec![],
        )
        .await
        .unwrap();
    let mut got: BTreeMap<(String, String), f64> = BTreeMap::new();
    for bar in bars.as_array().unwrap() {
        *got.entry((
            bar[0].as_str().unwrap().into(),
            bar[1].as_str().unwrap().into(),
        ))
        .or_default() += bar[2].as_f64().unwrap();
    }
    assert!(!want.is_empty(), "{plan}");
    assert_eq!(got, want, "chart bars against /v1/plan");
    // Every class has its price line.
    let lines = b
        .find_all(Locator::Css("#plan-chart path.price"))
        .await
        .unwrap();
    assert_eq!(lines.len(), 1, "one class, one price line");

    // A job held back by the price window says so, with its planned start.
    b.goto(&format!("{base}/ui/#/jobs/job_1")).await.unwrap();
    let why = wait_js(
        b,
        "job_1's explanation",
        "const e = document.querySelector(\"#explanation[data-job='job_1']\"); return e ? [e.dataset.code, e.textContent] : null;",
    )
    .await;
    assert_eq!(why[0], "price_window", "{why}");
    let job = api.get("/v1/jobs/job_1").await.unwrap();
    assert_eq!(why[1], job["explanation"]["text"], "{why}");

    // Cancelling from the page (two clicks) cancels the job in the API.
    b.goto(&format!("{base}/ui/#/jobs/job_2")).await.unwrap();
    let click = "const e = document.querySelector(\"#cancel-job[data-job='job_2']\"); if (!e) return null; e.click(); return e.dataset.armed || 'clicked';";
    let first = wait_js(b, "job_2's cancel button", click).await;
    assert_eq!(first, "1", "the first click only arms the button");
    assert_eq!(api.get("/v1/jobs/job_2").await.unwrap()["state"], "queued");
    wait_js(b, "job_2's armed cancel button", click).await;
    wait_until_async("job_2 cancelled from the page", WAIT, async || {
        api.get("/v1/jobs/job_2").await.unwrap()["state"] == "cancelled"
    })
    .await;
    assert_eq!(api.get("/v1/jobs/job_1").await.unwrap()["state"], "queued");

    // The other pages render from the API too.
    for (view, css) in [
        ("jobs", "#job-filters"),
        ("sources", "main[data-view='sources'] table"),
        ("providers", "main[data-view='providers'] table"),
    ] {
        b.goto(&format!("{base}/ui/#/{view}")).await.unwrap();
        b.wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap();
    }
    // Nothing but the daemon was asked for anything.
    assert_loopback_only(&requested_urls(b).await);
    assert_eq!(provider.count(), 0, "every job is still held back");
}

/// The providers page shows a batch channel's terms and a real batch: a
/// daemon whose one provider has a Batch API (the loopback OpenAI files +
/// batches server) sends a backlog due in 6 h through one batch; once the
/// batch is done in `/v1/providers`, its row on the page says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_providers_page_shows_the_batch_channel_and_its_batches() {
    let provider =
        crate::batch_server::LoopbackBatchProvider::openai(crate::batch_server::BatchBehaviour {
            turnaround: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
    let dir = tempfile::tempdir().unwrap();
    let spec = ProviderSpec {
        name: "openai",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 2.0,
        extra: "[providers.batch]\ndiscount = 0.5\nexpected_turnaround = \"5s\"\npoll_every = \"200ms\"",
    };
    let daemon = Daemon::start(dir.path(), &api_config_toml(dir.path(), &[spec], ""));
    daemon.wait_ready().await;
    let api = daemon.unix_client().await;
    let body: String = (0..4)
        .map(|i| {
            chat_line(
                &format!("b{i}"),
                "chat",
                "hello",
                Some(json!({"deadline": "6h"})),
            ) + "\n"
        })
        .collect();
    let sub = post_jsonl(&api, body).await.unwrap();
    assert_eq!(sub["queued"], 4, "{sub}");
    let mut batch = Value::Null;
    wait_until_async("a provider batch done in /v1/providers", WAIT, async || {
        let p = api.get("/v1/providers").await.unwrap();
        batch = p["data"][0]["batch"]["recent"][0].clone();
        batch["state"] == "done" && batch["succeeded"] == 4
    })
    .await;
    assert_eq!(provider.creates(), 1);
    let remote = batch["remote_id"].as_str().unwrap().to_string();
    assert!(!remote.is_empty(), "{batch}");

    let h = headless().await;
    let b = &h.browser;
    b.goto(&login_url(&api).await).await.unwrap();
    wait_overview_matches_stats(b, &api).await;
    let base = daemon.tcp_base().await.0;
    b.goto(&format!("{base}/ui/#/providers")).await.unwrap();
    let script = format!(
        "const r = document.querySelector(\"#provider-batches tr.provider-batch[data-provider='openai'][data-batch='{}']\"); \
         return r ? [...r.cells].map(c => c.textContent) : null;",
        batch["id"]
    );
    let cells = wait_js(b, "the batch's row on the providers page", &script).await;
    let cells: Vec<&str> = cells
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cells[0], "openai", "{cells:?}");
    assert_eq!(cells[1], batch["id"].to_string(), "{cells:?}");
    assert_eq!(cells[2], remote, "{cells:?}");
    assert_eq!(cells[3], "m", "{cells:?}");
    assert!(cells[4].starts_with("done"), "{cells:?}");
    assert_eq!(cells[5], "4", "{cells:?}");
    assert_eq!(cells[6], "4 / 0 / 0", "{cells:?}");
    assert!(
        cells[7].ends_with(" UTC") && cells[8].ends_with(" UTC"),
        "{cells:?}"
    );
    assert!(cells[9].ends_with(" UTC"), "ended: {cells:?}");
    // The channel's terms: the discount, the window, the prior turnaround
    // and the model's batch price.
    let terms = wait_js(
        b,
        "the batch channel's terms",
        "const t = [...document.querySelectorAll('main h2')].find(e => e.textContent === 'Batch channels'); \
         return t ? t.nextElementSibling.querySelector('tbody tr').textContent : null;",
    )
    .await;
    let terms = terms.as_str().unwrap();
    for want in ["openai", "× 0.5", "24h", "5 s", "m 0.500/1.000"] {
        assert!(terms.contains(want), "{want} in {terms:?}");
    }
    b.execute(
        "document.querySelector('main h2:nth-of-type(2)').scrollIntoView(); return null;",
        vec![],
    )
    .await
    .unwrap();
    std::fs::write(
        screenshot_dir().join("provider-batches.png"),
        b.screenshot().await.unwrap(),
    )
    .unwrap();
    assert_loopback_only(&requested_urls(b).await);
}

/// A loopback "other site": serves one page whose script posts a form to
/// `target` as soon as it loads.
async fn attacker_site(target: String) -> u16 {
    use axum::response::Html;
    let page = format!(
        "<!doctype html><form id=f method=post action=\"{target}\"><input name=x value=1></form>\
         <script>document.getElementById('f').submit()</script>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { Html(page) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_form_post_cannot_use_the_dashboards_session() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = held_back_daemon(dir.path(), &provider).await;
    let api = daemon.unix_client().await;
    submit(&api, &["a"]).await;
    let h = headless().await;
    let b = &h.browser;
    b.goto(&login_url(&api).await).await.unwrap();
    wait_text(b, "#jobs-by-state [data-state='queued'] .n", "1").await;

    let (base, _) = daemon.tcp_base().await;
    let target = format!("{base}/v1/jobs/job_1/cancel");
    let port = attacker_site(target).await;
    // localhost is another site than 127.0.0.1 (the cookie is not even
    // sent); another port of 127.0.0.1 is the same site but another origin
    // (the cookie is sent, the page's CSRF token is not).
    for (origin, code) in [
        (format!("http://localhost:{port}/"), "invalid_api_key"),
        (format!("http://127.0.0.1:{port}/"), "csrf_failed"),
    ] {
        b.goto(&origin).await.unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let body = loop {
            let text = b
                .find(Locator::Css("body"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap_or_default();
            if text.contains("\"error\"") {
                break text;
            }
            assert!(std::time::Instant::now() < deadline, "{origin}: {text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], code, "{origin}: {v}");
        assert_eq!(
            api.get("/v1/jobs/job_1").await.unwrap()["state"],
            "queued",
            "{origin}"
        );
    }
}

/// Logs in with reqwest: the session cookie (name=value) and the page's CSRF token.
async fn session_of(url: &str) -> (String, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let base = url.split("/ui/").next().unwrap();
    let s: Value = http
        .get(format!("{base}/ui/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (cookie, s["csrf_token"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sessions_need_their_csrf_token_origin_and_host() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = held_back_daemon(dir.path(), &provider).await;
    let api = daemon.unix_client().await;
    submit(&api, &["a", "b"]).await;
    let (base, token) = daemon.tcp_base().await;
    let url = login_url(&api).await;
    assert!(url.starts_with(&format!("{base}/ui/login?code=")), "{url}");
    let (cookie, csrf) = session_of(&url).await;
    let http = reqwest::Client::new();
    let post = |path: &str| http.post(format!("{base}{path}")).header("cookie", &cookie);
    let code = async |r: reqwest::RequestBuilder| {
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        (
            status,
            v["error"]["code"].as_str().unwrap_or("").to_string(),
        )
    };

    // Reads need only the session.
    let stats = http
        .get(format!("{base}/v1/stats"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 200);
    // Without the session or the token: 401.
    let none = http.get(format!("{base}/v1/stats")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    // A write without the page's token, with a wrong one, or from another origin: 403.
    let cancel = "/v1/jobs/job_1/cancel";
    assert_eq!(code(post(cancel)).await, (403, "csrf_failed".into()));
    assert_eq!(
        code(post(cancel).header("x-nightshift-csrf", "0".repeat(64))).await,
        (403, "csrf_failed".into())
    );
    assert_eq!(
        code(
            post(cancel)
                .header("x-nightshift-csrf", &csrf)
                .header("origin", "http://127.0.0.1:1")
        )
        .await,
        (403, "csrf_failed".into())
    );
    assert_eq!(
        code(
            post(cancel)
                .header("x-nightshift-csrf", &csrf)
                .header("sec-fetch-site", "same-site")
        )
        .await,
        (403, "csrf_failed".into())
    );
    // A DNS-rebinding page names another host.
    assert_eq!(
        code(
            http.get(format!("{base}/v1/stats"))
                .header("cookie", &cookie)
                .header("host", "rebind.example:80")
        )
        .await,
        (403, "invalid_host".into())
    );
    // A session cannot mint login links; the token can.
    assert_eq!(
        code(post("/v1/ui/login-codes").header("x-nightshift-csrf", &csrf)).await,
        (403, "token_required".into())
    );
    let minted = http
        .post(format!("{base}/v1/ui/login-codes"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(minted.status(), 200);
    assert_eq!(api.get("/v1/jobs/job_1").await.unwrap()["state"], "queued");
    // The page's own request goes through.
    let origin = base.clone();
    let ok = post(cancel)
        .header("x-nightshift-csrf", &csrf)
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        api.get("/v1/jobs/job_1").await.unwrap()["state"],
        "cancelled"
    );
    // Logging out ends the session.
    let out = post("/ui/logout")
        .header("x-nightshift-csrf", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    let after = http
        .get(format!("{base}/v1/stats"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);
    // Neither the token, nor a code, nor a session id reaches the log.
    let log = daemon.log_text();
    let sid = cookie.split('=').nth(1).unwrap();
    let code_in_url = url.split("code=").nth(1).unwrap();
    for secret in [token.as_str(), sid, code_in_url, csrf.as_str()] {
        assert!(!log.contains(secret), "a secret is in the log");
    }
    // The page's shell carries its Content-Security-Policy.
    let shell = reqwest::get(format!("{base}/ui/")).await.unwrap();
    let csp = shell.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
}

/// The README's screenshots: the embedded default (simulated providers)
/// with a promotion on DeepSeek from 3 h to 9 h from now, a backlog due
/// in 24 h, and the example file; the overview and the plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_dashboard_renders_the_example_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let start = chrono::Utc::now() + chrono::Duration::hours(3);
    let promo = format!(
        "[[providers.price_windows]]\nname = \"promo\"\nstart = \"{}\"\nend = \"{}\"\nmultiplier = 0.2\n\n",
        start.to_rfc3339(),
        (start + chrono::Duration::hours(6)).to_rfc3339()
    );
    let config = nightshift::config::EMBEDDED_DEFAULT.replacen(
        "[[providers.price_windows]]\nname = \"peak\"",
        &format!("{promo}[[providers.price_windows]]\nname = \"peak\""),
        1,
    );
    assert_ne!(config, nightshift::config::EMBEDDED_DEFAULT);
    std::fs::write(dir.path().join("nightshift.toml"), config).unwrap();
    let daemon = Daemon::spawn(dir.path(), &["serve", "--config", "nightshift.toml"]);
    let api = daemon.unix_client().await;
    let backlog: String = (0..400)
        .map(|i| {
            chat_line(
                &format!("ticket-{i}"),
                "cheap-chat",
                "Classify this support ticket: my invoice is wrong",
                Some(json!({"deadline": "24h"})),
            ) + "\n"
        })
        .collect();
    let sub = post_jsonl(&api, backlog).await.unwrap();
    assert_eq!(sub["queued"], 400, "{sub}");
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs/examples/tickets.jsonl"),
    )
    .unwrap();
    drop_file(&daemon.jobs(), "tickets.jsonl", &example);
    wait_until_async("the example file to be queued", WAIT, async || {
        let s = api.get("/v1/sources").await.unwrap();
        s["data"].as_array().is_some_and(|d| d.len() == 2)
    })
    .await;

    let h = headless().await;
    let b = &h.browser;
    b.goto(&login_url(&api).await).await.unwrap();
    let stats = wait_overview_matches_stats(b, &api).await;
    assert!(stats["jobs"]["queued"].as_u64().unwrap() >= 400, "{stats}");
    let dir_out = screenshot_dir();
    std::fs::write(dir_out.join("overview.png"), b.screenshot().await.unwrap()).unwrap();
    b.goto(&format!("{}/ui/#/plan", daemon.tcp_base().await.0))
        .await
        .unwrap();
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#plan-chart rect.alloc"))
        .await
        .unwrap();
    let lines = b
        .find_all(Locator::Css("#plan-chart path.price"))
        .await
        .unwrap();
    let prices = api.get("/v1/prices").await.unwrap();
    assert_eq!(lines.len(), prices["classes"].as_array().unwrap().len());
    std::fs::write(dir_out.join("plan.png"), b.screenshot().await.unwrap()).unwrap();
    // A held job's page, and the providers.
    let base = daemon.tcp_base().await.0;
    b.goto(&format!("{base}/ui/#/jobs/job_1")).await.unwrap();
    let why = wait_js(
        b,
        "job_1's explanation",
        "const e = document.querySelector(\"#explanation[data-job='job_1']\"); return e ? e.textContent : null;",
    )
    .await;
    let job = api.get("/v1/jobs/job_1").await.unwrap();
    assert_eq!(why, job["explanation"]["text"]);
    std::fs::write(dir_out.join("job.png"), b.screenshot().await.unwrap()).unwrap();
    b.goto(&format!("{base}/ui/#/providers")).await.unwrap();
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("main[data-view='providers'] table"))
        .await
        .unwrap();
    std::fs::write(dir_out.join("providers.png"), b.screenshot().await.unwrap()).unwrap();
    assert_loopback_only(&requested_urls(b).await);
}
