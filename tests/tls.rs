//! https:// upstreams through rustls, with a CA of our own, on 127.0.0.1.
#![cfg(all(feature = "sidecar", feature = "tls"))]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use whydenied::Config;
use whydenied::sidecar;

/// A CA, and a TLS upstream for `localhost` with a certificate it signed.
async fn tls_upstream() -> (SocketAddr, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let mut res = Response::new(Full::new(Bytes::from(format!(
                            "hello over tls for {}",
                            req.uri().path()
                        ))));
                        if req.uri().path() == "/denied" {
                            *res.status_mut() = StatusCode::FORBIDDEN;
                        }
                        Ok::<_, Infallible>(res)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca.pem())
}

async fn start(yaml: &str, upstream: &str) -> sidecar::Running {
    sidecar::start(sidecar::Options {
        config: Config::from_yaml_str(yaml).unwrap(),
        config_path: None,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        upstream: Some(upstream.parse().unwrap()),
        admin: Some("127.0.0.1:0".parse().unwrap()),
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn an_https_upstream_with_a_private_ca() {
    let (up, ca_pem) = tls_upstream().await;
    let dir = std::env::temp_dir().join(format!("whydenied-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let upstream = format!("https://localhost:{}", up.port());

    let p = start(
        &format!("upstream_tls: {{ ca_file: \"{}\" }}\n", ca_file.display()),
        &upstream,
    )
    .await;
    let res = common::send(p.addr, common::get(p.addr, "/hello", &[])).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello over tls for /hello");
    // Denials over TLS are explained as any other.
    let res = common::send(p.addr, common::get(p.addr, "/denied", &[])).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers().contains_key("x-denial-id"));

    // Without the CA, the certificate is not trusted: an explained 502.
    let p = start("", &upstream).await;
    let res = common::send(p.addr, common::get(p.addr, "/hello", &[])).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert!(res.headers().contains_key("x-denial-id"));
    std::fs::remove_dir_all(&dir).ok();
}
