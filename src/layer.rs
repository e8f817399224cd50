//! The Tower layer: [`ExplainLayer`] wraps a service, and every response
//! whose status is intercepted comes out explained.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Empty, Full};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use whydenied::{Config, ExplainLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_yaml_str(r##"
//! policies:
//!   - id: admin-console
//!     title: Administrators only
//!     match: { path: "/admin/**" }
//!     cause: permission
//!     contact: "#platform-help"
//! "##)?;
//!
//! let app = service_fn(|req: Request<Empty<Bytes>>| async move {
//!     let status = if req.uri().path().starts_with("/admin") {
//!         StatusCode::FORBIDDEN
//!     } else {
//!         StatusCode::OK
//!     };
//!     let mut res = Response::new(Full::new(Bytes::from_static(b"upstream says no")));
//!     *res.status_mut() = status;
//!     Ok::<_, Infallible>(res)
//! });
//! let mut svc = ServiceBuilder::new().layer(ExplainLayer::new(config)).service(app);
//!
//! let req = Request::get("/admin/users").header("cookie", "s=1").body(Empty::new())?;
//! let res = svc.ready().await?.call(req).await?;
//! assert_eq!(res.status(), StatusCode::FORBIDDEN); // the status never changes
//! assert!(res.headers().contains_key("x-denial-id"));
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! let body = res.into_body().collect().await?.to_bytes();
//! let problem: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(problem["policy"]["id"], "admin-console");
//! assert_eq!(problem["causes"][0]["cause"], "permission");
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::HeaderMap;
use http::{Method, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ExplainBody;
use crate::config::{Config, ConfigHandle};
use crate::diagnose;
use crate::events::EventSink;
use crate::events::record::{Recorder, denial_event};
use crate::explanation::EscalateLink;
use crate::facts::RequestFacts;
use crate::id::{DenialId, IdError};
use crate::negotiate::Negotiated;
use crate::policy::Upstream;
use crate::render;
use crate::selfservice;

/// The header that carries the denial id.
pub const DENIAL_ID_HEADER: &str = "x-denial-id";

/// Explains intercepted responses of the wrapped service. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct ExplainLayer {
    config: ConfigHandle,
    recorder: Arc<Recorder>,
    trusted_identity_only: bool,
}

impl ExplainLayer {
    /// A layer with a fixed config.
    pub fn new(config: Config) -> Self {
        Self::with_handle(ConfigHandle::new(config))
    }

    /// A layer whose config can be replaced at run time through `handle`.
    pub fn with_handle(handle: ConfigHandle) -> Self {
        let recorder = handle.recorder();
        Self {
            config: handle,
            recorder,
            trusted_identity_only: false,
        }
    }

    /// Also sends every event (denials and escalations) to `sink`. Its `emit`
    /// runs on the request path: it must queue and return.
    pub fn with_event_sink(self, sink: Arc<dyn EventSink>) -> Self {
        self.recorder.add_sink(sink);
        self
    }

    /// Believe the identity header only from `trusted_proxies` (the sidecar
    /// does this; an embedding app decides itself and believes it always).
    pub fn identity_from_trusted_proxies_only(mut self, yes: bool) -> Self {
        self.trusted_identity_only = yes;
        self
    }

    /// Recent denials and the escalation state (for a lookup endpoint).
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    /// The handle to the layer's config, to replace it while running.
    pub fn handle(&self) -> &ConfigHandle {
        &self.config
    }
}

impl<S> Layer<S> for ExplainLayer {
    type Service = Explain<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Explain {
            inner,
            config: self.config.clone(),
            trusted_identity_only: self.trusted_identity_only,
            client_addr: None,
        }
    }
}

/// The service made by [`ExplainLayer`].
#[derive(Clone, Debug)]
pub struct Explain<S> {
    inner: S,
    config: ConfigHandle,
    trusted_identity_only: bool,
    client_addr: Option<SocketAddr>,
}

impl<S> Explain<S> {
    /// Wraps `inner` with `config`.
    pub fn new(inner: S, config: Config) -> Self {
        ExplainLayer::new(config).layer(inner)
    }

    /// The peer address of the connection this service serves, for servers
    /// that make one service per connection (the sidecar does): no
    /// [`ClientAddr`](crate::ClientAddr) extension is then needed on each
    /// request. An extension on a request still takes precedence.
    pub fn with_client_addr(mut self, addr: SocketAddr) -> Self {
        self.client_addr = Some(addr);
        self
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Explain<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: std::fmt::Display,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ExplainBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = self.config.load();
        let mut facts = RequestFacts::capture(&req, &config);
        if facts.peer.is_none() {
            facts.peer = self.client_addr;
        }
        if self.trusted_identity_only
            && facts.identity_header().is_some()
            && !facts.peer.is_some_and(|p| config.is_trusted_proxy(p.ip()))
        {
            facts.drop_identity_header();
        }
        if let Some(settings) = &config.events().self_service
            && req.method() == Method::POST
            && let Some(id) = selfservice::escalate_target(req.uri().path(), &settings.prefix)
        {
            let identity = diagnose::identity_record(&config, &facts);
            let handling = selfservice::handle(
                config.clone(),
                self.config.recorder(),
                facts,
                identity,
                id,
                req,
            );
            return ResponseFuture {
                inner: None,
                pending: None,
                collecting: None,
                local: Some(Box::pin(async move {
                    handling.await.map(ExplainBody::explained)
                })),
            };
        }
        ResponseFuture {
            inner: Some(self.inner.call(req)),
            pending: Some(Pending { config, facts }),
            collecting: None,
            local: None,
        }
    }
}

/// What a request leaves for its response: the config it started on and its facts.
struct Pending {
    config: Arc<Config>,
    facts: RequestFacts,
}

/// A response whydenied makes itself (self-service escalation).
type Local<B> = Pin<Box<dyn Future<Output = Response<ExplainBody<B>>> + Send>>;

pin_project! {
    /// The response future of [`Explain`].
    pub struct ResponseFuture<F, B: Body> {
        #[pin]
        inner: Option<F>,
        pending: Option<Pending>,
        collecting: Option<Box<Collecting<B>>>,
        local: Option<Local<B>>,
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<ExplainBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(local) = this.local.as_mut() {
            return local.as_mut().poll(cx).map(Ok);
        }
        if this.collecting.is_none() {
            let Some(inner) = this.inner.as_pin_mut() else {
                return Poll::Pending;
            };
            let response = ready!(inner.poll(cx))?;
            let intercept = this
                .pending
                .as_ref()
                .is_some_and(|p| p.config.intercepts(response.status()))
                && !response.headers().contains_key(DENIAL_ID_HEADER);
            // The pass-through path: one status check, then out.
            let (true, Some(pending)) = (intercept, this.pending.take()) else {
                return Poll::Ready(Ok(response.map(ExplainBody::inner)));
            };
            let (parts, body) = response.into_parts();
            *this.collecting = Some(Box::new(Collecting::new(pending, parts, body)));
        }
        let Some(collecting) = this.collecting.as_mut() else {
            return Poll::Pending;
        };
        ready!(collecting.poll_read(cx));
        match this.collecting.take() {
            Some(collecting) => Poll::Ready(Ok((*collecting).finish())),
            None => Poll::Pending,
        }
    }
}

/// An intercepted response whose body prefix is being read.
struct Collecting<B: Body> {
    pending: Pending,
    parts: http::response::Parts,
    body: Pin<Box<B>>,
    chunks: VecDeque<Bytes>,
    read: usize,
    trailers: Option<HeaderMap>,
    error: Option<B::Error>,
    ended: bool,
    done: bool,
}

impl<B: Body<Data = Bytes>> Collecting<B> {
    fn new(pending: Pending, parts: http::response::Parts, body: B) -> Self {
        Self {
            pending,
            parts,
            body: Box::pin(body),
            chunks: VecDeque::new(),
            read: 0,
            trailers: None,
            error: None,
            ended: false,
            done: false,
        }
    }

    /// Reads until `max_body_bytes` are held, the body ends, or it fails.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.pending.config.max_body_bytes();
        while !self.done {
            if self.read >= limit {
                self.done = true;
                break;
            }
            match ready!(self.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.read += data.len();
                        if !data.is_empty() {
                            self.chunks.push_back(data);
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                        }
                    }
                },
                Some(Err(e)) => {
                    self.error = Some(e);
                    self.done = true;
                }
                None => {
                    self.ended = true;
                    self.done = true;
                }
            }
        }
        Poll::Ready(())
    }

    /// The explained response, or the upstream's own if explaining failed.
    fn finish(self) -> Response<ExplainBody<B>> {
        let limit = self.pending.config.max_body_bytes();
        // The prefix in one piece: the usual small denial arrived as one chunk.
        let prefix: std::borrow::Cow<'_, [u8]> = match self.chunks.as_slices() {
            ([], []) => std::borrow::Cow::Borrowed(&[]),
            ([only], []) | ([], [only]) => {
                std::borrow::Cow::Borrowed(&only[..only.len().min(limit)])
            }
            _ => {
                let mut joined = Vec::with_capacity(self.read.min(limit));
                for chunk in &self.chunks {
                    let room = limit - joined.len();
                    joined.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if joined.len() == limit {
                        break;
                    }
                }
                std::borrow::Cow::Owned(joined)
            }
        };
        let built = catch_unwind(AssertUnwindSafe(|| {
            explained(&self.pending, &self.parts, &prefix)
        }));
        match built {
            Ok(Ok((headers, body))) => {
                let mut parts = self.parts;
                parts.headers = headers;
                Response::from_parts(parts, ExplainBody::explained(body))
            }
            failure => {
                let reason = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "a panic while building the explanation".to_owned(),
                };
                tracing::error!(
                    target: "whydenied",
                    status = self.parts.status.as_u16(),
                    error = %reason,
                    "could not explain a denial; the upstream response is passed through unchanged"
                );
                let this = self;
                let rest = (!this.ended && this.error.is_none()).then_some(this.body);
                Response::from_parts(
                    this.parts,
                    ExplainBody::Replay {
                        prefix: this.chunks,
                        trailers: this.trailers,
                        error: this.error,
                        rest,
                    },
                )
            }
        }
    }
}

/// Why an explanation could not be built.
#[derive(Debug, thiserror::Error)]
enum ExplainError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("an explanation header is not valid: {0}")]
    Header(#[from] http::header::InvalidHeaderValue),
}

/// Diagnoses and renders; returns the new headers and body.
fn explained(
    pending: &Pending,
    parts: &http::response::Parts,
    body: &[u8],
) -> Result<(HeaderMap, Bytes), ExplainError> {
    #[cfg(test)]
    if tests::FAIL_NEXT.with(|f| f.replace(false)) {
        panic!("injected failure");
    }
    let Pending { config, facts } = pending;
    let upstream = Upstream {
        status: parts.status,
        headers: &parts.headers,
        body,
        reason: parts
            .extensions
            .get::<crate::policy::UpstreamReason>()
            .map(|r| r.0.as_str()),
    };
    let now = SystemTime::now();
    let mut explanation = diagnose::explain(config, facts, &upstream, DenialId::random()?, now);
    if let Some(settings) = &config.events().self_service {
        explanation.escalate = Some(EscalateLink {
            href: selfservice::link(settings, &explanation.denial_id),
            method: "POST",
        });
    }
    metrics::counter!(
        "whydenied_denials_total",
        "policy" => explanation.policy.as_ref().map_or_else(|| "none".to_owned(), |p| p.id.clone()),
        "cause" => explanation.top_cause().as_str(),
        "status" => explanation.status.as_str().to_owned(),
    )
    .increment(1);

    let format = Negotiated::from_accept_bytes(facts.accept());
    let rendered = render::render(&explanation.caller_view(), format);

    let mut headers = parts.headers.clone();
    render::set_headers(&mut headers, format, &explanation.denial_id, rendered.len())?;
    let body = if facts.method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(rendered)
    };
    let event = denial_event(
        config,
        facts,
        explanation,
        &parts.headers,
        upstream.body,
        now,
    );
    if let Some(recorder) = config.recorder.get() {
        recorder.denial(config, event, facts.path());
    }
    Ok((headers, body))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Empty, StreamBody};
    use tower::{ServiceExt, service_fn};

    use super::*;

    thread_local! {
        /// Makes the next explanation on this thread fail, to test the fallback.
        pub(super) static FAIL_NEXT: Cell<bool> = const { Cell::new(false) };
    }

    type Chunks = StreamBody<
        tokio_stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
    >;

    fn upstream_403() -> Response<Chunks> {
        let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..40)
            .map(|i| {
                Ok(http_body::Frame::data(Bytes::from(
                    format!("chunk {i:04} ").repeat(300),
                )))
            })
            .collect();
        Response::builder()
            .status(403)
            .header("etag", "\"v1\"")
            .header("content-type", "text/plain")
            .body(StreamBody::new(tokio_stream::iter(frames)))
            .unwrap()
    }

    fn whole_upstream_body() -> Vec<u8> {
        (0..40)
            .flat_map(|i| format!("chunk {i:04} ").repeat(300).into_bytes())
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_explanation_passes_the_original_through() {
        let svc = ExplainLayer::new(Config::default()).layer(service_fn(
            |_req: Request<Empty<Bytes>>| async { Ok::<_, Infallible>(upstream_403()) },
        ));
        FAIL_NEXT.with(|f| f.set(true));
        let res = svc
            .oneshot(Request::get("/x").body(Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 403);
        assert!(!res.headers().contains_key(DENIAL_ID_HEADER));
        assert_eq!(res.headers()["etag"], "\"v1\"");
        assert_eq!(res.headers()["content-type"], "text/plain");
        // More than max_body_kib was buffered before the failure: all of it,
        // and the unread rest, arrive byte for byte.
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.as_ref(), whole_upstream_body().as_slice());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_same_response_is_explained_without_the_failure() {
        let svc = ExplainLayer::new(Config::default()).layer(service_fn(
            |_req: Request<Empty<Bytes>>| async { Ok::<_, Infallible>(upstream_403()) },
        ));
        let res = svc
            .oneshot(Request::get("/x").body(Empty::new()).unwrap())
            .await
            .unwrap();
        assert!(res.headers().contains_key(DENIAL_ID_HEADER));
        assert!(!res.headers().contains_key("etag"));
    }
}
