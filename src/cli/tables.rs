//! Human-readable tables for the command line: prices hour by hour, the
//! plan per provider and hour, one job's page. Pure: they take values and
//! return text.

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, Duration, DurationRound, Utc};

use crate::domain::pricing::{Catalog, ModelId};
use crate::plan::{JobGroup, Plan};

pub use crate::domain::pricing::{TYPICAL_INPUT, TYPICAL_OUTPUT};

fn hour_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

/// For each model class, the effective price (markup included, USD per 1M
/// input / output tokens) of each member hour by hour from `at` for `hours`
/// hours. Hours with the same prices are merged into one row; `*` marks the
/// cheapest model for a typical job (1,000 in / 250 out).
pub fn prices_table(catalog: &Catalog, at: DateTime<Utc>, hours: u32) -> String {
    let mut out = String::new();
    let start = hour_floor(at);
    for (class, members) in &catalog.classes {
        let names: Vec<String> = members.iter().map(|&m| catalog.qualified_name(m)).collect();
        let width = names.iter().map(String::len).max().unwrap_or(10).max(13);
        let _ = writeln!(
            out,
            "{class}  (USD per 1M tokens, input/output; * = cheapest for {TYPICAL_INPUT} in / {TYPICAL_OUTPUT} out)"
        );
        let _ = write!(out, "  {:<27}", "from (UTC)");
        for n in &names {
            let _ = write!(out, " {n:>width$}");
        }
        out.push('\n');
        let mut rows: Vec<(DateTime<Utc>, DateTime<Utc>, Vec<String>)> = Vec::new();
        for h in 0..hours {
            let t = start + Duration::hours(h as i64);
            let cells = row(catalog, members, t);
            match rows.last_mut() {
                Some(last) if last.2 == cells => last.1 = t + Duration::hours(1),
                _ => rows.push((t, t + Duration::hours(1), cells)),
            }
        }
        for (from, to, cells) in rows {
            let span = format!(
                "{} – {}",
                from.format("%a %d %H:%M"),
                to.format("%a %d %H:%M")
            );
            let _ = write!(out, "  {span:<27}");
            for c in cells {
                let _ = write!(out, " {c:>width$}");
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

fn row(catalog: &Catalog, members: &[ModelId], t: DateTime<Utc>) -> Vec<String> {
    let costs: Vec<f64> = members
        .iter()
        .map(|&m| catalog.cost_at(m, t, TYPICAL_INPUT, TYPICAL_OUTPUT))
        .collect();
    let best = costs.iter().copied().fold(f64::INFINITY, f64::min);
    members
        .iter()
        .zip(&costs)
        .map(|(&m, &c)| {
            let markup = 1.0 + catalog.providers[catalog.models[m].provider].markup;
            let p = catalog.price_at(m, t);
            let mark = if c <= best { "*" } else { " " };
            format!(
                "{:.3}/{:.3}{mark}",
                p.input_per_mtok * markup,
                p.output_per_mtok * markup
            )
        })
        .collect()
}

/// The plan per provider and hour: jobs and expected cost, then the totals
/// against dispatching everything now.
pub fn plan_table(plan: &Plan, groups: &[JobGroup], catalog: &Catalog) -> String {
    let mut out = String::new();
    let queued: u64 = groups.iter().map(|g| g.jobs).sum();
    let _ = writeln!(
        out,
        "{queued} queued jobs in {} groups, planned at {} ({:?})\n",
        groups.len(),
        plan.now.format("%Y-%m-%d %H:%M:%S UTC"),
        plan.method
    );
    let mut cells: BTreeMap<(String, DateTime<Utc>), (f64, f64)> = BTreeMap::new();
    for a in &plan.allocations {
        let provider = catalog.providers[catalog.models[a.model].provider]
            .name
            .clone();
        let hour = hour_floor(plan.slots[a.slot].start);
        let e = cells.entry((provider, hour)).or_default();
        e.0 += a.jobs;
        e.1 += a.jobs * a.cost_per_job;
    }
    let _ = writeln!(
        out,
        "  {:<14} {:<18} {:>10} {:>14}",
        "provider", "hour (UTC)", "jobs", "expected USD"
    );
    for ((provider, hour), (jobs, cost)) in &cells {
        let _ = writeln!(
            out,
            "  {provider:<14} {:<18} {jobs:>10.0} {cost:>14.6}",
            hour.format("%a %d %H:00")
        );
    }
    let overflow: f64 = plan.overflow.iter().map(|o| o.1).sum();
    if overflow > 0.0 {
        let _ = writeln!(
            out,
            "  {:<14} {:<18} {overflow:>10.0}",
            "(no capacity)", "now, fastest"
        );
    }
    let saving = plan.dispatch_now_cost - plan.expected_cost;
    let pct = if plan.dispatch_now_cost > 0.0 {
        100.0 * saving / plan.dispatch_now_cost
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "\n  expected cost of the plan       {:>14.6} USD",
        plan.expected_cost
    );
    let _ = writeln!(
        out,
        "  dispatching everything now     {:>14.6} USD",
        plan.dispatch_now_cost
    );
    let _ = writeln!(
        out,
        "  saving                         {saving:>14.6} USD ({pct:.1}%)"
    );
    out
}

/// The daemon's published plan (`GET /v1/plan`), as [`plan_table`] prints
/// an offline one, followed by what the plan assumed of each provider.
pub fn plan_table_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let source = match v["source"].as_str() {
        Some("dispatcher") => "the dispatcher's own plan",
        Some("configured") => "no dispatcher plan yet: computed from the configured limits",
        _ => "from the daemon",
    };
    let _ = writeln!(
        out,
        "{} queued jobs in {} groups, planned at {} ({}; {source})\n",
        v["queued_jobs"].as_u64().unwrap_or(0),
        v["groups"].as_u64().unwrap_or(0),
        v["planned_at"].as_str().unwrap_or("?"),
        v["method"].as_str().unwrap_or("?"),
    );
    let mut cells: BTreeMap<(String, DateTime<Utc>), (f64, f64)> = BTreeMap::new();
    for a in v["allocations"].as_array().into_iter().flatten() {
        let Some(start) = a["start"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        else {
            continue;
        };
        let provider = a["provider"].as_str().unwrap_or("?").to_string();
        let e = cells
            .entry((provider, hour_floor(start.with_timezone(&Utc))))
            .or_default();
        e.0 += f(&a["jobs"]);
        e.1 += f(&a["expected_cost_usd"]);
    }
    let _ = writeln!(
        out,
        "  {:<14} {:<18} {:>10} {:>14}",
        "provider", "hour (UTC)", "jobs", "expected USD"
    );
    for ((provider, hour), (jobs, cost)) in &cells {
        let _ = writeln!(
            out,
            "  {provider:<14} {:<18} {jobs:>10.0} {cost:>14.6}",
            hour.format("%a %d %H:00")
        );
    }
    let overflow = f(&v["overflow_jobs"]);
    if overflow > 0.0 {
        let _ = writeln!(
            out,
            "  {:<14} {:<18} {overflow:>10.0}",
            "(no capacity)", "now, fastest"
        );
    }
    let (expected, now) = (f(&v["expected_cost_usd"]), f(&v["dispatch_now_cost_usd"]));
    let saving = now - expected;
    let pct = if now > 0.0 { 100.0 * saving / now } else { 0.0 };
    let _ = writeln!(
        out,
        "\n  expected cost of the plan       {expected:>14.6} USD"
    );
    let _ = writeln!(out, "  dispatching everything now     {now:>14.6} USD");
    let _ = writeln!(
        out,
        "  saving                         {saving:>14.6} USD ({pct:.1}%)"
    );
    if let Some(providers) = v["providers"].as_array().filter(|p| !p.is_empty()) {
        let _ = writeln!(
            out,
            "\n  {:<14} {:>10} {:>13} {:>12} {:>14}  available",
            "assumed", "latency s", "success rate", "input ratio", "budget left $"
        );
        for p in providers {
            let until = match &p["unavailable_until"] {
                serde_json::Value::String(s) => format!("from {s}"),
                _ => "now".to_string(),
            };
            let budget = p["budget_remaining_usd"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |b| format!("{b:.6}"));
            let _ = writeln!(
                out,
                "  {:<14} {:>10.3} {:>13.3} {:>12.3} {budget:>14}  {until}",
                p["provider"].as_str().unwrap_or("?"),
                f(&p["latency_s"]),
                f(&p["success_rate"]),
                f(&p["input_token_ratio"]),
            );
        }
    }
    for u in v["unroutable"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  not routable in this config: {}: {}",
            u["route"].as_str().unwrap_or("?"),
            u["reason"].as_str().unwrap_or("?")
        );
    }
    out
}

/// How much of a job's request body its page shows.
const REQUEST_CHARS: usize = 120;

/// One job as `nightshift jobs show` prints it, from the API's object
/// (`GET /v1/jobs/{id}`): what it is (its request, cut short), where it stands, where and when it
/// ran, what it cost, the plan for it while queued, its error once it
/// failed, and, when the API explains it (`explanation.text`), why.
/// Fields the object lacks print as `-`; text from outside (custom ids,
/// provider messages) is escaped, so it cannot move the cursor.
pub fn job_page(v: &serde_json::Value) -> String {
    use crate::domain::units::escaped;
    use serde_json::Value;
    let text = |v: &Value| match v {
        Value::String(s) => escaped(s).to_string(),
        Value::Null => "-".to_string(),
        other => escaped(&other.to_string()).to_string(),
    };
    let usd = |v: &Value| v.as_f64().map(|x| format!("{x:.6}"));
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<16}{value}");
    };
    let head = format!("{} ({})", text(&v["id"]), text(&v["custom_id"]));
    line("job", head);
    line("state", text(&v["state"]));
    let mut source = match &v["source"] {
        Value::Null => text(&v["submission_id"]),
        s => text(s),
    };
    if let Some(l) = v["line"].as_u64() {
        let _ = write!(source, ", line {l}");
    }
    line("source", source);
    line(
        "model",
        format!("{} ({})", text(&v["model"]), text(&v["endpoint"])),
    );
    let request = &v["request"];
    if request.is_object() {
        // The body on one line, cut short: `--json` has all of it.
        let body = request["body"].to_string();
        let body = match body.char_indices().nth(REQUEST_CHARS) {
            Some((at, _)) => format!("{}…", &body[..at]),
            None => body,
        };
        line(
            "request",
            format!(
                "{} {} {}",
                text(&request["method"]),
                text(&request["url"]),
                escaped(&body)
            ),
        );
    }
    line("submitted", text(&v["submitted_at"]));
    line("deadline", text(&v["deadline"]));
    line("not before", text(&v["not_before"]));
    line("attempts", text(&v["attempts"]));
    let ran = match (v["provider"].as_str(), v["provider_model"].as_str()) {
        (Some(p), Some(m)) => format!("{}/{}", escaped(p), escaped(m)),
        (Some(p), None) => escaped(p).to_string(),
        _ => "-".to_string(),
    };
    line("ran on", ran);
    line("dispatched", text(&v["dispatched_at"]));
    line("completed", text(&v["completed_at"]));
    let list =
        usd(&v["list_cost_usd"]).or_else(|| usd(&v["result"]["nightshift"]["list_cost_usd"]));
    let cost = match (usd(&v["cost_usd"]), list) {
        (Some(c), Some(l)) => format!("{c} USD (list cost {l} USD)"),
        (Some(c), None) => format!("{c} USD"),
        (None, Some(l)) => format!("- (list cost {l} USD)"),
        (None, None) => "-".to_string(),
    };
    line("cost", cost);
    let plan = &v["plan"];
    if plan.is_object() {
        line(
            "earliest start",
            format!(
                "{} (planned at {})",
                text(&plan["earliest_start"]),
                text(&plan["planned_at"])
            ),
        );
        for a in plan["allocations"].as_array().into_iter().flatten() {
            line(
                "planned",
                format!(
                    "{:.1} jobs of its group on {}/{} {} – {}, {} USD each",
                    a["jobs"].as_f64().unwrap_or(0.0),
                    text(&a["provider"]),
                    text(&a["model"]),
                    text(&a["start"]),
                    text(&a["end"]),
                    usd(&a["expected_cost_per_job_usd"]).unwrap_or_else(|| "-".into()),
                ),
            );
        }
        if plan["overflow_jobs"].as_f64().is_some_and(|o| o > 0.0) {
            line(
                "planned",
                format!(
                    "{:.1} jobs of its group beyond every provider's capacity: sent as soon as any has room",
                    plan["overflow_jobs"].as_f64().unwrap_or(0.0)
                ),
            );
        }
    }
    let result = &v["result"];
    let error = &result["error"];
    if error.is_object() {
        let message = match &error["message"] {
            Value::Null => String::new(),
            m => format!(": {}", text(m)),
        };
        line("error", format!("{}{message}", text(&error["code"])));
    } else if let Some(status) = result["response"]["status_code"].as_u64()
        && !(200..300).contains(&status)
    {
        let body = &result["response"]["body"];
        let message = match &body["error"]["message"] {
            Value::String(m) => format!(": {}", escaped(m)),
            _ => String::new(),
        };
        line("error", format!("HTTP {status}{message}"));
    }
    if let Some(why) = v["explanation"]["text"].as_str() {
        line("why", escaped(why).to_string());
    }
    out
}

/// The effective configuration, as `nightshift check-config` prints it:
/// every default filled in, API keys shown only by where they come from.
pub fn effective_config(config: &crate::config::Config) -> String {
    use crate::config::Transport;
    let mut out = String::new();
    let d = &config.daemon;
    let _ = writeln!(out, "# effective configuration of {}", config.origin);
    let _ = writeln!(out, "[daemon]");
    let _ = writeln!(out, "state_dir = {:?}", d.state_dir.display().to_string());
    let _ = writeln!(out, "jobs_dir = {:?}", d.jobs_dir.display().to_string());
    match &d.database {
        crate::config::database::Database::Sqlite(path) => {
            let _ = writeln!(out, "database = {:?}  # SQLite", path.display().to_string());
        }
        crate::config::database::Database::Postgres(t) => {
            let _ = writeln!(
                out,
                "database = {:?}  # PostgreSQL, shared by every daemon on it; password {}",
                t.to_string(),
                if t.has_password() {
                    "set (not shown)"
                } else {
                    "not set"
                }
            );
        }
    }
    let _ = writeln!(out, "node = {:?}", d.node);
    for (k, v) in [
        ("default_deadline", d.default_deadline),
        ("rescan_interval", d.rescan_interval),
        ("request_timeout", d.request_timeout),
        ("shutdown_grace", d.shutdown_grace),
        ("safety_margin", d.safety_margin),
        ("retry_base", d.retry.base),
        ("retry_max", d.retry.cap),
    ] {
        let _ = writeln!(out, "{k} = \"{}\"", humantime::format_duration(v));
    }
    let _ = writeln!(
        out,
        "after_deadline = \"{}\"",
        if d.run_after_deadline {
            "run"
        } else {
            "expire"
        }
    );
    let _ = writeln!(out, "max_attempts = {}", d.retry.max_attempts);
    let off_or = |v: Option<std::time::Duration>| {
        v.map_or("off".to_string(), |d| {
            humantime::format_duration(d).to_string()
        })
    };
    let _ = writeln!(out, "retention = \"{}\"", off_or(d.retention));
    let _ = writeln!(out, "maintenance = {:?}", d.maintenance);
    let _ = writeln!(out, "checkpoint_every = \"{}\"", off_or(d.checkpoint_every));
    let _ = writeln!(out, "max_in_flight = {}", d.max_in_flight);
    let h = &config.http;
    let _ = writeln!(
        out,
        "\n[http]\nsocket = {:?}",
        h.socket.display().to_string()
    );
    match h.tcp {
        Some(addr) => {
            let _ = writeln!(out, "tcp = \"{addr}\"");
        }
        None => {
            let _ = writeln!(out, "# tcp: off");
        }
    }
    let _ = writeln!(
        out,
        "allow_non_loopback = {}\ntoken_file = {:?}\nmax_body = {}\nmax_upload = {}",
        h.allow_non_loopback,
        h.token_file.display().to_string(),
        h.max_body,
        h.max_upload
    );
    for (k, v) in [
        ("header_timeout", h.header_timeout),
        ("body_timeout", h.body_timeout),
        ("idle_timeout", h.idle_timeout),
    ] {
        let _ = writeln!(out, "{k} = \"{}\"", humantime::format_duration(v));
    }
    let _ = writeln!(out, "max_connections = {}", h.max_connections);
    for (p, t) in config.catalog.providers.iter().zip(&config.transports) {
        let _ = writeln!(out, "\n[[providers]]\nname = {:?}", p.name);
        match t {
            Transport::OpenAi {
                wire,
                base_url,
                key_source,
                timeout,
                connect_timeout,
                ..
            } => {
                let _ = writeln!(
                    out,
                    "kind = \"{}\"\nbase_url = {base_url:?}\napi_key = \"<redacted; from {key_source}>\"",
                    match wire {
                        crate::domain::pricing::Wire::OpenAi => "openai",
                        crate::domain::pricing::Wire::Anthropic => "anthropic",
                    }
                );
                if let Some(t) = timeout {
                    let _ = writeln!(out, "timeout = \"{}\"", humantime::format_duration(*t));
                }
                if let Some(t) = connect_timeout {
                    let _ = writeln!(
                        out,
                        "connect_timeout = \"{}\"",
                        humantime::format_duration(*t)
                    );
                }
            }
            Transport::Simulated {
                latency,
                ms_per_output_token,
                failure_rate,
            } => {
                let _ = writeln!(
                    out,
                    "kind = \"simulated\"\nlatency = \"{}\"\nms_per_output_token = {ms_per_output_token}\nfailure_rate = {failure_rate}",
                    humantime::format_duration(*latency)
                );
            }
        }
        if let Some(r) = &p.region {
            let _ = writeln!(out, "region = {r:?}");
        }
        let l = &p.limits;
        let _ = writeln!(out, "markup = {}\nreserve = {}", p.markup, l.reserve);
        for (k, v) in [
            ("rpm", l.rpm.map(u64::from)),
            ("tpm", l.tpm),
            ("rpd", l.rpd.map(u64::from)),
            ("concurrency", l.concurrency.map(u64::from)),
        ] {
            match v {
                Some(v) => {
                    let _ = writeln!(out, "{k} = {v}");
                }
                None => {
                    let _ = writeln!(out, "# {k}: unlimited");
                }
            }
        }
        let _ = writeln!(
            out,
            "# price windows: {}",
            p.windows
                .iter()
                .map(|w| w.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for m in config
            .catalog
            .models
            .iter()
            .filter(|m| config.catalog.providers[m.provider].name == p.name)
        {
            let endpoints: Vec<&str> = m.endpoints.iter().map(|e| e.as_url()).collect();
            let _ = writeln!(
                out,
                "[[providers.models]]\nname = {:?}\ninput_per_mtok = {}\noutput_per_mtok = {}\nendpoints = {endpoints:?}",
                m.name, m.list.input_per_mtok, m.list.output_per_mtok
            );
            for (k, v) in [
                ("cached_input_per_mtok", m.cached_input_per_mtok),
                ("cache_write_per_mtok", m.cache_write_per_mtok),
            ] {
                if let Some(v) = v {
                    let _ = writeln!(out, "{k} = {v}");
                }
            }
        }
    }
    let _ = writeln!(out, "\n[classes]");
    for (class, members) in &config.catalog.classes {
        let names: Vec<String> = members
            .iter()
            .map(|&m| config.catalog.qualified_name(m))
            .collect();
        let _ = writeln!(out, "{class} = {names:?}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    /// The value after a label of a page, e.g. `state`.
    fn field<'a>(page: &'a str, label: &str) -> Vec<&'a str> {
        page.lines()
            .filter_map(|l| {
                let l = l.trim_start();
                let rest = l.strip_prefix(label)?;
                rest.starts_with("  ").then(|| rest.trim())
            })
            .collect()
    }

    /// check-config names the backend and never shows a password, from the
    /// URL or from the password file.
    #[test]
    fn check_config_shows_the_postgres_backend_with_the_password_redacted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "file-secret\n").unwrap();
        let text = r#"[daemon]
database = "postgresql://ns:url-secret@db.internal:5432/nightshift?sslmode=disable"
database_password_file = "pw"
node = "host-a"

[[providers]]
name = "sim"
kind = "simulated"

[[providers.models]]
name = "m"
input_per_mtok = 1.0
output_per_mtok = 1.0

[classes]
chat = ["sim/m"]
"#;
        let config = Config::parse(text, "n.toml", dir.path()).unwrap();
        let shown = effective_config(&config);
        assert!(
            shown.contains("postgresql://ns:***@db.internal:5432/nightshift"),
            "{shown}"
        );
        assert!(shown.contains("PostgreSQL"), "{shown}");
        assert!(shown.contains("password set (not shown)"), "{shown}");
        assert!(shown.contains("node = \"host-a\""), "{shown}");
        assert!(
            !shown.contains("url-secret") && !shown.contains("file-secret"),
            "{shown}"
        );
        // The default stays SQLite, and says so.
        let shown = effective_config(&Config::embedded_default());
        assert!(shown.contains("# SQLite"), "{shown}");
    }

    #[test]
    fn a_queued_jobs_page_shows_its_plan_and_why() {
        let v = json!({
            "id": "job_7", "object": "job", "custom_id": "ticket-1", "state": "queued",
            "submission_id": "sub_2", "line": 3, "endpoint": "/v1/chat/completions",
            "model": "cheap-chat", "priority": 0,
            "submitted_at": "2026-11-24T00:00:00.000Z", "deadline": "2026-11-24T12:00:00.000Z",
            "not_before": "2026-11-24T02:00:00.000Z", "attempts": 0,
            "provider": null, "provider_model": null, "dispatched_at": null, "completed_at": null,
            "cost_usd": null,
            "plan": {"planned_at": "2026-11-24T00:00:01.000Z", "group_jobs": 5,
                     "earliest_start": "2026-11-24T02:00:00.000Z",
                     "allocations": [{"provider": "deepseek", "model": "deepseek-chat",
                                      "start": "2026-11-24T02:00:00.000Z", "end": "2026-11-24T03:00:00.000Z",
                                      "jobs": 5.0, "expected_cost_per_job_usd": 0.0001}],
                     "overflow_jobs": 0.0},
            "result": null,
            "request": {"method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "cheap-chat", "messages": [{"role": "user", "content": "x".repeat(300)}]}},
            "explanation": {"code": "waiting_for_cheaper", "text": "held for deepseek's off-peak window from 02:00"},
        });
        let page = job_page(&v);
        assert_eq!(field(&page, "job"), ["job_7 (ticket-1)"], "{page}");
        assert_eq!(field(&page, "state"), ["queued"], "{page}");
        assert_eq!(field(&page, "source"), ["sub_2, line 3"], "{page}");
        assert_eq!(field(&page, "model"), ["cheap-chat (/v1/chat/completions)"]);
        assert_eq!(field(&page, "not before"), ["2026-11-24T02:00:00.000Z"]);
        let request = field(&page, "request");
        assert!(
            request[0].starts_with(r#"POST /v1/chat/completions {"messages":[{"content":"xxx"#)
                && request[0].ends_with("x…")
                && request[0].chars().count() < 200,
            "{page}"
        );
        assert_eq!(field(&page, "ran on"), ["-"]);
        assert_eq!(field(&page, "cost"), ["-"]);
        assert_eq!(
            field(&page, "earliest start"),
            ["2026-11-24T02:00:00.000Z (planned at 2026-11-24T00:00:01.000Z)"]
        );
        assert_eq!(
            field(&page, "planned"),
            [
                "5.0 jobs of its group on deepseek/deepseek-chat 2026-11-24T02:00:00.000Z – 2026-11-24T03:00:00.000Z, 0.000100 USD each"
            ],
            "{page}"
        );
        assert_eq!(
            field(&page, "why"),
            ["held for deepseek's off-peak window from 02:00"]
        );
        assert!(field(&page, "error").is_empty(), "{page}");
    }

    #[test]
    fn a_failed_jobs_page_shows_cost_list_cost_and_the_error_escaped() {
        let v = json!({
            "id": "job_9", "custom_id": "evil\u{1b}[2Jid", "state": "failed",
            "submission_id": "sub_1", "line": 1, "endpoint": "/v1/chat/completions",
            "model": "chat", "submitted_at": "2026-11-24T00:00:00.000Z",
            "deadline": "2026-11-24T12:00:00.000Z", "not_before": null, "attempts": 3,
            "provider": "openai", "provider_model": "gpt-4o-mini",
            "dispatched_at": "2026-11-24T00:01:00.000Z", "completed_at": "2026-11-24T00:01:02.000Z",
            "cost_usd": 0.000_125, "plan": null,
            "result": {"error": {"code": "server_error", "message": "upstream\nfailed"},
                       "nightshift": {"list_cost_usd": 0.000_5}},
        });
        let page = job_page(&v);
        assert_eq!(field(&page, "job"), ["job_9 (evil\\u{1b}[2Jid)"], "{page}");
        assert!(!page.contains('\u{1b}'), "{page}");
        assert_eq!(field(&page, "ran on"), ["openai/gpt-4o-mini"]);
        assert_eq!(field(&page, "attempts"), ["3"]);
        assert_eq!(
            field(&page, "cost"),
            ["0.000125 USD (list cost 0.000500 USD)"]
        );
        assert_eq!(
            field(&page, "error"),
            ["server_error: upstream\\nfailed"],
            "{page}"
        );
        assert!(field(&page, "earliest start").is_empty());
        assert!(field(&page, "why").is_empty());
        // A failure with the provider's HTTP answer and no error code.
        let mut v = v;
        v["result"] = json!({"error": null, "response": {"status_code": 400,
            "body": {"error": {"message": "Invalid value for 'temperature'"}}}});
        assert_eq!(
            field(&job_page(&v), "error"),
            ["HTTP 400: Invalid value for 'temperature'"]
        );
    }

    #[test]
    fn the_price_table_shows_deepseek_peak_and_off_peak() {
        let c = Config::embedded_default();
        // Tuesday 2026-11-24 00:00 UTC, 12 hours: off-peak, peak 01-04, off 04-06, peak 06-10, off.
        let at = DateTime::parse_from_rfc3339("2026-11-24T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = prices_table(&c.catalog, at, 12);
        let cheap: Vec<&str> = t
            .lines()
            .skip_while(|l| !l.starts_with("cheap-chat"))
            .skip(2)
            .take(5)
            .collect();
        assert_eq!(cheap.len(), 5, "{t}");
        assert!(
            cheap[0].contains("Tue 24 00:00 – Tue 24 01:00")
                && cheap[0].contains("0.150/0.600 ")
                // gpt-4o-mini through OpenAI's Batch API: half of off-peak.
                && cheap[0].contains("0.075/0.300*"),
            "{t}"
        );
        assert!(
            cheap[1].contains("Tue 24 01:00 – Tue 24 04:00") && cheap[1].contains("0.300/1.200 "),
            "{t}"
        );
        assert!(cheap[2].contains("04:00 – Tue 24 06:00"), "{t}");
        assert!(cheap[3].contains("06:00 – Tue 24 10:00"), "{t}");
        assert!(cheap[4].contains("10:00 – Tue 24 12:00"), "{t}");
    }
}
