//! The CLI's stdout as a shell sees it.
//!
//! A closed stdout (`nightshift prices | head -1`) is the reader saying it has
//! enough: every command must exit 0 without a panic, as `cat` or `rg` do.
//! The offline commands share the CLI's one stdout writer with the daemon
//! clients (`jobs`, `status`, ...), so they cover it without a daemon.
//!
//! Also the help text, which clap writes itself: each subcommand's its own.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

fn nightshift(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nightshift"));
    c.args(args).stderr(Stdio::piped()).stdin(Stdio::null());
    c
}

fn assert_clean(args: &[&str], out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "nightshift {args:?} panicked on a closed stdout:\n{stderr}"
    );
    assert!(
        out.status.success(),
        "nightshift {args:?} on a closed stdout: {:?}\n{stderr}",
        out.status
    );
}

/// Runs the command with stdout a pipe whose read end is already closed, so
/// its first write fails with EPIPE.
fn with_closed_stdout(args: &[&str]) {
    let (reader, writer) = std::io::pipe().expect("creating a pipe");
    drop(reader);
    let out = nightshift(args)
        .stdout(writer)
        .output()
        .expect("running nightshift");
    assert_clean(args, &out);
}

#[test]
fn prices_into_a_closed_pipe_exits_cleanly() {
    with_closed_stdout(&["prices", "--at", "2026-11-24T00:00:00Z"]);
}

#[test]
fn check_config_into_a_closed_pipe_exits_cleanly() {
    with_closed_stdout(&["check-config"]);
}

#[test]
fn default_config_into_a_closed_pipe_exits_cleanly() {
    with_closed_stdout(&["default-config"]);
}

#[test]
fn completions_into_a_closed_pipe_exit_cleanly() {
    with_closed_stdout(&["completions", "bash"]);
}

/// `| head -1`: the reader takes one line, then goes away while the command
/// is still writing (the table is larger than a pipe's buffer).
#[test]
fn prices_read_one_line_then_closed_exits_cleanly() {
    let args = ["prices", "--at", "2026-11-24T00:00:00Z", "--hours", "20000"];
    let mut child = nightshift(&args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("running nightshift");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(!first.is_empty(), "no output at all");
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert_clean(&args, &out);
}

fn help(args: &[&str]) -> String {
    let out = nightshift(args).output().expect("running nightshift");
    assert!(out.status.success(), "nightshift {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

#[test]
fn plan_and_report_help_each_describe_their_own_command() {
    let plan = help(&["plan", "--help"]);
    assert!(
        plan.contains("what the daemon intends to do with its queue"),
        "{plan}"
    );
    assert!(!plan.contains("Spend and savings"), "{plan}");
    let report = help(&["report", "--help"]);
    assert!(
        report.contains("Spend and savings of finished jobs"),
        "{report}"
    );
    assert!(!report.contains("intends to do"), "{report}");
    // The overview lists each with its own summary.
    let all = help(&["--help"]);
    let line = |name: &str| {
        all.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no '{name}' in\n{all}"))
            .to_string()
    };
    assert!(line("plan").contains("intends to do"), "{all}");
    assert!(line("report").contains("Spend and savings"), "{all}");
}

/// `nightshift jobs | head -1` against a running daemon: the listing goes
/// through the same writer, into a pipe already closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_into_a_closed_pipe_exits_cleanly() {
    use crate::common::*;
    let dir = tempfile::tempdir().unwrap();
    let provider = LoopbackProvider::start().await;
    let spec = ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "",
    };
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &[spec]));
    daemon.wait_ready().await;
    let lines: Vec<String> = (0..20)
        .map(|i| chat_line(&format!("j{i}"), "chat", "hi", None))
        .collect();
    drop_file(&daemon.jobs(), "e.jsonl", &lines.join("\n"));
    wait_for_outbox(&daemon.jobs(), "e", std::time::Duration::from_secs(60)).await;
    let config = dir.path().join("nightshift.toml");
    with_closed_stdout(&["jobs", "--config", config.to_str().unwrap()]);
}
