//! Live config reload: on SIGHUP and when the config file changes.
//!
//! The file is checked every second by its metadata, following symlinks, so a
//! Kubernetes ConfigMap update (an atomic swap of a `..data` symlink in the
//! mounted directory) is seen like an in-place edit. A new config is parsed
//! and compiled fully, then swapped in one step; requests in flight finish on
//! the config they started with. A bad file changes nothing: it is logged with
//! its location and counted: so is a path that is not a regular file (a
//! FIFO or a device would block or never end), a file over the size limit,
//! and an empty file (an editor's save in progress). Reading and compiling
//! run on tokio's blocking threads, not on those that serve requests.

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

    /// Reads, compiles and swaps in the file now. Returns whether the file
    /// is what runs now (loaded, or unchanged). Blocking: it reads a file and
    /// compiles a config, which may take a while; [`Reloader::run`] calls it
    /// on tokio's blocking threads, never on a thread that serves requests.
    pub fn reload(&self, why: &str) -> bool {
        let text = crate::config::read_file(&self.path);
        if let Ok(text) = &text {
            // Touched but not changed (or written back as it was).
            if crate::config::revision(text) == self.handle.load().revision() {
                tracing::debug!(target: "whydenied", trigger = why, "config unchanged");
                return true;
            }
            // An editor that truncates the file, then writes it: the empty
            // moment would load the defaults.
            if text.trim().is_empty() {
                tracing::error!(
                    target: "whydenied",
                    trigger = why,
                    "config reload failed: the file is empty (being written?); keeping the running config"
                );
                metrics::counter!("whydenied_config_reloads_total", "result" => "failed")
                    .increment(1);
                return false;
            }
        }
        let path = self.path.display().to_string();
        match text.and_then(|text| Config::parse(&text, &path)) {
            Ok(config) => {
                let old = self.handle.load();
                if old.listen() != config.listen()
                    || old.admin_listen() != config.admin_listen()
                    || old.upstream() != config.upstream()
                    || old.limits() != config.limits()
                    || old.events().recent_max != config.events().recent_max
                    || old.events().max_tracked_keys != config.events().max_tracked_keys
                {
                    tracing::warn!(
                        target: "whydenied",
                        "listen, admin, upstream, limits, events.recent_max and escalation.max_tracked_keys apply at start; restart to use the new values"
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

    /// [`Reloader::reload`] on a blocking thread.
    async fn reload_off_thread(&self, why: &'static str) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.reload(why)).await;
    }

    /// Watches for SIGHUP and file changes until the task is dropped.
    pub async fn run(self) {
        // None: the first look compares the file with the running config
        // (a change between loading it and starting to watch is not
        // missed; an unchanged file is not reloaded).
        let mut last = None;
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
                    self.reload_off_thread("SIGHUP").await;
                    last = fingerprint(&self.path);
                }
                _ = tick.tick() => {
                    let now = fingerprint(&self.path);
                    if now.is_some() && now != last {
                        self.reload_off_thread("file changed").await;
                        last = now;
                    }
                }
            }
        }
    }
}
