//! An axum app whose routes deny in several ways, wrapped in whydenied's
//! `ExplainLayer` with the shipped config (`config/whydenied.yaml`).
//!
//! ```text
//! cargo run --example axum_app --features axum   # listens on 127.0.0.1:3000
//!
//! # A path only admins may use (problem+json, the default for API clients):
//! curl -i http://127.0.0.1:3000/admin/users -H 'x-forwarded-user: bob'
//! # The same for a browser, and as text:
//! curl -s http://127.0.0.1:3000/admin/users -H 'x-forwarded-user: bob' -H 'accept: text/html'
//! curl -s http://127.0.0.1:3000/admin/users -H 'x-forwarded-user: bob' -H 'accept: text/plain'
//! # An admin gets through (not a denial: untouched):
//! curl -i http://127.0.0.1:3000/admin/users -H 'x-forwarded-user: alice'
//! # No credentials at all:
//! curl -i http://127.0.0.1:3000/api/orders
//! # A token without the reports:read scope:
//! curl -i http://127.0.0.1:3000/api/reports/q3 -H 'authorization: Bearer abc'
//! # A rate limit (429 with Retry-After):
//! curl -i http://127.0.0.1:3000/api/search -H 'x-api-key: k'
//! # An S3-style AccessDenied document:
//! curl -i http://127.0.0.1:3000/files/payroll.csv -H 'cookie: session=1'
//! # Internal tools from outside the office network:
//! curl -i http://127.0.0.1:3000/internal/metrics -H 'cookie: session=1'
//! ```

use std::net::SocketAddr;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use whydenied::{Config, ExplainLayer};

const ADMINS: &[&str] = &["alice"];

async fn admin_users(headers: HeaderMap) -> Response {
    let user = headers
        .get("x-forwarded-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ADMINS.contains(&user) {
        "alice, bob, carol\n".into_response()
    } else {
        // What most apps send: a bare 403. The layer explains it.
        (StatusCode::FORBIDDEN, "Forbidden").into_response()
    }
}

async fn orders(headers: HeaderMap) -> Response {
    if headers.contains_key(header::AUTHORIZATION) || headers.contains_key(header::COOKIE) {
        "[]\n".into_response()
    } else {
        StatusCode::FORBIDDEN.into_response()
    }
}

async fn reports() -> Response {
    (
        StatusCode::FORBIDDEN,
        [(
            header::WWW_AUTHENTICATE,
            r#"Bearer error="insufficient_scope", scope="reports:read""#,
        )],
        "insufficient_scope",
    )
        .into_response()
}

async fn search() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            (header::RETRY_AFTER, "30"),
            (
                header::HeaderName::from_static("x-ratelimit-remaining"),
                "0",
            ),
        ],
        "slow down",
    )
        .into_response()
}

async fn files() -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "application/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>\
         <Message>Access Denied</Message><RequestId>EXAMPLE</RequestId></Error>",
    )
        .into_response()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::parse(
        include_str!("../config/whydenied.yaml"),
        "config/whydenied.yaml",
    )?;
    // The layer goes last, around the whole router (routes and fallback), so
    // that every 403 the app produces, whichever handler or inner middleware
    // sent it, passes through it.
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                "whydenied axum example: see the curl lines in examples/axum_app.rs\n"
            }),
        )
        .route("/admin/users", get(admin_users))
        .route("/api/orders", get(orders))
        .route("/api/reports/{quarter}", get(reports))
        .route("/api/search", get(search))
        .route("/files/{name}", get(files))
        .route("/internal/metrics", get(|| async { StatusCode::FORBIDDEN }))
        .layer(ExplainLayer::new(config));

    let addr: SocketAddr = std::env::var("LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("whydenied axum example on http://{addr} (curl lines: examples/axum_app.rs)");
    // With connect info, policies can match on the client address
    // (enable whydenied's `axum` feature, or insert `whydenied::ClientAddr`).
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
