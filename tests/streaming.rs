//! Streaming through the sidecar without buffering, alone in its own test
//! binary: it measures the process's peak memory, which tests running in
//! parallel in the same process would add to.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::upstream;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A test's own guard against hanging forever; never a synchronisation.
const GUARD: Duration = Duration::from_secs(30);

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_streamed_100_mib_post_passes_without_buffering() {
    let (up, _) = upstream::start().await;
    let p = common::start_sidecar("", up, None).await;
    let before = vm_hwm_kib();
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 1600; // 100 MiB
    let chunk = Bytes::from((0..CHUNK).map(|i| (i % 253) as u8).collect::<Vec<_>>());
    let mut expected_sum: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..CHUNKS {
        for b in chunk.iter() {
            expected_sum ^= u64::from(*b);
            expected_sum = expected_sum.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let frames = (0..CHUNKS).map({
        let chunk = chunk.clone();
        move |_| Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk.clone()))
    });
    let body = StreamBody::new(tokio_stream::iter(frames));
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/upload")
        .header("host", "app.example.com")
        .body(body)
        .unwrap();
    let res = tokio::time::timeout(GUARD * 4, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let v: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["len"], (CHUNK * CHUNKS) as u64);
    assert_eq!(v["sum"], expected_sum);
    let grown_mib = vm_hwm_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 48,
        "peak memory grew by {grown_mib} MiB for a 100 MiB body"
    );
}
