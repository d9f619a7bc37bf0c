//! A throwaway PostgreSQL server for tests and benchmarks: `initdb` into a
//! temporary directory, listening on a Unix socket only (no TCP), run as an
//! unprivileged user when the tests run as root (PostgreSQL refuses root).
//! One server per test process; each caller gets its own fresh database.
//!
//! The server is a child of a small shell that waits on a pipe from this
//! process: when the test process exits, however it exits, the pipe closes
//! and the shell stops the server (`SIGQUIT`: immediate) and removes its
//! directory, so no server outlives the tests.
//!
//! When PostgreSQL's binaries cannot be found this panics with what to
//! install: a missing server fails the tests, it never silently skips them.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running throwaway server.
pub struct Server {
    /// The directory holding the socket (`host=` in a URL).
    pub socket_dir: PathBuf,
    /// The role to connect as.
    pub user: String,
    _guard: Mutex<Child>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// The directory with `initdb`, `postgres` and `pg_ctl`: `$PG_BIN`, the
/// `PATH`, or Debian's `/usr/lib/postgresql/<version>/bin` (newest).
pub fn bin_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("PG_BIN") {
        return Some(PathBuf::from(d));
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").is_file() && d.join("postgres").is_file() {
                return Some(d);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// The server, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(start)
}

/// A new empty database on the server, as a libpq URL.
pub fn fresh_database() -> String {
    let s = server();
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let url = s.url("postgres");
    let mut c =
        postgres::Client::connect(&url, postgres::NoTls).expect("connecting to the test server");
    c.batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("creating a test database");
    s.url(&name)
}

impl Server {
    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{}@/{db}?host={}",
            self.user,
            self.socket_dir.display()
        )
    }
}

/// Runs `cmd` as `nobody` when this process is root.
fn unprivileged(cmd: &mut Command) -> &mut Command {
    if rustix::process::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    }
    cmd
}

fn start() -> Server {
    let bin = bin_dir().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed: the shared-backend tests need its server binaries \
             (Debian: apt-get install postgresql; or set PG_BIN to the directory with initdb)"
        )
    });
    let root = std::env::temp_dir().join(format!("nightshift-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("creating the test server's directory");
    let data = root.join("data");
    let socket_dir = root.join("sock");
    std::fs::create_dir_all(&socket_dir).unwrap();
    let root_user = rustix::process::geteuid().is_root();
    if root_user {
        for p in [&root, &socket_dir] {
            std::os::unix::fs::chown(p, Some(65534), Some(65534))
                .expect("chown for the server user");
        }
    }
    let user = if root_user {
        "nobody".to_string()
    } else {
        whoami()
    };
    let out = unprivileged(
        Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                &user,
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .env("LC_ALL", "C")
            .current_dir(&root),
    )
    .output()
    .expect("running initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The shell starts the server, then waits for its stdin to close.
    let script = format!(
        "{postgres} -D {data} -k {sock} -c listen_addresses= -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=200 -c shared_buffers=64MB >{log} 2>&1 & pid=$!; \
         cat >/dev/null; kill -QUIT $pid; wait $pid; rm -rf {root}",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        sock = socket_dir.display(),
        log = root.join("server.log").display(),
        root = root.display(),
    );
    let child = unprivileged(
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .current_dir(&root),
    )
    .spawn()
    .expect("starting the test server");
    let server = Server {
        socket_dir,
        user,
        _guard: Mutex::new(child),
    };
    let started = Instant::now();
    loop {
        match postgres::Client::connect(&server.url("postgres"), postgres::NoTls) {
            Ok(_) => break,
            Err(e) if started.elapsed() > Duration::from_secs(30) => panic!(
                "the test server did not start in 30 s: {e}; its log: {}",
                std::fs::read_to_string(root.join("server.log")).unwrap_or_default()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    // Keep the pipe open for the process's life: the guard holds the child.
    if let Ok(mut g) = server._guard.lock()
        && let Some(stdin) = g.stdin.as_mut()
    {
        let _ = stdin.flush();
    }
    server
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "postgres".into())
}

/// The socket directory of a URL made by [`Server::url`] (for tests that
/// point a daemon's config at it).
pub fn socket_of(server: &Server) -> &Path {
    &server.socket_dir
}

/// One store on each backend (SQLite in a temporary directory, PostgreSQL
/// in a fresh database), for tests that run the same steps on both and
/// compare what they answer. The directory lives as long as the store.
#[cfg(test)]
pub fn backends() -> Vec<(crate::store::Store, Option<tempfile::TempDir>)> {
    use crate::config::database::{Database, Target};
    let dir = tempfile::tempdir().unwrap();
    let sqlite = crate::store::Store::open(&dir.path().join("q.db")).unwrap();
    let url = fresh_database();
    let pg = crate::store::Store::open_database(
        &Database::Postgres(Box::new(Target::parse(&url, None).unwrap())),
        "test-node",
    )
    .unwrap();
    vec![(sqlite, Some(dir)), (pg, None)]
}
