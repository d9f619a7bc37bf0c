//! Serving one listener: an accept loop capped at `max_connections`, and
//! per connection three deadlines, so that no client (a slow one, or a
//! hostile one without the token) holds a descriptor for long:
//!
//! - idle: no request in flight and no byte of the next one for
//!   `idle_timeout` (from the accept, or from the last response) — closed;
//! - header: a request head not complete `header_timeout` after its first
//!   byte — closed;
//! - body: a body not complete `body_timeout` after its head — answered 408
//!   (OpenAI's error shape) and closed.
//!
//! hyper's own `header_read_timeout` runs from the end of the previous
//! response, so it would be the idle and the header deadline at once; it is
//! off, and the connection's watchdog here keeps the two apart.
//!
//! When a listener has `max_connections` open, the loop stops accepting:
//! new connections wait in the kernel's accept queue (no descriptor of
//! ours) until one closes. Each listener has its own cap, so a full TCP
//! listener leaves the Unix socket to the operator.
//!
//! Stopping: the listener is closed, every connection is asked to finish
//! (an idle one closes at once, one with a request in flight after its
//! response), and after `grace` the rest are dropped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use super::error::ApiError;

/// How long connections may take, and how many a listener serves at once.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl ConnectionLimits {
    pub fn new(http: &crate::config::HttpSettings) -> Self {
        ConnectionLimits {
            header_timeout: http.header_timeout,
            body_timeout: http.body_timeout,
            idle_timeout: http.idle_timeout,
            max_connections: http.max_connections,
        }
    }
}

/// Descriptors kept for everything but the listeners' connections: the
/// database and its WAL, inotify, the inbox's files, provider connections.
const RESERVED_DESCRIPTORS: u64 = 256;

/// The connections each of `listeners` may hold so that together they
/// leave [`RESERVED_DESCRIPTORS`] of the soft `RLIMIT_NOFILE` (`soft`, if
/// finite) free; at least 1.
pub fn connection_cap(configured: usize, listeners: usize, soft: Option<u64>) -> usize {
    match soft {
        None => configured,
        Some(soft) => {
            let share = soft.saturating_sub(RESERVED_DESCRIPTORS) / listeners.max(1) as u64;
            configured.min(usize::try_from(share).unwrap_or(usize::MAX).max(1))
        }
    }
}

/// Serves `router` on `listener` until `stop` turns true (see the module doc).
pub async fn serve<L>(
    mut listener: L,
    name: &'static str,
    router: Router,
    limits: ConnectionLimits,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) where
    L: Listener,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (finish_tx, finish_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut full_warned: Option<Instant> = None;
    loop {
        // A slot first: while the listener is full, new connections wait in
        // the kernel's accept queue and cost this process nothing.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        "HTTP API listener full; new connections wait until one closes"
                    );
                    full_warned = Some(Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        };
        let io = tokio::select! {
            (io, _addr) = listener.accept() => io,
            _ = stop.wait_for(|s| *s) => break,
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            io,
            router.clone(),
            limits,
            finish_rx.clone(),
            slot,
        ));
    }
    drop(listener);
    let _ = finish_tx.send(true);
    let open = connections.len();
    if open > 0 {
        debug!(
            listener = name,
            open, "HTTP API: letting open connections finish"
        );
    }
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        info!(
            listener = name,
            left = connections.len(),
            "HTTP API: closing connections still open after the grace period"
        );
        connections.shutdown().await;
    }
}

/// Serves one connection until it ends, a deadline passes, or (after
/// `finish`) its request in flight is answered.
async fn connection<I>(
    io: I,
    router: Router,
    limits: ConnectionLimits,
    mut finish: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
    });
    let service = Tracked {
        router: TowerToHyperService::new(router),
        activity: activity.clone(),
        body_timeout: limits.body_timeout,
    };
    let conn = hyper::server::conn::http1::Builder::new()
        // The watchdog below keeps the idle and the header deadline apart.
        .header_read_timeout(None)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut finishing = false;
    loop {
        let deadline = activity.deadline(&limits);
        let expired = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    debug!("HTTP API connection ended: {e}");
                }
                return;
            }
            () = activity.changed.notified() => {}
            () = expired => {
                if let Some((at, why)) = activity.deadline(&limits)
                    && at <= Instant::now()
                {
                    debug!("HTTP API connection closed: {why}");
                    return;
                }
            }
            _ = finish.wait_for(|f| *f), if !finishing => {
                conn.as_mut().graceful_shutdown();
                finishing = true;
            }
        }
    }
}

/// What one connection is doing, for its deadlines.
struct Activity {
    state: Mutex<ActivityState>,
    /// Wakes the connection's watchdog when the state changes.
    changed: Notify,
}

struct ActivityState {
    /// Requests whose response is not completely sent yet.
    in_flight: usize,
    /// When the connection last became idle: accepted, or a response sent.
    idle_since: Instant,
    /// When the first byte of the next request arrived, while idle.
    head_since: Option<Instant>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: Instant::now(),
                head_since: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // Nothing panics while holding it; if something did, the counts are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection's deadline and its name; `None` while a request is
    /// in flight (its body has its own deadline).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, &'static str)> {
        let s = self.lock();
        if s.in_flight > 0 {
            None
        } else if let Some(at) = s.head_since {
            Some((
                at + limits.header_timeout,
                "request head incomplete after http.header_timeout",
            ))
        } else {
            Some((
                s.idle_since + limits.idle_timeout,
                "idle for http.idle_timeout",
            ))
        }
    }

    /// Bytes arrived: while idle, the next request's head has begun.
    fn read(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 && s.head_since.is_none() {
            s.head_since = Some(Instant::now());
            drop(s);
            // One waiter (the watchdog): notify_one keeps the wake-up if it is not waiting yet.
            self.changed.notify_one();
        }
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        {
            let mut s = self.lock();
            s.in_flight += 1;
            s.head_since = None;
        }
        self.changed.notify_one();
        InFlight(self.clone())
    }
}

/// A request in flight on its connection, until its response is sent (or
/// dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut s = self.0.lock();
            s.in_flight -= 1;
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
            }
        }
        self.0.changed.notify_one();
    }
}

/// The connection's stream, telling its [`Activity`] when bytes arrive.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The router as one connection's service: marks each request in flight
/// until its response is sent, and gives its body a deadline.
struct Tracked {
    router: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response<SentBody>, Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = Response<SentBody>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.request_started();
        let timed_out = Arc::new(AtomicBool::new(false));
        let limit = self.body_timeout;
        let req: Request = req.map(|body| {
            Body::new(DeadlineBody {
                inner: body,
                deadline: Instant::now() + limit,
                sleep: None,
                timed_out: timed_out.clone(),
            })
        });
        let answer = hyper::service::Service::call(&self.router, req);
        Box::pin(async move {
            let Ok(mut response) = answer.await;
            // Whatever the handler made of the failed read, the answer is a 408.
            if timed_out.load(Ordering::Relaxed) {
                response = ApiError::request_timeout(limit).into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| SentBody {
                inner: body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A request body that fails once its deadline passes.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    /// Made on the first wait, so that requests whose body is there at once
    /// (or empty) cost no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

/// The error of a [`DeadlineBody`] past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within http.body_timeout")]
struct BodyTimeout;

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.timed_out.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(BodyTimeout.into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimeout.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request in flight until it is sent.
struct SentBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for SentBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_the_rest_of_the_daemon() {
        assert_eq!(connection_cap(256, 2, None), 256);
        assert_eq!(connection_cap(256, 2, Some(65_536)), 256);
        // 1024 descriptors: (1024 - 256) / 2 = 384 each, more than 256.
        assert_eq!(connection_cap(256, 2, Some(1024)), 256);
        assert_eq!(connection_cap(1000, 2, Some(1024)), 384);
        assert_eq!(connection_cap(1000, 1, Some(1024)), 768);
        assert_eq!(connection_cap(1000, 2, Some(100)), 1);
    }

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(5),
            max_connections: 1,
        }
    }

    #[test]
    fn idle_then_head_then_in_flight_then_idle_again() {
        let a = Arc::new(Activity::new());
        let l = limits();
        let idle = a.deadline(&l).unwrap();
        assert_eq!(idle.1, "idle for http.idle_timeout");
        a.read();
        let head = a.deadline(&l).unwrap();
        assert_eq!(head.1, "request head incomplete after http.header_timeout");
        // The header deadline (2 s after the first byte) comes before the idle one (5 s).
        assert!(head.0 < idle.0);
        // More bytes of the same head do not move its deadline.
        a.read();
        assert_eq!(a.deadline(&l), Some(head));
        let request = a.request_started();
        assert_eq!(a.deadline(&l), None);
        // The body's bytes are not the next request's head.
        a.read();
        assert_eq!(a.deadline(&l), None);
        let second = a.request_started();
        drop(request);
        assert_eq!(a.deadline(&l), None, "one request is still in flight");
        drop(second);
        let again = a.deadline(&l).unwrap();
        assert_eq!(again.1, "idle for http.idle_timeout");
        assert!(again.0 >= idle.0);
    }
}
