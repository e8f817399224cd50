//! The sidecar: `whydenied serve`, a reverse proxy that wraps the explaining
//! layer around one upstream, with an admin listener and live reload.
//!
//! The stack, outermost first: the accept loop ([`server`]) makes one
//! service per connection, which knows the client address →
//! [`crate::ExplainLayer`] explains denials → [`proxy`] forwards to the
//! upstream with header hygiene ([`hop`]), over the connection's own
//! upstream connection ([`direct`]).

pub mod admin;
pub mod conn;
pub mod demo;
pub mod direct;
pub mod hop;
pub mod lane;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http::Uri;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_layer::Layer;

use crate::config::{Config, ConfigHandle};
use crate::layer::ExplainLayer;

/// Default data listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default admin listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

/// What `start` needs; flags override the config file.
pub struct Options {
    /// The config.
    pub config: Config,
    /// The file it came from, for live reload.
    pub config_path: Option<PathBuf>,
    /// Overrides `listen`.
    pub listen: Option<SocketAddr>,
    /// Overrides `upstream`.
    pub upstream: Option<Uri>,
    /// Overrides `admin.listen`.
    pub admin: Option<SocketAddr>,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No upstream in the config or on the command line.
    #[error("no upstream: set `upstream: http://host:port` in the config or pass --upstream")]
    NoUpstream,
    /// The upstream is not an http:// (or, with `tls`, https://) URL.
    #[error(
        "upstream {0} is not supported: use http://host:port (or https:// with the `tls` feature)"
    )]
    BadUpstream(String),
    /// The upstream's TLS settings are not usable.
    #[error("upstream TLS: {0}")]
    Tls(String),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] std::io::Error),
}

/// A started sidecar.
pub struct Running {
    /// Where the proxy listens.
    pub addr: SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: SocketAddr,
    /// The live config.
    pub config: ConfigHandle,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    reloader: Option<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting and lets in-flight requests finish (up to the grace
    /// period), then returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(r) = self.reloader.take() {
            r.abort();
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// Binds the listeners and starts serving in the background.
pub async fn start(options: Options) -> Result<Running, StartError> {
    let upstream_uri = options
        .upstream
        .or_else(|| options.config.upstream().cloned())
        .ok_or(StartError::NoUpstream)?;
    let scheme_ok = crate::config::scheme_supported(upstream_uri.scheme_str());
    if !scheme_ok {
        return Err(StartError::BadUpstream(upstream_uri.to_string()));
    }
    let upstream = proxy::Upstream::from_uri(&upstream_uri)
        .ok_or_else(|| StartError::BadUpstream(upstream_uri.to_string()))?;
    let listen = options
        .listen
        .or(options.config.listen())
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid default address"));
    let admin_listen = options
        .admin
        .or(options.config.admin_listen())
        .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("a valid default address"));
    let limits = options.config.limits().clone();
    let revision = options.config.revision().to_owned();

    let data = server::bind(listen, "proxy").await?;
    let admin_listener = server::bind(admin_listen, "admin listener").await?;
    let addr = data.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(
            target: "whydenied",
            admin = %admin_addr,
            "the admin listener is reachable beyond this host: it serves metrics and the recorded events of denials (GET /denials/ID, with client addresses and identities); limit who can reach it"
        );
    }

    let metrics = telemetry::metrics();
    metrics::gauge!("whydenied_config_info", "revision" => revision.clone()).set(1.0);
    let handle = ConfigHandle::new(options.config);
    let layer = ExplainLayer::with_handle(handle.clone()).identity_from_trusted_proxies_only(true);
    let recorder = layer.recorder().clone();
    let stopping = Arc::new(conn::Stopping::default());
    let proxy = proxy::Proxy::new(handle.clone(), upstream.clone(), Some(stopping.clone()))
        .map_err(StartError::Tls)?;
    // The fast lane serves plain HTTP/1.1 to an http:// upstream
    // (WHYDENIED_FAST_LANE=off leaves everything to hyper).
    let lane = (upstream_uri.scheme() == Some(&http::uri::Scheme::HTTP)
        && std::env::var("WHYDENIED_FAST_LANE").map_or(true, |v| v != "off"))
    .then(|| {
        Arc::new(lane::Lane::new(
            handle.clone(),
            layer.clone(),
            upstream_uri.clone(),
            stopping.clone(),
        ))
    });
    let for_connection = move |peer| {
        layer
            .layer(proxy.for_connection(peer))
            .with_client_addr(peer)
    };
    // Histogram samples wait in the recorder until drained: drain them every
    // few seconds, not only when /metrics is scraped, so memory stays bounded.
    let upkeep_handle = metrics.clone();
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep_handle.run_upkeep();
        }
    });
    let admin = admin::Admin::new(handle.clone(), upstream, metrics, recorder);

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let data_task = tokio::spawn(server::serve(
        data,
        for_connection,
        server::ServeSettings {
            limits: limits.clone(),
            record_metrics: true,
            name: "proxy",
            stopping,
            lane,
        },
        until_stopped(stopped.clone()),
    ));
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        move |_peer| admin.clone(),
        server::ServeSettings {
            limits,
            record_metrics: false,
            name: "admin",
            stopping: Arc::default(),
            lane: None,
        },
        until_stopped(stopped),
    ));
    let reloader = options
        .config_path
        .map(|path| tokio::spawn(reload::Reloader::new(path, handle.clone()).run()));
    let background = vec![upkeep];
    tracing::info!(
        target: "whydenied",
        listen = %addr,
        admin = %admin_addr,
        upstream = %upstream_uri,
        revision = %revision,
        "whydenied is serving"
    );
    Ok(Running {
        addr,
        admin_addr,
        config: handle,
        stop,
        tasks: vec![data_task, admin_task],
        reloader,
        background,
    })
}
