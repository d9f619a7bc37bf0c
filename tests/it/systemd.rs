//! The sd_notify protocol as systemd sees it: the test owns the notify
//! socket and watches READY=1, WATCHDOG=1 and STOPPING=1 arrive in order.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ready_watchdog_and_stopping_are_notified_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .arg("serve")
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000") // pings every 200 ms
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut messages: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    let mut terminated = false;
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let watchdogs = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
        if !terminated && watchdogs >= 2 {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            terminated = true;
        }
        if messages.iter().any(|m| m.contains("STOPPING=1")) {
            break;
        }
    }
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let first = |what: &str| messages.iter().position(|m| m.contains(what));
    let (ready, watchdog, stopping) = (first("READY=1"), first("WATCHDOG=1"), first("STOPPING=1"));
    assert!(
        ready.is_some() && watchdog.is_some() && stopping.is_some(),
        "{messages:?}"
    );
    assert!(
        ready < watchdog || messages[ready.unwrap()].contains("WATCHDOG=1"),
        "{messages:?}"
    );
    assert!(watchdog < stopping, "{messages:?}");
    assert!(
        messages[ready.unwrap()].contains("STATUS="),
        "a status line comes with READY: {messages:?}"
    );
    // READY only once the state is on disk and the socket is bound.
    assert!(dir.path().join("state/nightshift.db").exists());
}
