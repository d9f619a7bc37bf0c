//! Results: a finished job as an OpenAI batch output line (plus what
//! nightshift knows), and the outbox files written once a source is final.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::Utc;
use serde_json::{Value, json};

use crate::store::{
    BatchClose, DoneBatch, FileKind, FinishedJob, JobState, ResultsError, SourceRow, Store,
    StoredLineError,
};

/// Costs are exact in the database; results show them to a picomillionth
/// of a dollar so that 9.15e-6 does not print as 9.149999999999999e-6.
pub fn usd(x: Option<f64>) -> Value {
    x.map_or(Value::Null, |x| json!(crate::domain::units::round_usd(x)))
}

/// Unix ms as RFC 3339 with milliseconds and `Z`; null if absent.
pub fn rfc3339(ms: Option<i64>) -> Value {
    ms.and_then(crate::domain::units::rfc3339_ms)
        .map_or(Value::Null, Value::String)
}

/// The result line id of a job (stable: derived from the job id).
pub fn result_id(job_id: i64) -> String {
    format!("batch_req_{job_id:012}")
}

/// The public id of a job.
pub fn job_public_id(job_id: i64) -> String {
    format!("job_{job_id}")
}

/// Whether a finished job belongs in the output file (else the errors file).
pub fn is_output(job: &FinishedJob) -> bool {
    job.state == JobState::Succeeded
}

/// A finished job as a result line in the design brief's format.
pub fn result_line(job: &FinishedJob) -> Value {
    // The provider's body is JSON in every case we know; keep it verbatim
    // as a string if it is not.
    let body = job
        .response
        .as_deref()
        .map(|b| serde_json::from_str::<Value>(b).unwrap_or_else(|_| Value::String(b.into())));
    let response = match job.status_code {
        Some(status) => json!({"status_code": status, "request_id": job.request_id, "body": body}),
        None => Value::Null,
    };
    let error = match (&job.error_code, job.status_code) {
        (Some(code), _) => json!({"code": code, "message": job.error_message}),
        (None, Some(_)) => Value::Null,
        (None, None) if job.state != JobState::Succeeded => {
            json!({"code": job.state.as_str(), "message": job.error_message})
        }
        (None, None) => Value::Null,
    };
    json!({
        "id": result_id(job.id),
        "custom_id": job.custom_id,
        "response": response,
        "error": error,
        "nightshift": {
            "job_id": job_public_id(job.id),
            "line": job.line,
            "state": job.state.as_str(),
            "provider": job.provider,
            "model": job.provider_model,
            "channel": job.channel(),
            "batch_id": job.provider_batch,
            "dispatched_at": rfc3339(job.dispatched_at),
            "completed_at": rfc3339(job.completed_at),
            "attempts": job.attempts,
            "input_tokens": job.input_tokens,
            "output_tokens": job.output_tokens,
            "cost_usd": usd(job.cost_usd),
            "list_cost_usd": usd(job.list_cost_usd),
        }
    })
}

/// An invalid line of an accepted file as an errors-file line.
pub fn line_error_line(stem: &str, e: &StoredLineError) -> Value {
    let message = match &e.field {
        Some(field) => format!("line {}: {field}: {}", e.line, e.message),
        None => format!("line {}: {}", e.line, e.message),
    };
    json!({
        "id": format!("invalid_{stem}_{}", e.line),
        "custom_id": e.custom_id,
        "response": null,
        "error": {"code": "invalid_line", "message": message},
        "nightshift": {"line": e.line, "field": e.field},
    })
}

/// Every result line of a source, in one pass: its jobs in line order
/// (`output` = true for the output file, false for the errors file; jobs not
/// final yet are skipped), then its invalid lines (errors file).
pub fn for_each_result_line(
    store: &Store,
    source_id: i64,
    stem: &str,
    mut f: impl FnMut(bool, &Value) -> std::io::Result<()>,
) -> Result<(), ResultsError> {
    store.for_each_job_of(source_id, |job| {
        if !job.state.is_final() {
            return Ok(());
        }
        f(is_output(&job), &result_line(&job))
    })?;
    let invalid = store
        .line_errors_of(source_id)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    for e in &invalid {
        f(false, &line_error_line(stem, e))?;
    }
    Ok(())
}

/// Where a source's results go.
pub fn outbox_paths(outbox: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        outbox.join(format!("{stem}.output.jsonl")),
        outbox.join(format!("{stem}.errors.jsonl")),
    )
}

/// The temporary names a source's outbox files are written under before
/// the rename: short and bounded whatever the source's name (a name near
/// the file system's limit must not make them too long), hidden, and
/// distinct per source.
pub fn outbox_temp_paths(outbox: &Path, source_id: i64) -> (PathBuf, PathBuf) {
    (
        outbox.join(format!(".nightshift-{source_id}.output.tmp")),
        outbox.join(format!(".nightshift-{source_id}.errors.tmp")),
    )
}

/// A new file at `path`, replacing whatever was there: a leftover of an
/// interrupted write is removed, and a link someone left there is removed,
/// not followed (`create_new`).
fn create_fresh(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    File::options().write(true).create_new(true).open(path)
}

/// Writes `<stem>.output.jsonl` and `<stem>.errors.jsonl` for a finished
/// source, each atomically (temp file, fsync, rename), then fsyncs the folder.
/// Fails, writing nothing, if the final names cannot exist (longer than
/// [`crate::ingest::NAME_MAX`]: ingest rejects such names, a source from an
/// older version may still have one).
pub fn write_outbox(
    store: &Store,
    outbox: &Path,
    source: &SourceRow,
) -> Result<(PathBuf, PathBuf), ResultsError> {
    let (out_path, err_path) = outbox_paths(outbox, &source.stem);
    for p in [&out_path, &err_path] {
        let len = p.file_name().map_or(0, |n| n.len());
        if len > crate::ingest::NAME_MAX {
            return Err(ResultsError::Io(io::Error::new(
                io::ErrorKind::InvalidFilename,
                format!(
                    "its outbox file names would be {len} bytes long, more than the file \
                     system's {} (the results stay in the database)",
                    crate::ingest::NAME_MAX
                ),
            )));
        }
    }
    let (out_tmp, err_tmp) = outbox_temp_paths(outbox, source.id);
    let written = (|| {
        let mut out = BufWriter::new(create_fresh(&out_tmp)?);
        let mut err = BufWriter::new(create_fresh(&err_tmp)?);
        for_each_result_line(store, source.id, &source.stem, |output, line| {
            let w = if output { &mut out } else { &mut err };
            serde_json::to_writer(&mut *w, line)?;
            w.write_all(b"\n")
        })?;
        for (w, tmp, path) in [(out, &out_tmp, &out_path), (err, &err_tmp, &err_path)] {
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs::rename(tmp, path)?;
        }
        // O_DIRECTORY: whatever took the folder's place (a FIFO) cannot block.
        File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(outbox)?
            .sync_all()?;
        Ok::<_, ResultsError>(())
    })();
    if written.is_err() {
        // Nothing half-written is left behind (a retry starts afresh anyway).
        let _ = fs::remove_file(&out_tmp);
        let _ = fs::remove_file(&err_tmp);
    }
    written.map(|()| (out_path, err_path))
}

/// Writes the lines of `kind` (output or errors) of a source to `w`. Jobs
/// not final yet are skipped.
pub fn write_results(
    store: &Store,
    source_id: i64,
    stem: &str,
    kind: FileKind,
    w: &mut dyn Write,
) -> io::Result<()> {
    let want_output = kind == FileKind::Output;
    crate::results::for_each_result_line(store, source_id, stem, |output, line| {
        if output != want_output {
            return Ok(());
        }
        serde_json::to_writer(&mut *w, line)?;
        w.write_all(b"\n")
    })
    .map_err(|e| match e {
        crate::store::ResultsError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    })
}

/// Counts bytes written.
#[derive(Default)]
pub struct Counter(pub u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// File name of a batch's output or error file.
pub fn batch_file_name(batch: i64, kind: FileKind) -> String {
    match kind {
        FileKind::Errors => format!("batch_{batch}_error.jsonl"),
        _ => format!("batch_{batch}_output.jsonl"),
    }
}

/// Closes open batches whose jobs are all final: status, timestamps, and
/// output and error files (their sizes counted from the database). Runs on
/// the dispatcher's completion path (the outbox component, woken when jobs
/// finish), not on reads. Returns how many batches it closed.
/// A batch that fails to close does not hold up the others: they are
/// closed, then the first failure is returned (the batch is retried on the
/// next pass).
pub fn close_finished_batches(store: &Store) -> anyhow::Result<usize> {
    let mut closed = 0;
    let mut first_failure = None;
    for done in store.done_batches()? {
        let id = done.id;
        match close_batch(store, done) {
            Ok(true) => closed += 1,
            Ok(false) => {}
            Err(e) => {
                first_failure.get_or_insert(e.context(format!("closing batch {id}")));
            }
        }
    }
    match first_failure {
        None => Ok(closed),
        Some(e) => Err(e),
    }
}

/// [`close_finished_batches`] for one batch; whether it was closed.
fn close_batch(store: &Store, done: DoneBatch) -> anyhow::Result<bool> {
    let Some(info) = store.source_info(done.source_id)? else {
        return Ok(false);
    };
    let mut sizes = [(FileKind::Output, 0u64), (FileKind::Errors, 0u64)];
    for (kind, bytes) in &mut sizes {
        let mut c = Counter::default();
        write_results(store, done.source_id, &info.stem, *kind, &mut c)?;
        *bytes = c.0;
    }
    let file = |(kind, bytes): (FileKind, u64)| {
        (bytes > 0).then(|| (batch_file_name(done.id, kind), bytes))
    };
    let status = if done.status == "cancelling" {
        "cancelled"
    } else if done.any_expired {
        "expired"
    } else {
        "completed"
    };
    store.close_batch(
        done.id,
        &BatchClose {
            status,
            at: done
                .last_completed_at
                .unwrap_or_else(|| Utc::now().timestamp_millis()),
            output: file(sizes[0]),
            errors: file(sizes[1]),
        },
    )?;
    Ok(true)
}
