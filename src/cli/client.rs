//! The CLI commands that talk to a running daemon over its Unix socket:
//! `submit`, `jobs`, `status`, `cancel` (and `token`, which reads the token
//! file). Human output by default, the API's JSON with `--json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::Method;
use serde_json::{Value, json};

use crate::api::client::{CallError, Client, Target};
use crate::config::HttpSettings;

/// A client of the daemon configured by `http` (its Unix socket).
pub fn client(http: &HttpSettings) -> Client {
    Client::new(Target::Unix(http.socket.clone()))
}

/// `nightshift token`: the TCP bearer token, created if it does not exist.
pub fn token(http: &HttpSettings) -> anyhow::Result<String> {
    crate::api::listen::ensure_token(&http.token_file)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// An API error as the CLI prints it: per-line errors as `FILE:LINE: field: message`.
fn explain(e: CallError, file: Option<&str>) -> anyhow::Error {
    if let CallError::Api { body, message, .. } = &e
        && let Some(lines) = body["error"]["lines"].as_array()
    {
        let mut text = String::new();
        for l in lines {
            let field = l["field"]
                .as_str()
                .map(|f| format!("{f}: "))
                .unwrap_or_default();
            let _ = writeln!(
                text,
                "{}:{}: {field}{}",
                file.unwrap_or("body"),
                l["line"],
                l["message"].as_str().unwrap_or_default()
            );
        }
        let n = lines.len();
        return anyhow::anyhow!(
            "{text}{} invalid line{}; nothing was queued ({})",
            n,
            if n == 1 { "" } else { "s" },
            message.split("; ").next().unwrap_or_default()
        );
    }
    e.into()
}

/// Options of `nightshift submit`.
pub struct SubmitArgs {
    pub files: Vec<PathBuf>,
    pub deadline: Option<String>,
    pub wait: bool,
    /// Where `--wait` writes `<stem>.output.jsonl` and `<stem>.errors.jsonl`.
    pub out_dir: PathBuf,
    pub json: bool,
}

/// `nightshift submit FILE...`: each file is one all-or-nothing submission.
pub async fn submit(client: &Client, args: &SubmitArgs) -> anyhow::Result<String> {
    let mut subs = Vec::new();
    for file in &args.files {
        let content = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "jobs.jsonl".into());
        let mut path = format!("/v1/jobs?name={}", encode(&name));
        if let Some(d) = &args.deadline {
            let _ = write!(path, "&deadline={}", encode(d));
        }
        let v = client
            .json(Method::POST, &path, Some("application/jsonl"), content)
            .await
            .map_err(|e| explain(e, Some(&file.display().to_string())))?;
        subs.push((file.clone(), v));
    }
    let mut out = String::new();
    if !args.json {
        for (file, v) in &subs {
            let first = v["jobs"][0]["deadline"].as_str().unwrap_or("-");
            let _ = writeln!(
                out,
                "{}: queued {} jobs as {} (first deadline {first})",
                file.display(),
                v["queued"],
                v["id"].as_str().unwrap_or_default()
            );
        }
    }
    if !args.wait {
        if args.json {
            let all: Vec<&Value> = subs.iter().map(|s| &s.1).collect();
            out = format!("{}\n", serde_json::to_string_pretty(&all)?);
        }
        return Ok(out);
    }
    // Progress, not output; not eprint!, which panics if stderr is closed.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), out.as_bytes());
    out.clear();
    let finals = wait_for(client, &subs).await?;
    let mut written = Vec::new();
    for ((file, v), info) in subs.iter().zip(&finals) {
        let id = v["id"].as_str().unwrap_or_default();
        let stem = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = stem.strip_suffix(".jsonl").unwrap_or(&stem).to_string();
        let mut paths = Vec::new();
        for kind in ["output", "errors"] {
            let (status, body) = client
                .send(
                    Method::GET,
                    &format!("/v1/submissions/{id}/{kind}"),
                    None,
                    Vec::new(),
                )
                .await?;
            if !status.is_success() {
                bail!("downloading the {kind} of {id}: HTTP {status}");
            }
            let path = args.out_dir.join(format!("{stem}.{kind}.jsonl"));
            write_atomically(&path, &body)?;
            paths.push(path);
        }
        let c = &info["counts"];
        if args.json {
            written.push(
                json!({"submission": info, "output_file": paths[0], "errors_file": paths[1]}),
            );
        } else {
            let _ = writeln!(
                out,
                "{}: {} succeeded, {} failed, {} expired, {} cancelled\n  results: {}\n  errors:  {}",
                file.display(),
                c["succeeded"],
                c["failed"],
                c["expired"],
                c["cancelled"],
                paths[0].display(),
                paths[1].display()
            );
        }
    }
    if args.json {
        out = format!("{}\n", serde_json::to_string_pretty(&written)?);
    }
    Ok(out)
}

fn write_atomically(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("jsonl.part");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Polls the submissions until every job is final, with a progress bar
/// (on a terminal). Returns each submission's final state.
async fn wait_for(client: &Client, subs: &[(PathBuf, Value)]) -> anyhow::Result<Vec<Value>> {
    let total: u64 = subs
        .iter()
        .map(|s| s.1["queued"].as_u64().unwrap_or(0))
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} jobs final {msg}",
        )
        .expect("a valid template"),
    );
    loop {
        let mut infos = Vec::new();
        for (_, v) in subs {
            let id = v["id"].as_str().unwrap_or_default();
            infos.push(client.get(&format!("/v1/submissions/{id}")).await?);
        }
        let open: u64 = infos
            .iter()
            .map(|i| {
                i["counts"]["queued"].as_u64().unwrap_or(0)
                    + i["counts"]["running"].as_u64().unwrap_or(0)
            })
            .sum();
        let running: u64 = infos
            .iter()
            .map(|i| i["counts"]["running"].as_u64().unwrap_or(0))
            .sum();
        bar.set_position(total.saturating_sub(open));
        bar.set_message(format!("({running} running)"));
        if open == 0 {
            bar.finish_and_clear();
            return Ok(infos);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Options of `nightshift jobs` (the list).
#[derive(Debug, Clone, Default)]
pub struct JobsArgs<'a> {
    pub state: Option<&'a str>,
    pub after: Option<&'a str>,
    pub limit: u32,
    /// `file`, `submission`, `batch`, `sub_N` or `batch_N`.
    pub source: Option<&'a str>,
    pub custom_id: Option<&'a str>,
    pub json: bool,
}

/// `nightshift jobs [--state S] [--source X] [--custom-id Y]`: one page of jobs.
pub async fn jobs(client: &Client, args: &JobsArgs<'_>) -> anyhow::Result<String> {
    let json = args.json;
    let mut path = format!("/v1/jobs?limit={}", args.limit);
    for (name, value) in [
        ("state", args.state),
        ("after", args.after),
        ("source", args.source),
        ("custom_id", args.custom_id),
    ] {
        if let Some(v) = value {
            let _ = write!(path, "&{name}={}", encode(v));
        }
    }
    let v = client.get(&path).await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    let mut out = format!(
        "{:<12} {:<10} {:<24} {:<14} {:<24} {:<24} {:>12}\n",
        "id", "state", "custom_id", "model", "provider/model", "deadline", "cost USD"
    );
    let data = v["data"].as_array().cloned().unwrap_or_default();
    for j in &data {
        let ran = match (j["provider"].as_str(), j["provider_model"].as_str()) {
            (Some(p), Some(m)) => format!("{p}/{m}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:<24} {:<14} {:<24} {:<24} {:>12}",
            j["id"].as_str().unwrap_or_default(),
            j["state"].as_str().unwrap_or_default(),
            j["custom_id"].as_str().unwrap_or_default(),
            j["model"].as_str().unwrap_or_default(),
            ran,
            j["deadline"].as_str().unwrap_or_default(),
            j["cost_usd"]
                .as_f64()
                .map_or_else(|| "-".into(), |c| format!("{c:.6}"))
        );
    }
    if data.is_empty() {
        out.push_str("(no jobs)\n");
    }
    if v["has_more"] == json!(true) {
        let _ = write!(
            out,
            "more: nightshift jobs --after {}",
            v["last_id"].as_str().unwrap_or_default()
        );
        for (flag, value) in [
            ("--state", args.state),
            ("--source", args.source),
            ("--custom-id", args.custom_id),
        ] {
            if let Some(v) = value {
                let _ = write!(out, " {flag} {}", crate::domain::units::escaped(v));
            }
        }
        out.push('\n');
    }
    Ok(out)
}

/// `nightshift jobs show ID`: one job as a readable page (the API's object
/// with `--json`). An unknown id is the API's 404, as an error.
pub async fn job_show(client: &Client, id: &str, json: bool) -> anyhow::Result<String> {
    let v = client
        .get(&format!("/v1/jobs/{}", encode(id)))
        .await
        .map_err(|e| match e {
            CallError::Api { status, .. } if status == hyper::StatusCode::NOT_FOUND => {
                anyhow::anyhow!("no job {id} (job ids look like job_12)")
            }
            e => e.into(),
        })?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    Ok(crate::cli::tables::job_page(&v))
}

/// `nightshift status`: the queue by state and provider, spend, savings,
/// the plan's expected cost, the next price change.
pub async fn status(client: &Client, json: bool) -> anyhow::Result<String> {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let usd = |v: &Value| v.as_f64().unwrap_or(0.0).max(0.0);
    let stats = client.get("/v1/stats").await?;
    let plan = client.get("/v1/plan").await?;
    if json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({"stats": stats, "plan": plan}))?
        ));
    }
    let mut out = String::from("jobs:");
    for (state, n) in stats["jobs"].as_object().into_iter().flatten() {
        let _ = write!(out, " {state} {n},");
    }
    out.pop();
    out.push_str("\n\n");
    let _ = writeln!(
        out,
        "  {:<22} {:>8} {:>8} {:>10} {:>8} {:>8} {:>10} {:>12}",
        "provider", "queued", "running", "succeeded", "failed", "expired", "cancelled", "cost USD"
    );
    for p in stats["providers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<22} {:>8} {:>8} {:>10} {:>8} {:>8} {:>10} {:>12.6}",
            p["provider"].as_str().unwrap_or_default(),
            n(&p["queued"]),
            n(&p["running"]),
            n(&p["succeeded"]),
            n(&p["failed"]),
            n(&p["expired"]),
            n(&p["cancelled"]),
            p["cost_usd"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        out,
        "\nspend: ${:.6}   list cost of succeeded jobs: ${:.6}   savings: ${:.6}{}",
        stats["spend_usd"].as_f64().unwrap_or(0.0),
        stats["succeeded_list_cost_usd"].as_f64().unwrap_or(0.0),
        stats["savings_usd"].as_f64().unwrap_or(0.0),
        stats["savings_pct"]
            .as_f64()
            .map_or_else(String::new, |p| format!(" ({p}%)"))
    );
    let _ = writeln!(
        out,
        "plan: {} queued jobs, expected ${:.6} (dispatching all now: ${:.6})",
        plan["queued_jobs"],
        usd(&plan["expected_cost_usd"]),
        usd(&plan["dispatch_now_cost_usd"])
    );
    let _ = writeln!(
        out,
        "next price change: {}",
        stats["next_price_change"]
            .as_str()
            .unwrap_or("none within 8 days")
    );
    let db = &stats["database"];
    if db["backend"] == "postgresql" {
        let _ = writeln!(
            out,
            "\nshared queue (PostgreSQL), this daemon: {} ({})\n  {:<20} {:<20} {:>8} {:<26} {:<6} role",
            db["node"].as_str().unwrap_or_default(),
            if db["planner"] == true {
                "plans"
            } else {
                "follows the plan"
            },
            "node",
            "host",
            "pid",
            "heartbeat",
            "state",
        );
        for d in db["daemons"].as_array().into_iter().flatten() {
            let text = |k: &str| {
                crate::domain::units::escaped(d[k].as_str().unwrap_or_default()).to_string()
            };
            let _ = writeln!(
                out,
                "  {:<20} {:<20} {:>8} {:<26} {:<6} {}",
                text("node"),
                text("host"),
                d["pid"],
                text("heartbeat_at"),
                if d["alive"] == true { "alive" } else { "dead" },
                if d["planner"] == true { "plans" } else { "" },
            );
        }
    }
    Ok(out)
}

/// `nightshift plan` while the daemon runs: the plan its dispatcher
/// follows. `Ok(None)` if no daemon answers on the socket.
pub async fn daemon_plan(client: &Client, json: bool) -> anyhow::Result<Option<String>> {
    let plan = match client.get("/v1/plan").await {
        Ok(plan) => plan,
        Err(CallError::Connect { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(Some(if json {
        format!("{}\n", serde_json::to_string_pretty(&plan)?)
    } else {
        crate::cli::tables::plan_table_json(&plan)
    }))
}

/// `nightshift cancel ID`: a job (`job_N`) or a batch (`batch_N`).
pub async fn cancel(client: &Client, id: &str, json: bool) -> anyhow::Result<String> {
    let path = if id.starts_with("batch_") {
        format!("/v1/batches/{}/cancel", encode(id))
    } else {
        format!("/v1/jobs/{}/cancel", encode(id))
    };
    let v = client.post_json(&path, &json!({})).await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    Ok(match v["object"].as_str() {
        Some("batch") => format!(
            "{}: {} ({} of {} requests failed or cancelled)\n",
            id,
            v["status"].as_str().unwrap_or_default(),
            v["request_counts"]["failed"],
            v["request_counts"]["total"]
        ),
        _ => format!("{}: {}\n", id, v["state"].as_str().unwrap_or_default()),
    })
}

/// `nightshift ui`: a one-time login link to the running daemon's
/// dashboard (it logs in once, within 5 minutes; the session lasts 12 h).
pub async fn ui_link(client: &Client, json: bool) -> anyhow::Result<String> {
    let v = client.post_json("/v1/ui/login-codes", &json!({})).await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    Ok(format!(
        "Open this link to log in to the dashboard (once, until {}):\n{}\n",
        v["expires_at"].as_str().unwrap_or_default(),
        v["url"].as_str().unwrap_or_default()
    ))
}
