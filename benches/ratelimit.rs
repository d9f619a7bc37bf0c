//! Rate-limit benchmark: the real daemon with a backlog against an instantly
//! answering loopback provider that enforces 600 rpm and 30,000 tpm the way
//! OpenAI describes it (per-minute limits enforced over one-second buckets)
//! and answers 429 beyond them. Measures achieved throughput against the
//! limits and counts the 429s.
//!
//!     cargo bench --bench ratelimit
//!
//! NIGHTSHIFT_BENCH_SECONDS (default 120) sets the measured window.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

const RPM: f64 = 600.0;
const TPM: f64 = 30_000.0;

/// The provider's view: token buckets of one second's allowance, like ours
/// but on the other side of the socket, plus what it served.
struct Provider {
    requests: f64,
    tokens: f64,
    last: Instant,
    served: Vec<(Instant, u64)>,
    refused: u64,
}

async fn handle(State(p): State<Arc<Mutex<Provider>>>, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let text = req["messages"][0]["content"].as_str().unwrap_or_default();
    // Usage close to what a tokenizer would say: ~4 bytes a token + overhead.
    let prompt = (text.len() as u64).div_ceil(4) + 7;
    let completion = 20u64;
    let mut p = p.lock().unwrap();
    let now = Instant::now();
    let dt = now.duration_since(p.last).as_secs_f64();
    p.last = now;
    p.requests = (p.requests + dt * RPM / 60.0).min(RPM / 60.0);
    p.tokens = (p.tokens + dt * TPM / 60.0).min(TPM / 60.0);
    if p.requests < 1.0 || p.tokens < (prompt + completion) as f64 {
        p.refused += 1;
        let body = json!({"error": {"message": "Rate limit reached. Please try again in 100ms.", "type": "requests", "code": "rate_limit_exceeded"}});
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after-ms", "100")],
            axum::Json(body),
        )
            .into_response();
    }
    p.requests -= 1.0;
    p.tokens -= (prompt + completion) as f64;
    p.served.push((now, prompt + completion));
    let body = json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// The most requests and tokens served within any 60 s (a request at `t`
/// counts over `[t, t + 60 s)`), over requests in arrival order.
fn max_in_any_minute(served: &[(Instant, u64)]) -> (usize, u64) {
    let (mut max_r, mut max_t, mut from, mut tokens) = (0, 0, 0, 0u64);
    for (to, &(t, n)) in served.iter().enumerate() {
        tokens += n;
        while t.duration_since(served[from].0) >= Duration::from_secs(60) {
            tokens -= served[from].1;
            from += 1;
        }
        max_r = max_r.max(to + 1 - from);
        max_t = max_t.max(tokens);
    }
    (max_r, max_t)
}

fn main() {
    let seconds: u64 = std::env::var("NIGHTSHIFT_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = Arc::new(Mutex::new(Provider {
        requests: RPM / 60.0,
        tokens: TPM / 60.0,
        last: Instant::now(),
        served: Vec::new(),
        refused: 0,
    }));
    let addr = rt.block_on(async {
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"[daemon]
state_dir = "{state}"
jobs_dir = "{jobs}"
safety_margin = "1m"

[[providers]]
name = "limited"
kind = "openai"
base_url = "http://{addr}/v1"
api_key_env = "NIGHTSHIFT_BENCH_KEY"
rpm = {RPM}
tpm = {TPM}
concurrency = 64

[[providers.models]]
name = "m"
input_per_mtok = 1.0
output_per_mtok = 1.0

[classes]
chat = ["limited/m"]
"#,
        state = dir.path().join("state").display(),
        jobs = dir.path().join("jobs").display(),
    );
    // A backlog larger than the window can drain: 1.5 × what the limits allow.
    let n = (RPM / 60.0 * seconds as f64 * 1.5) as usize;
    let lines: Vec<String> = (0..n)
        .map(|i| {
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "chat", "messages": [{"role": "user", "content": format!("Classify ticket {i}: the export button does nothing in Firefox since the update.")}],
                            "max_tokens": 40},
                   "nightshift": {"deadline": "2h"}})
            .to_string()
        })
        .collect();
    let inbox = dir.path().join("jobs/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::write(dir.path().join("jobs/backlog.part"), lines.join("\n")).unwrap();
    std::fs::rename(
        dir.path().join("jobs/backlog.part"),
        inbox.join("backlog.jsonl"),
    )
    .unwrap();

    let mut child =
        support::spawn_daemon(dir.path(), &config, &[("NIGHTSHIFT_BENCH_KEY", "sk-bench")]);
    let pid = child.id();
    // Measure from the first served request for `seconds`.
    let start = loop {
        if let Some(&(t, _)) = state.lock().unwrap().served.first() {
            break t;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut rss = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(support::rss_kb(pid).unwrap_or(0));
    }
    let end = start + Duration::from_secs(seconds);
    let _ = child.kill();
    let _ = child.wait();
    let p = state.lock().unwrap();
    let window: Vec<&(Instant, u64)> = p.served.iter().filter(|(t, _)| *t < end).collect();
    let requests = window.len() as f64;
    let tokens: u64 = window.iter().map(|(_, t)| t).sum();
    let minutes = seconds as f64 / 60.0;
    let allowed_requests = RPM * minutes + RPM / 60.0; // plus the initial one-second bucket
    let allowed_tokens = TPM * minutes + TPM / 60.0;
    let by_requests = requests / allowed_requests;
    let by_tokens = tokens as f64 / allowed_tokens;
    println!(
        "## Rate limits ({seconds} s window, backlog of {n} jobs, loopback provider enforcing {RPM} rpm / {TPM} tpm)\n"
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| requests served | {requests:.0} of {allowed_requests:.0} allowed ({:.1}%) |",
        by_requests * 100.0
    );
    println!(
        "| tokens served | {tokens} of {allowed_tokens:.0} allowed ({:.1}%) |",
        by_tokens * 100.0
    );
    println!(
        "| throughput vs the binding limit | {:.1}% |",
        by_requests.max(by_tokens) * 100.0
    );
    // The guarantee: over every sliding 60 s of what the provider served
    // (from the very first request, the start included), at most the limit.
    let (max_requests, max_tokens) = max_in_any_minute(&p.served);
    println!(
        "| max requests in any sliding 60 s | {max_requests} of {RPM} rpm ({:.3}) |",
        max_requests as f64 / RPM
    );
    println!(
        "| max tokens in any sliding 60 s | {max_tokens} of {TPM} tpm ({:.3}) |",
        max_tokens as f64 / TPM
    );
    println!("| 429s answered by the provider | {} |", p.refused);
    println!(
        "| daemon RSS (min / max over the window) | {} / {} KiB |",
        rss.iter().min().unwrap_or(&0),
        rss.iter().max().unwrap_or(&0)
    );
    println!();
}
