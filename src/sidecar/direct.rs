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
//! When the upstream answers before it has read the whole request body (an
//! early denial of an upload), the response can end while the body still
//! streams. The connection then finishes that exchange in a task of its own
//! (within the idle timeout), so the client can finish sending and read the
//! answer on a connection that stays usable, as with a pooled connection.
//!
//! The shared pool still serves HTTP/2 downstream connections (many
//! exchanges at once), upgrades, and `https://` upstreams.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response, Uri};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

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

/// Upstream connections held for client connections, open now.
const OPEN_GAUGE: &str = "whydenied_upstream_connections";

impl Drop for LinkParts {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_GAUGE).decrement(1.0);
    }
}

impl Link {
    /// Drives the connection (reads, writes, body frames). `Ready` means it
    /// is finished: closed by either side or failed.
    #[inline]
    pub fn poll_conn(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0.conn).poll(cx).map(|_| ())
    }

    /// Drives an idle connection until it can take a request (`true`) or
    /// turns out to be finished (`false`).
    fn poll_idle(&mut self, cx: &mut std::task::Context<'_>) -> Poll<bool> {
        if self.poll_conn(cx).is_ready() {
            return Poll::Ready(false);
        }
        self.0.send.poll_ready(cx).map(|r| r.is_ok())
    }

    /// Whether the connection can carry another request now that a response
    /// has been read to its end.
    pub fn reusable(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.0.send.is_ready() || self.poll_idle(cx) == Poll::Ready(true)
    }

    /// Hands a connection whose response has been read to its end back to
    /// `slot`. If the upstream answered before reading the whole request
    /// body (common for denials), the body still streams: the exchange is
    /// finished in a task of its own, within `limit`, so that the client can
    /// finish sending and read the answer, and the connection then goes back
    /// if the slot is still free.
    pub fn give_back(mut self, slot: &Slot, limit: Duration, cx: &mut std::task::Context<'_>) {
        if self.reusable(cx) {
            slot.put(self);
            return;
        }
        let slot = slot.clone();
        tokio::spawn(async move {
            if let Ok(true) = tokio::time::timeout(limit, ready(&mut self)).await {
                slot.put(self);
            }
        });
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

/// Why an exchange failed: no connection could be made, or the exchange
/// broke off (its source chain says whether it was refused, timed out, or a
/// request body over the limit).
pub type ExchangeError = Box<dyn std::error::Error + Send + Sync>;

/// Opens a new upstream connection to `upstream` (an `http://` URL) with
/// the proxy's connector (its connect timeout, TCP keepalive and `nodelay`,
/// and every resolved address tried, IPv6 and IPv4 side by side).
pub async fn connect(connector: &HttpConnector, upstream: &Uri) -> Result<Link, ExchangeError> {
    let io = connector.clone().call(upstream.clone()).await?;
    let (send, conn) = http1::handshake(io).await?;
    metrics::gauge!(OPEN_GAUGE).increment(1.0);
    Ok(Link(Box::new(LinkParts { send, conn })))
}

/// Whether an idle connection can take a request: drives it until it says
/// so, or until it turns out to be closed.
async fn ready(link: &mut Link) -> bool {
    poll_fn(|cx| link.poll_idle(cx)).await
}

/// What sending on one connection gave.
enum Sent {
    /// The response head, and the connection its body arrives on, unless the
    /// connection has already finished (then it delivered all it will).
    Response(Response<Incoming>, Option<Link>),
    /// Not written to the connection: safe to send elsewhere.
    Unsent(Request<OutBody>, hyper::Error),
    Failed(hyper::Error),
}

/// Sends `req` on `link`, polling the connection until the response head
/// arrives.
async fn send(mut link: Link, req: Request<OutBody>) -> Sent {
    let mut response = pin!(link.0.send.try_send_request(req));
    let mut link = Some(link);
    let result = poll_fn(|cx| {
        if let Some(l) = link.as_mut()
            && l.poll_conn(cx).is_ready()
        {
            // The connection has finished (it is never polled again).
            // Dropping it settles the request: a response it read is
            // already delivered; a request it never took is handed back.
            link = None;
        }
        response.as_mut().poll(cx)
    })
    .await;
    match result {
        Ok(response) => Sent::Response(response, link),
        Err(mut e) => match e.take_message() {
            Some(req) => Sent::Unsent(req, e.into_error()),
            None => Sent::Failed(e.into_error()),
        },
    }
}

/// Sends `req` upstream over the connection kept in `slot`, or a new one,
/// and returns the response head with the connection that carries its body.
pub async fn exchange(
    slot: &Slot,
    connector: &HttpConnector,
    upstream: &Uri,
    mut req: Request<OutBody>,
) -> Result<(Response<Incoming>, Option<Link>), ExchangeError> {
    let mut kept = slot.take();
    if let Some(link) = kept.as_mut()
        && !ready(link).await
    {
        kept = None;
    }
    loop {
        let reused = kept.is_some();
        let link = match kept.take() {
            Some(link) => link,
            None => connect(connector, upstream).await?,
        };
        match send(link, req).await {
            Sent::Response(response, link) => return Ok((response, link)),
            // The kept connection was closed under us before the request
            // was written: once more, on a fresh connection.
            Sent::Unsent(back, _) if reused => req = back,
            Sent::Unsent(_, e) | Sent::Failed(e) => return Err(e.into()),
        }
    }
}
