//! The sidecar over real sockets on 127.0.0.1: a real upstream, the proxy
//! started as it is in production, real clients.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::upstream;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use whydenied::sidecar::{self, Running};

/// A test's own guard against hanging forever; never a synchronisation.
const GUARD: Duration = Duration::from_secs(30);

async fn proxy(yaml: &str, upstream: SocketAddr) -> Running {
    proxy_with_path(yaml, upstream, None).await
}

async fn proxy_with_path(
    yaml: &str,
    upstream: SocketAddr,
    path: Option<std::path::PathBuf>,
) -> Running {
    common::start_sidecar(yaml, upstream, path).await
}

async fn send(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> http::Response<hyper::body::Incoming> {
    common::send(addr, req).await
}

/// An HTTP/2 (prior knowledge) connection to `addr`.
async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A loopback address where nothing listens any more.
async fn dead_address() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    common::get(addr, path, &[])
}

#[tokio::test]
async fn get_passes_through_byte_for_byte() {
    let (up, _) = upstream::start().await;
    let p = proxy("", up).await;
    let res = send(p.addr, get(p.addr, "/bytes")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!res.headers().contains_key("x-denial-id"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.as_ref(), upstream::megabyte().as_slice());
}

#[tokio::test]
async fn several_set_cookie_headers_survive() {
    let (up, _) = upstream::start().await;
    let p = proxy("", up).await;
    let res = send(p.addr, get(p.addr, "/cookies")).await;
    let cookies: Vec<_> = res.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2; HttpOnly", "c=3; Secure"]);
}

async fn upstream_saw(addr: SocketAddr, req: Request<Full<Bytes>>) -> serde_json::Value {
    let res = send(addr, req).await;
    assert_eq!(res.status(), StatusCode::OK);
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn forwarding_headers_cannot_be_spoofed_or_stripped() {
    let (up, _) = upstream::start().await;
    // 127.0.0.1 is not trusted here: what the client claims is discarded.
    let p = proxy("trusted_proxies: [10.0.0.0/8]\n", up).await;
    let mut req = get(p.addr, "/echo-headers");
    let h = req.headers_mut();
    h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    h.insert("forwarded", "for=6.6.6.6".parse().unwrap());
    h.insert(
        "connection",
        "x-forwarded-for, forwarded, x-hop".parse().unwrap(),
    );
    h.insert("x-hop", "should not pass".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    let seen = upstream_saw(p.addr, req).await;
    assert_eq!(seen["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(seen["x-forwarded-proto"], serde_json::json!(["http"]));
    assert!(
        seen["forwarded"][0]
            .as_str()
            .unwrap()
            .starts_with("for=127.0.0.1;proto=http")
    );
    assert!(seen.get("x-hop").is_none());
    assert!(seen.get("keep-alive").is_none());
    assert_eq!(
        seen["host"],
        serde_json::json!([p.addr.to_string()]),
        "Host is preserved"
    );
}

#[tokio::test]
async fn a_trusted_proxy_chain_is_extended() {
    let (up, _) = upstream::start().await;
    let p = proxy("trusted_proxies: [127.0.0.1]\n", up).await;
    let mut req = get(p.addr, "/echo-headers");
    req.headers_mut()
        .insert("x-forwarded-for", "198.51.100.7".parse().unwrap());
    let seen = upstream_saw(p.addr, req).await;
    assert_eq!(
        seen["x-forwarded-for"],
        serde_json::json!(["198.51.100.7, 127.0.0.1"])
    );
}

#[tokio::test]
async fn h2c_clients_reach_an_http1_upstream() {
    let (up, _) = upstream::start().await;
    let p = proxy("", up).await;
    let mut sender = h2c(p.addr).await;
    let req = Request::get("http://app.example.com/echo-headers")
        .header("cookie", "a=1")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), http::Version::HTTP_2);
    let seen: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen["host"], serde_json::json!(["app.example.com"]));
    assert_eq!(
        seen["x-forwarded-host"],
        serde_json::json!(["app.example.com"])
    );
}

#[tokio::test]
async fn denials_are_explained_through_the_proxy() {
    let (up, _) = upstream::start().await;
    let p = proxy(
        "policies:\n  - id: upstream-deny\n    match: { path: /denied }\n    cause: permission\n    contact: ops@example.com\n",
        up,
    )
    .await;
    let res = send(p.addr, get(p.addr, "/denied")).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"t\"");
    assert!(res.headers().contains_key("x-denial-id"));
    let v: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["policy"]["id"], "upstream-deny");
}

#[tokio::test]
async fn upstream_down_is_an_explained_502() {
    let dead = dead_address().await;
    let p = proxy("", dead).await;
    let res = send(
        p.addr,
        common::get(p.addr, "/x", &[("accept", "application/json")]),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert!(res.headers().contains_key("x-denial-id"));
    let body =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["title"], "The service did not answer");
    assert!(
        !body.contains(&dead.port().to_string()),
        "the upstream address leaked: {body}"
    );

    let res = send(
        p.addr,
        common::get(p.addr, "/x", &[("accept", "text/html")]),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(res.headers()["content-type"], "text/html; charset=utf-8");
}

#[tokio::test]
async fn a_slow_upstream_is_an_explained_504() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { upstream_response_timeout: 300ms }\n", up).await;
    let res = tokio::time::timeout(GUARD, send(p.addr, get(p.addr, "/hang")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(res.headers().contains_key("x-denial-id"));
}

#[tokio::test]
async fn a_denial_body_that_stalls_is_explained_after_the_idle_timeout() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { idle_timeout: 300ms }\n", up).await;
    let res = tokio::time::timeout(GUARD, send(p.addr, get(p.addr, "/stalled-denial")))
        .await
        .expect("the stalled body held the response");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers().contains_key("x-denial-id"));
}

#[tokio::test]
async fn a_passed_through_body_that_stalls_is_cut_at_the_idle_timeout() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { idle_timeout: 300ms }\n", up).await;
    let res = send(p.addr, get(p.addr, "/stalled")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body = tokio::time::timeout(GUARD, res.into_body().collect())
        .await
        .expect("the stalled body was never cut");
    assert!(body.is_err(), "a cut body must not look complete");
}

#[tokio::test]
async fn the_response_deadline_holds_on_a_kept_upstream_connection_and_after_a_504() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { upstream_response_timeout: 300ms }\n", up).await;
    let mut conn = http1(p.addr).await;
    let mut get = |path: &str| {
        let req = Request::get(path)
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = conn.send_request(req);
        async move {
            tokio::time::timeout(GUARD, res)
                .await
                .unwrap()
                .unwrap()
                .status()
        }
    };
    assert_eq!(get("/").await, StatusCode::OK);
    // The upstream connection kept from the first request times out ...
    assert_eq!(get("/hang").await, StatusCode::GATEWAY_TIMEOUT);
    // ... and the client connection goes on over a new one.
    assert_eq!(get("/").await, StatusCode::OK);
    assert_eq!(get("/hang").await, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn a_declared_oversized_body_is_413() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { max_request_body_bytes: 1024 }\n", up).await;
    let req = Request::post(format!("http://{}/upload", p.addr))
        .header("host", "x")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    let res = send(p.addr, req).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(GUARD, s.read(&mut buf)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { max_header_bytes: 16384 }\n", up).await;
    let big = "a".repeat(40 * 1024);
    let req = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let head = raw_exchange(p.addr, req.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[tokio::test]
async fn too_many_headers_get_431() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { max_headers: 20 }\n", up).await;
    let mut req = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
    for i in 0..50 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let head = raw_exchange(p.addr, req.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[tokio::test]
async fn a_long_uri_gets_414() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { max_uri_bytes: 1024 }\n", up).await;
    let res = send(p.addr, get(p.addr, &format!("/{}", "a".repeat(2000)))).await;
    assert_eq!(res.status(), StatusCode::URI_TOO_LONG);
}

#[tokio::test]
async fn slowloris_is_cut_off_at_the_header_timeout() {
    let (up, _) = upstream::start().await;
    let p = proxy("limits: { header_read_timeout: 300ms }\n", up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // Half a request head, then nothing.
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let mut seen = Vec::new();
    // The proxy must end the connection by itself (the guard only stops a hung test).
    loop {
        match tokio::time::timeout(GUARD, s.read(&mut buf)).await {
            Err(_) => panic!("the connection was never closed"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn expect_100_continue_works() {
    let (up, _) = upstream::start().await;
    let p = proxy("", up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(GUARD, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let mut all = interim.into_bytes();
    while !String::from_utf8_lossy(&all).contains("\"len\":5") {
        let n = tokio::time::timeout(GUARD, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&all));
        all.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&all).contains("HTTP/1.1 200 OK"));
}

#[tokio::test]
async fn trailers_pass_through() {
    let (up, _) = upstream::start().await;
    let p = proxy("", up).await;
    let mut sender = h2c(p.addr).await;
    let req = Request::get("http://x/trailers")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_trailed(sender.send_request(req).await.unwrap()).await;
}

/// The upstream's `/trailers` answer, arrived whole: body, then trailers.
async fn assert_trailed(res: http::Response<hyper::body::Incoming>) {
    let collected = tokio::time::timeout(GUARD, res.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc123");
    assert_eq!(collected.to_bytes(), "body before trailers");
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let (up, _) = upstream::start().await;
    let p = proxy("", up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(GUARD, s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed during the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [&b"ping over the tunnel"[..], b"second message"] {
        s.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(GUARD, s.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, message);
    }
}

#[tokio::test]
async fn admin_listener_serves_health_readiness_and_metrics_only_there() {
    let (up, _) = upstream::start().await;
    let p = proxy("", up).await;
    let admin = p.admin_addr;
    let res = send(admin, get(admin, "/healthz")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = send(admin, get(admin, "/readyz")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let _ = send(p.addr, get(p.addr, "/denied")).await;
    let res = send(admin, get(admin, "/metrics")).await;
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for name in [
        "whydenied_requests_total",
        "whydenied_denials_total",
        "whydenied_request_duration_seconds_bucket",
        "whydenied_config_info",
        "whydenied_open_connections",
        "whydenied_log_lines_dropped_total",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    // The data port proxies /metrics to the upstream instead of serving it.
    let res = send(p.addr, get(p.addr, "/metrics")).await;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello from upstream");
}

#[tokio::test]
async fn readiness_fails_when_the_upstream_is_down() {
    let dead = dead_address().await;
    let p = proxy("", dead).await;
    let res = send(p.admin_addr, get(p.admin_addr, "/readyz")).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
}

fn titled(title: &str) -> String {
    format!(
        "policies:\n  - id: upstream-deny\n    title: {title}\n    match: {{ path: /denied }}\n    cause: permission\n"
    )
}

async fn denial_title(addr: SocketAddr) -> String {
    let res = send(addr, get(addr, "/denied")).await;
    let v: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    v["title"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn reload_under_load_fails_no_request_and_bad_files_keep_the_old_config() {
    let (up, _) = upstream::start().await;
    let dir = std::env::temp_dir().join(format!("whydenied-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("whydenied.yaml");
    std::fs::write(&path, titled("Version zero")).unwrap();
    let p = proxy_with_path(&titled("Version zero"), up, None).await;
    let reloader = sidecar::reload::Reloader::new(path.clone(), p.config.clone());
    assert_eq!(denial_title(p.addr).await, "Version zero");

    // Continuous load on keep-alive connections while the config is swapped.
    let stop = Arc::new(tokio::sync::Notify::new());
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, stop, done, failed) = (p.addr, stop.clone(), done.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let stopped = stop.notified();
            tokio::pin!(stopped);
            for i in 0..100_000u32 {
                let path = if i % 2 == 0 { "/ok" } else { "/denied" };
                let req = Request::get(path).header("host", "x").body(Full::new(Bytes::new())).unwrap();
                let fut = sender.send_request(req);
                let ok = tokio::select! {
                    _ = &mut stopped => break,
                    res = fut => match res {
                        Ok(r) => {
                            let want = if i % 2 == 0 { StatusCode::OK } else { StatusCode::FORBIDDEN };
                            let good = r.status() == want;
                            good && r.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    },
                };
                if !ok {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for version in 1..=20 {
        // Let some requests through between swaps.
        let target = done.load(Ordering::SeqCst) + 20;
        while done.load(Ordering::SeqCst) < target {
            tokio::task::yield_now().await;
        }
        std::fs::write(&path, titled(&format!("Version {version}"))).unwrap();
        assert!(reloader.reload("test"));
    }
    stop.notify_waiters();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during reloads"
    );
    assert!(done.load(Ordering::SeqCst) >= 400);
    assert_eq!(denial_title(p.addr).await, "Version 20");

    // A bad file: refused, the running config stays.
    std::fs::write(&path, "policies:\n  - id: x\n    cause: nonsense\n").unwrap();
    assert!(!reloader.reload("test"));
    assert_eq!(denial_title(p.addr).await, "Version 20");
    let res = send(p.admin_addr, get(p.admin_addr, "/metrics")).await;
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.contains("whydenied_config_reloads_total{result=\"failed\"}"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(unix)]
#[tokio::test]
async fn a_configmap_style_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let (up, _) = upstream::start().await;
    let dir = std::env::temp_dir().join(format!("whydenied-cm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/whydenied.yaml"), titled("From v1")).unwrap();
    symlink("..v1", dir.join("..data")).unwrap();
    symlink("..data/whydenied.yaml", dir.join("whydenied.yaml")).unwrap();
    let p = proxy_with_path(&titled("From v1"), up, Some(dir.join("whydenied.yaml"))).await;
    assert_eq!(denial_title(p.addr).await, "From v1");

    // What the kubelet does: write a new version directory, then atomically
    // replace the `..data` symlink.
    std::fs::create_dir_all(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/whydenied.yaml"), titled("From v2")).unwrap();
    symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();

    // Wait for the observable effect (the watcher looks once a second).
    tokio::time::timeout(GUARD, async {
        while denial_title(p.addr).await != "From v2" {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the swapped config was never loaded");
    std::fs::remove_dir_all(&dir).ok();
}

/// One HTTP/1.1 client connection to `addr`.
async fn http1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn each_client_connection_keeps_one_upstream_connection() {
    let (up, accepted, _) = upstream::counting(usize::MAX).await;
    let p = proxy("", up).await;
    let mut first = http1(p.addr).await;
    for _ in 0..5 {
        assert_eq!(common::text_of_root(&mut first).await, "connection 1");
    }
    let mut second = http1(p.addr).await;
    assert_eq!(common::text_of_root(&mut second).await, "connection 2");
    assert_eq!(common::text_of_root(&mut first).await, "connection 1");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_idle_client_connection_is_closed_with_its_upstream_connection() {
    let (up, accepted, closed) = upstream::counting(usize::MAX).await;
    let p = proxy("limits: { header_read_timeout: 1s }\n", up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let head = read_response(&mut s, &mut pending).await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Nothing more is sent: the header timeout closes the client
    // connection, and the upstream connection it kept goes with it.
    assert!(read_response(&mut s, &mut pending).await.is_none());
    tokio::time::timeout(GUARD, closed.notified())
        .await
        .expect("the upstream connection was kept open");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_upstream_connection_closed_while_idle_is_replaced() {
    let (up, accepted, closed) = upstream::counting(1).await;
    let p = proxy("", up).await;
    let mut client = http1(p.addr).await;
    assert_eq!(common::text_of_root(&mut client).await, "connection 1");
    tokio::time::timeout(GUARD, closed.notified())
        .await
        .unwrap();
    // The kept connection is gone: the next request goes over a new one.
    assert_eq!(common::text_of_root(&mut client).await, "connection 2");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// Reads one response (head and `content-length` body) from `s`; `None` if
/// the connection closes first.
async fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if pending.len() >= end + 4 + len {
                pending.drain(..end + 4 + len);
                return Some(head);
            }
        }
        match tokio::time::timeout(GUARD, s.read(&mut buf))
            .await
            .expect("stalled")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// An upstream like nginx with keep-alive: it answers `POST /upload` with a
/// 403 before reading the body, then reads and discards the declared body
/// and serves the next request; anything else gets 200 "ok". It records the
/// request heads it saw (lower-cased).
async fn early_answering_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let (mut pending, mut buf) = (Vec::new(), vec![0u8; 64 * 1024]);
                loop {
                    while !pending.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => pending.extend_from_slice(&buf[..k]),
                        }
                    }
                    let end = pending.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                    let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
                    pending.drain(..end + 4);
                    seen.lock().unwrap().push(head.clone());
                    let mut len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let answer: &[u8] = if head.starts_with("post /upload") {
                        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 6\r\n\r\ndenied"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                    let buffered = len.min(pending.len());
                    pending.drain(..buffered);
                    len -= buffered;
                    while len > 0 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => {
                                let body = k.min(len);
                                len -= body;
                                pending.extend_from_slice(&buf[body..k]);
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn an_early_denial_of_an_upload_reaches_a_client_that_writes_first() {
    let (up, _) = early_answering_upstream().await;
    let p = proxy("", up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // Like curl: the whole body is written before the answer is read.
    let chunk = [b'x'; 64 * 1024];
    let chunks = 128;
    let total = chunk.len() * chunks;
    let upload = async {
        let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\n\r\n");
        s.write_all(head.as_bytes()).await?;
        for _ in 0..chunks {
            s.write_all(&chunk).await?;
        }
        std::io::Result::Ok(())
    };
    let wrote = tokio::time::timeout(GUARD, upload).await.expect("stalled");
    assert!(wrote.is_ok(), "the upload was cut off: {wrote:?}");
    let mut pending = Vec::new();
    let head = read_response(&mut s, &mut pending)
        .await
        .expect("no answer");
    assert!(head.starts_with("http/1.1 403"), "{head}");
    // The connection is still usable.
    s.write_all(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_response(&mut s, &mut pending)
        .await
        .expect("closed after the early denial");
    assert!(head.starts_with("http/1.1 200"), "{head}");
}

#[tokio::test]
async fn an_http10_request_without_host_reaches_the_upstream_with_one() {
    let (up, heads) = early_answering_upstream().await;
    let p = proxy("", up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /plain HTTP/1.0\r\n\r\n").await.unwrap();
    let head = read_response(&mut s, &mut Vec::new()).await.unwrap();
    assert!(head.contains(" 200 "), "{head}");
    let seen = heads.lock().unwrap()[0].clone();
    assert!(seen.starts_with("get /plain http/1.1"), "{seen}");
    assert!(
        seen.lines().any(|l| l == format!("host: {up}")),
        "no Host upstream: {seen}"
    );
}

#[tokio::test]
async fn trailers_pass_through_http1_and_the_connection_stays_usable() {
    let (up, _) = upstream::start().await;
    let p = proxy("", up).await;
    let mut client = http1(p.addr).await;
    let req = Request::get("/trailers")
        .header("host", "x")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tokio::time::timeout(GUARD, client.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_trailed(res).await;
    // The same client connection carries the next request.
    assert_eq!(
        common::text_of_root(&mut client).await,
        "hello from upstream"
    );
}
