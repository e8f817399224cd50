//! Denial events, sinks, escalation and self-service over real sockets: a
//! real upstream, the sidecar, a real webhook receiver that verifies the
//! signature, real files.
#![cfg(feature = "sidecar")]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{receiver, upstream};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use whydenied::Config;
use whydenied::sidecar::{self, Running};

const GUARD: Duration = Duration::from_secs(30);
const SECRET: &[u8] = b"webhook-shared-secret";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whydenied-ev-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(hook: SocketAddr, file: &Path, extra: &str) -> String {
    format!(
        r#"
identity: {{ header: x-forwarded-user, jwt_claim: sub }}
trusted_proxies: [127.0.0.1]
policies:
  - id: admin-console
    title: Administrators only
    match: {{ path: "/denied" }}
    cause: permission
    owner: platform-team
events:
  sinks: [audit, hook]
sinks:
  audit: {{ file: {{ path: "{}", max_bytes: 4096, keep: 2 }} }}
  hook:
    webhook: {{ url: "http://{hook}/events", timeout: 500ms, retries: 2, secret: webhook-shared-secret, headers: {{ x-team: platform }} }}
    queue: 64
{extra}"#,
        file.display()
    )
}

async fn start(yaml: &str, up: SocketAddr) -> Running {
    sidecar::start(sidecar::Options {
        config: Config::from_yaml_str(yaml).unwrap_or_else(|e| panic!("{e}")),
        config_path: None,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        upstream: Some(format!("http://{up}").parse().unwrap()),
        admin: Some("127.0.0.1:0".parse().unwrap()),
    })
    .await
    .unwrap()
}

fn req(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    common::get(addr, path, headers)
}

async fn body(res: http::Response<hyper::body::Incoming>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

async fn next(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<receiver::Delivery>,
) -> receiver::Delivery {
    tokio::time::timeout(GUARD, rx.recv())
        .await
        .expect("no delivery")
        .unwrap()
}

async fn metrics(p: &Running) -> String {
    body(common::send(p.admin_addr, req(p.admin_addr, "/metrics", &[])).await).await
}

#[tokio::test]
async fn denials_reach_the_webhook_signed_and_the_file_as_json_lines() {
    let (up, _) = upstream::start().await;
    let mut hook = receiver::start(SECRET).await;
    let dir = temp_dir("basic");
    let file = dir.join("events.jsonl");
    let p = start(&config(hook.addr, &file, ""), up).await;

    let res = common::send(
        p.addr,
        req(p.addr, "/denied", &[("x-forwarded-user", "bob")]),
    )
    .await;
    let id = res.headers()["x-denial-id"].to_str().unwrap().to_owned();
    let d = next(&mut hook.deliveries).await;
    assert!(d.signature_valid, "bad signature on {}", d.body);
    assert_eq!(d.custom_header.as_deref(), Some("platform"));
    assert_eq!(d.json["schema"], 1);
    assert_eq!(d.json["event"], "denial");
    assert_eq!(d.json["denial_id"], id.as_str());
    assert_eq!(d.json["policy"]["id"], "admin-console");
    assert_eq!(d.json["identity"]["name"], "bob");
    assert_eq!(d.json["identity"]["source"], "header");
    assert_eq!(d.json["client_ip"], "127.0.0.1");
    assert_eq!(d.json["upstream"]["status"], 403);
    assert!(!d.json["config_revision"].as_str().unwrap().is_empty());

    // The admin can look it up by id, on the admin listener only.
    let found = body(
        common::send(
            p.admin_addr,
            req(p.admin_addr, &format!("/denials/{id}"), &[]),
        )
        .await,
    )
    .await;
    let v: Value = serde_json::from_str(&found).unwrap();
    assert_eq!(v["denial_id"], id.as_str());
    let res = common::send(
        p.admin_addr,
        req(p.admin_addr, "/denials/AAAAAAAAAAAAAAAAAAAAAA", &[]),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let found = lookup(&id, p.admin_addr).await;
    let printed = String::from_utf8_lossy(&found.stdout);
    assert!(
        found.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&found.stderr)
    );
    assert!(printed.contains(&format!("Denial {id}")), "{printed}");
    assert!(
        printed.contains("policy:    admin-console (Administrators only)"),
        "{printed}"
    );
    assert!(
        printed.contains("caller:    bob (header) from 127.0.0.1"),
        "{printed}"
    );
    // One id in 64 starts with `-` (and one in 4096 with `--`): still an id
    // to look up, not an option.
    for unknown in ["-AAAAAAAAAAAAAAAAAAAAA", "--AAAAAAAAAAAAAAAAAAAA"] {
        let missing = lookup(unknown, p.admin_addr).await;
        let said = String::from_utf8_lossy(&missing.stderr);
        assert_eq!(missing.status.code(), Some(1), "{said}");
        assert!(
            said.contains(&format!("denial {unknown} is unknown")),
            "{said}"
        );
    }

    // The file sink has the same event as one JSON line (written by its own thread).
    let line = tokio::time::timeout(GUARD, async {
        loop {
            if let Some(l) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next().map(str::to_owned))
            {
                return l;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["denial_id"], id.as_str());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_dead_failing_or_slow_receiver_never_affects_requests() {
    let (up, _) = upstream::start().await;
    let mut hook = receiver::start(SECRET).await;
    let dir = temp_dir("dead");
    // Metrics are per process: this test's sink has a name of its own.
    let yaml = config(hook.addr, &dir.join("e.jsonl"), "")
        .replace("[audit, hook]", "[audit, deadhook]")
        .replace("\n  hook:\n", "\n  deadhook:\n");
    let p = start(&yaml, up).await;

    // 500s: each event is tried 1 + 2 times, then dropped and counted.
    hook.mode.store(receiver::FAIL_500, Ordering::SeqCst);
    for _ in 0..3 {
        let res = common::send(p.addr, req(p.addr, "/denied", &[])).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
    }
    tokio::time::timeout(GUARD, async {
        while !metrics(&p)
            .await
            .contains("whydenied_events_dropped_total{sink=\"deadhook\"} 3")
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the failed deliveries were never counted as dropped");
    assert_eq!(hook.attempts.load(Ordering::SeqCst), 9);
    let text = metrics(&p).await;
    assert!(
        text.contains("whydenied_webhook_retries_total{sink=\"deadhook\"} 6"),
        "{text}"
    );
    assert!(
        text.contains("whydenied_sink_errors_total{sink=\"deadhook\"}"),
        "{text}"
    );

    // A receiver that never answers: requests still complete at once, the
    // queue (64) fills, and the rest is dropped and counted.
    hook.mode.store(receiver::HANG, Ordering::SeqCst);
    for _ in 0..200 {
        let res = tokio::time::timeout(GUARD, common::send(p.addr, req(p.addr, "/denied", &[])))
            .await
            .expect("a request waited for the sink");
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
    }
    let text = metrics(&p).await;
    let dropped: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("whydenied_events_dropped_total{sink=\"deadhook\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped > 3 + 100, "only {dropped} dropped");
    assert!(
        hook.deliveries.try_recv().is_err(),
        "nothing was delivered while failing"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_repeated_denial_escalates_once_per_incident() {
    let (up, _) = upstream::start().await;
    let mut hook = receiver::start(SECRET).await;
    let dir = temp_dir("repeat");
    let extra = "escalation:\n  rules:\n    - { id: stuck-caller, same: [identity, policy], count: 3, within: 10m, cooldown: 1h, notify: [hook] }\n";
    let p = start(&config(hook.addr, &dir.join("e.jsonl"), extra), up).await;
    for _ in 0..6 {
        common::send(
            p.addr,
            req(p.addr, "/denied", &[("x-forwarded-user", "bob")]),
        )
        .await;
    }
    let mut escalations = Vec::new();
    for _ in 0..7 {
        let d = next(&mut hook.deliveries).await;
        if d.json["event"] == "escalation" {
            escalations.push(d);
        }
    }
    assert_eq!(escalations.len(), 1, "{escalations:?}");
    let e = &escalations[0].json;
    assert!(escalations[0].signature_valid);
    assert_eq!(e["rule"], "stuck-caller");
    assert_eq!(e["policy"], "admin-console");
    assert_eq!(e["count"], 3);
    assert_eq!(e["sample_denial_ids"].as_array().unwrap().len(), 3);
    let summary = e["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(
            "bob was denied 3 times by policy `admin-console` (Administrators only) within 10m"
        ),
        "{summary}"
    );
    assert!(
        metrics(&p)
            .await
            .contains("whydenied_escalations_total{rule=\"stuck-caller\"} 1")
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn the_file_sink_rotates_and_every_line_is_one_event() {
    let (up, _) = upstream::start().await;
    let hook = receiver::start(SECRET).await;
    let dir = temp_dir("rotate");
    let file = dir.join("events.jsonl");
    let p = start(&config(hook.addr, &file, ""), up).await;
    // The tokens' encoded parts; none may reach the file. (Not just "eyJ":
    // a random denial id contains that now and then.)
    let mut token_parts = vec!["eyJhbGciOiJub25lIn0".to_owned()];
    for i in 0..30 {
        // A JWT claim with CR LF: it must stay inside one line.
        let claims = format!("{{\"sub\":\"user{i}\\r\\nInjected: yes\"}}");
        let payload = base64_url(claims.as_bytes());
        let jwt = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        token_parts.push(payload);
        common::send(
            p.addr,
            req(
                p.addr,
                "/denied",
                &[("authorization", &format!("Bearer {jwt}"))],
            ),
        )
        .await;
    }
    let rotated2 = PathBuf::from(format!("{}.2", file.display()));
    tokio::time::timeout(GUARD, async {
        while !rotated2.exists() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("never rotated twice");
    assert!(
        !PathBuf::from(format!("{}.3", file.display())).exists(),
        "keep: 2"
    );
    for path in [
        file.clone(),
        PathBuf::from(format!("{}.1", file.display())),
        rotated2,
    ] {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text.len() <= 4096,
            "{} is {} bytes",
            path.display(),
            text.len()
        );
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(v["event"], "denial");
            for part in &token_parts {
                assert!(!line.contains(part), "a token reached the file: {line}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `whydenied lookup ID --admin http://ADMIN`, run to its end.
async fn lookup(id: &str, admin: SocketAddr) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_whydenied"))
        .args(["lookup", id, "--admin", &format!("http://{admin}")])
        .output()
        .await
        .unwrap()
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn escalate(addr: SocketAddr, href: &str, note: &str, who: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{href}"))
        .header("host", addr.to_string())
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-user", who)
        .body(Full::new(Bytes::from(format!("note={note}"))))
        .unwrap()
}

#[tokio::test]
async fn self_service_escalation_end_to_end() {
    let (up, _) = upstream::start().await;
    let mut hook = receiver::start(SECRET).await;
    let dir = temp_dir("self");
    let extra = "escalation:\n  self_service: { enabled: true, notify: [hook], max_note_bytes: 200, per_client_count: 2, per_client_within: 10m }\n";
    let p = start(&config(hook.addr, &dir.join("e.jsonl"), extra), up).await;

    let res = common::send(
        p.addr,
        req(p.addr, "/denied", &[("x-forwarded-user", "bob")]),
    )
    .await;
    let id = res.headers()["x-denial-id"].to_str().unwrap().to_owned();
    let v: Value = serde_json::from_str(&body(res).await).unwrap();
    let href = v["escalate"]["href"].as_str().unwrap().to_owned();
    assert_eq!(href, format!("/.whydenied/denials/{id}/escalate"));
    assert_eq!(v["escalate"]["method"], "POST");
    let _denial = next(&mut hook.deliveries).await;

    // The HTML page carries a form that works without JavaScript.
    let page = body(
        common::send(
            p.addr,
            req(
                p.addr,
                "/denied",
                &[("accept", "text/html"), ("x-forwarded-user", "bob")],
            ),
        )
        .await,
    )
    .await;
    assert!(
        page.contains("<form method=\"post\" action=\"/.whydenied/denials/"),
        "{page}"
    );
    assert!(!page.contains("<script"));
    let _second = next(&mut hook.deliveries).await;

    // Accepted: 202 with an escalation id; the event carries the note and the evidence.
    let res = common::send(
        p.addr,
        escalate(p.addr, &href, "I+run+the+Q3+report+%3Cb%3E", "bob"),
    )
    .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let accepted: Value = serde_json::from_str(&body(res).await).unwrap();
    let escalation_id = accepted["escalation_id"].as_str().unwrap().to_owned();
    let e = next(&mut hook.deliveries).await;
    assert!(e.signature_valid);
    assert_eq!(e.json["event"], "escalation");
    assert_eq!(e.json["rule"], "self_service");
    assert_eq!(e.json["escalation_id"], escalation_id.as_str());
    assert_eq!(e.json["note"], "I run the Q3 report <b>");
    assert_eq!(e.json["denial"]["denial_id"], id.as_str());
    assert_eq!(e.json["denial"]["policy"]["id"], "admin-console");
    assert!(
        e.json["summary"]
            .as_str()
            .unwrap()
            .starts_with("bob asks for access to GET /denied")
    );

    // Refused: an unknown id, another caller's denial, an oversized note, the rate limit.
    let unknown = "/.whydenied/denials/AAAAAAAAAAAAAAAAAAAAAA/escalate";
    let res = common::send(p.addr, escalate(p.addr, unknown, "x", "bob")).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = common::send(p.addr, escalate(p.addr, &href, "x", "mallory")).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let long = "a".repeat(1000);
    let res = common::send(p.addr, escalate(p.addr, &href, &long, "bob")).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let res = common::send(p.addr, escalate(p.addr, &href, "again", "bob")).await;
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the 413 attempt counted too"
    );
    assert!(res.headers().contains_key("retry-after"));
    let res = common::send(
        p.addr,
        common::get(p.addr, &href, &[("x-forwarded-user", "bob")]),
    )
    .await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "only POST is served by whydenied; GET goes upstream"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn secrets_never_reach_a_sink_a_log_or_a_page() {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    let (up, _) = upstream::start().await;
    let mut hook = receiver::start(SECRET).await;
    let dir = temp_dir("secrets");
    let file = dir.join("events.jsonl");
    let yaml = config(hook.addr, &file, "")
        .replace("sinks: [audit, hook]", "sinks: [audit, hook, out]")
        .replace("\nsinks:\n", "\nsinks:\n  out: { stdout: {} }\n");
    let path = dir.join("whydenied.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_whydenied"))
        .args([
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args([
            "--upstream",
            &format!("http://{up}"),
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut logs = String::new();
    let addr: SocketAddr = loop {
        let line = tokio::time::timeout(GUARD, stderr.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        logs.push_str(&line);
        logs.push('\n');
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["message"] == "whydenied is serving"
        {
            break v["listen"].as_str().unwrap().parse().unwrap();
        }
    };
    let secrets = [
        "SECRETAUTH123456",
        "SECRETCOOKIE123",
        "SECRETQUERY123",
        "sEcReT4Body1234567",
        "eyJzZWNyZXQiOiJ4In0",
    ];
    let mut pages = String::new();
    let mut id = String::new();
    for accept in ["application/json", "text/html", "text/plain"] {
        let res = common::send(
            addr,
            req(
                addr,
                "/leaky?token=SECRETQUERY123&page=1",
                &[
                    ("accept", accept),
                    ("authorization", "Bearer SECRETAUTH123456"),
                    ("cookie", "session=SECRETCOOKIE123"),
                ],
            ),
        )
        .await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        id = res.headers()["x-denial-id"].to_str().unwrap().to_owned();
        pages.push_str(&body(res).await);
    }
    let mut delivered = String::new();
    for _ in 0..3 {
        delivered.push_str(&next(&mut hook.deliveries).await.body);
    }
    assert!(
        delivered.contains("page=1") && delivered.contains("token=[redacted]"),
        "{delivered}"
    );
    // Wait for the last event in the stdout sink and the file, then stop the proxy.
    let mut stdout = child.stdout.take().unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(GUARD, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains(&id) {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "stdout closed early");
            out.extend_from_slice(&buf[..n]);
        }
        while !std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains(&id)
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the events never arrived");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    while let Ok(Some(line)) = tokio::time::timeout(GUARD, stderr.next_line())
        .await
        .unwrap()
    {
        logs.push_str(&line);
        logs.push('\n');
    }
    child.wait().await.unwrap();
    let file_text = std::fs::read_to_string(&file).unwrap();
    let stdout_text = String::from_utf8_lossy(&out).into_owned();
    // Every log line is one JSON object; an event's fields are the line's own.
    let logged: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON line ({e}): {l}")))
        .collect();
    assert!(
        logged.iter().any(|v| v["target"] == "whydenied::events"
            && v["event"] == "denial"
            && v["denial_id"] == id.as_str()),
        "events are traced too:\n{logs}"
    );
    for (what, text) in [
        ("pages", &pages),
        ("webhook", &delivered),
        ("file", &file_text),
        ("stdout sink", &stdout_text),
        ("logs", &logs),
    ] {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{secret} leaked into the {what}:\n{text}"
            );
        }
    }
    for line in file_text.lines().chain(stdout_text.lines()) {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("not one JSON line ({e}): {line}"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_widespread_rule_fires_on_distinct_callers_only() {
    let (up, _) = upstream::start().await;
    let mut hook = receiver::start(SECRET).await;
    let dir = temp_dir("wide");
    let extra = "escalation:\n  rules:\n    - { id: regression, same: [policy], distinct: identity, count: 3, within: 5m, cooldown: 1h, notify: [hook] }\n";
    let p = start(&config(hook.addr, &dir.join("e.jsonl"), extra), up).await;
    let mut sent = 0;
    for who in ["bob", "bob", "bob", "bob", "carol", "carol", "dave"] {
        common::send(p.addr, req(p.addr, "/denied", &[("x-forwarded-user", who)])).await;
        sent += 1;
    }
    let mut escalations = Vec::new();
    // Every denial is delivered, plus exactly one escalation, after dave's.
    for _ in 0..sent + 1 {
        let d = next(&mut hook.deliveries).await;
        if d.json["event"] == "escalation" {
            escalations.push(d.json);
        }
    }
    assert_eq!(escalations.len(), 1, "{escalations:?}");
    let e = &escalations[0];
    assert_eq!(e["rule"], "regression");
    assert_eq!(e["distinct_identities"], 3);
    assert!(
        e["summary"]
            .as_str()
            .unwrap()
            .contains("3 different callers were denied by policy `admin-console`")
    );
    let mut who: Vec<&str> = e["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    who.sort();
    assert_eq!(who, ["bob", "carol", "dave"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn an_unwritable_file_sink_is_counted_not_fatal() {
    let (up, _) = upstream::start().await;
    let hook = receiver::start(SECRET).await;
    let dir = temp_dir("unwritable");
    // The file's directory does not exist: every write fails.
    let missing = dir.join("no-such-dir").join("events.jsonl");
    let yaml = config(hook.addr, &missing, "")
        .replace("sinks: [audit, hook]", "sinks: [badfile]")
        .replace("\n  audit:", "\n  badfile:");
    let p = start(&yaml, up).await;
    for _ in 0..3 {
        let res = common::send(p.addr, req(p.addr, "/denied", &[])).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert!(res.headers().contains_key("x-denial-id"));
    }
    tokio::time::timeout(GUARD, async {
        loop {
            let text = metrics(&p).await;
            if text.contains("whydenied_sink_errors_total{sink=\"badfile\"} 3")
                && text.contains("whydenied_events_dropped_total{sink=\"badfile\"} 3")
            {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the failed writes were never counted");
    std::fs::remove_dir_all(&dir).ok();
}

/// A note that never finishes arriving does not hold the request: after
/// `note_timeout` the caller gets 408, and nothing is escalated.
#[tokio::test]
async fn a_self_service_note_that_never_arrives_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, _) = upstream::start().await;
    let mut hook = receiver::start(SECRET).await;
    let dir = temp_dir("slow-note");
    let extra =
        "escalation:\n  self_service: { enabled: true, notify: [hook], note_timeout: 300ms }\n";
    let p = start(&config(hook.addr, &dir.join("e.jsonl"), extra), up).await;
    let res = common::send(
        p.addr,
        req(p.addr, "/denied", &[("x-forwarded-user", "bob")]),
    )
    .await;
    let v: Value = serde_json::from_str(&body(res).await).unwrap();
    let href = v["escalate"]["href"].as_str().unwrap().to_owned();
    let _denial = next(&mut hook.deliveries).await;

    let mut stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let head = format!(
        "POST {href} HTTP/1.1\r\nhost: {}\r\nx-forwarded-user: bob\r\ncontent-type: text/plain\r\ncontent-length: 100\r\nconnection: close\r\n\r\nI need",
        p.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The rest of the note never comes; the answer does.
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), hook.deliveries.recv())
            .await
            .is_err(),
        "a note that did not arrive was escalated"
    );
    std::fs::remove_dir_all(&dir).ok();
}
