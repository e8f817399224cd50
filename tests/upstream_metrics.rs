//! The upstream connection gauge, alone in its own test binary: the metrics
//! recorder is global to the process, so proxies in parallel tests would
//! add to the same gauge.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::upstream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A test's own guard against hanging forever; never a synchronisation.
const GUARD: Duration = Duration::from_secs(30);

async fn gauge(admin: std::net::SocketAddr) -> String {
    let res = common::send(admin, common::get(admin, "/metrics", &[])).await;
    common::text(res)
        .await
        .lines()
        .find(|l| l.starts_with("whydenied_upstream_connections "))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_upstream_connection_gauge_follows_client_connections() {
    let (up, accepted, closed) = upstream::counting(usize::MAX).await;
    let p = common::start_sidecar("", up, None).await;

    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for _ in 0..3 {
        assert_eq!(common::text_of_root(&mut client).await, "connection 1");
    }
    assert_eq!(
        gauge(p.admin_addr).await,
        "whydenied_upstream_connections 1"
    );

    // The client leaves: its upstream connection is closed and uncounted.
    drop(client);
    let _ = conn.await;
    tokio::time::timeout(GUARD, closed.notified())
        .await
        .expect("the upstream connection was kept open");
    assert_eq!(
        gauge(p.admin_addr).await,
        "whydenied_upstream_connections 0"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
