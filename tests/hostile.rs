//! Hostile clients and hostile tokens against the sidecar, over real sockets
//! on 127.0.0.1: what a review found, each a test that failed before its fix.
#![cfg(feature = "sidecar")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::upstream;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bounds every wait, so a failing test fails instead of hanging.
const GUARD: Duration = Duration::from_secs(10);

/// Waits for the server to close `stream` (end of stream or reset), reading
/// and discarding what it sent before.
async fn closed_by_server(stream: &mut TcpStream) {
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(GUARD, stream.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "the server kept the connection open");
}

/// Writes `request` as it is on a new connection and reads what comes back
/// until the server closes it.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(GUARD, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a response head, byte by byte.
async fn head_of(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(GUARD, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            other => panic!("no response head: {other:?} after {head:?}"),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

const UPGRADE: &[u8] =
    b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
    sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// The event of a denial, from the admin listener.
async fn event_of(admin: SocketAddr, res: http::Response<hyper::body::Incoming>) -> String {
    let id = res.headers()["x-denial-id"].to_str().unwrap().to_owned();
    let _ = common::text(res).await;
    let lookup = common::send(admin, common::get(admin, &format!("/denials/{id}"), &[])).await;
    assert_eq!(lookup.status(), 200);
    common::text(lookup).await
}

/// A JWT whose `exp` is 10^19: a valid u64, past what `SystemTime` can hold.
/// Adding it to the epoch panicked; the layer caught the panic and passed the
/// upstream's bare 403 through: no id, no event, the upstream's body shown.
#[tokio::test]
async fn a_token_with_an_exp_past_the_end_of_time_is_still_explained() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("", up, None).await;
    let token =
        "eyJhbGciOiJub25lIn0.eyJleHAiOjEwMDAwMDAwMDAwMDAwMDAwMDAwLCJzdWIiOiJtYWxsb3J5In0.sig";
    let auth = format!("Bearer {token}");
    let res = common::send(
        p.addr,
        common::get(p.addr, "/denied", &[("authorization", auth.as_str())]),
    )
    .await;
    assert_eq!(res.status(), 403);
    assert!(res.headers().contains_key("x-denial-id"));
    let body = common::text(res).await;
    assert!(!body.contains("Forbidden by upstream"), "{body}");
}

/// A trusted proxy that appends a line of its own (HAProxy's `option
/// forwardfor`) leaves the client's forged line first; only the first line
/// used to be read.
#[tokio::test]
async fn the_client_address_comes_from_every_forwarded_for_line() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("trusted_proxies: [127.0.0.0/8]\n", up, None).await;
    let res = common::send(
        p.addr,
        common::get(
            p.addr,
            "/denied",
            &[
                ("x-forwarded-for", "192.0.2.66"),  // forged by the client
                ("x-forwarded-for", "203.0.113.9"), // written by the trusted proxy
            ],
        ),
    )
    .await;
    let event: serde_json::Value =
        serde_json::from_str(&event_of(p.admin_addr, res).await).unwrap();
    assert_eq!(event["client_ip"], "203.0.113.9", "{event}");
}

/// A token in the path (an invite link, a webhook URL) reached the event: in
/// its url and in the evidence that quotes the path.
#[tokio::test]
async fn a_token_in_the_path_does_not_reach_the_event() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar(
        "policies:\n  - { id: invites, match: { path: \"/denied/**\" }, cause: permission }\n",
        up,
        None,
    )
    .await;
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJpbnZpdGUiOiJ4eXoifQ.c2lnbmF0dXJlOTk";
    let res = common::send(
        p.addr,
        common::get(p.addr, &format!("/denied/invite/{jwt}"), &[]),
    )
    .await;
    let event = event_of(p.admin_addr, res).await;
    assert!(event.contains("invites"), "{event}");
    for part in jwt.split('.') {
        assert!(!event.contains(part), "{part} in {event}");
    }
}

/// hyper's HTTP/1-or-2 detection reads the first bytes with no timeout and
/// `header_read_timeout` starts after it: a connection that sent nothing, or
/// the start of the HTTP/2 preface, held its `max_connections` slot for ever.
#[tokio::test]
async fn connections_that_send_no_request_are_closed_at_the_header_timeout() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar(
        "limits: { max_connections: 2, header_read_timeout: 300ms }\n",
        up,
        None,
    )
    .await;
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    let mut preface = TcpStream::connect(p.addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    closed_by_server(&mut silent).await;
    closed_by_server(&mut preface).await;
    // Their slots are free again.
    let res = tokio::time::timeout(GUARD, common::send(p.addr, common::get(p.addr, "/", &[])))
        .await
        .expect("a real client was not served");
    assert_eq!(res.status(), 200);
}

/// A client that stops reading its response: hyper waits on the socket and
/// no timer runs. The proxy now drops it once a write has waited for the
/// idle timeout, and with it the upstream body.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_at_the_idle_timeout() {
    let (up, state) = upstream::start().await;
    let p = common::start_sidecar(
        "limits: { idle_timeout: 300ms, header_read_timeout: 300ms }\n",
        up,
        None,
    )
    .await;
    let mut client = TcpStream::connect(p.addr).await.unwrap();
    client
        .write_all(b"GET /endless HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Not reading: the socket buffers fill, the proxy's writes wait, it
    // gives up and drops the upstream's endless body.
    tokio::time::timeout(GUARD, state.endless_dropped.notified())
        .await
        .expect("the proxy kept writing to a client that does not read");
    closed_by_server(&mut client).await;
}

/// A GET over a new HTTP/2 (prior knowledge) connection: the response head,
/// the request handle (kept by the caller: dropping it lets the client
/// close the connection itself) and the task driving the connection.
async fn h2_get(
    addr: SocketAddr,
    path: &str,
) -> (
    http::Response<hyper::body::Incoming>,
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    (send.send_request(req).await.unwrap(), send, conn)
}

/// An HTTP/2 connection answers keep-alive pings on its own, so it stayed up
/// with no streams for ever; after the idle timeout it is sent away.
#[tokio::test]
async fn an_idle_http2_connection_is_sent_away_after_the_idle_timeout() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("limits: { idle_timeout: 300ms }\n", up, None).await;
    let (res, _send, conn) = h2_get(p.addr, "/").await;
    assert_eq!(res.status(), 200);
    drop(res);
    let ended = tokio::time::timeout(GUARD, conn)
        .await
        .expect("the idle HTTP/2 connection was kept open");
    // Sent away (GOAWAY, then a clean close), not cut off.
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
}

/// An HTTP/2 client that grants no flow-control window stops hyper from
/// asking the response body for data: nothing is written, no timer runs,
/// and the stream held its upstream connection (and a place under the
/// pooled cap) for ever. A response not asked for data for twice the idle
/// timeout now closes the connection.
#[tokio::test]
async fn an_http2_response_the_client_never_reads_is_dropped() {
    let (up, state) = upstream::start().await;
    let p = common::start_sidecar("limits: { idle_timeout: 300ms }\n", up, None).await;
    // The response is never read: the client's window fills and stays full.
    let (_unread, _send, conn) = h2_get(p.addr, "/endless").await;
    tokio::time::timeout(GUARD, state.endless_dropped.notified())
        .await
        .expect("the stalled stream kept its upstream body");
    tokio::time::timeout(GUARD, conn)
        .await
        .expect("the connection of the stalled stream was kept open")
        .unwrap()
        .ok();
}

/// After a 101, hyper's connection ends and its slot was given back while
/// the tunnel went on: tunnels escaped `max_connections`. The slot now
/// stays taken until the tunnel closes.
#[tokio::test]
async fn an_open_tunnel_keeps_its_connection_slot() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("limits: { max_connections: 1 }\n", up, None).await;
    let mut tunnel = TcpStream::connect(p.addr).await.unwrap();
    tunnel.write_all(UPGRADE).await.unwrap();
    assert!(head_of(&mut tunnel).await.starts_with("HTTP/1.1 101"));
    tunnel.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tunnel.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    // A second client waits for the slot (not served while the tunnel is open)...
    let mut second = tokio::spawn(common::send(p.addr, common::get(p.addr, "/", &[])));
    let early = tokio::time::timeout(Duration::from_millis(300), &mut second).await;
    assert!(early.is_err(), "served while the only slot was a tunnel's");
    // ...and is served once the tunnel closes.
    drop(tunnel);
    let res = tokio::time::timeout(GUARD, second).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
}

/// Tunnels had no timeout at all; now one that carries nothing either way
/// for the idle timeout is closed, as nginx closes one at
/// `proxy_read_timeout`.
#[tokio::test]
async fn an_idle_tunnel_is_closed_at_the_idle_timeout() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("limits: { idle_timeout: 300ms }\n", up, None).await;
    let mut tunnel = TcpStream::connect(p.addr).await.unwrap();
    tunnel.write_all(UPGRADE).await.unwrap();
    assert!(head_of(&mut tunnel).await.starts_with("HTTP/1.1 101"));
    closed_by_server(&mut tunnel).await;
}

/// Two `Host` lines were forwarded as they were: whydenied, the forwarding
/// headers and the upstream could each believe a different host. Two
/// `Authorization` lines likewise (the explanation reads the first, an
/// upstream might read the last): nginx refuses both; so does whydenied.
#[tokio::test]
async fn a_request_with_two_host_or_authorization_lines_is_refused() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("", up, None).await;
    let two_hosts = "host: a.example\r\nhost: b.example\r\n";
    let two_credentials = "host: a.example\r\nauthorization: Bearer one-secret\r\nauthorization: Bearer b.example\r\n";
    for lines in [two_hosts, two_credentials] {
        let request = format!(
            "GET /echo-headers HTTP/1.1\r\n{lines}accept: text/plain\r\nconnection: close\r\n\r\n"
        );
        let text = exchange(p.addr, request.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("x-denial-id"), "{text}");
        assert!(!text.contains("b.example"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}

/// The identity header says who a trusted proxy authenticated. From a client
/// that reached the proxy directly it is a claim: the layer ignored it, but
/// the upstream still received it.
#[tokio::test]
async fn identity_and_address_claims_from_an_untrusted_client_do_not_reach_the_upstream() {
    let (up, _) = upstream::start().await;
    let yaml = "identity: { header: x-forwarded-user }\n";
    let direct = common::start_sidecar(yaml, up, None).await;
    // With the other claims about the client's connection.
    let claimed = [
        ("x-forwarded-user", "admin"),
        ("x-real-ip", "10.9.9.9"),
        ("true-client-ip", "10.9.9.9"),
        ("x-forwarded-prefix", "/admin"),
    ];
    let res = common::send(
        direct.addr,
        common::get(direct.addr, "/echo-headers", &claimed),
    )
    .await;
    let seen: serde_json::Value = serde_json::from_str(&common::text(res).await).unwrap();
    for (name, _) in claimed {
        assert!(seen.get(name).is_none(), "{name}: {seen}");
    }
    // From a trusted proxy it is passed on.
    let trusted = format!("{yaml}trusted_proxies: [127.0.0.0/8]\n");
    let behind = common::start_sidecar(&trusted, up, None).await;
    let res = common::send(
        behind.addr,
        common::get(behind.addr, "/echo-headers", &claimed),
    )
    .await;
    let seen: serde_json::Value = serde_json::from_str(&common::text(res).await).unwrap();
    for (name, value) in claimed {
        assert_eq!(seen[name][0], value, "{name}: {seen}");
    }
}

/// HTTP/2 requests go upstream through the shared pool, one upstream
/// connection each: without a cap, a few clients with many streams each
/// opened upstream connections until file descriptors ran out. They are now
/// capped at `max_connections` in flight.
#[tokio::test]
async fn pooled_upstream_requests_are_capped() {
    let (up, state) = upstream::start().await;
    let p = common::start_sidecar(
        "limits: { max_connections: 1, upstream_connect_timeout: 1s }\n",
        up,
        None,
    )
    .await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        let mut send = send.clone();
        let req = Request::get(format!("http://{}{path}", p.addr))
            .body(Empty::<Bytes>::new())
            .unwrap();
        tokio::spawn(async move { send.send_request(req).await.unwrap().status() })
    };
    let slow = get("/slow");
    tokio::time::timeout(GUARD, state.slow_arrived.notified())
        .await
        .unwrap();
    // The one place is taken by /slow: the next request waits for it, as
    // long as a connection may take, then is told the proxy is busy...
    let next = get("/");
    assert_eq!(
        tokio::time::timeout(GUARD, next).await.unwrap().unwrap(),
        503
    );
    // ...and once /slow is done, requests go again.
    state.release_slow.notify_one();
    assert_eq!(
        tokio::time::timeout(GUARD, slow).await.unwrap().unwrap(),
        200
    );
    assert_eq!(
        tokio::time::timeout(GUARD, get("/"))
            .await
            .unwrap()
            .unwrap(),
        200
    );
}

/// An absolute-form target names the host; a `Host` line that says another
/// is ignored (RFC 9112 §3.2.2), by whydenied and the upstream alike.
#[tokio::test]
async fn an_absolute_form_target_wins_over_host() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("", up, None).await;
    let text = exchange(
        p.addr,
        b"GET http://a.example/echo-headers HTTP/1.1\r\nhost: b.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["host"][0], "a.example", "{seen}");
    assert_eq!(seen["x-forwarded-host"][0], "a.example", "{seen}");
}

/// A tunnel has no request to finish: it used to hold shutdown for the
/// whole grace period (and outlive it). It now closes when the listener
/// stops.
#[tokio::test]
async fn an_open_tunnel_does_not_hold_shutdown() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("limits: { shutdown_grace: 60s }\n", up, None).await;
    let mut tunnel = TcpStream::connect(p.addr).await.unwrap();
    tunnel.write_all(UPGRADE).await.unwrap();
    assert!(head_of(&mut tunnel).await.starts_with("HTTP/1.1 101"));
    tokio::time::timeout(GUARD, p.shutdown())
        .await
        .expect("shutdown waited for the tunnel");
    closed_by_server(&mut tunnel).await;
}

/// The reloads counted so far with this result, from the admin listener.
async fn reloads(admin: SocketAddr, result: &str) -> u64 {
    let res = common::send(admin, common::get(admin, "/metrics", &[])).await;
    let line = format!("whydenied_config_reloads_total{{result=\"{result}\"}}");
    common::text(res)
        .await
        .lines()
        .find(|l| l.starts_with(&line))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until `reloads(admin, result)` reaches `n`.
async fn wait_for_reloads(admin: SocketAddr, result: &str, n: u64) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while reloads(admin, result).await < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {result} reload counted"));
}

/// A config path that became a FIFO (or a link to /dev/zero) was read on a
/// thread that serves requests: with a FIFO the read waited for a writer
/// for ever and the proxy stopped answering; /dev/zero grew memory without
/// end. Now each is refused and counted, and requests go on. So is an empty
/// file (an editor's save in progress would load the defaults).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_path_that_is_not_a_regular_file_is_refused_on_reload() {
    let (up, _) = upstream::start().await;
    let dir = std::env::temp_dir().join(format!("whydenied-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("whydenied.yaml");
    std::fs::write(&path, "intercept: [403]\n").unwrap();
    let p = common::start_sidecar("intercept: [403]\n", up, Some(path.clone())).await;
    // The watcher is running once it has loaded a change.
    std::fs::write(&path, "intercept: [403, 401]\n").unwrap();
    wait_for_reloads(p.admin_addr, "ok", 1).await;
    let swaps: [&dyn Fn(); 3] = [
        &|| {
            std::fs::remove_file(&path).unwrap();
            let made = std::process::Command::new("mkfifo")
                .arg(&path)
                .status()
                .unwrap();
            assert!(made.success());
        },
        &|| {
            std::fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        },
        &|| {
            std::fs::remove_file(&path).unwrap();
            std::fs::write(&path, "").unwrap();
        },
    ];
    for (n, swap) in (1..).zip(swaps) {
        swap();
        wait_for_reloads(p.admin_addr, "failed", n).await;
        let res = common::send(p.addr, common::get(p.addr, "/ok", &[])).await;
        assert_eq!(res.status(), http::StatusCode::OK);
    }
    std::fs::remove_dir_all(&dir).ok();
}
