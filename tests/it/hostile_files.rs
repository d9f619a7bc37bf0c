//! Hostile input in the watched folder (issue 11): entries that are not
//! regular files, names that are not UTF-8, too long or forge log lines, a
//! byte order mark, and the modes of the state directory and database. The
//! real daemon binary, real inotify and a loopback provider.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

fn jobs_text(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            chat_line(
                &format!("{prefix}{i}"),
                "chat",
                &format!("{prefix} {i}"),
                None,
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// `path` with `suffix` after its last component.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The log lines that contain every one of `needles`.
fn count_lines(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_and_a_symlink_are_rejected_and_sigterm_still_exits_promptly() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    daemon.wait_ready().await;
    let (jobs, inbox) = (daemon.jobs(), daemon.jobs().join("inbox"));

    // A private file outside the inbox, and a link to it inside.
    let secret = dir.path().join("secret.jsonl");
    fs::write(&secret, chat_line("stolen", "chat", "private", None)).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&secret, inbox.join("link.jsonl")).unwrap();
    // A FIFO nobody writes to: opening it the usual way blocks forever.
    mkfifo(&inbox.join("pipe.jsonl"));

    let rejected = jobs.join("rejected");
    let (link_note, pipe_note) = (
        rejected.join("link.jsonl.error.txt"),
        rejected.join("pipe.jsonl.error.txt"),
    );
    wait_until("both rejection notes", T, || {
        link_note.exists() && pipe_note.exists()
    })
    .await;
    let link_text = fs::read_to_string(&link_note).unwrap();
    assert!(
        link_text.starts_with("link.jsonl: rejected: ") && link_text.contains("symbolic link"),
        "{link_text}"
    );
    let pipe_text = fs::read_to_string(&pipe_note).unwrap();
    assert!(pipe_text.contains("FIFO"), "{pipe_text}");
    // The entries themselves were moved, as what they are: not followed.
    let link = fs::symlink_metadata(rejected.join("link.jsonl")).unwrap();
    assert!(link.file_type().is_symlink());
    let pipe = fs::symlink_metadata(rejected.join("pipe.jsonl")).unwrap();
    assert!(pipe.file_type().is_fifo());
    assert_eq!(fs::read_dir(&inbox).unwrap().count(), 0);

    // The inbox still works, and nothing of the private file was sent.
    drop_file(&jobs, "ok.jsonl", &jobs_text("ok", 2));
    let (output, errors) = wait_for_outbox(&jobs, "ok", T).await;
    assert_eq!((output.len(), errors.len()), (2, 0), "{errors:?}");
    assert!(
        provider
            .seen()
            .iter()
            .all(|s| !s.text().contains("private"))
    );
    assert!(!daemon.log_text().contains("stolen"));

    let start = Instant::now();
    let status = daemon.terminate().await;
    assert!(status.success(), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_and_a_name_that_is_not_utf8_are_rejected_or_logged_once() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    daemon.wait_ready().await;
    let (jobs, inbox) = (daemon.jobs(), daemon.jobs().join("inbox"));
    let rejected = jobs.join("rejected");

    // rejected/ made unusable (a file where the folder was: even root
    // cannot move anything into it), so the entries must stay in the inbox.
    fs::remove_dir(&rejected).unwrap();
    fs::write(&rejected, "not a folder").unwrap();

    let bad_name = OsStr::from_bytes(b"caf\xe9.jsonl"); // Latin-1, not UTF-8
    fs::create_dir(inbox.join("dir.jsonl")).unwrap();
    fs::write(inbox.join(bad_name), jobs_text("latin", 1)).unwrap();
    let shown = r"caf\xe9.jsonl";

    // Several scans (rescan_interval = 1s) retry both...
    wait_until("several scans retried both entries", T, || {
        let log = daemon.log_text();
        count_lines(&log, &["ingest failed again", "dir.jsonl"]) >= 3
            && count_lines(&log, &["ingest failed again", shown]) >= 3
    })
    .await;
    // ... and each problem was logged once, naming the entry and the reason.
    let log = daemon.log_text();
    let logged = |name: &str, reason: &str| {
        count_lines(
            &log,
            &[
                "ERROR",
                "ingest failed; the file stays in the inbox",
                name,
                reason,
            ],
        )
    };
    assert_eq!(logged("dir.jsonl", "it is a directory"), 1, "{log}");
    assert_eq!(logged(shown, "not valid UTF-8"), 1, "{log}");
    assert!(inbox.join("dir.jsonl").is_dir() && inbox.join(bad_name).exists());

    // Once rejected/ is a folder again, both are moved there, with the reason.
    fs::remove_file(&rejected).unwrap();
    fs::create_dir(&rejected).unwrap();
    let dir_note = rejected.join("dir.jsonl.error.txt");
    let name_note = with_suffix(&rejected.join(bad_name), ".error.txt");
    wait_until("both rejected", T, || {
        dir_note.exists() && name_note.exists()
    })
    .await;
    assert!(rejected.join("dir.jsonl").is_dir());
    assert!(rejected.join(bad_name).is_file());
    let text = fs::read_to_string(&name_note).unwrap();
    assert!(
        text.starts_with(&format!("{shown}: rejected: its name is not valid UTF-8")),
        "{text}"
    );
    assert!(
        fs::read_to_string(&dir_note)
            .unwrap()
            .contains("it is a directory")
    );
    assert_eq!(fs::read_dir(&inbox).unwrap().count(), 0);
    assert_eq!(provider.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_251_byte_name_blocks_no_other_file_and_a_240_byte_one_is_processed() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    daemon.wait_ready().await;
    let (jobs, inbox) = (daemon.jobs(), daemon.jobs().join("inbox"));

    // Legal on the file system (255 is the limit), but its outbox names
    // would not be. It sorts first, so it is ingested first.
    let long = format!("{}.jsonl", "a".repeat(245));
    assert_eq!(long.len(), 251);
    // (drop_file's temporary name would be too long: written beside the inbox.)
    let outside = jobs.join("long.part");
    fs::write(&outside, jobs_text("long", 2)).unwrap();
    fs::rename(&outside, inbox.join(&long)).unwrap();
    wait_until("the long name has left the inbox", T, || {
        !inbox.join(&long).exists()
    })
    .await;
    drop_file(&jobs, "b.jsonl", &jobs_text("b", 2));
    let (output, _) = wait_for_outbox(&jobs, "b", T).await;
    assert_eq!(output.len(), 2);

    // The long one was rejected with a clear reason, under a shorter name.
    let notes: Vec<PathBuf> = fs::read_dir(jobs.join("rejected"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(".error.txt"))
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    let text = fs::read_to_string(&notes[0]).unwrap();
    assert!(
        text.starts_with(&format!(
            "{long}: rejected: its name is 251 bytes long; at most 240"
        )),
        "{text}"
    );
    let kept = PathBuf::from(
        notes[0]
            .to_str()
            .unwrap()
            .strip_suffix(".error.txt")
            .unwrap(),
    );
    assert_eq!(
        fs::read_to_string(kept).unwrap(),
        jobs_text("long", 2),
        "the file itself is kept"
    );
    assert!(provider.seen().iter().all(|s| !s.text().contains("long")));

    // The longest name accepted is processed, outbox and all.
    let longest = format!("{}.jsonl", "c".repeat(234));
    assert_eq!(longest.len(), 240);
    drop_file(&jobs, &longest, &jobs_text("c", 1));
    let (output, _) = wait_for_outbox(&jobs, &"c".repeat(234), T).await;
    assert_eq!(output.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outbox_that_cannot_be_written_holds_up_no_other() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    daemon.wait_ready().await;
    let jobs = daemon.jobs();
    let outbox = jobs.join("outbox");

    // A folder where a's output file must go: its rename fails.
    fs::create_dir(outbox.join("a.output.jsonl")).unwrap();
    drop_file(&jobs, "a.jsonl", &jobs_text("a", 1));
    wait_until("a's outbox failed", T, || {
        daemon
            .log_text()
            .contains("writing this file's outbox failed")
    })
    .await;
    drop_file(&jobs, "b.jsonl", &jobs_text("b", 1));
    let (output, _) = wait_for_outbox(&jobs, "b", T).await;
    assert_eq!(output.len(), 1);
    // b's pass retried a too: the failure was logged once, naming the file.
    wait_until("a retried", T, || {
        count_lines(&daemon.log_text(), &["outbox failed again", "a.jsonl"]) >= 1
    })
    .await;
    let log = daemon.log_text();
    assert_eq!(
        count_lines(
            &log,
            &[
                "ERROR",
                "writing this file's outbox failed",
                "source=a.jsonl"
            ]
        ),
        1,
        "{log}"
    );
    // No temporary file is left behind, and temporary names are short.
    let leftovers: Vec<_> = fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_str().unwrap().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Once the obstacle is gone, the next pass writes it.
    fs::remove_dir(outbox.join("a.output.jsonl")).unwrap();
    drop_file(&jobs, "c.jsonl", &jobs_text("c", 1));
    let (output, _) = wait_for_outbox(&jobs, "a", T).await;
    assert_eq!(output.len(), 1);
    wait_for_outbox(&jobs, "c", T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_name_or_custom_id_cannot_forge_a_log_line() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    daemon.wait_ready().await;
    let jobs = daemon.jobs();
    let stem = "x\nFORGED ERROR nightshift: all jobs deleted\u{1b}]0;pwned\u{7}";
    let content = [
        chat_line("plain", "chat", "a", None),
        chat_line("id\nFORGED custom id\u{1b}[2J", "chat", "b", None),
    ]
    .join("\n");
    drop_file(&jobs, &format!("{stem}.jsonl"), &content);
    let (output, _) = wait_for_outbox(&jobs, stem, T).await;
    assert_eq!(output.len(), 2);
    assert!(daemon.terminate().await.success());

    let log = daemon.log_text();
    assert!(
        log.contains(r"x\nFORGED ERROR"),
        "the name is logged, escaped: {log}"
    );
    assert!(log.contains(r"id\nFORGED custom id\u{1b}[2J"), "{log}");
    let forged: Vec<&str> = log.lines().filter(|l| l.starts_with("FORGED")).collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
    assert!(!log.contains("\u{1b}]0;pwned") && !log.contains("\u{1b}[2J"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_order_mark_loses_no_line_in_a_file_or_a_body() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &config_toml(dir.path(), &one_provider(&provider)),
    );
    let client = daemon.unix_client().await;
    let jobs = daemon.jobs();
    drop_file(
        &jobs,
        "bom.jsonl",
        &format!("\u{feff}{}\n", jobs_text("f", 3)),
    );
    let (output, errors) = wait_for_outbox(&jobs, "bom", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(output.len(), 3);
    assert_eq!(output[0]["custom_id"], "f0");

    let sub: Value = client
        .json(
            hyper::Method::POST,
            "/v1/jobs",
            Some("application/jsonl"),
            format!("\u{feff}{}\n", jobs_text("h", 2)),
        )
        .await
        .unwrap();
    assert_eq!(sub["queued"], 2, "{sub}");
}

/// `nightshift serve --config CONFIG` started by `sh` with umask 022, as
/// a daemon started by hand outside systemd typically is.
fn start_with_umask_022(dir: &Path, config: &Path, log: &Path) -> std::process::Child {
    Command::new("sh")
        .args(["-c", "umask 022 && exec \"$0\" serve --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_nightshift"))
        .arg(config)
        .current_dir(dir)
        .env(KEY_ENV, TEST_KEY)
        .env("RUST_LOG", "nightshift=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

async fn stop(mut child: std::process::Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut status = None;
    wait_until("the daemon to exit", T, || {
        status = child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(status.unwrap().success());
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_directory_is_0700_and_the_database_0600_whatever_the_umask() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nightshift.toml");
    fs::write(&config, config_toml(dir.path(), &one_provider(&provider))).unwrap();
    let (state, db) = (
        dir.path().join("state"),
        dir.path().join("state/nightshift.db"),
    );
    let (wal, shm) = (with_suffix(&db, "-wal"), with_suffix(&db, "-shm"));
    let log = dir.path().join("umask.log");
    let log_text = || fs::read_to_string(&log).unwrap_or_default();

    let child = start_with_umask_022(dir.path(), &config, &log);
    wait_until("the daemon ready", T, || {
        log_text().contains("nightshift ready")
    })
    .await;
    // A job, so that the WAL and its index are in use.
    drop_file(&dir.path().join("jobs"), "j.jsonl", &jobs_text("j", 1));
    wait_for_outbox(&dir.path().join("jobs"), "j", T).await;
    assert!(
        wal.exists() && shm.exists(),
        "WAL mode: -wal and -shm exist"
    );
    let modes = [mode(&state), mode(&db), mode(&wal), mode(&shm)];
    stop(child).await;
    assert_eq!(modes, [0o700, 0o600, 0o600, 0o600], "{}", log_text());

    // A database an older version left readable by others is tightened.
    fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
    let child = start_with_umask_022(dir.path(), &config, &log);
    wait_until("the daemon ready again", T, || {
        log_text().matches("nightshift ready").count() == 1 && mode(&db) == 0o600
    })
    .await;
    stop(child).await;
}
