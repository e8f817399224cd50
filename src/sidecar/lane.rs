//! The fast lane: plain HTTP/1.1 exchanges relayed without building HTTP
//! messages.
//!
//! Most of what a sidecar sees is the same exchange over and over: an
//! HTTP/1.1 request without a body on a keep-alive connection, answered with
//! something that is not a denial. For those, hyper's server and client
//! build two header maps, two messages and a body per request and write
//! them back out; this lane parses the request head with hyper's own parser
//! (`httparse`), writes the upstream request head straight from the bytes it
//! read (with the same header hygiene and forwarding headers as
//! [`super::proxy`]), and relays the response head and body as bytes, with
//! its framing checked. Nothing is allocated per request (only a `Date`
//! header for an upstream that sends none, and a trusted proxy's chains of
//! forwarding headers, allocate).
//!
//! It takes only what it can do as the hyper path does (one difference: a
//! response whose body runs until the upstream closes ends the client
//! connection too, where hyper would frame it as chunked), and hands
//! everything else to it, at a request boundary, with the bytes it has read
//! ([`Outcome::Hyper`]): HTTP/1.0, HTTP/2 (prior knowledge or `h2c`),
//! upgrades, `Expect`, any request body or `Transfer-Encoding`, absolute-form
//! targets, `CONNECT`, a missing or repeated `Host`, repeated
//! `Authorization` or `Cookie`, `Connection` options other than
//! `keep-alive` and `close`, heads over the limits (hyper answers 413, 414,
//! 431, 400), self-service requests, and anything `httparse` refuses. Once
//! handed over, a connection stays with hyper.
//!
//! A response the layer intercepts (a denial) is turned into an
//! `http::Response` whose body reads from the upstream connection, given to
//! the same [`ExplainLayer`] as the hyper path, and the explained answer is
//! written out; so are the proxy's own failures (502, 504). Framing the
//! upstream gets wrong (`Content-Length` with `Transfer-Encoding`, two
//! lengths, a coding other than `chunked`, a malformed chunk) is a 502 or,
//! mid-body, a closed connection: never bytes passed on as a new message.
//!
//! Timeouts are those of the hyper path: the next request head within
//! `header_read_timeout` (of accept, or of the previous response), the
//! upstream's response head within `upstream_response_timeout`, and no read
//! or write waiting longer than `idle_timeout`. They share one timer per
//! connection, moved only when it fires before the current deadline or a
//! deadline comes earlier than it, so a request usually costs no timer
//! operation.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer as _;
use tower_service::Service;

use super::conn::{Conn, Registered, Stopping};
use super::hop;
use super::proxy::{self, Failure};
use crate::config::{Config, ConfigHandle, Limits};
use crate::layer::ExplainLayer;

/// Header lines parsed at most (more: hyper answers 431 when over the limit).
const MAX_HEADERS: usize = 128;
/// Largest upstream response head.
const MAX_UPSTREAM_HEAD: usize = 64 * 1024;
/// Bytes read at a time.
const READ_SIZE: usize = 16 * 1024;

/// What a connection's time in the lane ended with.
pub enum Outcome {
    /// The connection is finished.
    Closed,
    /// The rest is hyper's: the connection and the bytes read from it that
    /// no exchange used (the start of the next request).
    Hyper {
        /// The connection.
        stream: TcpStream,
        /// Bytes read and not used.
        read: BytesMut,
        /// Whether the lane served requests on it first (it is then an
        /// HTTP/1.1 connection: no switch to HTTP/2 mid-way).
        served: bool,
    },
}

/// The fast lane of one listener.
pub struct Lane {
    config: ConfigHandle,
    layer: ExplainLayer,
    connector: HttpConnector,
    upstream: Uri,
    stopping: Arc<Stopping>,
}

impl Lane {
    /// A lane to the plain `http://` upstream `upstream`, explaining with
    /// `layer` (the one the hyper path uses).
    pub fn new(
        config: ConfigHandle,
        layer: ExplainLayer,
        upstream: Uri,
        stopping: Arc<Stopping>,
    ) -> Self {
        let limits = config.load().limits().clone();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.upstream_connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        Self {
            config,
            layer,
            connector,
            upstream,
            stopping,
        }
    }

    /// Serves `client` until the connection ends or needs hyper.
    pub async fn serve(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        conn: &Arc<Conn>,
        limits: &Limits,
    ) -> Outcome {
        let registered = self.stopping.register().await;
        let mut c = Connection {
            client,
            buf: BytesMut::with_capacity(READ_SIZE),
            up: None,
            out: Vec::with_capacity(2048),
            timer: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            peer,
            limits: limits.clone(),
            registered,
            started: Instant::now(),
        };
        let mut idle_since = Instant::now();
        let mut served = false;
        loop {
            let head_due = idle_since + limits.header_read_timeout;
            // Bytes already looked at: a head can only be complete once a
            // line ends, so a client that trickles a head byte by byte does
            // not make us parse it again for every byte.
            let mut looked = 0;
            let plan = loop {
                let config = self.config.load();
                let line_ended = memchr::memchr(b'\n', &c.buf[looked..]).is_some();
                looked = c.buf.len();
                if line_ended {
                    c.out.clear();
                    match plan(&c.buf, &config, &c.limits, peer, &mut c.out) {
                        Parse::Complete(plan) => break (plan, config),
                        Parse::Partial => {}
                        Parse::Other => return c.into_hyper(served),
                    }
                }
                // Over the limit: hyper answers it (431 or 414).
                if c.buf.len() >= c.limits.max_header_bytes {
                    return c.into_hyper(served);
                }
                match c.read_client(head_due).await {
                    Ok(true) => {}
                    // Closed, the header timeout, or the listener stops.
                    Ok(false) | Err(_) => return Outcome::Closed,
                }
            };
            let (plan, config) = plan;
            conn.begin(false);
            let started = Instant::now();
            c.started = started;
            let status = match self.exchange(&mut c, &plan, &config, started).await {
                Ok(status) => status,
                Err(answered) => {
                    if let Some((status, took)) = answered {
                        super::server::record_request(status, took);
                    }
                    return Outcome::Closed;
                }
            };
            super::server::record_request(status.code, status.took);
            if status.close {
                let _ = tokio::time::timeout(limits.idle_timeout, c.client.shutdown()).await;
                return Outcome::Closed;
            }
            c.buf.advance(plan.head_len);
            idle_since = Instant::now();
            served = true;
        }
    }

    /// One exchange: the request (already written to `c.out`) to the
    /// upstream, the answer to the client. `Err` closes the connection
    /// (with the status answered, if one was).
    async fn exchange(
        &self,
        c: &mut Connection,
        plan: &Plan,
        config: &Arc<Config>,
        started: Instant,
    ) -> Result<Answered, Option<(u16, Duration)>> {
        let close = plan.close || c.stopping();
        // The kept upstream connection, if the upstream has not closed it.
        let kept = c.up.take().filter(Upstream::open);
        let mut up = match kept {
            Some(up) => up,
            None => match tokio::select! {
                biased;
                () = c.registered.aborted() => return Err(None),
                up = self.connect(started + c.limits.upstream_connect_timeout) => up,
            } {
                Ok(up) => up,
                Err((f, why)) => return self.failed(c, f, plan, why, close).await,
            },
        };
        let write_due = Instant::now() + c.limits.idle_timeout;
        let write = up.stream.write_all(&c.out);
        if !matches!(
            within(&mut c.timer, &c.registered, write_due, write).await,
            Some(Ok(()))
        ) {
            return self
                .failed(
                    c,
                    Failure::Refused,
                    plan,
                    Some("the request could not be written".into()),
                    close,
                )
                .await;
        }
        // The response head (informational ones are skipped, as hyper's
        // client does).
        let head_due = started + c.limits.upstream_response_timeout;
        let head = loop {
            // A stop while the upstream answered: this is the last response.
            let last = close || c.stopping();
            let relay = |status, framing| {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                (!config.intercepts(status)).then_some(last || framing == Framing::UntilClose)
            };
            match response_head(&up.buf, plan.is_head_method, &mut c.out, relay) {
                Head::Complete(head) if head.status < 200 => {
                    up.buf.advance(head.len);
                    continue;
                }
                Head::Complete(head) => break head,
                Head::Bad(why) => {
                    return self
                        .failed(c, Failure::Refused, plan, Some(why.into()), close)
                        .await;
                }
                Head::Partial if up.buf.len() >= MAX_UPSTREAM_HEAD => {
                    return self
                        .failed(
                            c,
                            Failure::Refused,
                            plan,
                            Some("the response head is too large".into()),
                            close,
                        )
                        .await;
                }
                Head::Partial => {}
            }
            up.buf.reserve(READ_SIZE);
            let read = up.stream.read_buf(&mut up.buf);
            match within(&mut c.timer, &c.registered, head_due, read).await {
                None => return self.failed(c, Failure::Timeout, plan, None, close).await,
                Some(Ok(0)) | Some(Err(_)) => {
                    return self
                        .failed(
                            c,
                            Failure::Refused,
                            plan,
                            Some("the upstream closed the connection".into()),
                            close,
                        )
                        .await;
                }
                Some(Ok(_)) => {}
            }
        };
        let Some(close) = head.relayed else {
            return self.explain(c, plan, head, up, close).await;
        };
        up.buf.advance(head.len);
        let status = head.status;
        let took = started.elapsed();
        match relay_body(c, &mut up, head.framing).await {
            Ok(()) => {
                if head.reusable && up.buf.is_empty() {
                    c.up = Some(up);
                }
                Ok(Answered {
                    code: status,
                    close,
                    took,
                })
            }
            Err(()) => Err(Some((status, took))),
        }
    }

    async fn connect(&self, due: Instant) -> Result<Upstream, (Failure, Option<String>)> {
        let mut connector = self.connector.clone();
        let connect = connector.call(self.upstream.clone());
        match tokio::time::timeout_at(due, connect).await {
            Ok(Ok(io)) => {
                metrics::gauge!(UPSTREAM_GAUGE).increment(1.0);
                Ok(Upstream {
                    stream: io.into_inner(),
                    buf: BytesMut::with_capacity(READ_SIZE),
                })
            }
            // The error and its causes, for the log line.
            Ok(Err(e)) => Err((proxy::classify(&e), Some(proxy::ErrorChain(&e).to_string()))),
            Err(_) => Err((Failure::Timeout, None)),
        }
    }

    /// Answers a failure of the proxy (502, 504), explained as the hyper
    /// path explains it.
    async fn failed(
        &self,
        c: &mut Connection,
        f: Failure,
        plan: &Plan,
        why: Option<String>,
        close: bool,
    ) -> Result<Answered, Option<(u16, Duration)>> {
        // The grace period ended the wait: not the upstream's failure, and
        // nothing is answered (as on the hyper path).
        if c.registered.is_aborted() {
            return Err(None);
        }
        let close = close || c.stopping();
        let error = why.map(io::Error::other);
        let request = plan.rebuild(&c.buf);
        let accept = request
            .as_ref()
            .and_then(|r| r.headers().get(header::ACCEPT));
        let authority = self
            .upstream
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("upstream"));
        let response = proxy::failure(
            f,
            accept,
            plan.is_head_method,
            &authority,
            error
                .as_ref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
        );
        let code = response.status().as_u16();
        let took = c.started.elapsed();
        match write_response(c, response, plan.is_head_method, close).await {
            Ok(()) => Ok(Answered { code, close, took }),
            Err(()) => Err(Some((code, took))),
        }
    }

    /// Hands an intercepted response to the explaining layer and writes
    /// what it makes of it.
    async fn explain(
        &self,
        c: &mut Connection,
        plan: &Plan,
        head: ResponseHead,
        mut up: Upstream,
        close: bool,
    ) -> Result<Answered, Option<(u16, Duration)>> {
        let Some(request) = plan.rebuild(&c.buf) else {
            // Not expected (the lane takes only heads `http` can hold);
            // never a silent close, and never the upstream's answer unseen.
            return self
                .failed(
                    c,
                    Failure::Refused,
                    plan,
                    Some("the request could not be read again".into()),
                    close,
                )
                .await;
        };
        let Some(mut parts) = head.parts(&up.buf[..head.len]) else {
            return self
                .failed(
                    c,
                    Failure::Refused,
                    plan,
                    Some("the response head is not valid".into()),
                    close,
                )
                .await;
        };
        proxy::upstream_head(&mut parts);
        up.buf.advance(head.len);
        let returned = Arc::new(Mutex::new(None));
        let body = UpstreamBody {
            up: Some(up),
            framing: head.framing,
            chunks: Chunks::default(),
            left: match head.framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            idle: Box::pin(tokio::time::sleep(c.limits.idle_timeout)),
            timeout: c.limits.idle_timeout,
            armed: false,
            reusable: head.reusable,
            returned: returned.clone(),
        };
        let prepared = Prepared(Some(Response::from_parts(parts, body)));
        let mut service = self.layer.layer(prepared).with_client_addr(c.peer);
        // The layer reads the body's first part: each read is bounded by the
        // idle timeout (in `UpstreamBody`), as on the hyper path; here only
        // the end of the grace period is added.
        let due = Instant::now() + Duration::from_secs(86_400);
        let response = match within(&mut c.timer, &c.registered, due, service.call(request)).await {
            Some(Ok(response)) => response,
            Some(Err(never)) => match never {},
            None => return Err(None),
        };
        let code = response.status().as_u16();
        let took = c.started.elapsed();
        // The answer is framed here, whatever the upstream's framing was.
        let close = close || c.stopping();
        let written = write_response(c, response, plan.is_head_method, close).await;
        if let Some(up) = returned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            c.up = Some(up);
        }
        match written {
            Ok(()) => Ok(Answered { code, close, took }),
            Err(()) => Err(Some((code, took))),
        }
    }
}

/// Upstream connections held by client connections (the same gauge as the
/// hyper path's).
const UPSTREAM_GAUGE: &str = "whydenied_upstream_connections";

/// What was answered.
struct Answered {
    code: u16,
    close: bool,
    /// Time to the response head (what the hyper path's request duration
    /// measures).
    took: Duration,
}

/// One client connection in the lane.
struct Connection {
    client: TcpStream,
    buf: BytesMut,
    up: Option<Upstream>,
    out: Vec<u8>,
    timer: Pin<Box<Sleep>>,
    peer: SocketAddr,
    limits: Limits,
    registered: Registered,
    /// When the current exchange began.
    started: Instant,
}

impl Connection {
    fn into_hyper(self, served: bool) -> Outcome {
        Outcome::Hyper {
            stream: self.client,
            read: self.buf,
            served,
        }
    }

    fn stopping(&self) -> bool {
        self.registered.is_stopped()
    }

    /// Reads more of the client's next request. `Ok(false)`: the client
    /// closed, the time ran out, or the listener stops while no request has
    /// begun.
    async fn read_client(&mut self, due: Instant) -> io::Result<bool> {
        if self.buf.is_empty() && self.stopping() {
            return Ok(false);
        }
        self.buf.reserve(READ_SIZE);
        if self.timer.deadline() > due {
            self.timer.as_mut().reset(due);
        }
        let waiting_for_start = self.buf.is_empty();
        loop {
            tokio::select! {
                biased;
                read = self.client.read_buf(&mut self.buf) => return read.map(|n| n > 0),
                () = self.registered.aborted() => return Ok(false),
                () = self.registered.stopped(), if waiting_for_start => return Ok(false),
                () = self.timer.as_mut() => {
                    if Instant::now() >= due {
                        return Ok(false);
                    }
                    self.timer.as_mut().reset(due);
                }
            }
        }
    }

    /// Writes all of `data` to the client, waiting at most the idle
    /// timeout for the client to read.
    async fn write_client(&mut self, data: &[u8]) -> Result<(), ()> {
        let due = Instant::now() + self.limits.idle_timeout;
        let io = self.client.write_all(data);
        match within(&mut self.timer, &self.registered, due, io).await {
            Some(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }
}

/// Runs `io` until `due`; `None` if the time ran out, or the grace period
/// after a stop is over. The connection's one timer is moved only when it
/// fires before `due`, so a request usually costs no timer operation.
async fn within<F: Future>(
    timer: &mut Pin<Box<Sleep>>,
    registered: &Registered,
    due: Instant,
    io: F,
) -> Option<F::Output> {
    if timer.deadline() > due {
        timer.as_mut().reset(due);
    }
    tokio::pin!(io);
    loop {
        tokio::select! {
            biased;
            out = &mut io => return Some(out),
            () = registered.aborted() => return None,
            () = timer.as_mut() => {
                if Instant::now() >= due {
                    return None;
                }
                timer.as_mut().reset(due);
            }
        }
    }
}

/// An upstream connection and the bytes read from it that no response used.
struct Upstream {
    stream: TcpStream,
    buf: BytesMut,
}

impl Upstream {
    /// Whether a kept connection can carry another request: the upstream
    /// has not closed it (or sent anything unasked). Usually no system call:
    /// tokio knows the socket has not become readable.
    fn open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        metrics::gauge!(UPSTREAM_GAUGE).decrement(1.0);
    }
}

/// What a request head said, kept for its exchange.
struct Plan {
    head_len: usize,
    is_head_method: bool,
    close: bool,
}

impl Plan {
    /// The request as the explaining layer reads it (parsed again from the
    /// bytes still in the buffer: only an intercepted response needs it).
    fn rebuild(&self, buf: &[u8]) -> Option<Request<Empty<Bytes>>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(&buf[..self.head_len]).ok()?;
        let mut builder = Request::builder()
            .method(req.method?)
            .uri(req.path?)
            .version(http::Version::HTTP_11);
        for h in req.headers.iter() {
            builder = builder.header(
                HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                HeaderValue::from_bytes(h.value).ok()?,
            );
        }
        builder.body(Empty::new()).ok()
    }
}

/// What parsing a request head gave.
enum Parse {
    Complete(Plan),
    Partial,
    /// Not for the lane: hyper's.
    Other,
}

/// Parses a request head and, if the lane can take it, writes the head the
/// upstream gets into `out`.
fn plan(
    buf: &[u8],
    config: &Config,
    limits: &Limits,
    peer: SocketAddr,
    out: &mut Vec<u8>,
) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Other,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parse::Other;
    };
    if head_len > limits.max_header_bytes {
        return Parse::Other;
    }
    if method == "CONNECT"
        || !path.starts_with('/')
        // hyper refuses targets over 65 534 bytes (414), whatever the limit.
        || path.len() > limits.max_uri_bytes.min(65_534)
        || req.headers.len() > limits.max_headers
        // Anything but the plain characters of a path and query (RFC 3986)
        // is hyper's to accept or refuse: `<`, `"`, a fragment, ...
        || !path.bytes().all(plain_target_byte)
    {
        return Parse::Other;
    }
    if let Some(ss) = &config.events().self_service
        && path.starts_with(ss.prefix.as_str())
    {
        return Parse::Other;
    }
    let ip = crate::config::canonical(peer.ip());
    let trusted = config.is_trusted_proxy(ip);
    let identity = config.identity_header().map(HeaderName::as_str);
    let mut host: Option<&[u8]> = None;
    let (mut hosts, mut authorizations, mut cookies, mut lengths) = (0, 0, 0, 0);
    let mut close = false;
    // From a trusted proxy, the chains we extend and whether it set these.
    let (mut forwarded_for, mut forwarded): (Vec<&[u8]>, Vec<&[u8]>) = (Vec::new(), Vec::new());
    let (mut has_proto, mut has_host) = (false, false);

    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.len() > 65_535 {
            // Longer than `http` allows a header name: hyper's to refuse.
            return Parse::Other;
        }
        let is = |word: &str| name.eq_ignore_ascii_case(word.as_bytes());
        let keep = match name.len() {
            2 if is("te") => return Parse::Other,
            4 if is("host") => {
                hosts += 1;
                host = Some(h.value);
                true
            }
            6 if is("expect") => return Parse::Other,
            6 if is("cookie") => {
                cookies += 1;
                true
            }
            7 if is("upgrade") => return Parse::Other,
            10 if is("connection") => {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        return Parse::Other;
                    }
                }
                false
            }
            10 if is("keep-alive") => false,
            13 if is("authorization") => {
                authorizations += 1;
                true
            }
            14 if is("content-length") => {
                lengths += 1;
                if h.value.trim_ascii() != b"0" || lengths > 1 {
                    return Parse::Other;
                }
                true
            }
            14 if is("http2-settings") => return Parse::Other,
            16 if is("proxy-connection") => false,
            17 if is("transfer-encoding") => return Parse::Other,
            18 if is("proxy-authenticate") => false,
            19 if is("proxy-authorization") => false,
            _ if hop::is_client_claim_name(name) => {
                if !trusted {
                    false
                } else if is("x-forwarded-for") {
                    forwarded_for.push(h.value);
                    false
                } else if is("forwarded") {
                    forwarded.push(h.value);
                    false
                } else {
                    has_proto |= is("x-forwarded-proto");
                    has_host |= is("x-forwarded-host");
                    true
                }
            }
            _ => true,
        };
        // The identity header is a claim from anyone but a trusted proxy,
        // whatever its name.
        let keep = keep && (trusted || !identity.is_some_and(is));
        if keep {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    if hosts != 1 || authorizations > 1 || cookies > 1 {
        return Parse::Other;
    }
    // The forwarding headers, as `hop::set_forwarding` sets them; the
    // address is written once and copied.
    out.extend_from_slice(b"x-forwarded-for: ");
    for value in &forwarded_for {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    let ip_at = out.len();
    hop::push_ip(out, ip);
    let ip_end = out.len();
    if !has_proto {
        out.extend_from_slice(b"\r\nx-forwarded-proto: http");
    }
    if !has_host && let Some(host) = host {
        out.extend_from_slice(b"\r\nx-forwarded-host: ");
        out.extend_from_slice(host);
    }
    out.extend_from_slice(b"\r\nforwarded: ");
    for value in &forwarded {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    let mut ip_text = [0u8; 48];
    let ip_len = ip_end - ip_at;
    ip_text[..ip_len].copy_from_slice(&out[ip_at..ip_end]);
    hop::forwarded_element(out, &ip_text[..ip_len], ip.is_ipv4(), "http", host);
    out.extend_from_slice(b"\r\n\r\n");
    Parse::Complete(Plan {
        head_len,
        is_head_method: method == "HEAD",
        close,
    })
}

/// The bytes of a request target the lane forwards as they are: the
/// unreserved and sub-delimiter characters, `:`, `@`, `/`, `?` and `%`.
fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'?'
                | b'%'
        )
}

/// How a response body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body (a response to HEAD, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// A parsed upstream response head.
struct ResponseHead {
    len: usize,
    status: u16,
    framing: Framing,
    /// The upstream keeps the connection open after this response.
    reusable: bool,
    /// `Some(close)` when the client's head was written (relayed, not
    /// explained), saying whether it ends the connection.
    relayed: Option<bool>,
}

impl ResponseHead {
    /// The head as `http` parts, for the explaining layer.
    fn parts(&self, bytes: &[u8]) -> Option<http::response::Parts> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        res.parse(bytes).ok()?;
        let mut builder = Response::builder().status(self.status);
        for h in res.headers.iter() {
            builder = builder.header(
                HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                HeaderValue::from_bytes(h.value).ok()?,
            );
        }
        let status = StatusCode::from_u16(self.status).ok()?;
        if let Some(reason) = res.reason
            && Some(reason) != status.canonical_reason()
            && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.as_bytes().to_vec())
        {
            builder = builder.extension(reason);
        }
        let (parts, ()) = builder.body(()).ok()?.into_parts();
        Some(parts)
    }
}

enum Head {
    Complete(ResponseHead),
    Partial,
    Bad(&'static str),
}

/// Parses an upstream response head and decides how its body is framed
/// (RFC 9112 §6.3), refusing what could be read two ways.
///
/// For a final response, `relay(status, framing)` says whether it is relayed
/// as it is (`Some(close)`: the client's head is then written to `out`,
/// from this one parse) or not (`None`: intercepted, for the layer).
fn response_head(
    buf: &[u8],
    request_was_head: bool,
    out: &mut Vec<u8>,
    relay: impl FnOnce(u16, Framing) -> Option<bool>,
) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Bad("the response head is not valid HTTP/1.1"),
    };
    let (Some(status), Some(version)) = (res.code, res.version) else {
        return Head::Bad("the response head is not valid HTTP/1.1");
    };
    if status == 101 {
        return Head::Bad("the upstream switched protocols unasked");
    }
    if !(100..=599).contains(&status) {
        return Head::Bad("the upstream answered a status outside 100-599");
    }
    let mut length: Option<u64> = None;
    let mut lengths = 0;
    let mut codings = 0;
    let mut chunked = false;
    let mut close = version == 0;
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            length = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse().ok());
            if length.is_none() {
                return Head::Bad("the upstream sent an invalid Content-Length");
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings += 1;
            chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if version == 0 && token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
    }
    let no_body = request_was_head || status < 200 || status == 204 || status == 304;
    let framing = if no_body {
        Framing::None
    } else if codings > 0 {
        if codings > 1 || !chunked || lengths > 0 {
            return Head::Bad("the upstream's message framing is ambiguous");
        }
        Framing::Chunked
    } else if lengths > 1 {
        return Head::Bad("the upstream sent two Content-Length headers");
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let relayed = if status < 200 {
        None
    } else {
        relay(status, framing)
    };
    if let Some(close) = relayed {
        out.clear();
        write_response_head(out, &res, status, framing, close);
    }
    Head::Complete(ResponseHead {
        len,
        status,
        framing,
        reusable: !close && framing != Framing::UntilClose,
        relayed,
    })
}

/// Writes the client's response head: the upstream's status line and
/// headers, without hop-by-hop ones (and those `Connection` names), with
/// `Transfer-Encoding: chunked` kept as the framing the bytes carry, and
/// `Connection: close` when the connection ends after it.
fn write_response_head(
    out: &mut Vec<u8>,
    res: &httparse::Response<'_, '_>,
    status: u16,
    framing: Framing,
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status);
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Headers that `Connection` names are hop-by-hop too (the first 32
    // tokens, as on the hyper path).
    let mut named: [&[u8]; 32] = [&[]; 32];
    let mut count = 0;
    // Counted as `hop::strip_hop_by_hop` counts them: values that are not
    // visible ASCII are skipped, every piece between commas counts.
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection")
            && h.value
                .iter()
                .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
        {
            for token in h.value.split(|b| *b == b',') {
                if count < named.len() {
                    named[count] = token.trim_ascii();
                    count += 1;
                }
            }
        }
    }
    let named = &named[..count];
    let mut dated = false;
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let is = |word: &str| name.eq_ignore_ascii_case(word.as_bytes());
        if is("connection")
            || is("keep-alive")
            || is("proxy-connection")
            || is("proxy-authenticate")
            || is("proxy-authorization")
            || is("te")
            || is("transfer-encoding")
            || is("upgrade")
            || named.iter().any(|t| name.eq_ignore_ascii_case(t))
        {
            continue;
        }
        dated |= is("date");
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !dated {
        push_date(out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A status code's three digits.
fn push_status(out: &mut Vec<u8>, status: u16) {
    let status = status.min(999);
    for d in [status / 100, status / 10 % 10, status % 10] {
        out.push(b'0' + d as u8);
    }
}

/// A `Date` header, as hyper's server adds one to a response without.
fn push_date(out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Relays a response body of `framing` from the upstream to the client,
/// after the head in `c.out`. `Err`: the connection must close (the
/// upstream failed or the client is gone).
async fn relay_body(c: &mut Connection, up: &mut Upstream, framing: Framing) -> Result<(), ()> {
    let mut chunks = Chunks::default();
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    loop {
        // What is buffered and belongs to this body goes out with the head.
        // A chunked body is framed again as it passes (bare sizes, no
        // extensions, no trailers: what hyper sends a client that did not
        // ask for trailers).
        let take = match framing {
            Framing::None => 0,
            Framing::Length(_) => usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(up.buf.len()),
            Framing::Chunked => match chunks.step(&up.buf, Sink::Reframe(&mut c.out)) {
                Ok(n) => {
                    up.buf.advance(n);
                    0
                }
                Err(_) => {
                    // Pass on what was good, then end the connection: the
                    // client sees a body cut short, never a new message.
                    let out = std::mem::take(&mut c.out);
                    let _ = c.write_client(&out).await;
                    return Err(());
                }
            },
            Framing::UntilClose => up.buf.len(),
        };
        c.out.extend_from_slice(&up.buf[..take]);
        up.buf.advance(take);
        if let Framing::Length(_) = framing {
            left -= take as u64;
        }
        let done = match framing {
            Framing::None => true,
            Framing::Length(_) => left == 0,
            Framing::Chunked => chunks.done(),
            Framing::UntilClose => false,
        };
        if !c.out.is_empty() {
            let out = std::mem::take(&mut c.out);
            let written = c.write_client(&out).await;
            c.out = out;
            c.out.clear();
            written?;
        }
        if done {
            return Ok(());
        }
        up.buf.reserve(READ_SIZE);
        let due = Instant::now() + c.limits.idle_timeout;
        let read = within(
            &mut c.timer,
            &c.registered,
            due,
            up.stream.read_buf(&mut up.buf),
        )
        .await;
        match read {
            Some(Ok(0)) if framing == Framing::UntilClose => return Ok(()),
            Some(Ok(n)) if n > 0 => {}
            _ => return Err(()),
        }
    }
}

/// Where a chunked body's framing stands: checked as it passes, so that
/// its end is known and nothing after it is taken for body.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    size: u64,
    /// Hex digits read of the current size (leading zeros included): at
    /// least one must come before the line goes on.
    digits: u32,
    /// Bytes of the current extension or trailer line.
    line: usize,
}

/// Longest chunk extension or trailer line (hyper's limit).
const MAX_CHUNK_LINE: usize = 16 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// One byte of an extension or trailer line (skipped, not relayed): the
    /// line ends at CR (then `next`), holds no other control character, and
    /// is at most [`MAX_CHUNK_LINE`] long.
    fn line_byte(&mut self, b: u8, next: ChunkState) -> Result<(), ()> {
        match b {
            b'\r' => self.state = next,
            0..=8 | 10..=31 | 127 => return Err(()),
            _ => {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    return Err(());
                }
            }
        }
        Ok(())
    }

    /// Reads the framing in `buf`, giving what it carries to `sink`; how
    /// many bytes of `buf` belong to the body, or `Err` with how many came
    /// before the framing broke. Stops at the end of the body.
    fn step(&mut self, buf: &[u8], mut sink: Sink<'_>) -> Result<usize, usize> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        let d = (b as char).to_digit(16).ok_or(i)?;
                        // Leading zeros are fine; a size past u64 is not.
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|n| n.checked_add(u64::from(d)))
                            .ok_or(i)?;
                    }
                    b' ' | b'\t' if self.digits > 0 => self.state = ChunkState::SizeSpace,
                    b';' if self.digits > 0 => self.state = ChunkState::Extension,
                    b'\r' if self.digits > 0 => self.state = ChunkState::SizeLf,
                    _ => return Err(i),
                },
                // After the size only blanks, then `;` or the line's end.
                ChunkState::SizeSpace => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = ChunkState::Extension,
                    b'\r' => self.state = ChunkState::SizeLf,
                    _ => return Err(i),
                },
                ChunkState::Extension => self.line_byte(b, ChunkState::SizeLf).map_err(|()| i)?,
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(i);
                    }
                    self.digits = 0;
                    self.line = 0;
                    if self.size == 0 {
                        self.state = ChunkState::TrailerStart;
                    } else {
                        if let Sink::Reframe(out) = &mut sink {
                            push_hex(out, self.size);
                            out.extend_from_slice(b"\r\n");
                        }
                        self.state = ChunkState::Data;
                    }
                }
                ChunkState::Data => {
                    let n = usize::try_from(self.size)
                        .unwrap_or(usize::MAX)
                        .min(buf.len() - i);
                    match &mut sink {
                        Sink::Data(data) => data.extend_from_slice(&buf[i..i + n]),
                        Sink::Reframe(out) => out.extend_from_slice(&buf[i..i + n]),
                    }
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(i);
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(i);
                    }
                    if let Sink::Reframe(out) = &mut sink {
                        out.extend_from_slice(b"\r\n");
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::EndLf,
                    0..=8 | 10..=31 | 127 => return Err(i),
                    _ => self.state = ChunkState::TrailerLine,
                },
                ChunkState::TrailerLine => {
                    self.line_byte(b, ChunkState::TrailerLf).map_err(|()| i)?
                }
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(i);
                    }
                    self.line = 0;
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err(i);
                    }
                    self.state = ChunkState::Done;
                    if let Sink::Reframe(out) = &mut sink {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    return Ok(i + 1);
                }
                ChunkState::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

/// Where a chunked body's content goes as its framing is read.
enum Sink<'a> {
    /// The data alone (for the explaining layer).
    Data(&'a mut BytesMut),
    /// The data framed again, for the client.
    Reframe(&'a mut Vec<u8>),
}

/// A chunk size in hex.
fn push_hex(out: &mut Vec<u8>, n: u64) {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        let d = ((n >> (shift * 4)) & 0xf) as u8;
        out.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}

/// The inner service the layer wraps for an intercepted response: it
/// answers with the response already read.
struct Prepared(Option<Response<UpstreamBody>>);

impl Service<Request<Empty<Bytes>>> for Prepared {
    type Response = Response<UpstreamBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<UpstreamBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Empty<Bytes>>) -> Self::Future {
        let response = self.0.take().unwrap_or_else(|| {
            let mut res = Response::new(UpstreamBody::empty());
            *res.status_mut() = StatusCode::BAD_GATEWAY;
            res
        });
        std::future::ready(Ok(response))
    }
}

/// The body of an intercepted response, read from the upstream connection
/// with its framing checked; the connection goes to `returned` when the
/// body has been read to its end.
struct UpstreamBody {
    up: Option<Upstream>,
    framing: Framing,
    chunks: Chunks,
    left: u64,
    idle: Pin<Box<Sleep>>,
    timeout: Duration,
    armed: bool,
    reusable: bool,
    returned: Arc<Mutex<Option<Upstream>>>,
}

impl UpstreamBody {
    fn empty() -> Self {
        Self {
            up: None,
            framing: Framing::None,
            chunks: Chunks::default(),
            left: 0,
            idle: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timeout: Duration::ZERO,
            armed: false,
            reusable: false,
            returned: Arc::default(),
        }
    }

    fn finish(&mut self) {
        if let Some(up) = self.up.take()
            && self.reusable
            && up.buf.is_empty()
        {
            *self.returned.lock().unwrap_or_else(PoisonError::into_inner) = Some(up);
        }
    }
}

/// Why an upstream body ended early.
type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            let ended = match this.framing {
                Framing::None => true,
                Framing::Length(_) => this.left == 0,
                Framing::Chunked => this.chunks.done(),
                Framing::UntilClose => false,
            };
            if ended {
                this.finish();
                return Poll::Ready(None);
            }
            let Some(up) = this.up.as_mut() else {
                return Poll::Ready(None);
            };
            if !up.buf.is_empty() {
                let data = match this.framing {
                    Framing::Length(_) => {
                        let n = usize::try_from(this.left)
                            .unwrap_or(usize::MAX)
                            .min(up.buf.len());
                        this.left -= n as u64;
                        up.buf.split_to(n).freeze()
                    }
                    // Decoded: the layer reads the data, not the framing.
                    Framing::Chunked => {
                        let mut data = BytesMut::new();
                        match this.chunks.step(&up.buf, Sink::Data(&mut data)) {
                            Ok(used) => up.buf.advance(used),
                            Err(_) => {
                                this.up = None;
                                return Poll::Ready(Some(Err(
                                    "the upstream's chunked body is malformed".into(),
                                )));
                            }
                        }
                        data.freeze()
                    }
                    _ => up.buf.split().freeze(),
                };
                this.armed = false;
                if !data.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                continue;
            }
            up.buf.reserve(READ_SIZE);
            match up.stream.try_read_buf(&mut up.buf) {
                Ok(0) => {
                    this.up = None;
                    return if this.framing == Framing::UntilClose {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Err("the upstream closed the body early".into())))
                    };
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            match up.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Pending => {}
            }
            if !this.armed {
                this.idle.as_mut().reset(Instant::now() + this.timeout);
                this.armed = true;
            }
            if this.idle.as_mut().poll(cx).is_ready() {
                this.up = None;
                return Poll::Ready(Some(Err(
                    "the upstream sent nothing for the idle timeout".into()
                )));
            }
            return Poll::Pending;
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::None => SizeHint::with_exact(0),
            Framing::Length(_) => SizeHint::with_exact(self.left),
            _ => SizeHint::default(),
        }
    }
}

/// Writes a response made here (an explanation, a failure) to the client:
/// the status line, the headers without framing and connection ones, then
/// the body with `Content-Length` when its size is known, else chunked.
async fn write_response<B>(
    c: &mut Connection,
    response: Response<B>,
    head_request: bool,
    close: bool,
) -> Result<(), ()>
where
    B: Body<Data = Bytes>,
{
    let (parts, body) = response.into_parts();
    let mut out = std::mem::take(&mut c.out);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(&mut out, parts.status.as_u16());
    out.push(b' ');
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let exact = body.size_hint().exact();
    // A response to HEAD, or a 304, says the length of the body it does not
    // carry: its own `Content-Length` is kept.
    let own_length = (head_request || parts.status == StatusCode::NOT_MODIFIED)
        && parts.headers.contains_key(header::CONTENT_LENGTH);
    for (name, value) in &parts.headers {
        if (name == header::CONTENT_LENGTH && !own_length)
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        push_date(&mut out);
    }
    let bodiless_status = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let chunked = match exact {
        _ if bodiless_status || own_length => false,
        Some(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
            false
        }
        None if head_request => false,
        None => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            true
        }
    };
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let written = c.write_client(&out).await;
    c.out = out;
    written?;
    if head_request || bodiless_status {
        return Ok(());
    }
    let mut body = std::pin::pin!(body);
    loop {
        let due = Instant::now() + c.limits.idle_timeout;
        let frame = match within(&mut c.timer, &c.registered, due, body.frame()).await {
            Some(None) => break,
            Some(Some(Ok(frame))) => frame,
            // The body failed part way, stalled, or the grace period is
            // over: the client sees it cut short.
            _ => return Err(()),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let size = format!("{:x}\r\n", data.len());
            c.write_client(size.as_bytes()).await?;
            c.write_client(&data).await?;
            c.write_client(b"\r\n").await?;
        } else {
            c.write_client(&data).await?;
        }
    }
    if chunked {
        c.write_client(b"0\r\n\r\n").await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` to a scanner in pieces of `step` bytes; the client's
    /// bytes, or `None` if the framing broke.
    fn reframe(body: &[u8], step: usize) -> Option<Vec<u8>> {
        let mut chunks = Chunks::default();
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for piece in body.chunks(step) {
            pending.extend_from_slice(piece);
            let used = chunks.step(&pending, Sink::Reframe(&mut out)).ok()?;
            pending.drain(..used);
            if chunks.done() {
                break;
            }
        }
        chunks.done().then_some(out)
    }

    #[test]
    fn chunked_bodies_are_framed_again_however_they_arrive() {
        let body = b"0004;a=b\r\nwiki\r\n5 \t;x\r\npedia\r\n0\r\nx-t: 1\r\n\r\n";
        for step in 1..body.len() {
            assert_eq!(
                reframe(body, step).as_deref(),
                Some(&b"4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n"[..]),
                "step {step}"
            );
        }
        // Junk after a size, a size past u64, a bare LF, an overlong
        // extension: refused.
        let long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE + 1));
        for bad in [
            &b"5 junk\r\nhello\r\n0\r\n\r\n"[..],
            b"11111111111111111\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            long.as_bytes(),
        ] {
            assert_eq!(
                reframe(bad, bad.len()),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn hex_sizes_are_written_bare() {
        for n in [1u64, 9, 10, 15, 16, 255, 4096, u64::MAX] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{n:x}"));
        }
    }
}
