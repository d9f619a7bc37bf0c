//! The command line: README's first command on the embedded default, and
//! configuration errors that name file, line and field.

use std::fs;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn nightshift(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_config_runs_the_example_on_simulated_providers() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(dir.path(), &["serve"]);
    let example = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/jobs/examples/tickets.jsonl"
    ))
    .unwrap();
    drop_file(&dir.path().join("jobs"), "tickets.jsonl", &example);
    let (output, errors) =
        wait_for_outbox(&dir.path().join("jobs"), "tickets", Duration::from_secs(30)).await;
    assert_eq!(output.len(), 5, "{output:?}");
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(output.iter().all(|l| l["response"]["status_code"] == 200));
    assert!(
        output
            .iter()
            .all(|l| l["nightshift"]["cost_usd"].as_f64().unwrap() > 0.0)
    );
    assert!(dir.path().join("state/nightshift.db").exists());
    assert!(daemon.log_text().contains("SIMULATED"));
}

#[test]
fn an_invalid_config_names_file_line_and_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    fs::write(
        &path,
        "[[providers]]\nname = \"x\"\nkind = \"carrier-pigeon\"\n",
    )
    .unwrap();
    for args in [
        &["check-config", "bad.toml"][..],
        &["serve", "--config", "bad.toml"][..],
    ] {
        let out = nightshift(dir.path(), args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("bad.toml:3: providers[0].kind: unknown kind 'carrier-pigeon'"),
            "{args:?}: {stderr}"
        );
    }
    let out = nightshift(dir.path(), &["check-config", "missing.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn the_default_config_printed_is_the_one_that_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = nightshift(dir.path(), &["default-config"]);
    assert!(out.status.success());
    fs::write(dir.path().join("copy.toml"), &out.stdout).unwrap();
    let out = nightshift(dir.path(), &["check-config", "copy.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 providers"));
}

#[test]
fn a_second_daemon_on_the_same_state_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Daemon::spawn(dir.path(), &["serve"]);
    let db = dir.path().join("state/nightshift.db");
    let start = std::time::Instant::now();
    while !first.log_text().contains("nightshift ready") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "first daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(db.exists());
    let out = nightshift(dir.path(), &["serve"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another nightshift is already running"));
    first.kill();
}

#[test]
fn the_sample_systemd_config_is_valid() {
    let creds = tempfile::tempdir().unwrap();
    fs::write(creds.path().join("openai"), "sk-sample\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/nightshift.toml"),
        ])
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("sk-sample"),
        "the key is never printed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_spend_and_savings_match_the_sum_over_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::spawn(dir.path(), &["serve"]);
    let example = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/jobs/examples/tickets.jsonl"
    ))
    .unwrap();
    drop_file(&dir.path().join("jobs"), "tickets.jsonl", &example);
    let (output, _) =
        wait_for_outbox(&dir.path().join("jobs"), "tickets", Duration::from_secs(30)).await;
    daemon.terminate().await;
    let cost: f64 = output
        .iter()
        .map(|l| l["nightshift"]["cost_usd"].as_f64().unwrap())
        .sum();
    let list: f64 = output
        .iter()
        .map(|l| l["nightshift"]["list_cost_usd"].as_f64().unwrap())
        .sum();
    for by in ["provider", "class", "day", "channel"] {
        let out = nightshift(dir.path(), &["report", "--by", by]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let total: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("total"))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(total[1], output.len().to_string(), "{text}");
        let (spend, list_usd): (f64, f64) = (total[4].parse().unwrap(), total[5].parse().unwrap());
        assert!(
            (spend - cost).abs() < 1e-6,
            "{by}: {spend} vs {cost}\n{text}"
        );
        assert!(
            (list_usd - list).abs() < 1e-6,
            "{by}: {list_usd} vs {list}\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_the_running_dispatchers_plan_and_falls_back_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::spawn(dir.path(), &["serve"]);
    daemon.wait_ready().await;
    let plan_json = || {
        let out = nightshift(dir.path(), &["plan", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // The dispatcher publishes its plan once it has made one.
    wait_until(
        "the dispatcher's plan over the socket",
        Duration::from_secs(20),
        || plan_json()["source"] == "dispatcher",
    )
    .await;
    // The same object as the API's (a re-plan between the two reads may
    // differ: read again until both come from one plan).
    let client = daemon.unix_client().await;
    wait_until_async(
        "the CLI and the API to show one plan",
        Duration::from_secs(20),
        async || {
            let api = client.get("/v1/plan").await.unwrap();
            let cli = plan_json();
            cli["planned_at"] == api["planned_at"] && cli["providers"] == api["providers"]
        },
    )
    .await;
    let text = nightshift(dir.path(), &["plan"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("the dispatcher's own plan"), "{text}");
    assert!(text.contains("latency s"), "{text}");
    daemon.terminate().await;
    let text = nightshift(dir.path(), &["plan"]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("the daemon is not running"), "{text}");
    let json = nightshift(dir.path(), &["plan", "--json"]);
    assert!(!json.status.success());
    assert!(String::from_utf8_lossy(&json.stderr).contains("--offline"));
}

/// `nightshift completions SHELL` prints a script that completes the real
/// subcommands; bash itself accepts the bash one (when bash is installed).
#[test]
fn completions_for_bash_zsh_and_fish_name_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = nightshift(dir.path(), &["completions", shell]);
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        for sub in ["serve", "simulate", "jobs", "completions"] {
            assert!(script.contains(sub), "{shell}: no {sub} in\n{script}");
        }
        if shell == "bash" {
            let path = dir.path().join("nightshift.bash");
            fs::write(&path, &script).unwrap();
            match Command::new("bash").arg("-n").arg(&path).output() {
                Ok(check) => assert!(
                    check.status.success(),
                    "bash -n: {}",
                    String::from_utf8_lossy(&check.stderr)
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("running bash: {e}"),
            }
        }
    }
    let out = nightshift(dir.path(), &["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("possible values: bash, zsh, fish"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `nightshift jobs show ID` against a running daemon: a queued job's plan,
/// a succeeded job's provider and costs, a failed job's error, the API's
/// object with --json, and a clear error for an unknown id. The list
/// (`nightshift jobs --state S`) still works beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_show_prints_a_jobs_page_and_refuses_an_unknown_id() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Cheap only from two hours on: a job due tomorrow waits for that, one
    // due in 30 minutes runs now.
    let spec = ProviderSpec {
        name: "later",
        base_url: provider.base_url(),
        model: "later-chat",
        input_per_mtok: 1.0,
        output_per_mtok: 4.0,
        extra: crate::http::later_window(),
    };
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &[spec]));
    let client = daemon.unix_client().await;
    let soon = Some(serde_json::json!({"deadline": "30m"}));
    let body = [
        chat_line("waits", "chat", "hi", None),
        chat_line("runs", "chat", "hi", soon.clone()),
        chat_line("fails", "chat", "status:400", soon),
    ]
    .join("\n");
    client
        .json(
            hyper::Method::POST,
            "/v1/jobs",
            Some("application/jsonl"),
            body,
        )
        .await
        .unwrap();
    wait_until_async(
        "job_2 to succeed and job_3 to fail",
        Duration::from_secs(30),
        async || {
            let two = client.get("/v1/jobs/job_2").await.unwrap();
            let three = client.get("/v1/jobs/job_3").await.unwrap();
            two["state"] == "succeeded" && three["state"] == "failed"
        },
    )
    .await;
    let config = dir.path().join("nightshift.toml");
    let show = |args: &[&str]| {
        let mut all = vec!["jobs", "show"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", config.to_str().unwrap()]);
        let out = nightshift(dir.path(), &all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    /// The value after `label` on the page.
    fn field(page: &str, label: &str) -> Vec<String> {
        page.lines()
            .filter_map(|l| {
                let rest = l.trim_start().strip_prefix(label)?;
                rest.starts_with("  ").then(|| rest.trim().to_string())
            })
            .collect()
    }

    let (ok, page, stderr) = show(&["job_1"]);
    assert!(ok, "{stderr}");
    assert_eq!(field(&page, "job"), ["job_1 (waits)"], "{page}");
    assert_eq!(field(&page, "state"), ["queued"], "{page}");
    assert_eq!(field(&page, "source"), ["sub_1, line 1"], "{page}");
    assert_eq!(field(&page, "model"), ["chat (/v1/chat/completions)"]);
    let request = field(&page, "request");
    assert!(
        request.len() == 1
            && request[0].starts_with("POST /v1/chat/completions {")
            && request[0].contains(r#""model":"chat""#),
        "{page}"
    );
    let api = client.get("/v1/jobs/job_1").await.unwrap();
    let start = api["plan"]["earliest_start"].as_str().unwrap();
    assert!(
        field(&page, "earliest start")[0].starts_with(start),
        "{page}\n{api}"
    );
    assert!(
        field(&page, "planned")
            .iter()
            .any(|p| p.contains("on later/later-chat")),
        "{page}"
    );
    if let Some(why) = api["explanation"]["text"].as_str() {
        assert_eq!(field(&page, "why"), [why], "{page}");
    }

    let (ok, page, stderr) = show(&["job_2"]);
    assert!(ok, "{stderr}");
    assert_eq!(field(&page, "state"), ["succeeded"], "{page}");
    assert_eq!(field(&page, "ran on"), ["later/later-chat"], "{page}");
    assert_eq!(field(&page, "attempts"), ["1"], "{page}");
    let api = client.get("/v1/jobs/job_2").await.unwrap();
    let cost = api["cost_usd"].as_f64().unwrap();
    let list = api["result"]["nightshift"]["list_cost_usd"]
        .as_f64()
        .unwrap();
    assert_eq!(
        field(&page, "cost"),
        [format!("{cost:.6} USD (list cost {list:.6} USD)")],
        "{page}"
    );
    assert!(field(&page, "error").is_empty(), "{page}");
    assert!(field(&page, "earliest start").is_empty(), "{page}");

    let (ok, page, stderr) = show(&["job_3"]);
    assert!(ok, "{stderr}");
    assert_eq!(field(&page, "state"), ["failed"], "{page}");
    assert_eq!(
        field(&page, "error"),
        ["HTTP 400: Invalid value for 'temperature': must be <= 2."],
        "{page}"
    );

    let (ok, json, stderr) = show(&["job_2", "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v, api, "--json prints the API's object");

    for unknown in ["job_99", "nope"] {
        let (ok, stdout, stderr) = show(&[unknown]);
        assert!(!ok, "{unknown}: {stdout}");
        assert!(
            stderr.contains(&format!("no job {unknown}")),
            "{unknown}: {stderr}"
        );
        assert!(stdout.is_empty(), "{stdout}");
    }
    // A list option before `show` is refused, not ignored.
    let out = nightshift(
        dir.path(),
        &[
            "jobs",
            "--state",
            "queued",
            "show",
            "job_1",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--state"));
    // And the list is still `nightshift jobs [--state S]`.
    let out = nightshift(
        dir.path(),
        &[
            "jobs",
            "--state",
            "queued",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("job_1") && !list.contains("job_2"), "{list}");
}
