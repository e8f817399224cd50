//! Live config reload: on SIGHUP and when the config file changes.
//!
//! The file is checked every second by its metadata, following symlinks, so a
//! Kubernetes ConfigMap update (an atomic swap of a `..data` symlink in the
//! mounted directory) is seen like an in-place edit. A new config is parsed
//! and compiled fully, then swapped in one step; requests in flight finish on
//! the config they started with. A bad file changes nothing: it is logged with
//! its location and counted.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::{Config, ConfigHandle};

/// How often the file is looked at.
const POLL: Duration = Duration::from_secs(1);

/// Reloads one config file into one handle.
#[derive(Clone)]
pub struct Reloader {
    path: PathBuf,
    handle: ConfigHandle,
}

/// What identifies a version of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
    target: Option<PathBuf>,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        modified: meta.modified().ok(),
        len: meta.len(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&meta),
        target: std::fs::canonicalize(path).ok(),
    })
}

impl Reloader {
    /// A reloader for `path` into `handle`.
    pub fn new(path: PathBuf, handle: ConfigHandle) -> Self {
        Self { path, handle }
    }

    /// Reads, compiles and swaps in the file now. Returns whether it loaded.
    pub fn reload(&self, why: &str) -> bool {
        match Config::from_file(&self.path) {
            Ok(config) => {
                let old = self.handle.load();
                if old.listen() != config.listen()
                    || old.admin_listen() != config.admin_listen()
                    || old.upstream() != config.upstream()
                    || old.limits() != config.limits()
                {
                    tracing::warn!(
                        target: "whydenied",
                        "listen, admin, upstream and limits apply at start; restart to use the new values"
                    );
                }
                metrics::gauge!("whydenied_config_info", "revision" => old.revision().to_owned())
                    .set(0.0);
                metrics::gauge!("whydenied_config_info", "revision" => config.revision().to_owned())
                    .set(1.0);
                tracing::info!(
                    target: "whydenied",
                    trigger = why,
                    revision = config.revision(),
                    policies = config.policies().len(),
                    "config reloaded"
                );
                self.handle.replace(config);
                metrics::counter!("whydenied_config_reloads_total", "result" => "ok").increment(1);
                true
            }
            Err(e) => {
                tracing::error!(
                    target: "whydenied",
                    trigger = why,
                    error = %e,
                    "config reload failed; keeping the running config"
                );
                metrics::counter!("whydenied_config_reloads_total", "result" => "failed")
                    .increment(1);
                false
            }
        }
    }

    /// Watches for SIGHUP and file changes until the task is dropped.
    pub async fn run(self) {
        let mut last = fingerprint(&self.path);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = hangup => {
                    self.reload("SIGHUP");
                    last = fingerprint(&self.path);
                }
                _ = tick.tick() => {
                    let now = fingerprint(&self.path);
                    if now.is_some() && now != last {
                        self.reload("file changed");
                        last = now;
                    }
                }
            }
        }
    }
}
