//! One upstream connection per downstream HTTP/1 connection, driven by the
//! downstream connection's own task.
//!
//! An HTTP/1 connection carries one exchange at a time, so a downstream
//! HTTP/1 connection never needs more than one upstream connection. Keeping
//! that one connection beside it (in a [`Slot`]) removes what a shared pool
//! costs on every request: the pool's map lookup, the channel and wake-up
//! between the request's task and a separate connection task, and the hop
//! between threads that often follows. The upstream connection is polled
//! from the downstream task: while the request waits for its response head
//! ([`exchange`]) and while the response body streams
//! ([`super::proxy::ProxyBody`]); when the body has been read to its end the
//! connection goes back to the slot for the next request.
//!
//! An idle connection is not polled, so a close by the upstream is noticed
//! when the next request checks the connection before sending: it then
//! opens a new one. If the upstream closes it between that check and the
//! write, hyper hands the unsent request back and it is sent once more on a
//! fresh connection; a request that was already written is never repeated.
//!
//! The shared pool still serves HTTP/2 downstream connections (many
//! exchanges at once), upgrades, and `https://` upstreams.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The body of a request on its way to the upstream.
pub type OutBody = Limited<Incoming>;

/// An upstream HTTP/1 connection: the handle that sends requests and the
/// connection state machine, which the caller polls. Boxed: it is large,
/// and it moves between the slot, the exchange and the response body.
pub struct Link(Box<LinkParts>);

struct LinkParts {
    send: http1::SendRequest<OutBody>,
    conn: http1::Connection<TokioIo<TcpStream>, OutBody>,
}

impl Link {
    /// Drives the connection (reads, writes, body frames). `Ready` means it
    /// is finished: closed by either side or failed.
    #[inline]
    pub fn poll_conn(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0.conn).poll(cx).map(|_| ())
    }

    /// Whether the connection can carry another request now that a response
    /// has been read to its end. Not when the upstream answered before
    /// reading the whole request body (common for denials): that body still
    /// streams, and nothing would drive it while the connection sits idle.
    pub fn reusable(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if self.0.send.is_ready() {
            return true;
        }
        if self.poll_conn(cx).is_ready() {
            return false;
        }
        matches!(self.0.send.poll_ready(cx), Poll::Ready(Ok(())))
    }
}

/// Where a downstream connection keeps its upstream connection between
/// requests. Shared by the clones of one connection's service; never
/// contended, since HTTP/1 has one exchange in flight per connection.
#[derive(Clone, Default)]
pub struct Slot(Arc<Mutex<Option<Link>>>);

impl Slot {
    /// Takes the idle connection, if there is one.
    pub fn take(&self) -> Option<Link> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Keeps `link` for the next request (dropping it if the slot is taken,
    /// which HTTP/1's one-exchange-at-a-time rule makes impossible).
    pub fn put(&self, link: Link) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(link);
        }
    }
}

/// How an exchange failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// The TCP connection could not be made in time.
    ConnectTimeout,
    /// The TCP connection or HTTP handshake failed.
    Connect(std::io::Error),
    /// The exchange failed after the request was handed to the connection.
    Http(hyper::Error),
    /// The connection ended without answering (should not happen: hyper
    /// answers every request it accepted before its connection ends).
    Dropped,
}

/// Opens a new upstream connection to `authority` (an `http://` upstream).
pub async fn connect(authority: &Authority, timeout: Duration) -> Result<Link, ExchangeError> {
    let host = authority.host();
    // `[::1]` in a URL is `::1` to the resolver.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = authority.port_u16().unwrap_or(80);
    let stream = match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Err(_elapsed) => return Err(ExchangeError::ConnectTimeout),
        Ok(Err(e)) => return Err(ExchangeError::Connect(e)),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let (send, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ExchangeError::Connect(std::io::Error::other(e)))?;
    Ok(Link(Box::new(LinkParts { send, conn })))
}

/// Whether an idle connection can take a request: drives it until it says
/// so, or until it turns out to be closed.
async fn ready(link: &mut Link) -> bool {
    poll_fn(|cx| {
        if link.poll_conn(cx).is_ready() {
            return Poll::Ready(false);
        }
        link.0.send.poll_ready(cx).map(|r| r.is_ok())
    })
    .await
}

/// What sending on one connection gave.
enum Sent {
    Response(Response<Incoming>),
    /// Not written to the connection: safe to send elsewhere.
    Unsent(Request<OutBody>, hyper::Error),
    Failed(ExchangeError),
}

/// Sends `req` on `link`, polling the connection until the response head
/// arrives.
async fn send(link: &mut Link, req: Request<OutBody>) -> Sent {
    let mut response = pin!(link.0.send.try_send_request(req));
    let mut conn_done = false;
    let result = poll_fn(|cx| {
        if !conn_done && link.poll_conn(cx).is_ready() {
            conn_done = true;
        }
        match response.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending if conn_done => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    match result {
        Some(Ok(response)) => Sent::Response(response),
        Some(Err(mut e)) => match e.take_message() {
            Some(req) => Sent::Unsent(req, e.into_error()),
            None => Sent::Failed(ExchangeError::Http(e.into_error())),
        },
        None => Sent::Failed(ExchangeError::Dropped),
    }
}

/// Sends `req` upstream over the connection kept in `slot`, or a new one,
/// and returns the response head with the connection that carries its body.
pub async fn exchange(
    slot: &Slot,
    authority: &Authority,
    connect_timeout: Duration,
    mut req: Request<OutBody>,
) -> Result<(Response<Incoming>, Link), ExchangeError> {
    let mut kept = slot.take();
    if let Some(link) = kept.as_mut()
        && !ready(link).await
    {
        kept = None;
    }
    loop {
        let reused = kept.is_some();
        let mut link = match kept.take() {
            Some(link) => link,
            None => connect(authority, connect_timeout).await?,
        };
        match send(&mut link, req).await {
            Sent::Response(response) => return Ok((response, link)),
            // The kept connection was closed under us before the request
            // was written: once more, on a fresh connection.
            Sent::Unsent(back, _) if reused => req = back,
            Sent::Unsent(_, e) => return Err(ExchangeError::Http(e)),
            Sent::Failed(e) => return Err(e),
        }
    }
}
