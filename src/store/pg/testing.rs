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
        url_of(&self.user, &self.socket_dir, db)
    }
}

/// Runs `cmd` as `nobody` when this process is root.
fn unprivileged(cmd: &mut Command) -> &mut Command {
    if rustix::process::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    }
    cmd
}

/// A cluster's files and who runs it.
struct Cluster {
    bin: PathBuf,
    root: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    user: String,
}

/// `initdb` into `root` (owned by the unprivileged user when root).
fn init_cluster(root: PathBuf) -> Cluster {
    let bin = bin_dir().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed: the shared-backend tests need its server binaries \
             (Debian: apt-get install postgresql; or set PG_BIN to the directory with initdb)"
        )
    });
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
    Cluster {
        bin,
        root,
        data,
        socket_dir,
        user,
    }
}

impl Cluster {
    /// Starts the server under a shell that waits for its stdin to close,
    /// then stops it with `stop_signal` (and with `remove`, deletes the
    /// cluster). Returns once the server accepts connections.
    fn launch(&self, stop_signal: &str, remove: bool) -> Child {
        let script = format!(
            "{postgres} -D {data} -k {sock} -c listen_addresses= -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200 -c shared_buffers=64MB >>{log} 2>&1 & pid=$!; \
             cat >/dev/null; kill -{stop_signal} $pid; wait $pid;{remove}",
            postgres = self.bin.join("postgres").display(),
            data = self.data.display(),
            sock = self.socket_dir.display(),
            log = self.root.join("server.log").display(),
            remove = if remove {
                format!(" rm -rf {}", self.root.display())
            } else {
                String::new()
            },
        );
        let child = unprivileged(
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .current_dir(&self.root),
        )
        .spawn()
        .expect("starting the test server");
        let url = url_of(&self.user, &self.socket_dir, "postgres");
        let started = Instant::now();
        loop {
            match postgres::Client::connect(&url, postgres::NoTls) {
                Ok(_) => break,
                Err(e) if started.elapsed() > Duration::from_secs(30) => panic!(
                    "the test server did not start in 30 s: {e}; its log: {}",
                    std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        child
    }
}

fn url_of(user: &str, socket_dir: &Path, db: &str) -> String {
    format!("postgresql://{user}@/{db}?host={}", socket_dir.display())
}

fn start() -> Server {
    let root = std::env::temp_dir().join(format!("nightshift-pg-{}", std::process::id()));
    let cluster = init_cluster(root);
    // Immediate shutdown and removal when the test process exits.
    let child = cluster.launch("QUIT", true);
    Server {
        socket_dir: cluster.socket_dir,
        user: cluster.user,
        _guard: Mutex::new(child),
    }
}

/// A server of one test's own, that the test may stop and start again (a
/// database outage). Stopping is PostgreSQL's fast shutdown: sessions are
/// terminated, as when an operator restarts the database. Dropped, it stops
/// and its cluster is removed.
pub struct PrivateServer {
    cluster: Cluster,
    child: Option<Child>,
}

static NEXT_PRIVATE: AtomicU64 = AtomicU64::new(0);

impl PrivateServer {
    /// A new cluster, started, with one database `nightshift`.
    pub fn start() -> PrivateServer {
        let root = std::env::temp_dir().join(format!(
            "nightshift-pg-{}-own{}",
            std::process::id(),
            NEXT_PRIVATE.fetch_add(1, Ordering::Relaxed)
        ));
        let cluster = init_cluster(root);
        let child = cluster.launch("INT", false);
        let server = PrivateServer {
            cluster,
            child: Some(child),
        };
        let mut c = postgres::Client::connect(&server.url("postgres"), postgres::NoTls)
            .expect("connecting to the private test server");
        c.batch_execute("CREATE DATABASE nightshift")
            .expect("creating the database");
        server
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        url_of(&self.cluster.user, &self.cluster.socket_dir, db)
    }

    /// Stops the server and waits until it has exited.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again on the same cluster.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.child = Some(self.cluster.launch("INT", false));
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.cluster.root);
    }
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
