//! The PostgreSQL backend: several daemons, on several hosts, share one
//! queue and one provider account.
//!
//! The same methods as the SQLite store ([`crate::store::backend`]), with
//! what a shared database changes:
//!
//! - Jobs are claimed with `FOR UPDATE SKIP LOCKED` under a lease with an
//!   owner (one daemon run) and an expiry; a daemon renews its liveness every
//!   heartbeat ([`coord`]), and the others re-queue a dead daemon's running
//!   jobs once its heartbeat is older than [`coord::DEAD_AFTER_MS`].
//! - Rate limits hold for the sum over every daemon: a claim is admitted
//!   against the `sends` ledger of the last 60 s and 24 h and the running
//!   jobs of every daemon, under a per-provider transaction lock
//!   ([`coord`]).
//! - One daemon plans at a time (a session advisory lock), and publishes
//!   the plan the others follow.
//!
//! The client is the synchronous `postgres` crate (tokio-postgres underneath)
//! pooled by r2d2: the store's interface is synchronous and every caller
//! already runs it off the async threads, so an async client would only add a
//! second boundary. r2d2 replaces broken connections, so a database restart
//! or a lost connection costs the calls made meanwhile an error (the
//! dispatcher's pass fails and is retried; nothing is acknowledged that was
//! not committed), not the daemon.

use std::time::Duration;

use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;

use super::{QueueError, Result};
pub use crate::config::database::Target;

mod api;
mod batches;
pub mod coord;
mod queue;
#[doc(hidden)]
pub mod testing;

/// The newest PostgreSQL schema version; `schema.postgres.sql` describes it.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `MIGRATIONS[i]` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[include_str!("../../../schema.postgres.sql")];

/// The advisory lock key migrations hold ("nightshift" in ASCII, cut to 63 bits).
const MIGRATE_LOCK: i64 = 0x6e69_6768_7473_6869;

/// Pooled connections per daemon: the dispatcher, the recorder, the API and
/// the outbox each take one at a time.
const POOL_SIZE: u32 = 8;

/// How long a call waits for a connection before it fails (and its caller
/// retries): a database that is down must not hang the daemon.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

pub(crate) type Conn = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

/// The PostgreSQL-backed job queue.
pub struct Postgres {
    pool: r2d2::Pool<PostgresConnectionManager<NoTls>>,
    target: Target,
    /// This daemon's node name: the sources its inbox receives are its to
    /// write to its outbox.
    node: String,
    /// The limits admission holds for the sum over every daemon, per
    /// provider (from this daemon's catalog: every daemon sharing an
    /// account must configure the same limits).
    shares: std::sync::RwLock<coord::Shares>,
    /// The session holding the planner lock, while this daemon plans.
    planner: std::sync::Mutex<Option<postgres::Client>>,
}

impl Postgres {
    /// Connects, and migrates the schema to [`SCHEMA_VERSION`] under an
    /// advisory lock (daemons starting together do not race).
    pub fn open(target: &Target, node: &str) -> Result<Postgres> {
        let manager = PostgresConnectionManager::new(target.config().clone(), NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_WAIT)
            // Checked when taken: a connection the server dropped is replaced,
            // not handed out.
            .test_on_check_out(true)
            .build(manager)
            .map_err(|e| setup(target, format!("connecting: {e}")))?;
        let pg = Postgres {
            pool,
            target: target.clone(),
            node: node.to_string(),
            shares: Default::default(),
            planner: Default::default(),
        };
        pg.run(migrate)
            .map_err(|e| setup(target, format!("migrating the schema: {e}")))?;
        Ok(pg)
    }

    /// The database, password redacted.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// This daemon's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs `f` on a pooled connection. The `postgres` client blocks on its
    /// own runtime, which tokio forbids on an async worker thread: called
    /// from one (rather than from `spawn_blocking`, as the daemon does), the
    /// worker is handed over to blocking for the call.
    pub(crate) fn run<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let call = || {
            let mut conn = self
                .pool
                .get()
                .map_err(|e| QueueError::Pool(e.to_string()))?;
            f(&mut conn)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(call)
            }
            _ => call(),
        }
    }

    /// Whether the database answers (for `/healthz`).
    pub fn ping(&self) -> Result<()> {
        self.run(|c| {
            c.simple_query("SELECT 1")?;
            Ok(())
        })
    }
}

fn setup(target: &Target, message: String) -> QueueError {
    QueueError::Setup {
        path: target.to_string(),
        message,
    }
}

/// Applies the missing migrations in one transaction holding
/// [`MIGRATE_LOCK`]; refuses a database newer than this build.
fn migrate(c: &mut Conn) -> Result<()> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let version: Option<i64> = tx
        .query_opt("SELECT version FROM schema_version", &[])?
        .map(|r| r.get(0));
    let version = version.unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(QueueError::Setup {
            path: "schema_version".into(),
            message: format!(
                "the database has schema version {version}, newer than this nightshift's {SCHEMA_VERSION}: upgrade nightshift"
            ),
        });
    }
    for step in &MIGRATIONS[version as usize..] {
        tx.batch_execute(step)?;
    }
    tx.execute("DELETE FROM schema_version", &[])?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES ($1)",
        &[&SCHEMA_VERSION],
    )?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> Postgres {
        let url = testing::fresh_database();
        Postgres::open(&Target::parse(&url, None).unwrap(), "test").unwrap()
    }

    #[test]
    fn a_new_database_is_migrated_once_and_a_newer_one_refused() {
        let url = testing::fresh_database();
        let target = Target::parse(&url, None).unwrap();
        // Four daemons opening an empty database at once: one migrates, the
        // others wait on the lock and find it done.
        let opened: Vec<_> = (0..4)
            .map(|i| {
                let t = target.clone();
                std::thread::spawn(move || Postgres::open(&t, &format!("n{i}")).map(|_| ()))
            })
            .collect();
        for h in opened {
            h.join().unwrap().unwrap();
        }
        let pg = Postgres::open(&target, "n").unwrap();
        let version: i64 = pg
            .run(|c| {
                Ok(c.query_one("SELECT version FROM schema_version", &[])?
                    .get(0))
            })
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        pg.run(|c| {
            c.execute("UPDATE schema_version SET version = version + 1", &[])?;
            Ok(())
        })
        .unwrap();
        let err = Postgres::open(&target, "n")
            .err()
            .expect("a newer schema is refused");
        assert!(
            err.to_string().contains("newer than this nightshift"),
            "{err}"
        );
    }

    #[test]
    fn ping_answers() {
        open().ping().unwrap();
    }

    /// A lost connection or an empty pool is "unavailable" (callers retry);
    /// a statement the database refused is not.
    #[test]
    fn a_lost_connection_is_unavailable_and_a_refused_statement_is_not() {
        let pg = open();
        let refused = pg
            .run(|c| Ok(c.simple_query("SELECT no_such_column FROM daemons")?))
            .unwrap_err();
        assert!(!refused.is_unavailable(), "{refused}");
        let mut c = pg.target.config().connect(NoTls).unwrap();
        let mut killer = pg.target.config().connect(NoTls).unwrap();
        let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        killer
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
        // Gone from the server before the client next speaks.
        let gone_by = std::time::Instant::now() + Duration::from_secs(10);
        while killer
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .unwrap()
            .get::<_, i64>(0)
            > 0
        {
            assert!(
                std::time::Instant::now() < gone_by,
                "the backend did not exit"
            );
            std::thread::yield_now();
        }
        let lost: QueueError = c.simple_query("SELECT 1").unwrap_err().into();
        assert!(lost.is_unavailable(), "{lost}");
        assert!(QueueError::Pool("timed out".into()).is_unavailable());
        // The pool replaces what the server dropped: the next call works.
        pg.ping().unwrap();
    }
}
