//! The watched folder: `jobs/inbox/*.jsonl` into the queue.
//!
//! The inbox is writable by others, so what is listed there is not trusted:
//! each entry is opened once, without following a symbolic link and
//! without blocking (a FIFO), and checked *on the opened descriptor* to be a
//! regular file; everything after reads that descriptor, never the path
//! again, so an entry swapped after the listing cannot be read instead.
//! Anything else (a link, a FIFO, a directory, a socket, a file the daemon
//! may not read, a name that is not UTF-8 or too long to build its outbox
//! names from) is moved to `rejected/` with the reason beside it.
//!
//! A regular file is read twice: once to hash it (a re-drop of the same
//! content is not queued again), check it is UTF-8 and looks like JSONL at
//! all; then to validate and queue its lines in one transaction. Only after
//! that commit is the file moved to `processed/`: a crash in between leaves
//! it in the inbox, and the next scan recognises its hash and just moves it.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::hash::Hash;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

pub mod jsonl;

use crate::domain::job::{self, JobContext};
use crate::domain::pricing::Catalog;
use crate::domain::units::escaped_os;
use crate::store::{self, IngestSummary, LineOutcome, NewSource, Origin, Store};

/// The longest file name, in bytes, that the file systems nightshift runs
/// on take (`NAME_MAX` of ext4, XFS, btrfs, tmpfs).
pub const NAME_MAX: usize = 255;

/// Room kept in every derived name for the `.N` (up to `.9999999`) that
/// keeps it unique: `x.2.jsonl` in `processed/`, stem `x.2` in the outbox.
const SUFFIX_ROOM: usize = 8;

/// The longest inbox file name accepted, in bytes: its outbox files
/// `<stem>.output.jsonl` and `<stem>.errors.jsonl` (7 bytes longer than the
/// name), with room for a `.N`, must fit [`NAME_MAX`].
pub const MAX_NAME: usize = NAME_MAX - SUFFIX_ROOM - (".output.jsonl".len() - ".jsonl".len());

/// What the reason for a rejection is written to, beside the rejected entry.
const NOTE_SUFFIX: &str = ".error.txt";

/// The folders under the jobs root.
#[derive(Debug, Clone)]
pub struct Folders {
    pub inbox: PathBuf,
    pub processed: PathBuf,
    pub rejected: PathBuf,
    pub outbox: PathBuf,
}

impl Folders {
    pub fn new(root: &Path) -> Folders {
        Folders {
            inbox: root.join("inbox"),
            processed: root.join("processed"),
            rejected: root.join("rejected"),
            outbox: root.join("outbox"),
        }
    }

    /// Creates any that are missing.
    pub fn create(&self) -> io::Result<()> {
        for d in [&self.inbox, &self.processed, &self.rejected, &self.outbox] {
            fs::create_dir_all(d)?;
        }
        Ok(())
    }
}

/// What happened to one inbox entry.
#[derive(Debug)]
pub enum FileOutcome {
    /// Queued; moved to `processed/` as `moved_to`.
    Ingested {
        summary: IngestSummary,
        moved_to: PathBuf,
    },
    /// The same content was ingested before (as `previous`); moved to `processed/`.
    Duplicate { previous: String, moved_to: PathBuf },
    /// Not a JSONL job file (not a regular file, a bad name, not JSONL at
    /// all); moved to `rejected/` with an `.error.txt` beside it, unless
    /// writing that failed (`note_error`).
    Rejected {
        reason: String,
        moved_to: PathBuf,
        note_error: Option<String>,
    },
    /// Gone from the inbox before it was opened (renamed or deleted since
    /// the listing): nothing to do.
    Gone,
}

/// Errors that leave the entry in the inbox to be retried. Paths are
/// escaped (see [`crate::domain::units::escaped`]): they come from outside.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: {source}")]
    Queue {
        path: String,
        source: store::QueueError,
    },
    #[error("{path}: rejected ({reason}), but it cannot be moved to rejected/: {source}")]
    Reject {
        path: String,
        reason: String,
        source: io::Error,
    },
}

/// Whether an inbox entry's name is one of a job file to ingest (any bytes
/// but a leading `.`, ending in `.jsonl`): such an entry is ingested or
/// rejected; every other one is left alone.
pub fn is_job_file(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.ends_with(b".jsonl") && !b.starts_with(b".")
}

/// Why an inbox entry's name cannot be ingested, if it cannot.
pub fn name_problem(name: &OsStr) -> Option<String> {
    let Some(name) = name.to_str() else {
        return Some(
            "its name is not valid UTF-8 (outbox names and result lines are UTF-8): \
             rename it"
                .into(),
        );
    };
    (name.len() > MAX_NAME).then(|| {
        format!(
            "its name is {} bytes long; at most {MAX_NAME} are accepted, so that its outbox \
             files <stem>.output.jsonl and <stem>.errors.jsonl fit the file system's \
             {NAME_MAX}-byte limit: rename it",
            name.len()
        )
    })
}

/// Why an inbox entry was not opened.
#[derive(Debug)]
pub enum OpenError {
    /// It is not a regular file the daemon may read: it is rejected, for this reason.
    Refused(String),
    /// It is gone (renamed or deleted since the listing).
    Gone,
    /// Something that may pass (out of file descriptors, an I/O error):
    /// the entry stays for the next scan.
    Io(io::Error),
}

/// Opens a listed inbox entry for reading, as what it is now: a symbolic
/// link is not followed (`O_NOFOLLOW`), a FIFO does not block the open
/// (`O_NONBLOCK`), and the opened descriptor must be a regular file
/// (`fstat`). Read the returned file, never the path again. (`O_NONBLOCK`
/// changes nothing for reading a regular file.)
pub fn open_listed(path: &Path) -> Result<File, OpenError> {
    let opened = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP) => OpenError::Refused(
                    "it is a symbolic link; only regular files are read (put the file \
                     itself in the inbox, not a link to it)"
                        .into(),
                ),
                Some(libc::ENXIO) => OpenError::Refused(not_regular("a socket")),
                Some(libc::EACCES | libc::EPERM) => OpenError::Refused(format!(
                    "it cannot be opened for reading ({e}); give the daemon's user read \
                     permission and drop it again"
                )),
                Some(libc::ENOENT) => OpenError::Gone,
                _ => OpenError::Io(e),
            });
        }
    };
    let kind = file.metadata().map_err(OpenError::Io)?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "something else"
    };
    Err(OpenError::Refused(not_regular(what)))
}

fn not_regular(what: &str) -> String {
    format!("it is {what}, not a regular file; only regular files are read")
}

struct Precheck {
    sha256: String,
    /// Why the file is not JSONL, if it is not.
    reject: Option<String>,
}

/// Pass one: hash the file, check UTF-8 and that some line is a JSON object.
fn precheck(file: &File) -> io::Result<Precheck> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut line = Vec::new();
    let (mut n, mut objects) = (0u64, 0u64);
    let mut reject = None;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        n += 1;
        hasher.update(&line);
        if reject.is_none() {
            match std::str::from_utf8(&line) {
                Err(e) => {
                    reject = Some(format!(
                        "line {n}: not valid UTF-8 (byte {})",
                        e.valid_up_to() + 1
                    ))
                }
                Ok(s) if jsonl::content(s).is_some_and(|l| l.trim_start().starts_with('{')) => {
                    objects += 1
                }
                Ok(_) => {}
            }
        }
    }
    if reject.is_none() && objects == 0 {
        reject = Some(if n == 0 {
            "the file is empty".into()
        } else {
            "no line is a JSON object: this is not a JSONL job file".into()
        });
    }
    Ok(Precheck {
        sha256: hex::encode(hasher.finalize()),
        reject,
    })
}

/// Whether anything (a dangling link too) is at `path`; an error if that
/// cannot be told (the folder is not a directory, ...).
fn taken(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `path` with `suffix` after its last component.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Moves `path` into `dir` as `name`, unless taken (then `name.2`, ...,
/// before the extension). With `companion`, the name is also taken when
/// `<name><companion>` exists (the note of a rejected entry). The entry
/// is renamed, whatever it is: a link is moved, not followed.
fn move_into(
    path: &Path,
    dir: &Path,
    name: &OsStr,
    companion: Option<&str>,
) -> io::Result<PathBuf> {
    let bytes = name.as_bytes();
    let (stem, ext) = match bytes.iter().rposition(|&b| b == b'.') {
        Some(i) => bytes.split_at(i),
        None => (bytes, &b""[..]),
    };
    let unavailable = |p: &Path| -> io::Result<bool> {
        if taken(p)? {
            return Ok(true);
        }
        match companion {
            Some(c) => taken(&with_suffix(p, c)),
            None => Ok(false),
        }
    };
    let mut target = dir.join(name);
    let mut n = 2u32;
    while unavailable(&target)? {
        if n >= 10_000_000 {
            return Err(io::Error::other(format!(
                "{} and 10 million numbered variants are taken",
                escaped_os(name)
            )));
        }
        let mut numbered = stem.to_vec();
        numbered.extend_from_slice(format!(".{n}").as_bytes());
        numbered.extend_from_slice(ext);
        target = dir.join(OsStr::from_bytes(&numbered));
        n += 1;
    }
    fs::rename(path, &target)?;
    Ok(target)
}

/// The name an entry gets in `rejected/`: its own, unless
/// `<name>.N.error.txt` could be too long for the file system; then its
/// first bytes, `~`, eight hex digits of a hash of the whole name, and
/// `.jsonl` (the note beside it gives the whole name).
fn rejected_name(name: &OsStr) -> OsString {
    const KEEP: usize = NAME_MAX - SUFFIX_ROOM - NOTE_SUFFIX.len();
    let b = name.as_bytes();
    if b.len() <= KEEP {
        return name.to_os_string();
    }
    let tail = format!("~{}.jsonl", hex::encode(&Sha256::digest(b)[..4]));
    let mut cut = KEEP - tail.len();
    if let Ok(s) = std::str::from_utf8(b) {
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
    }
    let mut short = b[..cut].to_vec();
    short.extend_from_slice(tail.as_bytes());
    OsString::from_vec(short)
}

/// Moves an inbox entry to `rejected/` and writes why beside it.
fn reject(folders: &Folders, path: &Path, reason: String) -> Result<FileOutcome, IngestError> {
    let name = path.file_name().unwrap_or_default();
    let as_name = rejected_name(name);
    let moved_to = match move_into(path, &folders.rejected, &as_name, Some(NOTE_SUFFIX)) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !taken(path).unwrap_or(true) => {
            return Ok(FileOutcome::Gone);
        }
        Err(source) => {
            return Err(IngestError::Reject {
                path: escaped_os(path.as_os_str()).to_string(),
                reason,
                source,
            });
        }
    };
    let mut text = format!("{}: rejected: {reason}\n", escaped_os(name));
    if as_name != name {
        let short = moved_to.file_name().unwrap_or_default();
        text.push_str(&format!(
            "(moved here as {}: the whole name is too long to keep with {NOTE_SUFFIX} after it)\n",
            escaped_os(short)
        ));
    }
    let note = with_suffix(&moved_to, NOTE_SUFFIX);
    // A new file: never through a link someone left at that name.
    let note_error = File::options()
        .write(true)
        .create_new(true)
        .open(&note)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .err()
        .map(|e| format!("{}: {e}", escaped_os(note.as_os_str())));
    Ok(FileOutcome::Rejected {
        reason,
        moved_to,
        note_error,
    })
}

/// Ingests one listed inbox entry: a regular job file has its valid lines
/// queued and its invalid ones recorded in one transaction, then is moved
/// to `processed/`; anything else is moved to `rejected/`.
pub fn ingest_file(
    store: &Store,
    catalog: &Catalog,
    default_deadline: Duration,
    folders: &Folders,
    path: &Path,
    now: DateTime<Utc>,
) -> Result<FileOutcome, IngestError> {
    let shown = || escaped_os(path.as_os_str()).to_string();
    let io_err = |source| IngestError::Io {
        path: shown(),
        source,
    };
    let os_name = path.file_name().unwrap_or_default();
    if let Some(reason) = name_problem(os_name) {
        return reject(folders, path, reason);
    }
    let name = os_name.to_str().unwrap_or_default().to_string();
    let file = match open_listed(path) {
        Ok(f) => f,
        Err(OpenError::Refused(reason)) => return reject(folders, path, reason),
        Err(OpenError::Gone) => return Ok(FileOutcome::Gone),
        Err(OpenError::Io(e)) => return Err(io_err(e)),
    };
    let check = precheck(&file).map_err(io_err)?;
    if let Some(reason) = check.reject {
        return reject(folders, path, reason);
    }
    let queue_err = |source| IngestError::Queue {
        path: shown(),
        source,
    };
    if let Some((_, previous)) = store
        .inbox_source_by_hash(&check.sha256)
        .map_err(queue_err)?
    {
        let moved_to = move_into(path, &folders.processed, os_name, None).map_err(io_err)?;
        return Ok(FileOutcome::Duplicate { previous, moved_to });
    }

    let ctx = JobContext {
        catalog,
        now,
        default_deadline,
    };
    // Pass two reads the same descriptor again, from the start.
    (&file).rewind().map_err(io_err)?;
    let lines = JobLines::new(&file, &ctx);
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    let source = NewSource {
        origin: Origin::Inbox,
        name: &name,
        stem,
        sha256: Some(&check.sha256),
        now_ms: now.timestamp_millis(),
    };
    let summary = store.ingest(&source, lines).map_err(queue_err)?;
    let moved_to = move_into(path, &folders.processed, os_name, None).map_err(io_err)?;
    Ok(FileOutcome::Ingested { summary, moved_to })
}

/// Problems already logged, so that one that lasts (an entry that cannot
/// be moved out of the inbox, an outbox that cannot be written) is logged
/// once, not on every pass; a different problem for the same key is new.
#[derive(Debug)]
pub struct LogOnce<K>(HashMap<K, String>);

impl<K> Default for LogOnce<K> {
    fn default() -> Self {
        LogOnce(HashMap::new())
    }
}

impl<K: Eq + Hash> LogOnce<K> {
    /// Whether `problem` is new for `key` (it is remembered): log it then.
    pub fn first(&mut self, key: K, problem: &str) -> bool {
        if self.0.get(&key).is_some_and(|p| p == problem) {
            return false;
        }
        self.0.insert(key, problem.to_string());
        true
    }

    /// Forgets `key`'s problem (it is over); whether there was one.
    pub fn forget(&mut self, key: &K) -> bool {
        self.0.remove(key).is_some()
    }

    /// Keeps only the keys for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.0.retain(|k, _| keep(k));
    }
}

/// The non-blank lines of a reader, validated. A read error is passed on, and
/// the ingest transaction rolls back.
pub struct JobLines<'a, R> {
    reader: BufReader<R>,
    ctx: &'a JobContext<'a>,
    line_no: u64,
    buf: String,
}

impl<'a, R: Read> JobLines<'a, R> {
    pub fn new(reader: R, ctx: &'a JobContext<'a>) -> JobLines<'a, R> {
        JobLines {
            reader: BufReader::with_capacity(1 << 20, reader),
            ctx,
            line_no: 0,
            buf: String::new(),
        }
    }
}

impl<R: Read> Iterator for JobLines<'_, R> {
    type Item = io::Result<LineOutcome>;

    fn next(&mut self) -> Option<io::Result<LineOutcome>> {
        loop {
            self.buf.clear();
            match self.reader.read_line(&mut self.buf) {
                Ok(0) => return None,
                Err(e) => return Some(Err(e)),
                Ok(_) => {}
            }
            self.line_no += 1;
            let Some(line) = jsonl::content(&self.buf) else {
                continue;
            };
            return Some(Ok(LineOutcome {
                line: self.line_no,
                job: job::parse_line(line, self.ctx),
            }));
        }
    }
}

/// Names of inbox files that inotify reported as completely written (closed
/// after writing, or renamed in); they need not wait for the settle time.
/// Keyed by file name: the watcher's paths and the scan's may be spelled
/// differently (absolute vs relative).
#[derive(Default, Clone)]
pub struct CompletedWrites(Arc<Mutex<HashSet<OsString>>>);

impl CompletedWrites {
    pub fn mark(&self, name: OsString) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name);
    }
    fn take(&self, name: &OsStr) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }
}

/// A file written in place (not renamed in) is only picked up once it has
/// not changed for this long, unless inotify saw it closed.
pub const SETTLE: Duration = Duration::from_secs(2);

/// The inbox's entries with job-file names that are ready to ingest, in
/// name order, and whether some file was skipped because it may still be
/// being written. A regular file is ready once settled (or seen closed);
/// anything else (a directory, a link, a FIFO, ...) at once, to be
/// rejected. An entry gone since the listing is skipped.
pub fn ready_files(
    inbox: &Path,
    completed: &CompletedWrites,
    now: SystemTime,
) -> io::Result<(Vec<PathBuf>, bool)> {
    let mut ready = Vec::new();
    let mut unsettled = false;
    for entry in fs::read_dir(inbox)? {
        let entry = entry?;
        let file_name = entry.file_name();
        if !is_job_file(&file_name) {
            continue;
        }
        // Both as the entry is now, not following a link.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !kind.is_file() {
            completed.take(&file_name);
            ready.push(entry.path());
            continue;
        }
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let settled = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= SETTLE);
        if completed.take(&file_name) || settled {
            ready.push(entry.path());
        } else {
            unsettled = true;
        }
    }
    ready.sort();
    Ok((ready, unsettled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn os(b: &[u8]) -> &OsStr {
        OsStr::from_bytes(b)
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    }

    /// `open_listed(path)` on another thread, failing the test if it does
    /// not return within 5 s (a blocking open would hang forever).
    fn open_promptly(path: &Path) -> Result<File, OpenError> {
        let (tx, rx) = mpsc::channel();
        let p = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(open_listed(&p));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("open_listed blocked instead of returning")
    }

    fn refused(r: Result<File, OpenError>) -> String {
        match r {
            Err(OpenError::Refused(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn job_file_names() {
        assert!(is_job_file(os(b"a.jsonl")));
        assert!(is_job_file(os(b"\xff\xfe.jsonl")), "any bytes");
        assert!(!is_job_file(os(b".a.jsonl")));
        assert!(!is_job_file(os(b"a.jsonl.tmp")));
        assert!(!is_job_file(os(b"a.jsonl.part")));
        assert!(!is_job_file(os(b"a.json")));
    }

    #[test]
    fn names_that_cannot_be_ingested() {
        assert_eq!(name_problem(os(b"a.jsonl")), None);
        assert!(
            name_problem(os(b"a\xff.jsonl"))
                .unwrap()
                .contains("not valid UTF-8")
        );
        let longest = format!("{}.jsonl", "x".repeat(MAX_NAME - 6));
        assert_eq!(name_problem(OsStr::new(&longest)), None);
        // Its outbox names fit, with room for a ".N".
        assert!(longest.len() - ".jsonl".len() + ".output.jsonl".len() + SUFFIX_ROOM <= NAME_MAX);
        let long = format!("{}.jsonl", "x".repeat(MAX_NAME - 5));
        let why = name_problem(OsStr::new(&long)).unwrap();
        assert!(
            why.contains(&format!("{} bytes long", MAX_NAME + 1)),
            "{why}"
        );
    }

    #[test]
    fn open_listed_opens_only_regular_files_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let regular = d.join("a.jsonl");
        fs::write(&regular, "{}\n").unwrap();
        let mut text = String::new();
        open_promptly(&regular)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "{}\n");

        mkfifo(&d.join("fifo.jsonl"));
        assert!(refused(open_promptly(&d.join("fifo.jsonl"))).contains("FIFO"));
        fs::create_dir(d.join("dir.jsonl")).unwrap();
        assert!(refused(open_promptly(&d.join("dir.jsonl"))).contains("a directory"));
        std::os::unix::fs::symlink(&regular, d.join("link.jsonl")).unwrap();
        assert!(refused(open_promptly(&d.join("link.jsonl"))).contains("symbolic link"));
        let _listener = std::os::unix::net::UnixListener::bind(d.join("sock.jsonl")).unwrap();
        assert!(refused(open_promptly(&d.join("sock.jsonl"))).contains("socket"));
        assert!(matches!(
            open_promptly(&d.join("missing.jsonl")),
            Err(OpenError::Gone)
        ));
    }

    #[test]
    fn an_entry_swapped_after_the_listing_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path().join("inbox");
        fs::create_dir(&inbox).unwrap();
        let secret = dir.path().join("secret.jsonl");
        fs::write(&secret, "{\"custom_id\": \"stolen\"}\n").unwrap();
        let completed = CompletedWrites::default();
        let later = SystemTime::now() + Duration::from_secs(60);
        for swap in ["fifo", "symlink"] {
            let path = inbox.join("x.jsonl");
            fs::write(&path, "{}\n").unwrap();
            let (ready, _) = ready_files(&inbox, &completed, later).unwrap();
            assert_eq!(
                ready,
                std::slice::from_ref(&path),
                "listed as a regular file"
            );
            fs::remove_file(&path).unwrap();
            match swap {
                "fifo" => mkfifo(&path),
                _ => std::os::unix::fs::symlink(&secret, &path).unwrap(),
            }
            let why = refused(open_promptly(&path));
            assert!(
                why.contains(if swap == "fifo" {
                    "FIFO"
                } else {
                    "symbolic link"
                }),
                "{why}"
            );
            fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn entries_that_are_not_regular_files_are_ready_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path();
        fs::write(inbox.join("fresh.jsonl"), "{}\n").unwrap();
        mkfifo(&inbox.join("fifo.jsonl"));
        fs::create_dir(inbox.join("dir.jsonl")).unwrap();
        fs::create_dir(inbox.join("dir")).unwrap();
        fs::write(inbox.join(OsStr::from_bytes(b"\xff.jsonl")), "{}\n").unwrap();
        let (ready, unsettled) =
            ready_files(inbox, &CompletedWrites::default(), SystemTime::now()).unwrap();
        let names: Vec<_> = ready.iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, [OsStr::new("dir.jsonl"), OsStr::new("fifo.jsonl")]);
        assert!(unsettled, "the regular files wait to settle");
    }

    #[test]
    fn precheck_rejects_non_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        let check = |content: &[u8]| {
            fs::write(&p, content).unwrap();
            precheck(&File::open(&p).unwrap()).unwrap().reject
        };
        assert!(check(b"hello\nworld\n").unwrap().contains("not a JSONL"));
        assert!(check(b"").unwrap().contains("empty"));
        assert!(
            check(b"{\"a\":1}\n\xff\xfe\n")
                .unwrap()
                .contains("line 2: not valid UTF-8")
        );
        assert!(check(b"{\"a\":1}\nnot json\n").is_none());
        assert!(check(b"\xef\xbb\xbf{\"a\":1}\n").is_none(), "a BOM first");
    }

    #[test]
    fn move_into_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        for i in 0..3 {
            fs::write(a.join("x.jsonl"), format!("{i}")).unwrap();
            move_into(&a.join("x.jsonl"), &b, OsStr::new("x.jsonl"), None).unwrap();
        }
        // A dangling link takes its name too.
        std::os::unix::fs::symlink(dir.path().join("nowhere"), b.join("x.4.jsonl")).unwrap();
        fs::write(a.join("x.jsonl"), "3").unwrap();
        move_into(&a.join("x.jsonl"), &b, OsStr::new("x.jsonl"), None).unwrap();
        let mut names: Vec<_> = fs::read_dir(&b)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "x.2.jsonl",
                "x.3.jsonl",
                "x.4.jsonl",
                "x.5.jsonl",
                "x.jsonl"
            ]
        );
    }

    #[test]
    fn a_rejection_note_is_never_written_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let folders = Folders::new(dir.path());
        folders.create().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, folders.rejected.join("x.jsonl.error.txt")).unwrap();
        let path = folders.inbox.join("x.jsonl");
        mkfifo(&path);
        let FileOutcome::Rejected {
            reason,
            moved_to,
            note_error,
        } = reject(&folders, &path, "it is a FIFO".into()).unwrap()
        else {
            panic!("not rejected")
        };
        assert_eq!((reason.as_str(), note_error), ("it is a FIFO", None));
        assert_eq!(moved_to, folders.rejected.join("x.2.jsonl"));
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let note = fs::read_to_string(folders.rejected.join("x.2.jsonl.error.txt")).unwrap();
        assert_eq!(note, "x.jsonl: rejected: it is a FIFO\n");
    }

    #[test]
    fn names_too_long_to_keep_are_shortened_in_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let folders = Folders::new(dir.path());
        folders.create().unwrap();
        for name in [
            format!("{}.jsonl", "é".repeat(124)),   // 254 bytes
            format!("{}\n.jsonl", "y".repeat(248)), // 255 bytes
            format!("{}.jsonl", "y".repeat(249)),   // 255 bytes
        ] {
            assert!(name.len() > MAX_NAME);
            let path = folders.inbox.join(&name);
            fs::write(&path, "{}\n").unwrap();
            let why = name_problem(OsStr::new(&name)).unwrap();
            let FileOutcome::Rejected {
                moved_to,
                note_error,
                ..
            } = reject(&folders, &path, why).unwrap()
            else {
                panic!("not rejected")
            };
            assert_eq!(note_error, None);
            let short = moved_to.file_name().unwrap();
            assert!(short.len() + ".error.txt".len() + SUFFIX_ROOM <= NAME_MAX);
            assert!(short.to_str().is_some_and(|s| s.ends_with(".jsonl")));
            let note = fs::read_to_string(with_suffix(&moved_to, NOTE_SUFFIX)).unwrap();
            assert!(
                note.starts_with(&format!(
                    "{}: rejected: its name is",
                    escaped_os(OsStr::new(&name))
                )),
                "{note}"
            );
            assert!(
                !note.trim_end().contains("\n\n") && note.lines().count() == 2,
                "{note}"
            );
        }
        // Distinct long names get distinct short ones.
        assert_eq!(fs::read_dir(&folders.rejected).unwrap().count(), 6);
    }

    #[test]
    fn each_problem_is_logged_once() {
        let mut logged = LogOnce::<&str>::default();
        assert!(logged.first("a", "EACCES"));
        assert!(!logged.first("a", "EACCES"));
        assert!(logged.first("b", "EACCES"));
        assert!(logged.first("a", "ENOSPC"), "a new problem is news");
        assert!(logged.forget(&"a"));
        assert!(!logged.forget(&"a"));
        assert!(logged.first("a", "ENOSPC"));
        logged.retain(|k| *k != "b");
        assert!(logged.first("b", "EACCES"));
    }
}
