//! The smallest reverse proxy on whydenied's HTTP stack: a reference point
//! for `bench/load.sh` (its "hyper alone" row), not part of the product.
//!
//! It is hyper 1's HTTP/1 server and, for each client connection, one hyper
//! HTTP/1 client connection to the upstream, opened when the client
//! connects and driven by a task of its own. Every request goes upstream as
//! it arrived and the response comes back as it left the upstream, bodies
//! streamed through. There is no header hygiene (no hop-by-hop removal, no
//! forwarding headers), no timeouts, no retries, no limits, no HTTP/2, no
//! explanation layer and no metrics. Its gap to nginx is, roughly, what
//! hyper and tokio cost; whydenied's gap to it is, roughly, whydenied's
//! own work.
//!
//! ```text
//! cargo build --release --example bare_proxy
//! target/release/examples/bare_proxy 127.0.0.1:18091 127.0.0.1:18081
//! ```
//!
//! Both addresses are plain `host:port`, resolved once at start (the first
//! address is used); the upstream is spoken to in plain HTTP/1.1. The
//! runtime follows `WHYDENIED_WORKERS` as `whydenied serve` does, so that
//! both can be given the same setting: `1` is a one-thread runtime, `N` a
//! multi-threaded runtime with `N` workers, unset one worker per core (with
//! whydenied's event interval). Errors are printed to stderr, one line per
//! dropped connection.

#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

/// The multi-threaded runtime's event interval, as in `whydenied serve`.
const EVENT_INTERVAL: u32 = 200;

fn main() -> ExitCode {
    let (listen, upstream, workers) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("bare_proxy: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let mut builder = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.event_interval(EVENT_INTERVAL);
        if let Some(n) = workers {
            b.worker_threads(n);
        }
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bare_proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen, upstream)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare_proxy: cannot listen on {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str =
    "usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR  (e.g. 127.0.0.1:18091 127.0.0.1:18081)";

/// The two addresses from the command line, and `WHYDENIED_WORKERS`.
fn parse_args() -> Result<(SocketAddr, SocketAddr, Option<usize>), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = args.as_slice() else {
        return Err(format!("want 2 arguments, got {}", args.len()));
    };
    // Resolved once, here; the first address is used.
    let addr = |name: &str, v: &str| match v.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{name} {v:?} resolves to no address")),
        Err(e) => Err(format!("{name} {v:?} is not a host:port ({e})")),
    };
    let workers = match std::env::var("WHYDENIED_WORKERS") {
        Err(std::env::VarError::NotPresent) => None,
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(format!("WHYDENIED_WORKERS={v:?}: want a positive integer")),
        },
        Err(e) => return Err(format!("WHYDENIED_WORKERS: {e}")),
    };
    Ok((
        addr("LISTEN_ADDR", listen)?,
        addr("UPSTREAM_ADDR", upstream)?,
        workers,
    ))
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                eprintln!("bare_proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = proxy_connection(stream, upstream).await {
                eprintln!("bare_proxy: connection dropped: {e}");
            }
        });
    }
}

/// Serves one client connection over one upstream connection of its own.
async fn proxy_connection(
    client: TcpStream,
    upstream: SocketAddr,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    client.set_nodelay(true)?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    // The upstream connection runs until the client side drops `send`
    // (or the upstream closes); its errors reach the client side through
    // `send_request`, which then drops the client connection.
    tokio::spawn(async move {
        let _ = conn.await;
    });

    // HTTP/1 has one request at a time: the lock is never contended.
    let send: Arc<Mutex<SendRequest<Incoming>>> = Arc::new(Mutex::new(send));
    let service = service_fn(move |req: Request<Incoming>| {
        let send = send.clone();
        async move {
            let response = {
                let mut send = send.lock().await;
                send.ready().await?;
                send.send_request(req)
            };
            response.await
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await?;
    Ok(())
}
