//! Result files produced from the database: a source's output lines
//! (succeeded jobs) or error lines (failed, expired and cancelled jobs, then
//! its invalid lines), in the same format as the outbox
//! ([`crate::results::result_line`], [`crate::results::line_error_line`]).
//! They are streamed: a batch may hold a million results.

use std::io::{self, Write};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use tokio::sync::mpsc;

use crate::store::Store;

/// A writer that sends 64 KiB pieces to an async body; fails once the
/// client is gone, which stops the producer.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

const PIECE: usize = 64 * 1024;

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE));
        self.tx
            .blocking_send(Ok(Bytes::from(piece)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A response body produced by `produce` on a blocking thread, as it writes.
pub fn streamed(
    store: Arc<Store>,
    produce: impl FnOnce(&Store, &mut dyn Write) -> io::Result<()> + Send + 'static,
) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(PIECE),
        };
        let result = produce(&store, &mut w).and_then(|()| w.flush());
        if let Err(e) = result
            && e.kind() != io::ErrorKind::BrokenPipe
        {
            tracing::error!("streaming a result file failed: {e}");
            // The client sees a truncated body rather than a clean end.
            let _ = tx.blocking_send(Err(e));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Body::from_stream(stream)
}
