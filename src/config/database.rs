//! `[daemon] database`: a SQLite file (the default) or a PostgreSQL URL.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Which backend holds the queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Database {
    /// A SQLite file on this host (the embedded default).
    Sqlite(PathBuf),
    /// A PostgreSQL database that several daemons may share.
    Postgres(Box<Target>),
}

impl Database {
    /// The SQLite file, if that is the backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Database::Sqlite(p) => Some(p),
            Database::Postgres(_) => None,
        }
    }

    /// Whether a URL names PostgreSQL rather than a file.
    pub fn is_postgres_url(s: &str) -> bool {
        let l = s.to_ascii_lowercase();
        l.starts_with("postgresql://") || l.starts_with("postgres://")
    }
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres(t) => write!(f, "{t}"),
        }
    }
}

/// How long connecting waits for the server.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Where the database is, with the password kept apart from anything that
/// is printed.
#[derive(Clone)]
pub struct Target {
    config: postgres::Config,
    /// Whether a password was given (in the URL, the file or PGPASSWORD).
    has_password: bool,
    /// The URL with any password replaced by `***`.
    redacted: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl Target {
    /// The client configuration (holds the password: never print it).
    pub fn config(&self) -> &postgres::Config {
        &self.config
    }

    /// Whether a password is set (`check-config` says so, without it).
    pub fn has_password(&self) -> bool {
        self.has_password
    }

    /// Parses a libpq URL (`postgresql://user@host:port/db?host=/socket/dir`)
    /// or key/value string. The password may be in it, in `password_file`
    /// (its first line), or in `PGPASSWORD`; it is never printed.
    pub fn parse(url: &str, password_file: Option<&Path>) -> std::result::Result<Target, String> {
        let mut config =
            postgres::Config::from_str(url).map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        if config.get_password().is_none() {
            if let Some(path) = password_file {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading the password file {}: {e}", path.display()))?;
                let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
                config.password(line);
            } else if let Ok(p) = std::env::var("PGPASSWORD") {
                config.password(p);
            }
        }
        if config.get_application_name().is_none() {
            config.application_name("nightshift");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_WAIT);
        }
        // A host that vanished is noticed in about a minute, not the OS's two hours.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(20));
        Ok(Target {
            has_password: config.get_password().is_some(),
            config,
            redacted: redact(url),
        })
    }
}

/// The URL with the password of its userinfo (`user:secret@`) and any
/// `password=` parameter replaced by `***`.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            let start = scheme_end + 3 + colon + 1;
            let end = scheme_end + 3 + at;
            out.replace_range(start..end, "***");
        }
    }
    // key=value forms and URL parameters: password=...
    let lower = out.to_ascii_lowercase();
    if let Some(i) = lower.find("password=") {
        let start = i + "password=".len();
        let end = out[start..]
            .find(['&', ' '])
            .map_or(out.len(), |e| start + e);
        out.replace_range(start..end, "***");
    }
    out
}

impl PartialEq for Target {
    fn eq(&self, other: &Target) -> bool {
        self.redacted == other.redacted && self.config.get_password() == other.config.get_password()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_in_every_form() {
        assert_eq!(
            redact("postgresql://ns:s3cret@db.internal:5432/nightshift"),
            "postgresql://ns:***@db.internal:5432/nightshift"
        );
        assert_eq!(
            redact(
                "postgresql://ns@/nightshift?host=/run/postgresql&password=s3cret&sslmode=disable"
            ),
            "postgresql://ns@/nightshift?host=/run/postgresql&password=***&sslmode=disable"
        );
        assert_eq!(
            redact("host=/tmp user=ns password=s3cret dbname=q"),
            "host=/tmp user=ns password=*** dbname=q"
        );
        assert_eq!(
            redact("postgresql://ns@localhost/q"),
            "postgresql://ns@localhost/q"
        );
    }

    #[test]
    fn a_password_file_is_read_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "hunter2\n").unwrap();
        let t = Target::parse("postgresql://ns@/q?host=/tmp", Some(&file)).unwrap();
        assert_eq!(t.config.get_password(), Some(&b"hunter2"[..]));
        assert!(!format!("{t} {t:?}").contains("hunter2"));
    }
}
