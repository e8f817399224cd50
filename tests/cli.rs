//! The `whydenied` binary as an operator runs it: check, schema, health, and
//! serve with a graceful SIGTERM.
#![cfg(feature = "sidecar")]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::upstream;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_whydenied");
const GUARD: Duration = Duration::from_secs(30);

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = run(&["check", "--config", "config/whydenied.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("config/whydenied.yaml: OK"), "{stdout}");
    assert!(stdout.contains("policies:  7"), "{stdout}");
    assert!(stdout.contains("listen:    127.0.0.1:8080"), "{stdout}");
}

#[test]
fn check_refuses_a_bad_config_with_its_location() {
    let dir = std::env::temp_dir().join(format!("whydenied-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "intercept: [403]\npolicies:\n  - id: a\n    cause: permision\n",
    )
    .unwrap();
    let out = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:4:12: unknown cause `permision` (did you mean `permission`?)",
            path.display()
        )),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_committed_schema_is_current() {
    let out = run(&["schema"]);
    assert!(out.status.success());
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/whydenied.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        printed, committed,
        "run `whydenied schema > config/whydenied.schema.json`"
    );
    assert!(printed["properties"]["policies"].is_object());
    assert!(printed["properties"]["limits"].is_object());
    assert!(printed["properties"]["escalation"].is_object());
    let out = run(&["schema", "events"]);
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/events.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        printed, committed,
        "run `whydenied schema events > config/events.schema.json`"
    );
    assert!(printed["$defs"]["DenialEvent"].is_object());
    assert!(printed["$defs"]["EscalationEvent"].is_object());
}

/// Reads the child's JSON log lines until one has this message.
async fn wait_for_log(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    message: &str,
) -> Value {
    loop {
        let line = tokio::time::timeout(GUARD, lines.next_line())
            .await
            .expect("the proxy went quiet")
            .unwrap()
            .unwrap_or_else(|| panic!("the proxy exited before logging {message:?}"));
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["message"] == message
        {
            return v;
        }
    }
}

/// `whydenied serve` on ephemeral ports with JSON logs, in front of
/// `upstream`: the child, its log lines, and the "whydenied is serving" line.
async fn spawn_serve(
    config: &str,
    upstream: std::net::SocketAddr,
    extra: &[&str],
) -> (
    Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    Value,
) {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--config",
            config,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &format!("http://{upstream}"),
            "--log-format",
            "json",
        ])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = wait_for_log(&mut lines, "whydenied is serving").await;
    (child, lines, serving)
}

fn kill(child: &Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_slow_response_complete() {
    sigterm_case(&[]).await;
}

/// The same on a one-thread runtime (`--workers 1`): serving, health,
/// signals and the graceful stop all work without a thread pool.
#[tokio::test]
async fn one_worker_thread_serves_and_stops_gracefully() {
    sigterm_case(&["--workers", "1"]).await;
}

async fn sigterm_case(extra: &[&str]) {
    let (up, state) = upstream::start().await;
    let dir = std::env::temp_dir().join(format!(
        "whydenied-hup-{}-{}",
        std::process::id(),
        extra.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("whydenied.yaml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/whydenied.yaml"),
        &config,
    )
    .unwrap();
    let (mut child, mut lines, serving) = spawn_serve(config.to_str().unwrap(), up, extra).await;
    let addr: std::net::SocketAddr = serving["listen"].as_str().unwrap().parse().unwrap();
    let admin = serving["admin"].as_str().unwrap().to_owned();

    let health = Command::new(BIN)
        .args(["health", "--admin", &format!("http://{admin}")])
        .output()
        .await
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    // A slow request is in flight when SIGTERM arrives.
    let slow = tokio::spawn(async move {
        let res = common::send(addr, common::get(addr, "/slow", &[])).await;
        let status = res.status();
        (status, res.into_body().collect().await.unwrap().to_bytes())
    });
    tokio::time::timeout(GUARD, state.slow_arrived.notified())
        .await
        .unwrap();
    kill(&child, "-TERM");
    wait_for_log(
        &mut lines,
        "stopped accepting; waiting for in-flight requests",
    )
    .await;
    state.release_slow.notify_one();

    let (status, body) = tokio::time::timeout(GUARD, slow).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "slow but complete");
    let exit = tokio::time::timeout(GUARD, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");

    let health = Command::new(BIN)
        .args(["health", "--admin", &format!("http://{admin}")])
        .output()
        .await
        .unwrap();
    assert!(!health.status.success(), "healthy after shutdown");
    std::fs::remove_dir_all(&dir).ok();
}

/// A 502 asks the caller to report its id: the operator finds that id in
/// the log, with the upstream and the error.
#[tokio::test]
async fn a_proxy_failure_is_logged_with_its_id_and_error() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (mut child, mut lines, serving) = spawn_serve("config/whydenied.yaml", dead, &[]).await;
    let addr: std::net::SocketAddr = serving["listen"].as_str().unwrap().parse().unwrap();
    let res = common::send(addr, common::get(addr, "/", &[])).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let id = res.headers()["x-denial-id"].to_str().unwrap().to_owned();
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["temporary"], true, "{body}");
    assert!(!body.to_string().contains(&dead.to_string()), "{body}");
    let logged = wait_for_log(&mut lines, "proxy failure").await;
    assert_eq!(logged["denial_id"], id.as_str(), "{logged}");
    assert_eq!(logged["kind"], "unreachable", "{logged}");
    assert_eq!(logged["upstream"], dead.to_string(), "{logged}");
    assert!(
        logged["error"].as_str().unwrap().contains("refused"),
        "{logged}"
    );
    kill(&child, "-TERM");
    child.wait().await.unwrap();
}
