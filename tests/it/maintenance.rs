//! Maintenance end to end: the real binary, a loopback provider, a real
//! SQLite file. `nightshift maintenance` purges what was delivered and the
//! spend report does not move; the daemon runs the same on its schedule.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

/// `config_toml` with extra `[daemon]` lines.
fn config_with(dir: &Path, p: &LoopbackProvider, daemon: &str) -> String {
    config_toml(dir, &one_provider(p)).replace("[daemon]\n", &format!("[daemon]\n{daemon}\n"))
}

fn nightshift(dir: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .args(args)
        .current_dir(dir)
        .env(KEY_ENV, TEST_KEY)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "nightshift {args:?}: {stderr}");
    (stdout, stderr)
}

fn db(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        dir.join("state/nightshift.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

/// Per job, in id order: (custom_id, state, body empty, options NULL,
/// response NULL, provider, input tokens, cost).
#[allow(clippy::type_complexity)]
fn jobs(
    dir: &Path,
) -> Vec<(
    String,
    String,
    bool,
    bool,
    bool,
    Option<String>,
    Option<i64>,
    Option<f64>,
)> {
    let conn = db(dir);
    let mut stmt = conn
        .prepare(
            "SELECT custom_id, state, body = '', options IS NULL, response IS NULL, provider, input_tokens, cost_usd
             FROM jobs ORDER BY id",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
        ))
    })
    .unwrap()
    .map(|r| r.unwrap())
    .collect()
}

/// Milliseconds since the last job completed (`None` while some is open).
fn since_last_completed(dir: &Path) -> Option<i64> {
    let (open, last): (i64, Option<i64>) = db(dir)
        .query_row(
            "SELECT COUNT(*) FILTER (WHERE completed_at IS NULL), MAX(completed_at) FROM jobs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    (open == 0).then(|| chrono::Utc::now().timestamp_millis() - last.unwrap_or(0))
}

fn three_jobs_and_a_bad_line() -> String {
    [
        chat_line(
            "a",
            "chat",
            "private text a",
            Some(json!({"deadline": "1h"})),
        ),
        chat_line("b", "loop-model", "private text b", None),
        chat_line("c", "chat", "private text c", None),
        chat_line("d", "no-such-model", "x", None),
    ]
    .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maintenance_command_purges_delivered_bodies_and_the_report_does_not_move() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The daemon keeps the default retention (30 days); the command gets a
    // config for the same state with a one-second retention.
    let mut daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    std::fs::write(
        dir.path().join("tiny.toml"),
        config_with(dir.path(), &provider, "retention = \"1s\""),
    )
    .unwrap();
    drop_file(&daemon.jobs(), "work.jsonl", &three_jobs_and_a_bad_line());
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "work", T).await;
    assert_eq!((output.len(), errors.len()), (3, 1));

    let before = jobs(dir.path());
    assert_eq!(before.len(), 3);
    assert!(
        before.iter().all(|j| j.1 == "succeeded" && !j.2 && !j.4),
        "{before:?}"
    );
    let (report_before, _) = nightshift(dir.path(), &["report", "--config", "tiny.toml"]);
    let (by_day_before, _) = nightshift(
        dir.path(),
        &["report", "--config", "tiny.toml", "--by", "day"],
    );

    // Every job finished more than the retention ago (the outbox exists, so
    // the results were delivered).
    wait_until("the last job to be over 1.2 s old", T, || {
        since_last_completed(dir.path()).is_some_and(|ms| ms > 1_200)
    })
    .await;
    // While the daemon runs: SQLite serialises the two writers.
    let (out, _) = nightshift(dir.path(), &["maintenance", "--config", "tiny.toml"]);
    assert!(
        out.contains("retention 1s: purged 3 jobs (body, options, response) and 0 uploaded files"),
        "{out}"
    );
    assert!(out.contains("WAL checkpoint (TRUNCATE): "), "{out}");
    assert!(!out.contains("busy"), "{out}");

    let after = jobs(dir.path());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.0, b.0);
        assert!(a.2 && a.3 && a.4, "{} still has content: {a:?}", a.0);
        // State, provider, tokens and cost are kept.
        assert_eq!((&a.1, &a.5, a.6, a.7), (&b.1, &b.5, b.6, b.7));
        assert!(a.7.unwrap() > 0.0);
    }
    let (report_after, _) = nightshift(dir.path(), &["report", "--config", "tiny.toml"]);
    let (by_day_after, _) = nightshift(
        dir.path(),
        &["report", "--config", "tiny.toml", "--by", "day"],
    );
    assert_eq!(report_after, report_before);
    assert_eq!(by_day_after, by_day_before);
    assert!(report_after.contains("total"), "{report_after}");

    // A second run has nothing left to purge; the outbox is the delivered copy.
    let (out, _) = nightshift(dir.path(), &["maintenance", "--config", "tiny.toml"]);
    assert!(out.contains("purged 0 jobs"), "{out}");
    let (output_again, _) = wait_for_outbox(&daemon.jobs(), "work", T).await;
    assert_eq!(output_again, output);

    // The daemon carries on.
    drop_file(
        &daemon.jobs(),
        "more.jsonl",
        &chat_line("e", "chat", "later", None),
    );
    let (more, _) = wait_for_outbox(&daemon.jobs(), "more", T).await;
    assert_eq!(more.len(), 1);
    assert!(daemon.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_retention_and_checkpoints_on_its_schedule() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &config_with(
            dir.path(),
            &provider,
            // Every other second, so that the every-second passive
            // checkpoint also gets turns (it skips while maintenance runs).
            "retention = \"1s\"\nmaintenance = \"*/2 * * * * *\"\ncheckpoint_every = \"1s\"",
        ),
    );
    drop_file(&daemon.jobs(), "work.jsonl", &three_jobs_and_a_bad_line());
    wait_for_outbox(&daemon.jobs(), "work", T).await;
    wait_until("the daemon to purge every delivered job", T, || {
        let j = jobs(dir.path());
        j.len() == 3 && j.iter().all(|j| j.2 && j.3 && j.4)
    })
    .await;
    wait_until("the purge and checkpoints in the log", T, || {
        let log = daemon.log_text();
        log.contains("retention: purged bodies and results of delivered jobs")
            && log.contains("WAL checkpoint")
            && log.contains("TRUNCATE")
            && log.contains("PASSIVE")
    })
    .await;
    let log = daemon.log_text();
    assert!(log.contains("maintenance scheduled"), "{log}");
    // Accounting kept.
    let j = jobs(dir.path());
    assert!(
        j.iter()
            .all(|j| j.1 == "succeeded" && j.5.as_deref() == Some("loop") && j.6 == Some(100))
    );
    assert!(daemon.terminate().await.success());
    assert!(daemon.log_text().contains("stopped"));
}

#[test]
fn bad_maintenance_settings_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for (line, field) in [
        ("maintenance = \"3:17 nightly\"", "daemon.maintenance"),
        ("retention = \"forever\"", "daemon.retention"),
        ("checkpoint_every = \"0s\"", "daemon.checkpoint_every"),
    ] {
        let text = format!(
            "[daemon]\n{line}\n[[providers]]\nname = \"a\"\nkind = \"simulated\"\n\
             [[providers.models]]\nname = \"m\"\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
        );
        std::fs::write(dir.path().join("bad.toml"), text).unwrap();
        for args in [
            &["check-config", "bad.toml"][..],
            &["maintenance", "--config", "bad.toml"][..],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_nightshift"))
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(!out.status.success(), "{args:?} {line}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(&format!("bad.toml:2: {field}: ")),
                "{args:?} {line}: {stderr}"
            );
        }
    }
}
