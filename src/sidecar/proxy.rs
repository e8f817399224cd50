//! The inner service of the sidecar: forwards a request to the one upstream
//! and streams the answer back. Bodies stream both ways; nothing is buffered
//! here (the explaining layer around this service reads a denial's prefix).
//!
//! Failures of the proxy itself become explained responses in the negotiated
//! format: 502 when the upstream refuses or drops the connection, 504 when it
//! does not answer in time, 413/414 for requests over the limits.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::direct::{self, Link, Slot};
use super::hop::{self, Hop};
use crate::config::ConfigHandle;
use crate::diagnose::proxy_failure;
use crate::facts::ClientAddr;
use crate::id::DenialId;

#[cfg(feature = "tls")]
type Connector = crate::tls::Connector;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

type UpstreamClient = Client<Connector, Limited<Incoming>>;

/// Forwards requests to the upstream.
///
/// Clones share everything. [`Proxy::for_connection`] gives a downstream
/// connection its own clone, which keeps that connection's upstream
/// connection between requests (see [`super::direct`]).
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
    slot: Option<Slot>,
    peer: Option<SocketAddr>,
}

struct Inner {
    client: UpstreamClient,
    // Requests in flight through the pool (HTTP/2 clients, upgrades, TLS
    // upstreams), each on an upstream connection of its own: capped like
    // client connections, so a few HTTP/2 clients with many streams each
    // cannot open upstream connections without end.
    pooled: Arc<tokio::sync::Semaphore>,
    // The data listener's stop signal, which closes the tunnels of upgrades.
    stopping: Option<Arc<super::conn::Stopping>>,
    config: ConfigHandle,
    upstream: Upstream,
    // How downstream HTTP/1 connections open an upstream connection of
    // their own (plain `http://` upstreams; TLS ones use the pool).
    direct: Option<Direct>,
}

struct Direct {
    connector: HttpConnector,
    uri: Uri,
    // `Host` for requests that came without one (HTTP/1.0).
    host: HeaderValue,
}

/// Where requests go.
#[derive(Clone, Debug)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
}

impl Upstream {
    /// From an `http://host:port` URL.
    pub fn from_uri(uri: &Uri) -> Option<Self> {
        Some(Self {
            scheme: uri.scheme()?.clone(),
            authority: uri.authority()?.clone(),
        })
    }

    /// `host:port`, for reachability checks.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

impl Proxy {
    /// A proxy to `upstream`, with limits from the current config. Its
    /// upgraded tunnels close when `stopping` is raised.
    pub fn new(
        config: ConfigHandle,
        upstream: Upstream,
        stopping: Option<Arc<super::conn::Stopping>>,
    ) -> Result<Self, String> {
        let current = config.load();
        let limits = current.limits().clone();
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(limits.upstream_connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        #[cfg(feature = "tls")]
        let connector = crate::tls::connector(http.clone(), current.upstream_ca_file())?;
        #[cfg(not(feature = "tls"))]
        let connector = http.clone();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(limits.idle_timeout)
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(256)
            .build(connector);
        let direct = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .ok()
            .zip(HeaderValue::from_str(upstream.authority.as_str()).ok())
            .filter(|_| upstream.scheme == Scheme::HTTP)
            .map(|(uri, host)| Direct {
                connector: http,
                uri,
                host,
            });
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                pooled: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
                stopping,
                config,
                upstream,
                direct,
            }),
            slot: None,
            peer: None,
        })
    }

    /// The clone that serves one downstream connection from `peer`: its
    /// HTTP/1 requests go over one upstream connection of its own, kept
    /// between requests.
    pub fn for_connection(&self, peer: SocketAddr) -> Self {
        Self {
            inner: self.inner.clone(),
            slot: self.inner.direct.as_ref().map(|_| Slot::default()),
            peer: Some(peer),
        }
    }
}

pin_project! {
    /// The body of a proxied response: the upstream's, or one we made.
    #[project = ProxyBodyProj]
    #[allow(missing_docs)]
    pub enum ProxyBody {
        /// Streamed from the upstream.
        Upstream {
            #[pin] body: Incoming,
            #[pin] idle: tokio::time::Sleep,
            timeout: Duration,
            // Whether `idle` runs from the current wait: the timer is only
            // touched when the upstream makes us wait, not per frame.
            armed: bool,
            // The connection the body arrives on, when this task drives it
            // (not a pooled one), and where it goes once the body is read.
            link: Option<Link>,
            slot: Option<Slot>,
            // A pooled request's place under the cap, until its body ends.
            pooled: Option<tokio::sync::OwnedSemaphorePermit>,
        },
        /// Made by the proxy (an explained failure).
        Local { #[pin] body: Full<Bytes> },
    }
}

/// Why a proxied body ended early.
type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyBody {
    /// The upstream's body, failing if it sends nothing for `timeout`.
    fn upstream(
        body: Incoming,
        timeout: Duration,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        ProxyBody::Upstream {
            body,
            idle: tokio::time::sleep(timeout),
            timeout,
            armed: false,
            link: None,
            slot: None,
            pooled: Some(permit),
        }
    }

    /// The upstream's body arriving on `link` (if it is still open), which
    /// goes back to `slot` once the body has been read to its end.
    fn direct(body: Incoming, timeout: Duration, mut link: Option<Link>, slot: Slot) -> Self {
        if body.is_end_stream() {
            // No body to wait for (HEAD, 204, 304, `content-length: 0`):
            // nobody will poll this body, so the connection goes back now.
            // The slot does not rely on wake-ups, so no waker is needed.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            give_back(&mut link, Some(&slot), timeout, &mut cx);
        }
        ProxyBody::Upstream {
            body,
            idle: tokio::time::sleep(timeout),
            timeout,
            armed: false,
            link,
            slot: Some(slot),
            pooled: None,
        }
    }
}

/// Hands a connection whose response has been read to its end back to the
/// slot it came from (see [`Link::give_back`]).
#[inline]
fn give_back(link: &mut Option<Link>, slot: Option<&Slot>, limit: Duration, cx: &mut Context<'_>) {
    if let (Some(link), Some(slot)) = (link.take(), slot) {
        link.give_back(slot, limit, cx);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            ProxyBodyProj::Upstream {
                mut body,
                mut idle,
                timeout,
                armed,
                link,
                slot,
                pooled: _,
            } => {
                // The connection first: it is what moves the body's bytes.
                if let Some(l) = link
                    && l.poll_conn(cx).is_ready()
                {
                    *link = None;
                }
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        *armed = false;
                        // Trailers are the last frame; hyper's server stops
                        // polling after them.
                        if body.is_end_stream() || frame.is_trailers() {
                            give_back(link, slot.as_ref(), *timeout, cx);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(None) => {
                        give_back(link, slot.as_ref(), *timeout, cx);
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        *link = None;
                        Poll::Ready(Some(Err(e.into())))
                    }
                    Poll::Pending => {
                        if !*armed {
                            idle.as_mut().reset(tokio::time::Instant::now() + *timeout);
                            *armed = true;
                        }
                        match idle.poll(cx) {
                            Poll::Ready(()) => Poll::Ready(Some(Err(
                                "the upstream sent nothing for the idle timeout".into(),
                            ))),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                }
            }
            ProxyBodyProj::Local { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never: Infallible| match never {}))),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local { body } => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local { body } => body.size_hint(),
        }
    }
}

impl Service<Request<Incoming>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let inner = self.inner.clone();
        let slot = self.slot.clone();
        let peer = self.peer;
        Box::pin(async move { Ok(inner.forward(req, slot, peer).await) })
    }
}

/// Why the upstream exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    Refused,
    Timeout,
    BodyTooLarge,
    UriTooLong,
    AmbiguousHost,
    AmbiguousCredentials,
    Busy,
}

impl Failure {
    fn kind(self) -> &'static str {
        match self {
            Failure::Refused => "unreachable",
            Failure::Timeout => "timeout",
            Failure::BodyTooLarge => "body_too_large",
            Failure::UriTooLong => "uri_too_long",
            Failure::AmbiguousHost => "ambiguous_host",
            Failure::AmbiguousCredentials => "ambiguous_credentials",
            Failure::Busy => "busy",
        }
    }
}

impl Inner {
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        slot: Option<Slot>,
        peer: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        let config = self.config.load();
        let limits = config.limits();
        let accept = req.headers().get(header::ACCEPT).cloned();
        let head = req.method() == http::Method::HEAD;
        let upstream = &self.upstream.authority;
        let fail = |f: Failure| failure(f, accept.as_ref(), head, upstream, None);
        let broke = |e: &(dyn std::error::Error + 'static)| {
            failure(classify(e), accept.as_ref(), head, upstream, Some(e))
        };

        let target_len = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
        if target_len > limits.max_uri_bytes {
            return fail(Failure::UriTooLong);
        }
        let declared_len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body_limit = limits.max_request_body_bytes;
        if let (Some(limit), Some(len)) = (body_limit, declared_len)
            && len > limit
        {
            return fail(Failure::BodyTooLarge);
        }

        let peer = req
            .extensions()
            .get::<ClientAddr>()
            .map(|a| a.0)
            .or(peer)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let upgrading = hop::is_upgrade(req.headers());
        // HTTP/2 multiplexes (and upgrades hand the connection over): both
        // use the pool.
        let slot = slot.filter(|_| !upgrading && req.version() <= Version::HTTP_11);
        let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));

        // One host per request (RFC 9112 §3.2, RFC 9113 §8.3.1): with two,
        // the explanation, the forwarding headers and the upstream could each
        // believe a different one.
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host_header = hosts.next().cloned();
        if hosts.next().is_some() {
            return fail(Failure::AmbiguousHost);
        }
        // One set of credentials (as nginx requires): with two, the
        // explanation and the upstream could each see a different caller.
        let mut credentials = req.headers().get_all(header::AUTHORIZATION).iter();
        if credentials.next().is_some() && credentials.next().is_some() {
            return fail(Failure::AmbiguousCredentials);
        }
        // Over HTTP/1.1 an absolute-form target wins over `Host` (RFC 9112
        // §3.2.2); over HTTP/2 the two must agree.
        if req.version() == Version::HTTP_2
            && let (Some(host), Some(authority)) = (&host_header, req.uri().authority())
            && !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return fail(Failure::AmbiguousHost);
        }
        let (mut parts, body) = req.into_parts();
        let authority = || {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        };
        let host = if parts.version <= Version::HTTP_11 && parts.uri.authority().is_some() {
            // Absolute form: the target's authority is the host, and the
            // upstream gets it as `Host` (RFC 9112 §3.2.2).
            let host = authority();
            if let Some(host) = &host {
                parts.headers.insert(header::HOST, host.clone());
            }
            host
        } else {
            host_header.or_else(authority)
        };
        hop::strip_hop_by_hop(&mut parts.headers, upgrading);
        parts.headers.remove(header::EXPECT);
        join_cookies(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST)
            && let Some(host) = &host
        {
            parts.headers.insert(header::HOST, host.clone());
        }
        let trusted = config.is_trusted_proxy(peer.ip());
        // The identity header says who a trusted proxy authenticated; from
        // anyone else it is a claim the upstream must not see either (the
        // layer already ignores it).
        if !trusted && let Some(name) = config.identity_header() {
            parts.headers.remove(name);
        }
        hop::set_forwarding(
            &mut parts.headers,
            &Hop {
                peer,
                trusted,
                proto: "http",
                host,
            },
        );
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.version = Version::HTTP_11;
        let limit = body_limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));

        if let (Some(slot), Some(direct)) = (slot, &self.direct) {
            // Written as is on our own connection: origin form, and a `Host`
            // even when the client sent none (HTTP/1.0), as HTTP/1.1 needs.
            parts.uri = Uri::from(path);
            if !parts.headers.contains_key(header::HOST) {
                parts.headers.insert(header::HOST, direct.host.clone());
            }
            let outbound = Request::from_parts(parts, Limited::new(body, limit));
            let exchange = direct::exchange(&slot, &direct.connector, &direct.uri, outbound);
            let (response, link) =
                match tokio::time::timeout(limits.upstream_response_timeout, exchange).await {
                    Err(_elapsed) => return fail(Failure::Timeout),
                    Ok(Err(e)) => return broke(e.as_ref()),
                    Ok(Ok(pair)) => pair,
                };
            let (mut parts, body) = response.into_parts();
            upstream_head(&mut parts);
            let body = ProxyBody::direct(body, limits.idle_timeout, link, slot);
            return Response::from_parts(parts, body);
        }

        let Ok(uri) = Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query(path)
            .build()
        else {
            return fail(Failure::UriTooLong);
        };
        parts.uri = uri;
        let outbound = Request::from_parts(parts, Limited::new(body, limit));

        // A place under the cap, waited for as long as a connection to the
        // upstream may take: a full proxy says so (503), it is not the
        // upstream's fault.
        let waited = tokio::time::timeout(
            limits.upstream_connect_timeout,
            self.pooled.clone().acquire_owned(),
        )
        .await;
        let Ok(Ok(permit)) = waited else {
            return fail(Failure::Busy);
        };
        let response = tokio::time::timeout(
            limits.upstream_response_timeout,
            self.client.request(outbound),
        )
        .await;
        let mut response = match response {
            Err(_elapsed) => return fail(Failure::Timeout),
            Ok(Err(e)) => return broke(&e),
            Ok(Ok(response)) => response,
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let idle = limits.idle_timeout;
            let stopping = self.stopping.clone();
            tokio::spawn(async move {
                let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await)
                else {
                    tracing::debug!(target: "whydenied", "an upgrade was not completed");
                    return;
                };
                super::conn::tunnel(TokioIo::new(client), TokioIo::new(upstream), idle, stopping)
                    .await;
            });
            let (mut parts, body) = response.into_parts();
            hop::strip_hop_by_hop(&mut parts.headers, true);
            return Response::from_parts(
                parts,
                ProxyBody::upstream(body, limits.idle_timeout, permit),
            );
        }

        let (mut parts, body) = response.into_parts();
        upstream_head(&mut parts);
        Response::from_parts(
            parts,
            ProxyBody::upstream(body, limits.idle_timeout, permit),
        )
    }
}

/// Header hygiene on an upstream response (not an upgrade), and the reason
/// phrase of an error kept for the explanation.
pub(super) fn upstream_head(parts: &mut http::response::Parts) {
    hop::strip_hop_by_hop(&mut parts.headers, false);
    if parts.status.is_client_error() || parts.status.is_server_error() {
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        if let Some(reason) = reason {
            parts
                .extensions
                .insert(crate::policy::UpstreamReason(reason));
        }
    }
}

/// Over HTTP/1.1 there is one `Cookie` header; HTTP/2 may split it.
fn join_cookies(headers: &mut http::HeaderMap) {
    if headers.get_all(header::COOKIE).iter().count() < 2 {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

pub(super) fn classify(e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return Failure::BodyTooLarge;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return Failure::Timeout;
        }
        source = err.source();
    }
    Failure::Refused
}

/// The explained response to a failure of the proxy, logged with its id (the
/// caller is asked to report it), the upstream and the error, if any.
pub(super) fn failure(
    f: Failure,
    accept: Option<&HeaderValue>,
    head: bool,
    upstream: &Authority,
    error: Option<&(dyn std::error::Error + 'static)>,
) -> Response<ProxyBody> {
    metrics::counter!("whydenied_upstream_errors_total", "kind" => f.kind()).increment(1);
    let (status, title, detail, step, admin) = match f {
        Failure::Refused => (
            StatusCode::BAD_GATEWAY,
            "The service did not answer",
            "The service behind this proxy refused or dropped the connection, so your request got no answer.",
            "Try again in a moment. If it keeps failing, report the denial id.",
            Some("Check that the upstream service is running and accepting connections."),
        ),
        Failure::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "The service did not answer in time",
            "The service behind this proxy took too long to answer your request.",
            "Try again in a moment. If it keeps failing, report the denial id.",
            Some("Check the upstream service's latency and the proxy's upstream timeouts."),
        ),
        Failure::BodyTooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "The request body is too large",
            "The request body is larger than this service accepts.",
            "Send a smaller body, or split the upload.",
            None,
        ),
        Failure::UriTooLong => (
            StatusCode::URI_TOO_LONG,
            "The request URL is too long",
            "The request URL is longer than this service accepts.",
            "Shorten the URL, for example by moving parameters into a request body.",
            None,
        ),
        Failure::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            "The service is busy",
            "This proxy already has as many requests in flight to the service as it allows, so yours was not sent.",
            "Try again in a moment. If it keeps failing, report the denial id.",
            Some("Raise limits.max_connections, or add capacity behind this proxy."),
        ),
        Failure::AmbiguousHost => (
            StatusCode::BAD_REQUEST,
            "The request names more than one host",
            "The request carries more than one Host header, or a Host header that differs from the host in its URL, so it is not clear which service it is for.",
            "Send the request with one Host header.",
            None,
        ),
        Failure::AmbiguousCredentials => (
            StatusCode::BAD_REQUEST,
            "The request carries more than one set of credentials",
            "The request has more than one Authorization header, so it is not clear who is asking.",
            "Send the request with one Authorization header.",
            None,
        ),
    };
    let id = DenialId::random().unwrap_or_else(|_| DenialId::from_bytes([0; 16]));
    match error {
        Some(e) => tracing::warn!(
            target: "whydenied",
            denial_id = %id,
            status = status.as_u16(),
            kind = f.kind(),
            upstream = %upstream,
            error = %ErrorChain(e),
            "proxy failure"
        ),
        None => tracing::warn!(
            target: "whydenied",
            denial_id = %id,
            status = status.as_u16(),
            kind = f.kind(),
            "proxy failure"
        ),
    }
    let explanation = proxy_failure(status, id, title, detail, step, admin);
    crate::render::response(&explanation, accept, head).map(|body| ProxyBody::Local {
        body: Full::new(body),
    })
}

/// An error and its sources, as one line (`a: b: c`).
pub(super) struct ErrorChain<'a>(pub(super) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        // Bounded: a cyclic or endless chain is not followed for ever.
        for _ in 0..8 {
            let Some(e) = source else { break };
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
