//! A real webhook receiver on 127.0.0.1 that verifies signatures.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How the receiver answers.
pub const OK: u8 = 0;
pub const FAIL_500: u8 = 1;
pub const HANG: u8 = 2;

/// One delivery as received.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub body: String,
    pub json: serde_json::Value,
    pub signature_valid: bool,
    pub custom_header: Option<String>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub mode: Arc<AtomicU8>,
    pub attempts: Arc<AtomicUsize>,
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
}

fn verify(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    want == hex
}

pub async fn start(secret: &'static [u8]) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mode = Arc::new(AtomicU8::new(OK));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    let (m, a) = (mode.clone(), attempts.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (m, a, tx) = (m.clone(), a.clone(), tx.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (m, a, tx) = (m.clone(), a.clone(), tx.clone());
                    async move {
                        a.fetch_add(1, Ordering::SeqCst);
                        let mode = m.load(Ordering::SeqCst);
                        if mode == HANG {
                            std::future::pending::<()>().await;
                        }
                        let sig = req
                            .headers()
                            .get("x-whydenied-signature")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let custom = req
                            .headers()
                            .get("x-team")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut res = Response::new(Full::new(Bytes::new()));
                        if mode == FAIL_500 {
                            *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            return Ok::<_, Infallible>(res);
                        }
                        let text = String::from_utf8_lossy(&body).into_owned();
                        let _ = tx.send(Delivery {
                            json: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                            signature_valid: verify(secret, &body, sig.as_deref()),
                            custom_header: custom,
                            body: text,
                        });
                        Ok(res)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Receiver {
        addr,
        mode,
        attempts,
        deliveries: rx,
    }
}
