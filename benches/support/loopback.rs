//! The loopback provider the dispatch benchmarks send to: an
//! OpenAI-compatible `POST /v1/chat/completions` that answers at once and
//! counts what it saw (each job's custom_id leads its message content), and
//! the timing helpers around it.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use serde_json::{Value, json};

/// What the server saw in one phase (the ceiling, or one depth).
#[derive(Default)]
pub struct Seen {
    /// Requests to expect: the window ends at this one.
    pub target: u64,
    /// The daemon's pid, for its CPU time; 0 for the ceiling client.
    pub pid: u32,
    pub requests: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// The daemon's CPU ticks at the first and at the target-th request.
    pub cpu_first: Option<u64>,
    pub cpu_last: Option<u64>,
    pub ids: HashSet<String>,
    pub duplicates: u64,
    /// Requests whose content carried no `custom_id=`.
    pub unlabelled: u64,
}

pub type Shared = Arc<Mutex<Seen>>;

/// utime + stime of process `pid`, in clock ticks (from /proc/<pid>/stat).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second for /proc times, from `getconf CLK_TCK` (100 if
/// that fails, which is what Linux uses almost everywhere).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub async fn handle(State(seen): State<Shared>, body: Bytes) -> axum::Json<Value> {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let text = req["messages"][0]["content"].as_str().unwrap_or_default();
    let id = text
        .split_whitespace()
        .next()
        .and_then(|w| w.strip_prefix("custom_id="));
    {
        let mut s = seen.lock().unwrap();
        let now = Instant::now();
        s.requests += 1;
        match id {
            Some(id) => {
                if !s.ids.insert(id.to_string()) {
                    s.duplicates += 1;
                }
            }
            None => s.unlabelled += 1,
        }
        if s.requests == 1 {
            s.first = Some(now);
            s.cpu_first = if s.pid == 0 { None } else { cpu_ticks(s.pid) };
        }
        if s.requests == s.target {
            s.last = Some(now);
            s.cpu_last = if s.pid == 0 { None } else { cpu_ticks(s.pid) };
        }
    }
    let prompt = (text.len() as u64).div_ceil(4) + 7;
    let completion = 2u64;
    axum::Json(json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0,
        "model": req["model"].as_str().unwrap_or("m"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    }))
}

/// Starts a fresh phase on the server: counters cleared.
pub fn reset(seen: &Shared, target: u64, pid: u32) {
    *seen.lock().unwrap() = Seen {
        target,
        pid,
        ..Seen::default()
    };
}

/// One job's request body; the custom_id leads the content so the server can
/// count each job.
pub fn chat_body(id: &str, model: &str) -> Value {
    json!({"model": model,
           "messages": [{"role": "user", "content": format!("custom_id={id} Classify this ticket: the export button does nothing in Firefox since the update.")}],
           "max_tokens": 16})
}

/// SIGTERM, then up to 30 s for the daemon to exit (SIGKILL after that).
pub fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("daemon did not exit 30 s after SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

pub fn count_lines(path: &Path) -> Option<usize> {
    Some(
        std::fs::read_to_string(path)
            .ok()?
            .lines()
            .filter(|l| !l.is_empty())
            .count(),
    )
}
