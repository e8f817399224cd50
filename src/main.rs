//! The `whydenied` command: the sidecar proxy, the demo, config checks.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use http::Uri;
use whydenied::Config;
use whydenied::sidecar::{self, telemetry};

/// whydenied: a reverse proxy that explains HTTP denials.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExplainFormat {
    Json,
    Text,
}

#[derive(Clone, Copy, ValueEnum)]
enum SchemaOf {
    Config,
    Events,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

impl From<LogFormat> for telemetry::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Json => telemetry::LogFormat::Json,
            LogFormat::Pretty => telemetry::LogFormat::Pretty,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of an upstream.
    Serve {
        /// The config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Listen here instead of the config's `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Forward to this upstream instead of the config's `upstream`.
        #[arg(long)]
        upstream: Option<Uri>,
        /// Serve the admin listener here instead of the config's `admin.listen`.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Log format (RUST_LOG sets the level).
        #[arg(long, value_enum, default_value = "json")]
        log_format: LogFormat,
        /// Threads that serve requests: 1 runs everything on one thread (like
        /// one nginx worker, and the right size for a sidecar limited to one
        /// CPU or less); by default one per CPU.
        #[arg(long, env = "WHYDENIED_WORKERS")]
        workers: Option<std::num::NonZeroUsize>,
    },
    /// Run the proxy in front of a built-in demo service that denies in the
    /// common ways, and print the requests to try.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where its admin listener listens.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Log format (RUST_LOG sets the level).
        #[arg(long, value_enum, default_value = "pretty")]
        log_format: LogFormat,
    },
    /// Validate a config file; exit 1 with file:line:column on error.
    Check {
        /// The config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the JSON Schema of the config file, or of the events.
    Schema {
        /// `config` or `events`.
        #[arg(default_value = "config")]
        of: SchemaOf,
    },
    /// Explain a response offline: what the caller would get, and the full
    /// diagnosis. With --corpus, evaluate the diagnosis on labelled samples.
    Explain(ExplainArgs),
    /// Print a recent denial, looked up by its id on the admin listener.
    Lookup {
        /// The denial id (from `x-denial-id` or the caller's page). One in
        /// 64 starts with `-`, which is taken as the id, not as an option.
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// The admin listener's URL.
        #[arg(long, default_value = "http://127.0.0.1:9901")]
        admin: Uri,
        /// Print the raw JSON event instead.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if the admin listener says healthy (for container health checks).
    Health {
        /// The admin listener's URL.
        #[arg(long, default_value = "http://127.0.0.1:9901")]
        admin: Uri,
        /// Ask /readyz instead (a config is loaded and the upstream accepts
        /// connections), for readiness probes.
        #[arg(long)]
        ready: bool,
    },
}

const DEMO_CONFIG: &str = include_str!("../config/whydenied.yaml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` and `demo` log through a writer thread (see `telemetry`).
    let mut logs = None;
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Schema { of } => {
            println!("{}", schema(of));
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain(args) => explain(args),
        Command::Lookup { id, admin, json } => {
            runtime().and_then(|rt| rt.block_on(lookup(&id, admin, json)))
        }
        Command::Health { admin, ready } => {
            runtime().and_then(|rt| rt.block_on(health(admin, ready)))
        }
        Command::Serve {
            config,
            listen,
            upstream,
            admin,
            log_format,
            workers,
        } => {
            logs = Some(telemetry::init_logging(log_format.into()));
            serve_runtime(workers)
                .and_then(|rt| rt.block_on(serve(config, listen, upstream, admin)))
        }
        Command::Demo {
            listen,
            admin,
            log_format,
        } => {
            logs = Some(telemetry::init_logging(log_format.into()));
            runtime().and_then(|rt| rt.block_on(demo(listen, admin)))
        }
    };
    // The log's last lines first; a stderr that did not take them would
    // block the error message too, and the exit code says it anyway.
    let stderr_drained = logs.is_none_or(telemetry::LogGuard::finish);
    match result {
        Ok(code) => code,
        Err(e) => {
            if stderr_drained {
                eprintln!("whydenied: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The runtime of `serve`: one thread, a pool of `workers` threads, or by
/// default one per CPU.
fn serve_runtime(
    workers: Option<std::num::NonZeroUsize>,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers.is_some_and(|n| n.get() == 1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.event_interval(EVENT_INTERVAL);
        if let Some(n) = workers {
            b.worker_threads(n.get());
        }
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Task polls between two looks for new I/O events and timers, when tasks
/// are ready all along, for the multi-threaded runtime (tokio's default is
/// 61). A proxy's tasks are short (one request's parsing and forwarding), so
/// like nginx's event loop it serves every connection that is ready before
/// asking the kernel for more: at saturation this halved the 99th percentile
/// latency (`wrk -t2 -c64 --latency`, 2.0-3.4 ms against 3.5-4.9 ms) with
/// the same throughput. The one-thread runtime showed no difference either
/// way and keeps the default. When no task is ready, events are picked up at
/// once as ever.
const EVENT_INTERVAL: u32 = 200;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    serve_runtime(None)
}

fn check(path: &PathBuf) -> anyhow::Result<ExitCode> {
    match Config::from_file(path) {
        Ok(config) => {
            let or_default =
                |v: Option<String>, d: &str| v.unwrap_or_else(|| format!("{d} (default)"));
            println!("{}: OK", path.display());
            println!("  revision:  {}", config.revision());
            println!("  policies:  {}", config.policies().len());
            println!("  intercept: {:?}", config.intercepted());
            println!(
                "  listen:    {}",
                or_default(
                    config.listen().map(|a| a.to_string()),
                    sidecar::DEFAULT_LISTEN
                )
            );
            println!(
                "  admin:     {}",
                or_default(
                    config.admin_listen().map(|a| a.to_string()),
                    sidecar::DEFAULT_ADMIN
                )
            );
            println!(
                "  upstream:  {}",
                config.upstream().map_or_else(
                    || "(not set: pass --upstream)".to_owned(),
                    |u| u.to_string()
                )
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Tells the operator at start, before the first 502, that the upstream
/// does not accept connections (yet).
async fn warn_if_unreachable(authority: String, limit: Duration) {
    let connect = tokio::net::TcpStream::connect(authority.clone());
    match tokio::time::timeout(limit, connect).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(
            target: "whydenied",
            upstream = %authority,
            error = %e,
            "the upstream does not accept connections yet; requests get 502 until it does"
        ),
        Err(_) => tracing::warn!(
            target: "whydenied",
            upstream = %authority,
            "the upstream did not accept a connection within upstream_connect_timeout; requests fail until it does"
        ),
    }
}

fn schema(of: SchemaOf) -> String {
    let schema = match of {
        SchemaOf::Config => schemars::schema_for!(whydenied::config::raw::RawConfig),
        SchemaOf::Events => schemars::schema_for!(whydenied::events::AnyEvent),
    };
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

async fn serve(
    config_path: PathBuf,
    listen: Option<SocketAddr>,
    upstream: Option<Uri>,
    admin: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let config = match Config::from_file(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let probe = upstream
        .as_ref()
        .or(config.upstream())
        .and_then(|u| u.authority())
        .map(|a| {
            (
                a.as_str().to_owned(),
                config.limits().upstream_connect_timeout,
            )
        });
    let running = sidecar::start(sidecar::Options {
        config,
        config_path: Some(config_path),
        listen,
        upstream,
        admin,
    })
    .await?;
    if let Some((authority, limit)) = probe {
        tokio::spawn(warn_if_unreachable(authority, limit));
    }
    wait_for_shutdown_signal().await;
    tracing::info!(target: "whydenied", "shutting down");
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn demo(listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<ExitCode> {
    let upstream_addr = sidecar::demo::start_upstream()
        .await
        .context("cannot start the demo service")?;
    let config = Config::parse(DEMO_CONFIG, "config/whydenied.yaml")
        .context("the shipped config does not load")?;
    let upstream: Uri = format!("http://{upstream_addr}").parse()?;
    let running = sidecar::start(sidecar::Options {
        config,
        config_path: None,
        listen: Some(listen),
        upstream: Some(upstream),
        admin: Some(admin),
    })
    .await
    .context("cannot start the demo proxy (is the port taken? try --listen 127.0.0.1:8081 --admin 127.0.0.1:9902)")?;
    print_demo(running.addr, running.admin_addr, upstream_addr);
    wait_for_shutdown_signal().await;
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn print_demo(addr: SocketAddr, admin: SocketAddr, upstream: SocketAddr) {
    let u = format!("http://{addr}");
    println!(
        r#"
whydenied demo: the proxy on {u} explains the denials of a demo service
(on {upstream}), with the shipped config (config/whydenied.yaml).

Try these (the status never changes; the explanation follows Accept):

  # A path only admins may use; an API client gets problem+json:
  curl -i {u}/admin/users -H 'x-forwarded-user: bob'
  # ... a browser gets a page, a terminal gets text:
  curl -s {u}/admin/users -H 'x-forwarded-user: bob' -H 'accept: text/html'
  curl -s {u}/admin/users -H 'x-forwarded-user: bob' -H 'accept: text/plain'
  # An admin gets through: not a denial, passed through untouched:
  curl -i {u}/admin/users -H 'x-forwarded-user: alice'
  # No credentials at all:
  curl -s {u}/api/orders -H 'accept: text/plain'
  # A token without the reports:read scope:
  curl -s {u}/api/reports/q3 -H 'authorization: Bearer demo' -H 'accept: text/plain'
  # A rate limit (429 with Retry-After):
  curl -i {u}/api/search -H 'x-api-key: demo'
  # An S3-style AccessDenied document:
  curl -s {u}/files/payroll.csv -H 'cookie: session=demo' -H 'accept: text/plain'
  # Internal tools from outside the office network (X-Forwarded-For is
  # believed from 127.0.0.1, a trusted proxy in the shipped config):
  curl -s {u}/internal/metrics -H 'cookie: session=demo' -H 'accept: text/plain'
  # ... and from the office network, where the service lets it through:
  curl -i {u}/internal/metrics -H 'cookie: session=demo' -H 'x-forwarded-for: 192.0.2.10'
  # A rule that must not say which rule fired (expose: minimal):
  curl -s {u}/debug/vars -H 'accept: text/plain'
  # An ordinary page:
  curl -i {u}/

  # "Request access" for a denial (take the id from x-denial-id; only the
  # caller who was denied may): the escalation event appears below.
  curl -s -X POST {u}/.whydenied/denials/DENIAL_ID/escalate -H 'x-forwarded-user: bob' -d 'note=I run the Q3 report'
  # Look a denial up as an admin:
  cargo run -- lookup DENIAL_ID --admin http://{admin}

Open {u}/admin/users in a browser to see the page. Every denial and
escalation is also printed below as one JSON event (the `console` sink).
Admin listener: http://{admin}/healthz  http://{admin}/readyz  http://{admin}/metrics

Press Ctrl-C to stop.
"#
    );
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// A config whose policies and signatures to use (default: none, built-in signatures).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// The request URL or path.
    #[arg(long, default_value = "/")]
    url: String,
    /// A request header, `name: value` (repeatable).
    #[arg(long = "request-header", value_name = "HEADER")]
    request_headers: Vec<String>,
    /// The response status.
    #[arg(long, default_value_t = 403)]
    status: u16,
    /// The reason phrase of the status line, if it says something.
    #[arg(long)]
    reason: Option<String>,
    /// A response header, `name: value` (repeatable).
    #[arg(long = "response-header", value_name = "HEADER")]
    response_headers: Vec<String>,
    /// A file holding the response body.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: ExplainFormat,
    /// Evaluate every sample in this directory (labelled samples, as in tests/corpus).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

fn header_map(lines: &[String]) -> anyhow::Result<http::HeaderMap> {
    let mut map = http::HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("`{line}` is not a header; write `name: value`"))?;
        map.append(
            http::HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("`{}` is not a header name", name.trim()))?,
            http::HeaderValue::from_str(value.trim())
                .with_context(|| format!("the value of `{}` is not valid", name.trim()))?,
        );
    }
    Ok(map)
}

fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        None => Config::default(),
    };
    if let Some(dir) = &args.corpus {
        let report = whydenied::corpus::evaluate(&config, dir).map_err(|e| anyhow::anyhow!(e))?;
        print!("{}", report.to_markdown());
        return Ok(ExitCode::SUCCESS);
    }
    let status = http::StatusCode::from_u16(args.status).context("--status must be 100..=999")?;
    let body = match &args.body_file {
        Some(path) => {
            let mut data =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            data.truncate(config.max_body_bytes());
            data
        }
        None => Vec::new(),
    };
    let mut request = http::Request::builder()
        .method(args.method.as_str())
        .uri(args.url.as_str())
        .body(())
        .context("--method or --url is not valid")?;
    *request.headers_mut() = header_map(&args.request_headers)?;
    let response_headers = header_map(&args.response_headers)?;
    let facts = whydenied::facts::RequestFacts::capture(&request, &config);
    let upstream = whydenied::policy::Upstream {
        status,
        headers: &response_headers,
        body: &body,
        reason: args.reason.as_deref(),
    };
    let explanation = whydenied::diagnose::explain(
        &config,
        &facts,
        &upstream,
        whydenied::DenialId::random()?,
        std::time::SystemTime::now(),
    );
    let negotiated = match args.format {
        ExplainFormat::Json => whydenied::Negotiated::ProblemJson,
        ExplainFormat::Text => whydenied::Negotiated::Text,
    };
    let caller = whydenied::render::render(&explanation.caller_view(), negotiated);
    if args.format == ExplainFormat::Json {
        let diagnosis = serde_json::json!({
            "caller_sees": serde_json::from_str::<serde_json::Value>(&caller).unwrap_or_default(),
            "diagnosis": {
                "denied_by": explanation.denied_by.as_str(),
                "temporary": explanation.temporary,
                "retry_after_seconds": explanation.retry_after_seconds,
                "causes": explanation.causes,
            }
        });
        println!("{}", serde_json::to_string_pretty(&diagnosis)?);
    } else {
        println!("--- What the caller sees ---\n{caller}");
        println!("--- Diagnosis ---");
        println!("denied by: {}", explanation.denied_by.describe());
        println!(
            "temporary: {}{}",
            if explanation.temporary { "yes" } else { "no" },
            explanation
                .retry_after_seconds
                .map(|s| format!(", retry after {s} seconds"))
                .unwrap_or_default()
        );
        for (n, cause) in explanation.causes.iter().enumerate() {
            println!("{}. {} ({})", n + 1, cause.cause, cause.likelihood);
            for e in &cause.evidence {
                println!("   - {e}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// GET `path` from the admin listener: (status, body).
async fn admin_get(admin: &Uri, path: &str) -> anyhow::Result<(http::StatusCode, bytes::Bytes)> {
    use http_body_util::BodyExt as _;
    let authority = admin
        .authority()
        .context("--admin must be a URL such as http://127.0.0.1:9901")?
        .as_str()
        .to_owned();
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let res = sender.send_request(req).await?;
        let status = res.status();
        let body = http_body_util::Limited::new(res.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {authority} within 3 seconds"))?
        .with_context(|| format!("cannot ask the admin listener at {authority}"))
}

async fn lookup(id: &str, admin: Uri, json: bool) -> anyhow::Result<ExitCode> {
    if whydenied::DenialId::parse(id).is_none() {
        eprintln!(
            "`{}` is not a denial id (22 characters of A-Z, a-z, 0-9, - and _)",
            whydenied::escape::clean(id, 64)
        );
        return Ok(ExitCode::FAILURE);
    }
    let (status, body) = admin_get(&admin, &format!("/denials/{id}")).await?;
    // What the admin listener sends reaches a terminal: cleaned of control
    // characters (escape sequences), whoever answers on that address.
    if !status.is_success() {
        eprintln!(
            "{}",
            whydenied::escape::clean_prose(String::from_utf8_lossy(&body).trim_end(), 2000)
        );
        return Ok(ExitCode::FAILURE);
    }
    if json {
        // Re-serialised: JSON escapes every control character.
        let v: serde_json::Value =
            serde_json::from_slice(&body).context("the admin listener's answer is not JSON")?;
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&body).context("the admin listener sent no JSON")?;
    let s = |v: &serde_json::Value| whydenied::escape::clean_prose(v.as_str().unwrap_or(""), 4000);
    println!("Denial {}", s(&v["denial_id"]));
    println!("  when:      {}", s(&v["ts"]));
    println!(
        "  request:   {} {} (host {})",
        s(&v["method"]),
        s(&v["url"]),
        s(&v["host"])
    );
    println!("  status:    {}", v["status"]);
    println!(
        "  caller:    {} from {}",
        v["identity"]["name"]
            .as_str()
            .map_or("unknown".to_owned(), |_| {
                format!(
                    "{} ({})",
                    s(&v["identity"]["name"]),
                    s(&v["identity"]["source"])
                )
            }),
        v["client_ip"]
            .as_str()
            .map_or("an unknown address".to_owned(), |_| s(&v["client_ip"]))
    );
    println!("  agent:     {}", s(&v["user_agent"]));
    match v["policy"]["id"].as_str() {
        Some(p) => println!("  policy:    {p} ({})", s(&v["policy"]["title"])),
        None => println!("  policy:    none matched"),
    }
    println!("  causes:");
    for c in v["causes"].as_array().into_iter().flatten() {
        println!("    - {} ({})", s(&c["cause"]), s(&c["likelihood"]));
        for e in c["evidence"].as_array().into_iter().flatten() {
            println!("        {}", s(e));
        }
    }
    println!("  upstream:  {}", v["upstream"]["status"]);
    for h in v["upstream"]["headers"].as_array().into_iter().flatten() {
        println!("    {}: {}", s(&h[0]), s(&h[1]));
    }
    let excerpt = s(&v["upstream"]["body_excerpt"]);
    if !excerpt.is_empty() {
        println!("  body:      {excerpt}");
    }
    println!("  config:    revision {}", s(&v["config_revision"]));
    Ok(ExitCode::SUCCESS)
}

async fn health(admin: Uri, ready: bool) -> anyhow::Result<ExitCode> {
    let path = if ready { "/readyz" } else { "/healthz" };
    match admin_get(&admin, path).await {
        Ok((status, _)) if status.is_success() => {
            println!("{}", if ready { "ready" } else { "healthy" });
            Ok(ExitCode::SUCCESS)
        }
        Ok((status, body)) => {
            eprintln!(
                "not {}: {path} answered {status}: {}",
                if ready { "ready" } else { "healthy" },
                whydenied::escape::clean_prose(String::from_utf8_lossy(&body).trim_end(), 2000)
            );
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("unhealthy: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}
