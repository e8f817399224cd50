//! The admin listener: health, readiness and metrics. It is a separate
//! listener (loopback by default) and never served on the data port.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_service::Service;

use super::proxy::Upstream;
use crate::config::ConfigHandle;
use crate::events::record::Recorder;

/// Serves `/healthz`, `/readyz` and `/metrics`.
#[derive(Clone)]
pub struct Admin {
    inner: Arc<AdminInner>,
}

struct AdminInner {
    config: ConfigHandle,
    upstream: Upstream,
    metrics: PrometheusHandle,
    recorder: Arc<Recorder>,
}

impl Admin {
    /// The admin service.
    pub fn new(
        config: ConfigHandle,
        upstream: Upstream,
        metrics: PrometheusHandle,
        recorder: Arc<Recorder>,
    ) -> Self {
        Self {
            inner: Arc::new(AdminInner {
                config,
                upstream,
                metrics,
                recorder,
            }),
        }
    }
}

impl Service<Request<Incoming>> for Admin {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"));
            }
            Ok(match req.uri().path() {
                "/healthz" => text(StatusCode::OK, "ok\n"),
                "/readyz" => inner.ready().await,
                "/metrics" => {
                    inner.metrics.run_upkeep();
                    let mut res = text(StatusCode::OK, inner.metrics.render());
                    res.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(
                            "text/plain; version=0.0.4; charset=utf-8",
                        ),
                    );
                    res
                }
                path if path.starts_with("/denials/") => inner.lookup(&path["/denials/".len()..]),
                _ => text(
                    StatusCode::NOT_FOUND,
                    "not found; try /healthz, /readyz, /metrics or /denials/{id}\n",
                ),
            })
        })
    }
}

impl AdminInner {
    /// A recent denial's event, as JSON.
    fn lookup(&self, id: &str) -> Response<Full<Bytes>> {
        let Some(id) = crate::id::DenialId::parse(id) else {
            return text(StatusCode::BAD_REQUEST, "that is not a denial id\n");
        };
        match self.recorder.store.get(&id) {
            Some(recorded) => {
                let body = serde_json::to_vec_pretty(&*recorded.event).unwrap_or_default();
                let mut res = text(StatusCode::OK, body);
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                res
            }
            None => text(
                StatusCode::NOT_FOUND,
                format!(
                    "denial {id} is unknown or no longer kept (see events.recent_max and events.recent_max_age); the ids of the proxy's own 502, 503 and 504 answers are in its log (\"proxy failure\")\n"
                ),
            ),
        }
    }

    /// Ready when a config is loaded and the upstream accepts connections.
    async fn ready(&self) -> Response<Full<Bytes>> {
        let config = self.config.load();
        let authority = self.upstream.authority().as_str().to_owned();
        let connect = tokio::time::timeout(
            Duration::from_secs(1).min(config.limits().upstream_connect_timeout),
            tokio::net::TcpStream::connect(authority),
        )
        .await;
        match connect {
            Ok(Ok(_)) => text(
                StatusCode::OK,
                format!(
                    "ready: config {} loaded, upstream reachable\n",
                    config.revision()
                ),
            ),
            _ => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the upstream does not accept connections\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    res
}
