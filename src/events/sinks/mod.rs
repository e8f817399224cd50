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
use std::sync::{Arc, Mutex, PoisonError, Weak};
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

/// How long a sink that is no longer used (its config was replaced by a
/// reload with different sink settings, or dropped) keeps delivering what it
/// had queued; then the rest is dropped and counted. A webhook to a dead
/// receiver would otherwise take queue × attempts × timeout (hours).
const DRAIN_LIMIT_SECS: u64 = 10;

/// When a sink was retired (milliseconds since the epoch; 0 = in use).
#[derive(Debug, Default)]
pub(crate) struct Retired(AtomicU64);

impl Retired {
    /// Whether the sink is no longer used (it finishes what it has).
    pub(crate) fn is_retired(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }

    /// Whether the sink was retired more than [`DRAIN_LIMIT_SECS`] ago.
    pub(crate) fn drained_long_enough(&self) -> bool {
        let at = self.0.load(Ordering::Relaxed);
        at != 0 && now_millis().saturating_sub(at) > DRAIN_LIMIT_SECS * 1000
    }
}

fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

/// A sink fed through a bounded queue to its own thread.
struct Queued {
    name: String,
    tx: Mutex<Option<SyncSender<Arc<str>>>>,
    throttle: Throttle,
    retired: Arc<Retired>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.retired.0.store(now_millis(), Ordering::Relaxed);
    }
}

/// The sinks running now, by their settings: a reload that keeps a sink's
/// settings keeps the running sink (its thread, queue and open file), so
/// reloads never pile up threads, and two configs never write and rotate
/// one file side by side.
static RUNNING: Mutex<Vec<(SinkSpec, Weak<Queued>)>> = Mutex::new(Vec::new());

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

/// The sink described by `spec`: the running one with these settings, or a
/// new one.
pub fn start(spec: &SinkSpec) -> Arc<dyn EventSink> {
    let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    running.retain(|(_, sink)| sink.strong_count() > 0);
    if let Some(sink) = running
        .iter()
        .filter(|(settings, _)| settings == spec)
        .find_map(|(_, sink)| sink.upgrade())
    {
        return sink;
    }
    let sink = Arc::new(start_new(spec));
    running.push((spec.clone(), Arc::downgrade(&sink)));
    sink
}

fn start_new(spec: &SinkSpec) -> Queued {
    let (tx, rx) = sync_channel::<Arc<str>>(spec.queue);
    let name = spec.name.clone();
    let kind = spec.kind.clone();
    let retired = Arc::new(Retired::default());
    let thread_retired = retired.clone();
    // Thread names may not hold NUL; sink names are ids, but be safe.
    let thread_name = format!("whydenied-sink-{}", spec.name.replace('\0', ""));
    let spawned = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || run(&name, kind, rx, &thread_retired));
    if let Err(e) = &spawned {
        tracing::error!(target: "whydenied", sink = %spec.name, error = %e, "cannot start an event sink");
    }
    Queued {
        name: spec.name.clone(),
        tx: Mutex::new(spawned.is_ok().then_some(tx)),
        throttle: Throttle::default(),
        retired,
    }
}

fn run(name: &str, kind: SinkKind, rx: Receiver<Arc<str>>, retired: &Retired) {
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
        SinkKind::Webhook(spec) => webhook::run(name, spec, rx, &throttle, retired),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, queue: usize) -> SinkSpec {
        SinkSpec {
            name: name.to_owned(),
            kind: SinkKind::Stderr,
            queue,
        }
    }

    fn same(a: &Arc<dyn EventSink>, b: &Arc<dyn EventSink>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
    }

    /// A reload that keeps a sink's settings keeps its running sink: no
    /// second thread beside the first.
    #[test]
    fn a_sink_with_unchanged_settings_is_reused() {
        let first = start(&spec("reuse-test", 16));
        let again = start(&spec("reuse-test", 16));
        assert!(same(&first, &again));
        let other = start(&spec("reuse-test", 32));
        assert!(!same(&first, &other));
        drop((first, again));
        // Once nothing uses it, the next start is a new sink.
        let fresh = start(&spec("reuse-test", 16));
        assert!(!same(&fresh, &other));
    }
}
