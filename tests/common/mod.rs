//! Real sockets on 127.0.0.1 for the integration tests: a server for any
//! axum router, a client connection per request, and bodies that the test
//! drives chunk by chunk.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Serves `router` on an ephemeral loopback port, with connect info.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// Sends one request on a new HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

/// A GET with these headers.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The whole body as text.
pub async fn text(res: Response<Incoming>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// `GET /` on an open HTTP/1.1 connection: the status must be 200; the body
/// as text.
pub async fn text_of_root(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) -> String {
    let req = Request::get("/")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tokio::time::timeout(std::time::Duration::from_secs(30), sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    text(res).await
}

/// The sidecar with `yaml` in front of `upstream`, on ephemeral loopback
/// ports.
#[cfg(feature = "sidecar")]
pub async fn start_sidecar(
    yaml: &str,
    upstream: SocketAddr,
    config_path: Option<std::path::PathBuf>,
) -> whydenied::sidecar::Running {
    whydenied::sidecar::start(whydenied::sidecar::Options {
        config: whydenied::Config::from_yaml_str(yaml).unwrap(),
        config_path,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        upstream: Some(format!("http://{upstream}").parse().unwrap()),
        admin: Some("127.0.0.1:0".parse().unwrap()),
    })
    .await
    .unwrap()
}

/// A body fed through a channel, so a test decides when each chunk exists.
pub struct ChannelBody(pub mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl ChannelBody {
    pub fn new() -> (mpsc::Sender<Result<Bytes, std::io::Error>>, Self) {
        let (tx, rx) = mpsc::channel(1);
        (tx, Self(rx))
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// An endless body of 16 KiB chunks that counts how many were asked for.
pub struct EndlessBody {
    pub produced: Arc<AtomicUsize>,
}

impl Body for EndlessBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.produced.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 16 * 1024])))))
    }
}

#[cfg(feature = "sidecar")]
pub mod upstream;

#[cfg(feature = "sidecar")]
pub mod receiver;
