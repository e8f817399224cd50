//! The sidecar's fast lane (src/sidecar/lane.rs) against an upstream that
//! answers with scripted bytes: framing it must relay exactly, framing it
//! must refuse, and the hand-over to hyper at a request boundary. Real
//! sockets on 127.0.0.1.
#![cfg(feature = "sidecar")]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GUARD: Duration = Duration::from_secs(30);

/// What the scripted upstream saw: the request heads, by connection.
type Seen = Arc<Mutex<Vec<Vec<String>>>>;

/// An upstream that answers the n-th request head on each connection with
/// `script[n]` (raw bytes), then closes that connection after the script.
async fn scripted(script: Vec<&'static [u8]>) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let script = script.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let index = {
                    let mut all = record.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                let mut pending = Vec::new();
                for answer in script {
                    // One request head (the lane sends no bodies).
                    let head = loop {
                        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = pending.drain(..end + 4).collect();
                            break String::from_utf8_lossy(&head).into_owned();
                        }
                        let mut buf = [0u8; 4096];
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    };
                    record.lock().unwrap()[index].push(head);
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Reads from `s` until the connection closes (or the guard runs out).
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(GUARD, s.read_to_end(&mut all)).await;
    String::from_utf8_lossy(&all).into_owned()
}

/// Reads from `s` until `done` says the text so far is complete.
async fn read_until(s: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    while !done(&String::from_utf8_lossy(&all)) {
        let n = tokio::time::timeout(GUARD, s.read(&mut buf))
            .await
            .expect("the answer never completed")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&all));
        all.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// Whether `t` holds a whole response with a `content-length` body.
fn whole_response(t: &str) -> bool {
    t.find("\r\n\r\n").is_some_and(|end| {
        let len: usize = t[..end]
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(usize::MAX);
        t.len() >= end + 4 + len
    })
}

/// What a client gets for `HEAD /a` through the sidecar when the upstream
/// answers `answer`.
async fn head_through(answer: &'static [u8]) -> String {
    let (up, _) = scripted(vec![answer]).await;
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"HEAD /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    read_to_close(&mut s).await
}

const GET: &[u8] = b"GET /a HTTP/1.1\r\nhost: app.example\r\naccept: text/plain\r\n\r\n";

/// A chunked body is framed again on the way (bare sizes, no extensions,
/// no trailers: what hyper sends a client that did not ask for trailers),
/// and the upstream connection is kept for the next request.
#[tokio::test]
async fn a_chunked_body_is_framed_again_without_extensions_or_trailers() {
    let answer: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n4;note=x\r\nwiki\r\n5\r\npedia\r\n0\r\nset-cookie: session=attacker\r\ncontent-length: 99\r\n\r\n";
    let (up, seen) = scripted(vec![answer, answer]).await;
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[GET, GET].concat()).await.unwrap();
    let body = "\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n";
    let both = read_until(&mut s, |t| t.matches(body).count() == 2).await;
    assert_eq!(both.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{both}");
    assert_eq!(
        both.matches("\r\ntransfer-encoding: chunked\r\n").count(),
        2,
        "{both}"
    );
    assert!(
        !both.contains("note") && !both.contains("attacker"),
        "{both}"
    );
    // Two requests, one upstream connection.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].len(), 2);
    assert!(
        seen[0][0].contains("x-forwarded-for: 127.0.0.1\r\n"),
        "{}",
        seen[0][0]
    );
    assert!(
        seen[0][0].contains("forwarded: for=127.0.0.1;proto=http;host=\"app.example\"\r\n"),
        "{}",
        seen[0][0]
    );
}

/// What the lane would forward differently from the hyper path goes to
/// hyper: targets with characters outside a plain path and query (hyper
/// refuses `<`; a fragment must not reach the upstream), two
/// `Content-Length: 0`, and a head over `max_header_bytes` even when it
/// arrives in one read.
#[tokio::test]
async fn requests_the_lane_would_forward_differently_go_to_hyper() {
    let (up, _) = common::upstream::start().await;
    let p = common::start_sidecar("limits: { max_header_bytes: 8192 }\n", up, None).await;
    let big = format!(
        "GET /echo-headers HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(10_000)
    );
    for (request, status) in [
        (
            "GET /a<b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_owned(),
            "400",
        ),
        (big, "431"),
    ] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let text = read_to_close(&mut s).await;
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
    }
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /echo-headers#/../admin HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 "), "{text}");
    assert!(!text.contains("admin"), "{text}");
}

#[tokio::test]
async fn ambiguous_upstream_framing_is_a_502_not_a_second_message() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"[..],
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"[..],
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxxxx"[..],
        &b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"[..],
    ] {
        let (up, _) = scripted(vec![answer]).await;
        let p = common::start_sidecar("", up, None).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(GET).await.unwrap();
        let text = read_until(&mut s, |t| t.contains("x-denial-id") && t.contains("\r\n\r\n")).await;
        assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    }
}

#[tokio::test]
async fn a_malformed_chunk_cuts_the_body_and_closes_the_connection() {
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
    let (up, _) = scripted(vec![answer]).await;
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("5\r\nhello\r\n"), "{text}");
    assert!(!text.contains("zz"), "{text}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
}

#[tokio::test]
async fn a_body_until_close_is_relayed_and_the_client_connection_closed() {
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it";
    let (up, _) = scripted(vec![answer]).await;
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nall of it"), "{text}");
}

#[tokio::test]
async fn informational_responses_are_skipped_and_head_gets_no_body() {
    let answer: &[u8] = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
    let text = head_through(answer).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 5\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "{text}");
    assert!(!text.contains("103"), "{text}");
}

#[tokio::test]
async fn a_chunked_denial_is_explained_and_the_connection_goes_on() {
    let denial: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n6\r\nDenied\r\n0\r\n\r\n";
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (up, seen) = scripted(vec![denial, ok]).await;
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let text = read_until(&mut s, whole_response).await;
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(text.contains("x-denial-id: "), "{text}");
    assert!(
        !text.contains("Denied"),
        "the upstream body is never shown: {text}"
    );
    s.write_all(GET).await.unwrap();
    let next = read_until(&mut s, |t| t.ends_with("ok")).await;
    assert!(next.starts_with("HTTP/1.1 200 OK"), "{next}");
    // The denial's body was read to its end: the connection was kept.
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// A request the lane does not take (here: one with a body) goes to hyper
/// on the same connection, after the ones it served; pipelined bytes are
/// not lost on the way.
#[tokio::test]
async fn the_connection_is_handed_to_hyper_at_a_request_boundary() {
    let (up, _) = common::upstream::start().await;
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let post = b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello";
    let get = b"GET /echo-headers HTTP/1.1\r\nhost: x\r\n\r\n";
    s.write_all(&[&get[..], &post[..], &get[..]].concat())
        .await
        .unwrap();
    let text = read_until(&mut s, |t| {
        t.matches("x-forwarded-for").count() >= 2 && t.contains("\"len\":5")
    })
    .await;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    let upload = text.find("\"len\":5").unwrap();
    let first_echo = text.find("x-forwarded-for").unwrap();
    assert!(first_echo < upload, "answers out of order: {text}");
}

/// Headers the upstream names in `Connection` are hop-by-hop: they stop at
/// the proxy, as on the hyper path, up to the 32nd token.
#[tokio::test]
async fn headers_named_in_the_upstreams_connection_header_stop_at_the_proxy() {
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\nconnection: t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15, t16, x-internal-secret\r\nx-internal-secret: hunter2\r\nkeep-alive: timeout=5\r\ncontent-length: 2\r\n\r\nok";
    let (up, _) = scripted(vec![answer]).await;
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let text = read_until(&mut s, |t| t.ends_with("\r\n\r\nok")).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("keep-alive"), "{text}");
    assert!(!text.contains("t16"), "{text}");
}

/// A denial whose body arrives slowly is still explained: each read waits
/// up to the idle timeout, as on the hyper path; the response timeout
/// covers only the head.
#[tokio::test]
async fn a_slow_denial_body_is_explained() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 6\r\n\r\nDen")
            .await
            .unwrap();
        // Slower than the response timeout, quicker than the idle timeout.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let _ = s.write_all(b"ied").await;
        let _ = s.read(&mut buf).await;
    });
    let p = common::start_sidecar(
        "limits: { upstream_response_timeout: 200ms, idle_timeout: 10s }\n",
        up,
        None,
    )
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\naccept: text/plain\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(text.contains("x-denial-id: "), "{text}");
}

/// hyper refuses targets over 65 534 bytes whatever `max_uri_bytes` says;
/// the lane hands them over rather than forwarding them.
#[tokio::test]
async fn a_target_longer_than_hyper_takes_goes_to_hyper() {
    let (up, _) = common::upstream::start().await;
    let p = common::start_sidecar(
        "limits: { max_uri_bytes: 100000, max_header_bytes: 200000 }\n",
        up,
        None,
    )
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let request = format!(
        "GET /{} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let text = read_to_close(&mut s).await;
    assert!(
        text.starts_with("HTTP/1.1 414"),
        "{}",
        &text[..text.len().min(200)]
    );
}

/// A stop while the upstream is answering makes that response the last
/// one: it says `connection: close`, as hyper's does.
#[tokio::test]
async fn a_stop_during_an_exchange_closes_after_its_response() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let arrived = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (arrived2, release2) = (arrived.clone(), release.clone());
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        arrived2.notify_one();
        release2.notified().await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let _ = s.read(&mut buf).await;
    });
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    tokio::time::timeout(GUARD, arrived.notified())
        .await
        .unwrap();
    let stopping = tokio::spawn(p.shutdown());
    // The stop has begun once the listener no longer accepts.
    tokio::time::timeout(GUARD, async {
        while TcpStream::connect(p_addr_of(&s)).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    release.notify_one();
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    tokio::time::timeout(GUARD, stopping)
        .await
        .unwrap()
        .unwrap();
}

fn p_addr_of(s: &TcpStream) -> SocketAddr {
    s.peer_addr().unwrap()
}

/// An explained denial is framed by whydenied, whatever the upstream's
/// framing: a denial whose body ran until the upstream closed leaves the
/// client connection open. A HEAD answered with a denial already explained
/// upstream keeps that response's own `Content-Length`.
#[tokio::test]
async fn explained_answers_keep_the_connection_and_head_keeps_its_length() {
    let denial: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n\r\nDenied";
    let (up, _) = scripted(vec![denial]).await;
    let p = common::start_sidecar("", up, None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let text = read_until(&mut s, whole_response).await;
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(!text.contains("connection: close"), "{text}");

    let explained: &[u8] =
        b"HTTP/1.1 403 Forbidden\r\nx-denial-id: AAAAAAAAAAAAAAAAAAAAAA\r\ncontent-length: 1234\r\n\r\n";
    let text = head_through(explained).await;
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("content-length: 1234\r\n"), "{text}");
}
