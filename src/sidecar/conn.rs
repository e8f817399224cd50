//! What one downstream connection holds and how long it may hold it.
//!
//! hyper's own timers leave three ways to keep a connection (and its slot
//! under `max_connections`) for ever:
//!
//! - before the first request: the HTTP/1-or-2 detection reads the first
//!   bytes with no timeout, and `header_read_timeout` starts only after it,
//!   so a client that sends nothing (or the first bytes of the HTTP/2
//!   preface) is never dropped;
//! - a client that stops reading its response: hyper waits on the socket,
//!   nothing polls the body, no timer runs;
//! - an HTTP/2 connection with no streams: keep-alive pings are answered by
//!   any HTTP/2 stack, so it stays up.
//!
//! [`Conn`] is the shared record the connection's I/O ([`Watched`]), its
//! service and its HTTP/2 response bodies ([`Counted`]) keep up to date;
//! [`Conn::check`] is what the connection's task asks at each deadline. The
//! record also holds the connection's slot: an upgraded connection (a
//! WebSocket tunnel) keeps the slot until the tunnel closes, because the
//! tunnel holds the I/O that holds the record.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// One downstream connection, shared by its I/O, its service and its task.
pub struct Conn {
    opened: Instant,
    /// Requests begun on the connection.
    requests: AtomicU64,
    /// Whether requests arrive over HTTP/2.
    h2: AtomicBool,
    /// HTTP/2 responses whose body has not ended yet.
    open_streams: AtomicUsize,
    /// When each HTTP/2 response body was last asked for data (see
    /// [`StreamGuard`]); HTTP/2 only, so no lock on the HTTP/1 path.
    streams: Mutex<Vec<std::sync::Weak<AtomicU64>>>,
    /// Milliseconds after `opened` at which a write began to wait for the
    /// client to read, plus one (0: no write is waiting).
    write_blocked_at: AtomicU64,
    record_metrics: bool,
    _slot: OwnedSemaphorePermit,
}

/// When a connection last had something to do, as its task last saw it.
#[derive(Clone, Copy, Debug)]
pub struct Activity {
    requests: u64,
    at: Instant,
}

impl Activity {
    /// Nothing yet, as of `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            requests: 0,
            at: now,
        }
    }
}

/// What the connection's task should do at a deadline.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is wrong: look again at this instant.
    CheckAt(Instant),
    /// Ask the client to go (HTTP/2 GOAWAY; requests in flight finish).
    Wind,
    /// Drop the connection now.
    Close(&'static str),
}

/// The limits the checks apply.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// Time from accept to the first request's head.
    pub first_request: Duration,
    /// Longest a write may wait for the client to read, and longest an
    /// HTTP/2 connection may stay without streams.
    pub idle: Duration,
}

impl Conn {
    /// The record of a connection accepted now, holding its slot.
    pub fn new(slot: OwnedSemaphorePermit, record_metrics: bool) -> Arc<Self> {
        if record_metrics {
            metrics::gauge!("whydenied_open_connections").increment(1.0);
        }
        Arc::new(Self {
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            open_streams: AtomicUsize::new(0),
            streams: Mutex::new(Vec::new()),
            write_blocked_at: AtomicU64::new(0),
            record_metrics,
            _slot: slot,
        })
    }

    /// Notes a request; an HTTP/2 one is counted until its body ends.
    #[inline]
    pub fn begin(self: &Arc<Self>, http2: bool) -> Option<StreamGuard> {
        // One task owns the connection's HTTP/1 requests: no read-modify-write needed.
        self.requests
            .store(self.requests.load(Relaxed).wrapping_add(1), Relaxed);
        if !http2 {
            return None;
        }
        // HTTP/2 requests may be handled on several tasks at once.
        self.h2.store(true, Relaxed);
        self.open_streams.fetch_add(1, Relaxed);
        // 0 until the response is ready: waiting for the upstream's answer is
        // bounded by `upstream_response_timeout`, not by this.
        let polled = Arc::new(AtomicU64::new(0));
        if let Ok(mut streams) = self.streams.lock() {
            if streams.len() >= 16 && streams.len() > 2 * self.open_streams.load(Relaxed) {
                streams.retain(|s| s.strong_count() > 0);
            }
            streams.push(Arc::downgrade(&polled));
        }
        Some(StreamGuard {
            conn: self.clone(),
            polled,
        })
    }

    /// Requests begun so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    /// Decides, at `now`, whether the connection may go on. `activity` is
    /// the task's memory of when the connection last had a request or an
    /// open HTTP/2 stream.
    pub fn check(&self, now: Instant, activity: &mut Activity, limits: Deadlines) -> Verdict {
        // Often enough to see a write that waits for the whole idle timeout
        // within a quarter of it more.
        let next = now + (limits.idle / 4).max(Duration::from_millis(10));
        let requests = self.requests();
        if requests == 0 {
            let due = self.opened + limits.first_request;
            return if now >= due {
                Verdict::Close("no request within the header read timeout")
            } else {
                Verdict::CheckAt(due.min(next))
            };
        }
        let blocked = self.write_blocked_at.load(Relaxed);
        if blocked != 0 {
            let since = self.opened + Duration::from_millis(blocked - 1);
            if now.saturating_duration_since(since) >= limits.idle {
                return Verdict::Close("the client did not read its response for the idle timeout");
            }
        }
        let streams = self.open_streams.load(Relaxed);
        if streams > 0 && self.stalled_stream(now, limits.idle * 2) {
            return Verdict::Close("an HTTP/2 response was not read for twice the idle timeout");
        }
        if requests != activity.requests || streams > 0 {
            *activity = Activity { requests, at: now };
        }
        if self.h2.load(Relaxed) && now.saturating_duration_since(activity.at) >= limits.idle {
            return Verdict::Wind;
        }
        Verdict::CheckAt(next)
    }

    /// Whether an HTTP/2 response body has not been asked for data for
    /// `limit`: the client is not granting flow-control window (a slow
    /// upstream makes the body's own idle timeout fire first, at half that).
    fn stalled_stream(&self, now: Instant, limit: Duration) -> bool {
        let Ok(streams) = self.streams.lock() else {
            return false;
        };
        streams
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .any(|polled| {
                let at = polled.load(Relaxed);
                at != 0
                    && now.saturating_duration_since(self.opened + Duration::from_millis(at - 1))
                        >= limit
            })
    }

    fn stamp(&self, polled: &AtomicU64) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        polled.store(ms + 1, Relaxed);
    }

    #[inline]
    fn write_waits(&self) {
        if self.write_blocked_at.load(Relaxed) == 0 {
            let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.write_blocked_at.store(ms + 1, Relaxed);
        }
    }

    #[inline]
    fn write_moved(&self) {
        if self.write_blocked_at.load(Relaxed) != 0 {
            self.write_blocked_at.store(0, Relaxed);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.record_metrics {
            metrics::gauge!("whydenied_open_connections").decrement(1.0);
        }
    }
}

/// Counts an HTTP/2 response as open until its body ends or is dropped,
/// and notes when its body was last asked for data.
pub struct StreamGuard {
    conn: Arc<Conn>,
    polled: Arc<AtomicU64>,
}

impl StreamGuard {
    fn polled(&self) {
        self.conn.stamp(&self.polled);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.open_streams.fetch_sub(1, Relaxed);
    }
}

pin_project! {
    /// The connection's I/O, noting when a write waits for the client.
    pub struct Watched<T> {
        #[pin]
        io: T,
        conn: Arc<Conn>,
    }
}

impl<T> Watched<T> {
    /// Wraps `io` of `conn`.
    pub fn new(io: T, conn: Arc<Conn>) -> Self {
        Self { io, conn }
    }
}

impl<T: hyper::rt::Read> hyper::rt::Read for Watched<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write> hyper::rt::Write for Watched<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        note(this.conn, &polled);
        polled
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        note(this.conn, &polled);
        polled
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[inline]
fn note(conn: &Conn, polled: &Poll<io::Result<usize>>) {
    match polled {
        Poll::Pending => conn.write_waits(),
        Poll::Ready(_) => conn.write_moved(),
    }
}

pin_project! {
    /// A response body that, for HTTP/2, keeps its stream counted as open.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        guard: Option<StreamGuard>,
    }
}

impl<B> Counted<B> {
    /// `inner`, counted by `guard` until it ends.
    #[inline]
    pub fn new(inner: B, guard: Option<StreamGuard>) -> Self {
        if let Some(guard) = &guard {
            guard.polled();
        }
        Self { inner, guard }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(guard) = this.guard.as_ref() {
            guard.polled();
        }
        let polled = this.inner.poll_frame(cx);
        if this.guard.is_some() && matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            *this.guard = None;
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Tells a listener's connections to wind down, without a lock or a shared
/// waiter list on the request path: each connection's task leaves its waker
/// here once, and checks one flag when it is polled.
#[derive(Default)]
pub struct Stopping {
    stopped: AtomicBool,
    aborted: AtomicBool,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Waker>>,
}

impl Stopping {
    /// Sets the flag and wakes every connection task that is waiting.
    pub fn stop(&self) {
        self.stopped.store(true, SeqCst);
        self.wake_all();
    }

    /// After the grace period: the connections still open are dropped.
    pub fn abort(&self) {
        self.aborted.store(true, SeqCst);
        self.wake_all();
    }

    fn wake_all(&self) {
        let waiting: Vec<Waker> = match self.waiting.lock() {
            Ok(waiting) => waiting.values().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
        };
        for waker in waiting {
            waker.wake();
        }
    }

    /// Whether [`Stopping::stop`] was called.
    #[inline]
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Relaxed)
    }

    /// Leaves the calling task's waker, until the returned guard is dropped.
    pub async fn register(self: &Arc<Self>) -> Registered {
        let id = self.next.fetch_add(1, Relaxed);
        std::future::poll_fn(|cx| {
            if let Ok(mut waiting) = self.waiting.lock() {
                waiting.insert(id, cx.waker().clone());
            }
            Poll::Ready(())
        })
        .await;
        // A stop between the flag and the insert: the task sees the flag
        // itself when it next checks it, which it does before waiting.
        Registered {
            stopping: self.clone(),
            id,
        }
    }
}

/// A task's place in [`Stopping`].
pub struct Registered {
    stopping: Arc<Stopping>,
    id: u64,
}

impl Registered {
    /// Ready once the listener stops.
    pub fn stopped(&self) -> impl Future<Output = ()> + '_ {
        raised(&self.stopping.stopped)
    }

    /// Whether the listener has stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopping.stopped.load(Relaxed)
    }

    /// Whether the grace period is over.
    pub fn is_aborted(&self) -> bool {
        self.stopping.aborted.load(Relaxed)
    }

    /// Ready once the grace period is over.
    pub fn aborted(&self) -> impl Future<Output = ()> + '_ {
        raised(&self.stopping.aborted)
    }
}

/// Ready once `flag` is set (the waker was left in [`Stopping`] already).
fn raised(flag: &AtomicBool) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(|_| {
        if flag.load(Relaxed) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.stopping.waiting.lock() {
            waiting.remove(&self.id);
        }
    }
}

/// Relays an upgraded connection (a WebSocket, say) both ways until either
/// side closes, nothing moves either way for `idle` (as nginx's
/// `proxy_read_timeout` does for tunnels), or the listener stops (a tunnel
/// has no request to finish). The client side holds the connection's slot
/// (see [`Conn`]) until this returns.
pub async fn tunnel<A, B>(client: A, upstream: B, idle: Duration, stopping: Option<Arc<Stopping>>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let moved = AtomicU64::new(0);
    let mut client = Moving {
        io: client,
        moved: &moved,
    };
    let mut upstream = Moving {
        io: upstream,
        moved: &moved,
    };
    let relay = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(relay);
    let mut seen = 0;
    let mut last_moved = Instant::now();
    let registered = match stopping {
        Some(stopping) => Some(stopping.register().await),
        None => None,
    };
    let stopped = async {
        match &registered {
            Some(registered) => registered.stopped().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut relay => return,
            () = &mut stopped => {
                tracing::debug!(target: "whydenied", "closing a tunnel: the listener stops");
                return;
            }
            () = tokio::time::sleep((idle / 4).max(Duration::from_millis(10))) => {
                let count = moved.load(Relaxed);
                if count != seen {
                    seen = count;
                    last_moved = Instant::now();
                } else if last_moved.elapsed() >= idle {
                    tracing::debug!(target: "whydenied", "closing a tunnel idle for the idle timeout");
                    return;
                }
            }
        }
    }
}

/// One side of a tunnel, counting the reads that brought bytes.
struct Moving<'a, T> {
    io: T,
    moved: &'a AtomicU64,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Moving<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.fetch_add(1, Relaxed);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Moving<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    const LIMITS: Deadlines = Deadlines {
        first_request: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    fn conn() -> Arc<Conn> {
        let slots = Arc::new(Semaphore::new(1));
        Conn::new(slots.try_acquire_owned().unwrap(), false)
    }

    #[test]
    fn a_connection_without_a_request_is_closed_at_the_header_timeout() {
        let c = conn();
        let t0 = c.opened;
        let mut seen = Activity::new(t0);
        let ten = t0 + Duration::from_secs(10);
        assert_eq!(c.check(t0, &mut seen, LIMITS), Verdict::CheckAt(ten));
        assert!(matches!(c.check(ten, &mut seen, LIMITS), Verdict::Close(_)));
        c.begin(false);
        assert!(matches!(
            c.check(ten, &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
    }

    #[test]
    fn a_write_that_waits_for_the_idle_timeout_closes_the_connection() {
        let c = conn();
        c.begin(false);
        let t0 = c.opened;
        let mut seen = Activity::new(t0);
        c.write_waits();
        let at = |s| t0 + Duration::from_secs(s);
        assert!(matches!(
            c.check(at(59), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
        assert!(matches!(
            c.check(at(60), &mut seen, LIMITS),
            Verdict::Close(_)
        ));
        c.write_moved();
        assert!(matches!(
            c.check(at(60), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
    }

    #[test]
    fn an_http2_connection_winds_down_after_the_idle_timeout_without_streams() {
        let c = conn();
        let t0 = c.opened;
        let at = |s| t0 + Duration::from_secs(s);
        let mut seen = Activity::new(t0);
        let stream = c.begin(true);
        // A stream open for longer than the idle timeout is not idleness.
        assert!(matches!(
            c.check(at(100), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
        drop(stream);
        assert!(matches!(
            c.check(at(159), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
        // Another request restarts the clock.
        drop(c.begin(true));
        assert!(matches!(
            c.check(at(159), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
        assert!(matches!(
            c.check(at(218), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
        assert_eq!(c.check(at(219), &mut seen, LIMITS), Verdict::Wind);
    }

    #[test]
    fn an_http2_response_that_is_not_read_closes_the_connection() {
        let c = conn();
        let t0 = c.opened;
        let at = |s| t0 + Duration::from_secs(s);
        let mut seen = Activity::new(t0);
        let waiting = c.begin(true).unwrap();
        // Waiting for the upstream's answer is not a stall.
        assert!(matches!(
            c.check(at(600), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
        // The response is ready and its body is asked for data once, then
        // never again (the client grants no window).
        let body = Counted::new(http_body_util::Empty::<Bytes>::new(), Some(waiting));
        assert!(matches!(
            c.check(at(119), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
        assert!(matches!(
            c.check(at(120), &mut seen, LIMITS),
            Verdict::Close(_)
        ));
        drop(body);
        assert!(matches!(
            c.check(at(120), &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
    }

    #[test]
    fn an_http1_connection_is_left_to_hyper_when_idle() {
        let c = conn();
        c.begin(false);
        let t0 = c.opened;
        let mut seen = Activity::new(t0);
        let later = t0 + Duration::from_secs(3600);
        assert!(matches!(
            c.check(later, &mut seen, LIMITS),
            Verdict::CheckAt(_)
        ));
    }

    #[tokio::test]
    async fn stopping_wakes_the_registered_tasks() {
        let stopping = Arc::new(Stopping::default());
        let (ready, registered_now) = tokio::sync::oneshot::channel();
        let waiting = {
            let stopping = stopping.clone();
            tokio::spawn(async move {
                let registered = stopping.register().await;
                let _ = ready.send(());
                registered.stopped().await;
            })
        };
        // Once the task has registered, stop must wake it.
        registered_now.await.unwrap();
        stopping.stop();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the task was not woken")
            .unwrap();
        // A task that registers after the stop sees it at once.
        let late = stopping.register().await;
        late.stopped().await;
    }

    #[test]
    fn the_slot_is_held_until_the_last_holder_goes() {
        let slots = Arc::new(Semaphore::new(1));
        let c = Conn::new(slots.clone().try_acquire_owned().unwrap(), false);
        let io = Watched::new((), c.clone());
        drop(c);
        assert_eq!(slots.available_permits(), 0);
        drop(io);
        assert_eq!(slots.available_permits(), 1);
    }
}
