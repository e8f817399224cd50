//! Embedding in axum 0.8, and the lean dependency set of `default-features = false`.

use axum::Router;
use axum::routing::get;
use whydenied::{Config, ExplainLayer};

/// Compile-time check: the layer is accepted by axum's `Router::layer` and
/// `Router::route_layer`, and the result is still a `Router` that can be served.
#[allow(dead_code)]
fn accepted_by_axum_router() -> Router {
    let layer = ExplainLayer::new(Config::default());
    let inner: Router = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(layer.clone());
    let router = Router::new()
        .merge(inner)
        .fallback(|| async { (http::StatusCode::FORBIDDEN, "no") })
        .layer(layer);
    fn servable(_: &Router) {
        let _ = axum::serve::<tokio::net::TcpListener, Router, Router>;
    }
    servable(&router);
    router
}

#[test]
fn the_lean_layer_pulls_in_no_proxy_cli_or_runtime() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--no-default-features",
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for heavy in [
        "hyper",
        "hyper-util",
        "tokio",
        "clap",
        "tracing-subscriber",
        "schemars",
        "axum",
    ] {
        assert!(
            !crates.contains(&heavy),
            "`{heavy}` is a dependency of the lean layer:\n{tree}"
        );
    }
    assert!(crates.contains(&"tower-layer"));
}
