//! The accept loop shared by the data and admin listeners: HTTP/1.1 and h2c
//! on one port, upgrades, the header limits and timeouts that hyper's
//! defaults leave too loose, a cap on open connections, and graceful
//! shutdown that lets in-flight requests finish within a grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant as TokioInstant;
use tower_service::Service;

use super::conn::{Activity, Conn, Counted, Deadlines, Stopping, Verdict, Watched};
use super::lane::{Lane, Outcome};

use crate::config::Limits;

/// How a listener serves.
pub struct ServeSettings {
    /// Limits of the data listener.
    pub limits: Limits,
    /// Whether to record per-request metrics (the data listener does).
    pub record_metrics: bool,
    /// A name for logs.
    pub name: &'static str,
    /// Tells the listener's connections (and the tunnels its proxy opens)
    /// to wind down; `serve` raises it when `shutdown` resolves.
    pub stopping: Arc<Stopping>,
    /// The fast lane, which serves plain HTTP/1.1 exchanges first and hands
    /// the rest to hyper (see [`super::lane`]).
    pub lane: Option<Arc<Lane>>,
}

/// Serves on `listener` until `shutdown` resolves, then waits for in-flight
/// connections up to the grace period. `make_service` gives each connection
/// its service, from the peer's address (clones of it serve the
/// connection's requests).
pub async fn serve<M, S, B>(
    listener: TcpListener,
    make_service: M,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()>,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = settings.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    if limits.max_headers != 100 {
        builder.http1().max_headers(limits.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(Some(128));
    // For connections the fast lane served first: HTTP/1.1 they are.
    let builder_h1 = Arc::new(builder.clone().http1_only());
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let record = settings.record_metrics;
    let deadlines = Deadlines {
        first_request: limits.header_read_timeout,
        idle: limits.idle_timeout,
    };
    let stopping = settings.stopping;
    let lane = settings.lane;
    let lane_limits = Arc::new(limits.clone());
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // rather than spin.
                    tracing::warn!(target: "whydenied", listener = settings.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = Conn::new(permit, record);
        let service = make_service(peer);
        let per_request = {
            let state = state.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let stream = state.begin(req.version() == Version::HTTP_2);
                let mut service = service.clone();
                async move {
                    let start = record.then(Instant::now);
                    let response = service.call(req).await;
                    if let (Some(start), Ok(res)) = (start, &response) {
                        record_request(res.status().as_u16(), start.elapsed());
                    }
                    response.map(|res| res.map(|body| Counted::new(body, stream)))
                }
            })
        };
        let builder = builder.clone();
        let builder_h1 = builder_h1.clone();
        let stopping = stopping.clone();
        let lane = lane.clone();
        let lane_limits = lane_limits.clone();
        tokio::spawn(async move {
            let (stream, read, builder) = match lane {
                Some(lane) => match lane.serve(stream, peer, &state, &lane_limits).await {
                    Outcome::Closed => return,
                    Outcome::Hyper {
                        stream,
                        read,
                        served,
                    } => (
                        stream,
                        read.freeze(),
                        if served { builder_h1 } else { builder },
                    ),
                },
                None => (stream, Bytes::new(), builder),
            };
            let io = Watched::new(TokioIo::new(Replay::new(stream, read)), state.clone());
            let conn = builder.serve_connection_with_upgrades(io, per_request);
            supervise(conn, &state, deadlines, stopping, peer).await;
        });
    }

    drop(listener);
    tracing::info!(
        target: "whydenied",
        listener = settings.name,
        grace_seconds = limits.shutdown_grace.as_secs_f64(),
        "stopped accepting; waiting for in-flight requests"
    );
    stopping.stop();
    // Every slot back means every connection (and upgraded tunnel) is gone.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(target: "whydenied", listener = settings.name, "grace period over; closing the remaining connections");
        stopping.abort();
    }
}

/// Drives one connection to its end, applying what hyper's own timers do not
/// (see [`super::conn`]) and winding it down when the listener stops.
async fn supervise<C>(
    conn: C,
    state: &Conn,
    deadlines: Deadlines,
    stopping: Arc<Stopping>,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Winding,
{
    tokio::pin!(conn);
    let stopping = stopping.register().await;
    let opened = TokioInstant::now();
    let mut activity = Activity::new(opened);
    let first = match state.check(opened, &mut activity, deadlines) {
        Verdict::CheckAt(at) => at,
        _ => opened,
    };
    let deadline = tokio::time::sleep_until(first);
    tokio::pin!(deadline);
    // Whether the connection was asked to go: by shutdown, or for idleness.
    let mut stop_asked = false;
    let mut wound = false;
    loop {
        tokio::select! {
            biased;
            () = stopping.aborted() => {
                tracing::debug!(target: "whydenied", peer = %peer, "closing a connection at the end of the grace period");
                return;
            }
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(target: "whydenied", peer = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = stopping.stopped(), if !stop_asked => {
                stop_asked = true;
                if !wound {
                    conn.as_mut().wind();
                    wound = true;
                }
            }
            () = &mut deadline => {
                let now = TokioInstant::now();
                match state.check(now, &mut activity, deadlines) {
                    Verdict::CheckAt(at) => deadline.as_mut().reset(at),
                    Verdict::Wind if !wound => {
                        conn.as_mut().wind();
                        wound = true;
                        deadline.as_mut().reset(now + deadlines.idle);
                    }
                    Verdict::Wind => {
                        tracing::debug!(target: "whydenied", peer = %peer, "closing an idle HTTP/2 connection that did not leave after GOAWAY");
                        return;
                    }
                    Verdict::Close(why) => {
                        tracing::debug!(target: "whydenied", peer = %peer, reason = why, "closing a connection");
                        return;
                    }
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection that first gives back the bytes already read from it
    /// (by the fast lane) and then reads on.
    pub struct Replay<T> {
        read: Bytes,
        #[pin]
        io: T,
    }
}

impl<T> Replay<T> {
    fn new(io: T, read: Bytes) -> Self {
        Self { read, io }
    }
}

impl<T: tokio::io::AsyncRead> tokio::io::AsyncRead for Replay<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        if this.read.is_empty() {
            return this.io.poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read.split_to(n));
        std::task::Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Replay<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// A connection that can be asked to finish what it has and close.
trait Winding {
    fn wind(self: Pin<&mut Self>);
}

impl<I, S, E> Winding for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: Body + Send + 'static,
    <S::ResBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn wind(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Metric handles, registered once: recording is then an atomic add, with no
/// registry lookup per request.
struct RequestMetrics {
    by_status: Vec<(u16, metrics::Counter)>,
    other: Vec<(&'static str, metrics::Counter)>,
    duration: metrics::Histogram,
}

fn request_metrics() -> &'static RequestMetrics {
    static METRICS: std::sync::OnceLock<RequestMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| RequestMetrics {
        by_status: KNOWN_STATUSES
            .iter()
            .map(|(code, label)| {
                (
                    *code,
                    metrics::counter!("whydenied_requests_total", "status" => *label),
                )
            })
            .collect(),
        other: ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .iter()
            .map(|label| {
                (
                    *label,
                    metrics::counter!("whydenied_requests_total", "status" => *label),
                )
            })
            .collect(),
        duration: metrics::histogram!("whydenied_request_duration_seconds"),
    })
}

pub(super) fn record_request(status: u16, elapsed: Duration) {
    let m = request_metrics();
    match m.by_status.iter().find(|(code, _)| *code == status) {
        Some((_, counter)) => counter.increment(1),
        None => {
            let label = status_label(status);
            if let Some((_, counter)) = m.other.iter().find(|(l, _)| *l == label) {
                counter.increment(1);
            }
        }
    }
    m.duration.record(elapsed.as_secs_f64());
}

const KNOWN_STATUSES: &[(u16, &str)] = &[
    (200, "200"),
    (201, "201"),
    (202, "202"),
    (204, "204"),
    (206, "206"),
    (301, "301"),
    (302, "302"),
    (303, "303"),
    (304, "304"),
    (307, "307"),
    (308, "308"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (409, "409"),
    (413, "413"),
    (414, "414"),
    (429, "429"),
    (431, "431"),
    (451, "451"),
    (500, "500"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
    (101, "101"),
];

/// The class label of a status not listed in `KNOWN_STATUSES`.
fn status_label(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Binds a listener, with a clear error.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for the {what}: {e}"),
        )
    })
}
