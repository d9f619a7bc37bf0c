//! The watched folder: `jobs/inbox/*.jsonl` into the queue.
//!
//! A file is read twice: once to hash it (a re-drop of the same content is
//! not queued again), check it is UTF-8 and looks like JSONL at all; then to
//! validate and queue its lines in one transaction. Only after that commit is
//! the file moved to `processed/`: a crash in between leaves it in the inbox,
//! and the next scan recognises its hash and just moves it.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

pub mod jsonl;

use crate::domain::job::{self, JobContext};
use crate::domain::pricing::Catalog;
use crate::store::{self, IngestSummary, LineOutcome, NewSource, Origin, Store};

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

/// What happened to one inbox file.
#[derive(Debug)]
pub enum FileOutcome {
    /// Queued; moved to `processed/` as `moved_to`.
    Ingested {
        summary: IngestSummary,
        moved_to: PathBuf,
    },
    /// The same content was ingested before (as `previous`); moved to `processed/`.
    Duplicate { previous: String, moved_to: PathBuf },
    /// Not JSONL at all; moved to `rejected/` with an `.error.txt` beside it.
    Rejected { reason: String, moved_to: PathBuf },
}

/// Errors that leave the file in the inbox to be retried.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: {source}")]
    Queue {
        path: String,
        source: store::QueueError,
    },
}

/// Whether a file name in the inbox is a job file to ingest.
pub fn is_job_file(name: &str) -> bool {
    name.ends_with(".jsonl") && !name.starts_with('.')
}

struct Precheck {
    sha256: String,
    /// Why the file is not JSONL, if it is not.
    reject: Option<String>,
}

/// Pass one: hash the file, check UTF-8 and that some line is a JSON object.
fn precheck(path: &Path) -> io::Result<Precheck> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
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
                Ok(s) if s.trim_start().starts_with('{') => objects += 1,
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

/// Moves `path` into `dir`, keeping its name unless taken (then `name.2`, ...).
fn move_into(path: &Path, dir: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) => (s, format!(".{e}")),
        None => (name, String::new()),
    };
    let mut target = dir.join(name);
    let mut n = 2;
    while target.exists() {
        target = dir.join(format!("{stem}.{n}{ext}"));
        n += 1;
    }
    fs::rename(path, &target)?;
    Ok(target)
}

/// Ingests one inbox file: queue its valid lines and record its invalid
/// ones in one transaction, then move it.
pub fn ingest_file(
    store: &Store,
    catalog: &Catalog,
    default_deadline: Duration,
    folders: &Folders,
    path: &Path,
    now: DateTime<Utc>,
) -> Result<FileOutcome, IngestError> {
    let io_err = |source| IngestError::Io {
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let check = precheck(path).map_err(io_err)?;
    if let Some(reason) = check.reject {
        let moved_to = move_into(path, &folders.rejected).map_err(io_err)?;
        let note = format!("{}.error.txt", moved_to.display());
        fs::write(&note, format!("{name}: rejected: {reason}\n")).map_err(io_err)?;
        return Ok(FileOutcome::Rejected { reason, moved_to });
    }
    let queue_err = |source| IngestError::Queue {
        path: path.display().to_string(),
        source,
    };
    if let Some((_, previous)) = store
        .inbox_source_by_hash(&check.sha256)
        .map_err(queue_err)?
    {
        let moved_to = move_into(path, &folders.processed).map_err(io_err)?;
        return Ok(FileOutcome::Duplicate { previous, moved_to });
    }

    let ctx = JobContext {
        catalog,
        now,
        default_deadline,
    };
    let file = File::open(path).map_err(io_err)?;
    let lines = JobLines::new(file, &ctx);
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    let source = NewSource {
        origin: Origin::Inbox,
        name: &name,
        stem,
        sha256: Some(&check.sha256),
        now_ms: now.timestamp_millis(),
    };
    let summary = store.ingest(&source, lines).map_err(queue_err)?;
    let moved_to = move_into(path, &folders.processed).map_err(io_err)?;
    Ok(FileOutcome::Ingested { summary, moved_to })
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

/// The inbox's job files that are ready to ingest, in name order, and
/// whether some file was skipped because it may still be being written.
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
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if !is_job_file(name) || !entry.file_type()?.is_file() {
            continue;
        }
        let path = entry.path();
        let settled = entry
            .metadata()?
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= SETTLE);
        if completed.take(&file_name) || settled {
            ready.push(path);
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

    #[test]
    fn job_file_names() {
        assert!(is_job_file("a.jsonl"));
        assert!(!is_job_file(".a.jsonl"));
        assert!(!is_job_file("a.jsonl.tmp"));
        assert!(!is_job_file("a.jsonl.part"));
        assert!(!is_job_file("a.json"));
    }

    #[test]
    fn precheck_rejects_non_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        fs::write(&p, b"hello\nworld\n").unwrap();
        assert!(
            precheck(&p)
                .unwrap()
                .reject
                .unwrap()
                .contains("not a JSONL")
        );
        fs::write(&p, b"").unwrap();
        assert!(precheck(&p).unwrap().reject.unwrap().contains("empty"));
        fs::write(&p, b"{\"a\":1}\n\xff\xfe\n").unwrap();
        assert!(
            precheck(&p)
                .unwrap()
                .reject
                .unwrap()
                .contains("line 2: not valid UTF-8")
        );
        fs::write(&p, b"{\"a\":1}\nnot json\n").unwrap();
        assert!(precheck(&p).unwrap().reject.is_none());
    }

    #[test]
    fn move_into_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        for i in 0..3 {
            fs::write(a.join("x.jsonl"), format!("{i}")).unwrap();
            move_into(&a.join("x.jsonl"), &b).unwrap();
        }
        let mut names: Vec<_> = fs::read_dir(&b)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["x.2.jsonl", "x.3.jsonl", "x.jsonl"]);
    }
}
