//! The demo upstream of `whydenied demo`: a small service that denies in the
//! common ways (and serves ordinary pages), run in-process on an ephemeral
//! loopback port behind the proxy.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Starts the demo upstream on 127.0.0.1 and returns its address.
pub async fn start_upstream() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(
                        |req| async move { Ok::<_, Infallible>(answer(&req)) },
                    );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn respond(
    status: StatusCode,
    headers: &[(&'static str, &'static str)],
    body: &'static str,
) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    for (name, value) in headers {
        res.headers_mut()
            .insert(*name, HeaderValue::from_static(value));
    }
    res
}

/// What the demo service says to a request.
pub fn answer(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let h = req.headers();
    let has = |name: &str| h.contains_key(name);
    let user = h
        .get("x-forwarded-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let text = [("content-type", "text/plain; charset=utf-8")];
    match path {
        "/" => respond(
            StatusCode::OK,
            &text,
            "Welcome to the demo service. This page is not a denial, so whydenied passes it through untouched.\n",
        ),
        "/healthz" => respond(StatusCode::OK, &text, "ok\n"),
        p if p.starts_with("/admin") => {
            if user == "alice" {
                respond(StatusCode::OK, &text, "admin console: alice, bob, carol\n")
            } else {
                // What most apps send: a bare 403. whydenied explains it.
                respond(StatusCode::FORBIDDEN, &text, "Forbidden\n")
            }
        }
        "/api/orders" => {
            if has("authorization") || has("cookie") || has("x-api-key") {
                respond(
                    StatusCode::OK,
                    &[("content-type", "application/json")],
                    "[]\n",
                )
            } else {
                respond(
                    StatusCode::FORBIDDEN,
                    &[("content-type", "application/json")],
                    "{\"error\":\"forbidden\"}\n",
                )
            }
        }
        p if p.starts_with("/api/reports") => respond(
            StatusCode::FORBIDDEN,
            &[(
                "www-authenticate",
                "Bearer realm=\"demo\", error=\"insufficient_scope\", scope=\"reports:read\"",
            )],
            "",
        ),
        "/api/search" => respond(
            StatusCode::TOO_MANY_REQUESTS,
            &[
                ("retry-after", "30"),
                ("x-ratelimit-limit", "60"),
                ("x-ratelimit-remaining", "0"),
                ("content-type", "application/json"),
            ],
            "{\"error\":\"rate limit exceeded\"}\n",
        ),
        p if p.starts_with("/files/") => respond(
            StatusCode::FORBIDDEN,
            &[("content-type", "application/xml"), ("server", "AmazonS3")],
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>4442587FB7D0A2F9</RequestId><HostId>demo</HostId></Error>",
        ),
        p if p.starts_with("/internal") => {
            // Like an app behind a network check: the office network
            // (192.0.2.0/24 in the shipped config) gets in. The client is
            // the first address of X-Forwarded-For, which whydenied set.
            let client = h
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .unwrap_or("");
            if client.starts_with("192.0.2.") {
                respond(StatusCode::OK, &text, "internal metrics: all green\n")
            } else {
                respond(StatusCode::FORBIDDEN, &text, "Forbidden\n")
            }
        }
        p if p.starts_with("/debug") => respond(StatusCode::FORBIDDEN, &text, "Forbidden\n"),
        "/legal" => respond(
            StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS,
            &text,
            "Unavailable\n",
        ),
        _ => respond(
            StatusCode::OK,
            &[(header::CONTENT_TYPE.as_str(), "text/plain; charset=utf-8")],
            "hello from the demo service\n",
        ),
    }
}
