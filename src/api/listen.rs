//! The listeners' files: the Unix socket (mode 0660; a stale one from a
//! crash is replaced, a live one is never stolen) and the bearer token
//! (mode 0600, created once, never logged).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The longest path a Unix socket address holds (`sun_path`, with its NUL).
const SUN_PATH_MAX: usize = 107;

/// The kernel's accept queue of each listener (capped by
/// `net.core.somaxconn`): connections beyond `http.max_connections` wait
/// there, costing the daemon no descriptor. The usual 128 overflows in a
/// burst, and a TCP client whose handshake the kernel then drops may never
/// hear of it.
pub const ACCEPT_BACKLOG: u32 = 1024;

/// A bound Unix socket and its path.
pub struct BoundSocket {
    pub listener: tokio::net::UnixListener,
    pub path: PathBuf,
}

/// Binds the API socket at `path` with mode 0660.
///
/// If a file is already there: a socket nobody answers on (left by a
/// crash) is replaced; a socket someone answers on is refused (another
/// daemon uses it); anything else is refused (we never delete a file that
/// is not a socket). The socket is bound under a temporary name, given its
/// mode, then renamed into place, so the path never has a wider mode.
pub fn bind_unix(path: &Path) -> anyhow::Result<BoundSocket> {
    if path.as_os_str().len() > SUN_PATH_MAX {
        bail!(
            "the socket path {} is longer than {SUN_PATH_MAX} bytes, the limit of Unix sockets; set http.socket to a shorter path",
            path.display()
        );
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "{} exists and is not a socket; refusing to replace it (set http.socket elsewhere or remove it)",
            path.display()
        ),
        Ok(_) => {
            // Nobody answering means a crash left it behind: the rename below replaces it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another process is listening on {}; refusing to take its socket",
                    path.display()
                );
            }
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener = tokio::net::UnixSocket::new_stream()
        .and_then(|socket| {
            socket.bind(&tmp)?;
            socket.listen(ACCEPT_BACKLOG)
        })
        .with_context(|| format!("binding the Unix socket {}", tmp.display()))?;
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o660))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("placing the Unix socket at {}", path.display()));
    }
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
    })
}

/// Binds the TCP listener at `addr` with [`ACCEPT_BACKLOG`].
pub fn bind_tcp(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    socket
        .and_then(|socket| {
            // As std and tokio do: a restart rebinds at once, past TIME_WAIT.
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(ACCEPT_BACKLOG)
        })
        .with_context(|| format!("binding the HTTP API to {addr}"))
}

/// `N` bytes from the kernel's CSPRNG, as hex: tokens, login codes, session ids.
pub fn random_hex<const N: usize>() -> io::Result<String> {
    let mut random = [0u8; N];
    fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut random))?;
    Ok(hex::encode(random))
}

/// Reads the token at `path`, creating it (mode 0600, 32 random bytes as
/// hex) if it does not exist yet.
pub fn ensure_token(path: &Path) -> anyhow::Result<String> {
    if let Some(token) = read_token(path)? {
        return Ok(token);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let token = format!(
        "ns-{}",
        random_hex::<32>().context("reading /dev/urandom for the API token")?
    );
    // Written under a temporary name, then linked into place: a concurrent
    // creator (the daemon and `nightshift token` at once) cannot leave a
    // half-written file, and whoever links second reads the first's token.
    let tmp = dir.join(format!(".api-token.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(token),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read_token(path)?.with_context(|| format!("{} is empty", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// The token at `path`, if the file exists. Refuses a file others can read.
fn read_token(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => {
            let mode = fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!(
                    "{} has mode {mode:o}; the token must be readable by its owner only (chmod 600)",
                    path.display()
                );
            }
            let t = s.trim().to_string();
            Ok((!t.is_empty()).then_some(t))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A socket nobody listens on: bound, then its listener dropped.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let bound = rt.block_on(async { bind_unix(&path) }).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A live one is refused.
        let e = rt.block_on(async { bind_unix(&path) }).err().unwrap();
        assert!(
            e.to_string().contains("another process is listening"),
            "{e}"
        );
        drop(bound);
        let file = dir.path().join("f");
        fs::write(&file, "x").unwrap();
        let e = rt.block_on(async { bind_unix(&file) }).err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    }

    #[test]
    fn the_token_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/api-token");
        let t = ensure_token(&path).unwrap();
        assert!(t.starts_with("ns-") && t.len() == 67, "{t}");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(ensure_token(&path).unwrap(), t);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_token(&path).is_err());
    }
}
