//! The layer over real TCP on 127.0.0.1: an axum app wrapped in
//! `ExplainLayer`, a real HTTP/1.1 client.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use common::{ChannelBody, EndlessBody, get as request, send, serve, text};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use tokio::sync::Mutex;
use whydenied::{Config, ExplainLayer};

const CONFIG: &str = r##"
intercept: [403, 429]
identity: { header: x-forwarded-user }
networks: { office: [192.0.2.0/24] }
policies:
  - id: admin-console
    title: Administrators only
    match: { path: "/admin/**" }
    cause: permission
    detail: "{{ method }} {{ path }} is limited to ops-admins."
    remediation:
      - { step: Ask your team lead to add you to ops-admins., for: caller }
      - { step: Add the user to ops-admins., for: admin, effort: medium }
    owner: platform-team
    contact: "#platform-help"
    docs: https://wiki.example.com/access/admin
  - id: reflect
    title: "Denied {{ path }}"
    match: { path: "/reflect/**" }
    cause: permission
    detail: "{{ method }} {{ path }} on {{ host }} for {{ identity }}"
  - id: office-only
    match: { path: "/office/**", client_not_in: [office] }
    cause: ip_blocked
    detail: "Your address {{ client_ip }} is outside the office network."
  - id: quiet
    match: { path: "/quiet/**" }
    cause: waf_or_bot
    expose: minimal
    contact: security@example.com
"##;

type Slot = Arc<Mutex<Option<ChannelBody>>>;

fn forbidden(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::FORBIDDEN)
        .body(body)
        .unwrap()
}

async fn app(slot: Slot, endless: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let router = Router::new()
        .route(
            "/admin/{*rest}",
            any(|| async {
                Response::builder()
                    .status(StatusCode::FORBIDDEN)
                    .header("content-type", "text/plain")
                    .header("content-encoding", "gzip")
                    .header("content-range", "bytes 0-8/9")
                    .header("etag", "\"abc\"")
                    .header("www-authenticate", "Bearer realm=\"api\"")
                    .header("retry-after", "30")
                    .header("ratelimit", "limit=10, remaining=0, reset=30")
                    .header("ratelimit-policy", "10;w=60")
                    .header("x-ratelimit-remaining", "0")
                    .header("set-cookie", "a=1")
                    .header("x-request-id", "req-7")
                    .body(Body::from("forbidden"))
                    .unwrap()
            }),
        )
        .route("/ok", get(|| async { "hello, world" }))
        .route(
            "/missing",
            get(|| async { (StatusCode::NOT_FOUND, "nope") }),
        )
        .route(
            "/unauth",
            get(|| async { (StatusCode::UNAUTHORIZED, "who?") }),
        )
        .route(
            "/stream",
            get(move || async move {
                let body = slot.lock().await.take().unwrap();
                Body::new(body).into_response()
            }),
        )
        .route(
            "/endless",
            get(move || async move { forbidden(Body::new(EndlessBody { produced: endless })) }),
        )
        .route(
            "/broken",
            get(|| async {
                let (tx, body) = ChannelBody::new();
                tokio::spawn(async move {
                    tx.send(Ok(Bytes::from_static(b"partial"))).await.ok();
                    tx.send(Err(std::io::Error::other("upstream reset")))
                        .await
                        .ok();
                });
                forbidden(Body::new(body))
            }),
        )
        .route(
            "/nested",
            get(|| async {
                Response::builder()
                    .status(StatusCode::FORBIDDEN)
                    .header("x-denial-id", "already-explained")
                    .body(Body::from("inner explanation"))
                    .unwrap()
            }),
        )
        .fallback(|| async { forbidden(Body::from("denied")) })
        .layer(ExplainLayer::new(Config::from_yaml_str(CONFIG).unwrap()));
    serve(router).await
}

async fn start() -> std::net::SocketAddr {
    app(Arc::default(), Arc::default()).await
}

#[tokio::test]
async fn problem_json_by_default() {
    let addr = start().await;
    let res = send(addr, request(addr, "/admin/users", &[("cookie", "s=1")])).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let h = res.headers().clone();
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["vary"], "accept");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let id = h["x-denial-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 22);
    let body = text(res).await;
    assert_eq!(h["content-length"], body.len().to_string().as_str());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], 403);
    assert_eq!(v["denial_id"], id.as_str());
    assert_eq!(v["title"], "Administrators only");
    assert_eq!(v["detail"], "GET /admin/users is limited to ops-admins.");
    assert_eq!(v["policy"]["id"], "admin-console");
    assert_eq!(v["policy"]["owner"], "platform-team");
    assert_eq!(v["policy"]["docs"], "https://wiki.example.com/access/admin");
    assert_eq!(v["causes"][0]["cause"], "permission");
    assert_eq!(v["causes"][0]["likelihood"], "high");
    assert_eq!(v["remediation"][0]["for"], "caller");
    assert_eq!(v["remediation"][1]["for"], "admin");
    assert_eq!(v["contact"], "#platform-help");
    // The policy is authoritative: a permission denial is not temporary, even
    // though the upstream also sent rate-limit headers (they are evidence below).
    assert_eq!(v["temporary"], false);
    assert!(v.get("retry_after_seconds").is_none());
    assert_eq!(v["causes"][1]["cause"], "rate_limited");
    assert!(
        !body.contains("forbidden"),
        "the upstream body is not shown"
    );
}

#[tokio::test]
async fn kept_and_dropped_upstream_headers() {
    let addr = start().await;
    let res = send(addr, request(addr, "/admin/x", &[])).await;
    let h = res.headers();
    for kept in [
        "www-authenticate",
        "retry-after",
        "ratelimit",
        "ratelimit-policy",
        "x-ratelimit-remaining",
        "set-cookie",
        "x-request-id",
    ] {
        assert!(h.contains_key(kept), "{kept} was dropped");
    }
    for dropped in ["content-encoding", "content-range", "etag"] {
        assert!(!h.contains_key(dropped), "{dropped} was kept");
    }
    assert_ne!(
        h["content-length"], "9",
        "content-length describes the new body"
    );
}

#[tokio::test]
async fn html_for_browsers() {
    let addr = start().await;
    let accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let res = send(addr, request(addr, "/admin/users", &[("accept", accept)])).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let h = res.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let id = h["x-denial-id"].to_str().unwrap().to_owned();
    let page = text(res).await;
    assert!(page.starts_with("<!doctype html>"));
    assert!(page.contains("Administrators only"));
    assert!(page.contains("Why this happened"));
    assert!(page.contains("What you can do"));
    assert!(page.contains("#platform-help"));
    assert!(page.contains(&id));
    assert!(
        !page.contains("http://") && !page.contains("<script"),
        "no external assets"
    );
}

#[tokio::test]
async fn text_when_asked() {
    let addr = start().await;
    let res = send(
        addr,
        request(addr, "/admin/users", &[("accept", "text/plain")]),
    )
    .await;
    assert_eq!(res.headers()["content-type"], "text/plain; charset=utf-8");
    let id = res.headers()["x-denial-id"].to_str().unwrap().to_owned();
    let body = text(res).await;
    assert!(
        body.starts_with("403 Forbidden: Administrators only"),
        "{body}"
    );
    assert!(body.contains(&format!("Denial id: {id}")));
}

#[tokio::test]
async fn head_gets_headers_only() {
    let addr = start().await;
    let req = http::Request::head(format!("http://{addr}/admin/users"))
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = send(addr, req).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers().contains_key("x-denial-id"));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert_eq!(text(res).await, "");
}

#[tokio::test]
async fn other_statuses_pass_through_untouched() {
    let addr = start().await;
    for (path, status, body) in [
        ("/ok", 200, "hello, world"),
        ("/missing", 404, "nope"),
        ("/unauth", 401, "who?"),
    ] {
        let res = send(addr, request(addr, path, &[])).await;
        assert_eq!(res.status().as_u16(), status);
        assert!(!res.headers().contains_key("x-denial-id"));
        assert!(!res.headers().contains_key("vary"));
        assert_eq!(text(res).await, body);
    }
    // A response that already carries an explanation is not explained twice.
    let res = send(addr, request(addr, "/nested", &[])).await;
    assert_eq!(res.headers()["x-denial-id"], "already-explained");
    assert_eq!(text(res).await, "inner explanation");
}

#[tokio::test]
async fn pass_through_streams_chunk_by_chunk() {
    let slot: Slot = Arc::default();
    let (tx, body) = ChannelBody::new();
    *slot.lock().await = Some(body);
    let addr = app(slot, Arc::default()).await;
    let res = send(addr, request(addr, "/stream", &[])).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();

    tx.send(Ok(Bytes::from_static(b"first chunk")))
        .await
        .unwrap();
    // The second chunk does not exist yet: the client must get the first now.
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first chunk");

    tx.send(Ok(Bytes::from_static(b"second chunk")))
        .await
        .unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "second chunk");
    drop(tx);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn an_endless_denial_body_is_read_only_up_to_the_limit() {
    let produced = Arc::new(AtomicUsize::new(0));
    let addr = app(Arc::default(), produced.clone()).await;
    let res = send(addr, request(addr, "/endless", &[("cookie", "a=b")])).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers().contains_key("x-denial-id"));
    let v: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(v["causes"][0]["cause"], "unknown");
    // 64 KiB in 16 KiB chunks: four chunks read, never the endless rest.
    let n = produced.load(Ordering::SeqCst);
    assert!((4..=5).contains(&n), "{n} chunks were read");
}

#[tokio::test]
async fn a_body_that_fails_mid_read_still_gets_explained() {
    let addr = start().await;
    let res = send(addr, request(addr, "/broken", &[])).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers().contains_key("x-denial-id"));
    let v: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(v["causes"][0]["cause"], "authentication_missing");
}

#[tokio::test]
async fn reflected_values_come_out_inert() {
    let addr = start().await;
    let accept = [("accept", "text/html")];
    // A hostile path (percent-encoded on the wire, as any client sends it)
    // and a hostile Host and identity header.
    let path = "/reflect/%3Cscript%3Ealert(1)%3C/script%3E";
    let mut req = request(addr, path, &accept);
    // In origin form, so that `Host` is what names the host (an
    // absolute-form target's authority would win over it).
    *req.uri_mut() = path.parse().unwrap();
    req.headers_mut()
        .insert("host", "x\"><script>alert(2)</script>".parse().unwrap());
    req.headers_mut().insert(
        "x-forwarded-user",
        "<img src=x onerror=alert(3)>".parse().unwrap(),
    );
    let page = text(send(addr, req).await).await;
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(!page.contains("<img"), "{page}");
    assert!(
        page.contains("&lt;img src=x onerror=alert(3)&gt;"),
        "{page}"
    );
    assert!(page.contains("&quot;&gt;&lt;script&gt;alert(2)"), "{page}");

    let mut req = request(addr, "/reflect/a", &[]);
    req.headers_mut().insert(
        "x-forwarded-user",
        "\"}, \"status\": 200, \"x\": {\"".parse().unwrap(),
    );
    let v: serde_json::Value = serde_json::from_str(&text(send(addr, req).await).await).unwrap();
    assert_eq!(
        v["status"], 403,
        "identity cannot break out of its JSON string"
    );
}

#[tokio::test]
async fn client_address_comes_from_the_connection() {
    let addr = start().await;
    let res = send(addr, request(addr, "/office/wiki", &[("cookie", "a=b")])).await;
    let v: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(v["causes"][0]["cause"], "ip_blocked");
    assert_eq!(
        v["detail"],
        "Your address 127.0.0.1 is outside the office network."
    );
}

#[tokio::test]
async fn minimal_exposure_tells_nothing_about_the_rule() {
    let addr = start().await;
    let res = send(addr, request(addr, "/quiet/x", &[])).await;
    let v: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert!(v.get("policy").is_none());
    assert_eq!(v["causes"], serde_json::json!([]));
    assert_eq!(v["type"], "urn:whydenied:denied");
    assert_eq!(v["contact"], "security@example.com");
}

#[tokio::test]
async fn no_credentials_without_a_policy() {
    let addr = start().await;
    let res = send(addr, request(addr, "/anything", &[])).await;
    let v: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert!(v.get("policy").is_none());
    assert_eq!(v["causes"][0]["cause"], "authentication_missing");
    assert_eq!(v["title"], "Sign-in required");
}
