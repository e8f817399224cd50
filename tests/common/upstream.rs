//! A real upstream on 127.0.0.1 for the sidecar tests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Hooks the tests use to hold and release slow responses.
#[derive(Default)]
pub struct UpstreamState {
    /// Notified when a /slow request has arrived.
    pub slow_arrived: Notify,
    /// The /slow response waits for this.
    pub release_slow: Notify,
    /// Notified when an /endless body is dropped (its reader went away).
    pub endless_dropped: Notify,
}

/// The body of `/endless`: [`super::EndlessBody`], telling the state when it
/// is dropped.
struct Endless(super::EndlessBody, Arc<UpstreamState>);

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }
}

impl Drop for Endless {
    fn drop(&mut self) {
        self.1.endless_dropped.notify_one();
    }
}

/// The deterministic body of `/bytes`.
pub fn megabyte() -> Vec<u8> {
    (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect()
}

pub type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<UpBody> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    res
}

fn headers_json(h: &HeaderMap) -> String {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in h {
        map.entry(k.to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    serde_json::to_string(&map).unwrap()
}

/// A body of one data frame and then trailers.
struct WithTrailers(u8);

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0 += 1;
        Poll::Ready(match self.0 {
            1 => Some(Ok(Frame::data(Bytes::from_static(b"body before trailers")))),
            2 => {
                let mut t = HeaderMap::new();
                t.insert("x-checksum", "abc123".parse().unwrap());
                Some(Ok(Frame::trailers(t)))
            }
            _ => None,
        })
    }
}

/// One data frame, then nothing, ever.
struct Stalling(bool);

impl Body for Stalling {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 {
            return Poll::Pending;
        }
        self.0 = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            b"partial denial body",
        )))))
    }
}

async fn answer(state: Arc<UpstreamState>, mut req: Request<Incoming>) -> Response<UpBody> {
    match req.uri().path() {
        "/echo-headers" => {
            let mut res = full(StatusCode::OK, headers_json(req.headers()));
            res.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            res
        }
        "/cookies" => {
            let mut res = full(StatusCode::OK, "three cookies");
            for c in ["a=1; Path=/", "b=2; HttpOnly", "c=3; Secure"] {
                res.headers_mut().append("set-cookie", c.parse().unwrap());
            }
            res
        }
        "/bytes" => full(StatusCode::OK, megabyte()),
        "/upload" => {
            let mut len: u64 = 0;
            let mut sum: u64 = 0xcbf2_9ce4_8422_2325;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return full(StatusCode::BAD_REQUEST, "body failed");
                };
                if let Ok(data) = frame.into_data() {
                    len += data.len() as u64;
                    for b in data.iter() {
                        sum ^= u64::from(*b);
                        sum = sum.wrapping_mul(0x0100_0000_01b3);
                    }
                }
            }
            full(StatusCode::OK, format!("{{\"len\":{len},\"sum\":{sum}}}"))
        }
        "/slow" => {
            state.slow_arrived.notify_one();
            state.release_slow.notified().await;
            full(StatusCode::OK, "slow but complete")
        }
        "/hang" => std::future::pending().await,
        "/endless" => {
            let body = super::EndlessBody {
                produced: Arc::default(),
            };
            Response::new(Endless(body, state.clone()).boxed())
        }
        "/stalled" => Response::new(Stalling(false).boxed()),
        "/stalled-denial" => {
            let mut res = Response::new(Stalling(false).boxed());
            *res.status_mut() = StatusCode::FORBIDDEN;
            res
        }
        "/trailers" => {
            let mut res = Response::new(WithTrailers(0).boxed());
            res.headers_mut()
                .insert("trailer", "x-checksum".parse().unwrap());
            res
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut res = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
            res.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            res.headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            res
        }
        "/leaky" => full(
            StatusCode::FORBIDDEN,
            "error: invalid credentials Bearer sEcReT4Body1234567 for eyJhbGciOiJIUzI1NiJ9.eyJzZWNyZXQiOiJ4In0.c2VjcmV0NQ\r\nfin",
        ),
        // Answers without reading the request body, as many authorization
        // checks do.
        "/early-denial" => full(StatusCode::FORBIDDEN, "denied before the body was read"),
        p if p == "/denied" || p.starts_with("/denied/") => {
            let mut res = full(StatusCode::FORBIDDEN, "Forbidden by upstream");
            res.headers_mut()
                .insert("www-authenticate", "Bearer realm=\"t\"".parse().unwrap());
            res
        }
        _ => full(StatusCode::OK, "hello from upstream"),
    }
}

/// Starts the upstream; returns its address and hooks.
pub async fn start() -> (SocketAddr, Arc<UpstreamState>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(UpstreamState::default());
    let shared = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(state, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

/// An upstream written byte by byte: it answers the bodiless requests on a
/// connection with `connection <n>` (the how-manieth connection it accepted)
/// and closes the connection after `per_connection` answers, as a keep-alive
/// timeout would, without saying so in the response. `closed` is notified
/// whenever a connection ends, closed by either side.
pub async fn counting(per_connection: usize) -> (SocketAddr, Arc<AtomicUsize>, Arc<Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(Notify::new());
    let (count, notify) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let notify = notify.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                for _ in 0..per_connection {
                    while !pending.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                notify.notify_one();
                                return;
                            }
                            Ok(k) => pending.extend_from_slice(&buf[..k]),
                        }
                    }
                    let end = pending.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                    pending.drain(..end + 4);
                    let body = format!("connection {n}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                drop(s);
                notify.notify_one();
            });
        }
    });
    (addr, accepted, closed)
}
