//! Hostile clients and hostile tokens against the sidecar, over real sockets
//! on 127.0.0.1: what a review found, each a test that failed before its fix.
#![cfg(feature = "sidecar")]

mod common;

use std::net::SocketAddr;

use common::upstream;

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
