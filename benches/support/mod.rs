//! What the daemon benchmarks share: starting the real binary on a config,
//! and reading its resident memory.

#[allow(dead_code)] // not every benchmark sends to a provider
pub mod loopback;

use std::path::Path;
use std::process::{Child, Command};

/// Writes `config` to `dir/nightshift.toml` and starts `nightshift serve` on
/// it (warnings only, logged to `dir/daemon.log`), with `env` set.
pub fn spawn_daemon(dir: &Path, config: &str, env: &[(&str, &str)]) -> Child {
    let path = dir.join("nightshift.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap()
}

/// Resident memory of process `pid` in KiB (from /proc).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
