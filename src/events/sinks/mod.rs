//! The built-in sinks (feature `sinks`): stdout, stderr, a rotated file, a
//! webhook. Each runs on its own thread behind its own bounded queue, so a
//! slow, failing or dead sink never slows or fails a request; what does not
//! fit in the queue is dropped and counted (`whydenied_events_dropped_total`)
//! and logged at a bounded rate.

mod file;
mod webhook;

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Event, EventSink};
use crate::config::events::{SinkKind, SinkSpec};

/// Logs at most once per this many seconds per sink and kind of problem.
const LOG_EVERY_SECS: u64 = 10;

/// A log line that is written at most once per interval.
#[derive(Debug, Default)]
pub(crate) struct Throttle(AtomicU64);

impl Throttle {
    pub(crate) fn ready(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.0.load(Ordering::Relaxed);
        now >= last + LOG_EVERY_SECS
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Counts and (at a bounded rate) logs a sink failure.
pub(crate) fn failed(sink: &str, throttle: &Throttle, what: &str) {
    metrics::counter!("whydenied_sink_errors_total", "sink" => sink.to_owned()).increment(1);
    if throttle.ready() {
        tracing::warn!(target: "whydenied", sink, error = what, "event sink failed");
    }
}

/// Counts and (at a bounded rate) logs a dropped event.
pub(crate) fn dropped(sink: &str, throttle: &Throttle, why: &str) {
    metrics::counter!("whydenied_events_dropped_total", "sink" => sink.to_owned()).increment(1);
    if throttle.ready() {
        tracing::warn!(target: "whydenied", sink, reason = why, "event dropped");
    }
}

/// A sink fed through a bounded queue to its own thread.
struct Queued {
    name: String,
    tx: Mutex<Option<SyncSender<Arc<str>>>>,
    throttle: Throttle,
}

impl EventSink for Queued {
    fn emit(&self, _event: &Event, line: &Arc<str>) {
        let Ok(tx) = self.tx.lock() else {
            return;
        };
        match tx.as_ref().map(|tx| tx.try_send(line.clone())) {
            Some(Ok(())) => {}
            Some(Err(TrySendError::Full(_))) => dropped(&self.name, &self.throttle, "queue full"),
            Some(Err(TrySendError::Disconnected(_))) | None => {
                dropped(&self.name, &self.throttle, "sink stopped")
            }
        }
    }
}

/// Starts the sink described by `spec`.
pub fn start(spec: &SinkSpec) -> Arc<dyn EventSink> {
    let (tx, rx) = sync_channel::<Arc<str>>(spec.queue);
    let name = spec.name.clone();
    let kind = spec.kind.clone();
    let thread_name = format!("whydenied-sink-{}", spec.name);
    let spawned = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || run(&name, kind, rx));
    let sink = Queued {
        name: spec.name.clone(),
        tx: Mutex::new(spawned.is_ok().then_some(tx)),
        throttle: Throttle::default(),
    };
    if let Err(e) = spawned {
        tracing::error!(target: "whydenied", sink = %spec.name, error = %e, "cannot start an event sink");
    }
    Arc::new(sink)
}

fn run(name: &str, kind: SinkKind, rx: Receiver<Arc<str>>) {
    let throttle = Throttle::default();
    match kind {
        SinkKind::Stdout | SinkKind::Stderr => {
            for line in rx {
                let result = if kind == SinkKind::Stdout {
                    writeln!(std::io::stdout().lock(), "{line}")
                } else {
                    writeln!(std::io::stderr().lock(), "{line}")
                };
                if let Err(e) = result {
                    failed(name, &throttle, &e.to_string());
                }
            }
        }
        SinkKind::File {
            path,
            max_bytes,
            keep,
        } => file::run(name, &path, max_bytes, keep, rx, &throttle),
        SinkKind::Webhook(spec) => webhook::run(name, spec, rx, &throttle),
    }
}
