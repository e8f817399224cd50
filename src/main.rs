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
    /// Print the JSON Schema of the config file.
    Schema,
    /// Exit 0 if the admin listener says healthy (for container health checks).
    Health {
        /// The admin listener's URL.
        #[arg(long, default_value = "http://127.0.0.1:9901")]
        admin: Uri,
    },
}

const DEMO_CONFIG: &str = include_str!("../config/whydenied.yaml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Schema => {
            println!("{}", schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { admin } => runtime().and_then(|rt| rt.block_on(health(admin))),
        Command::Serve {
            config,
            listen,
            upstream,
            admin,
            log_format,
        } => {
            telemetry::init_logging(log_format.into());
            runtime().and_then(|rt| rt.block_on(serve(config, listen, upstream, admin)))
        }
        Command::Demo {
            listen,
            admin,
            log_format,
        } => {
            telemetry::init_logging(log_format.into());
            runtime().and_then(|rt| rt.block_on(demo(listen, admin)))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("whydenied: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
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

fn schema() -> String {
    let schema = schemars::schema_for!(whydenied::config::raw::RawConfig);
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
    let running = sidecar::start(sidecar::Options {
        config,
        config_path: Some(config_path),
        listen,
        upstream,
        admin,
    })
    .await?;
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
  curl -i {u}/internal/metrics -H 'cookie: session=demo' -H 'x-forwarded-for: 192.0.2.10'
  # A rule that must not say which rule fired (expose: minimal):
  curl -s {u}/debug/vars -H 'accept: text/plain'
  # An ordinary page:
  curl -i {u}/

Open {u}/admin/users in a browser to see the page.
Admin listener: http://{admin}/healthz  http://{admin}/readyz  http://{admin}/metrics

Press Ctrl-C to stop.
"#
    );
}

async fn health(admin: Uri) -> anyhow::Result<ExitCode> {
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
        let req = http::Request::get("/healthz")
            .header(http::header::HOST, authority.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let res = sender.send_request(req).await?;
        anyhow::Ok(res.status())
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(status)) if status.is_success() => {
            println!("healthy");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Ok(status)) => {
            eprintln!("unhealthy: /healthz answered {status}");
            Ok(ExitCode::FAILURE)
        }
        Ok(Err(e)) => {
            eprintln!("unhealthy: {e:#}");
            Ok(ExitCode::FAILURE)
        }
        Err(_) => {
            eprintln!("unhealthy: no answer within 3 seconds");
            Ok(ExitCode::FAILURE)
        }
    }
}
