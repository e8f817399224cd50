//! Logs and metrics for the binary: a `tracing` subscriber (JSON or pretty,
//! `RUST_LOG` honoured) and the Prometheus recorder behind `/metrics`.
//!
//! Log lines never make a request wait: they are formatted on the thread
//! that logs them and handed to a writer thread through a queue bounded in
//! bytes ([`LOG_QUEUE_BYTES`]). When stderr is slower than the lines come
//! (a log pipe that is full, a collector that stalls), the lines that do not
//! fit are dropped and counted (`whydenied_log_lines_dropped_total`), the way
//! the event sinks drop what their queues cannot hold; so are lines stderr
//! refuses. The writer writes whole lines, several at a time. Into a pipe or
//! a socket (a container's log stream) it writes at most 4 KiB at a time (a
//! longer line alone): a pipe never splits such a write, so a line stays
//! whole even when stdout (the `stdout` sink) and stderr share the pipe.
//! Into a file or a terminal, where the kernel keeps each write whole, it
//! writes up to 64 KiB at a time, which costs fewer system calls.
//!
//! In JSON, an event of `whydenied::events` (already one JSON object) is
//! written as the log line's own fields, not escaped into a string.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::events::TRACE_TARGET;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Bytes of log lines that may wait for the writer thread.
pub const LOG_QUEUE_BYTES: usize = 1 << 20;

/// What a queued line costs against the budget beyond its bytes.
const LINE_OVERHEAD: usize = 64;

/// The most bytes one write carries into a pipe or a socket: `PIPE_BUF`,
/// the size up to which a write to a pipe is never split by other writers'
/// writes.
const ATOMIC_WRITE: usize = 4096;

/// The most bytes one write carries into a file or a terminal.
const LARGE_WRITE: usize = 64 * 1024;

/// How many bytes one write to stderr may carry (see the module's
/// documentation).
fn stderr_write_size() -> usize {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::FileTypeExt as _;
    let kind = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata().ok())
        .map(|m| m.file_type());
    match kind {
        Some(t) if t.is_file() || t.is_char_device() => LARGE_WRITE,
        _ => ATOMIC_WRITE,
    }
}

/// The counter of lost log lines.
const DROPPED: &str = "whydenied_log_lines_dropped_total";

/// How long [`LogGuard`] waits for the queue to be written out.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Installs the global `tracing` subscriber, writing to stderr through the
/// log queue. Keep the guard until the end of `main`: dropping it writes out
/// what is queued. Later calls install nothing and return a guard that
/// flushes the first subscriber's queue.
pub fn init_logging(format: LogFormat) -> LogGuard {
    static QUEUE: OnceLock<LogQueue> = OnceLock::new();
    let mut first = false;
    let queue = QUEUE
        .get_or_init(|| {
            first = true;
            LogQueue::spawn(io::stderr(), LOG_QUEUE_BYTES, stderr_write_size())
        })
        .clone();
    if first {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Colours only for a person at a terminal, not in a log file.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
            .with_writer(queue.clone());
        let _ = match format {
            LogFormat::Json => builder.json().event_format(JsonLines::default()).try_init(),
            LogFormat::Pretty => builder.try_init(),
        };
    }
    LogGuard {
        queue,
        finished: false,
    }
}

/// Writes out the queued log lines when dropped or finished (waiting at
/// most two seconds for a stuck stderr).
#[must_use = "dropping the guard at once only flushes what is queued now"]
pub struct LogGuard {
    queue: LogQueue,
    finished: bool,
}

impl LogGuard {
    /// Writes out the queued lines; `false` if stderr did not take them in
    /// time (then writing to stderr again may block).
    pub fn finish(mut self) -> bool {
        self.finished = true;
        self.queue.flush(FLUSH_WAIT)
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.queue.flush(FLUSH_WAIT);
        }
    }
}

enum Msg {
    Line(Vec<u8>),
    Flush(Sender<()>),
}

/// A queue of formatted log lines, bounded in bytes, written by a thread of
/// its own. Cloning shares the queue.
#[derive(Clone)]
pub struct LogQueue {
    tx: Sender<Msg>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

impl LogQueue {
    /// Starts the writer thread over `out`, with room for `limit` bytes of
    /// waiting lines, writing at most `write_size` bytes at a time unless a
    /// line is longer.
    pub fn spawn<W: Write + Send + 'static>(out: W, limit: usize, write_size: usize) -> Self {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let budget = queued.clone();
        let spawned = std::thread::Builder::new()
            .name("whydenied-log".into())
            .spawn(move || write_lines(out, &rx, &budget, write_size));
        if let Err(e) = spawned {
            // Without the thread every line is dropped (and counted); say so
            // once, the only way left.
            eprintln!("whydenied: cannot start the log writer thread: {e}");
        }
        Self { tx, queued, limit }
    }

    /// Queues one line (`true`), or drops and counts it if the queue is
    /// full.
    fn push(&self, line: &[u8]) -> bool {
        let cost = line.len() + LINE_OVERHEAD;
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                queued.checked_add(cost).filter(|&n| n <= self.limit)
            });
        if reserved.is_ok() && self.tx.send(Msg::Line(line.to_vec())).is_ok() {
            return true;
        }
        if reserved.is_ok() {
            // No writer thread: give the room back.
            self.queued.fetch_sub(cost, Ordering::AcqRel);
        }
        metrics::counter!(DROPPED).increment(1);
        false
    }

    /// Waits until every line queued before this call is written (`true`),
    /// or `wait` has passed.
    pub fn flush(&self, wait: Duration) -> bool {
        let (done, written) = mpsc::channel();
        self.tx.send(Msg::Flush(done)).is_ok() && written.recv_timeout(wait).is_ok()
    }
}

/// After writing a batch, the writer thread pauses this long before it
/// waits again: lines logged meanwhile queue up without waking it, so under
/// a stream of lines (a wave of denials) it wakes once per batch instead of
/// once per line, and the threads that log never pay for a wake-up.
const BATCH_PAUSE: Duration = Duration::from_millis(2);

/// Whole lines waiting to go out in one write.
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
    /// Their cost against the queue's budget.
    cost: usize,
}

impl Batch {
    fn add(&mut self, line: &[u8]) {
        self.bytes.extend_from_slice(line);
        self.lines += 1;
        self.cost += line.len() + LINE_OVERHEAD;
    }

    /// Writes the batch out, or counts its lines as lost if the output
    /// refuses them (a failing stderr cannot be reported anywhere else);
    /// either way their room in the queue is free again.
    fn write_to<W: Write>(&mut self, out: &mut W, queued: &AtomicUsize) {
        if self.lines == 0 {
            return;
        }
        if out.write_all(&self.bytes).is_err() {
            metrics::counter!(DROPPED).increment(self.lines);
        }
        queued.fetch_sub(self.cost, Ordering::AcqRel);
        self.bytes.clear();
        self.lines = 0;
        self.cost = 0;
    }
}

/// The writer thread: writes lines as they come, as many whole lines per
/// write as fit in `write_size` bytes (a longer line on its own), then
/// pauses ([`BATCH_PAUSE`]) when the queue has run empty.
fn write_lines<W: Write>(mut out: W, rx: &Receiver<Msg>, queued: &AtomicUsize, write_size: usize) {
    let mut batch = Batch {
        bytes: Vec::with_capacity(write_size),
        lines: 0,
        cost: 0,
    };
    while let Ok(mut msg) = rx.recv() {
        loop {
            match msg {
                Msg::Line(line) => {
                    if batch.bytes.len() + line.len() > write_size {
                        batch.write_to(&mut out, queued);
                    }
                    batch.add(&line);
                }
                Msg::Flush(done) => {
                    batch.write_to(&mut out, queued);
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        batch.write_to(&mut out, queued);
        let _ = out.flush();
        std::thread::sleep(BATCH_PAUSE);
    }
}

/// One log line on its way into the queue.
pub struct QueuedLine<'a>(&'a LogQueue);

impl Write for QueuedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // tracing-subscriber formats a whole line, then writes it at once.
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedLine(self)
    }
}

/// tracing-subscriber's JSON lines (flattened fields), except for events of
/// `whydenied::events`: their message is the event's own JSON object, which
/// becomes the line's fields after `timestamp`, `level` and `target`.
pub struct JsonLines {
    other: Format<Json, SystemTime>,
}

impl Default for JsonLines {
    fn default() -> Self {
        Self {
            other: Format::default().json().flatten_event(true),
        }
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() == TRACE_TARGET {
            let mut message = Message(String::new());
            event.record(&mut message);
            let object = message.0;
            // The event's own serialization (serde_json's compact form): one
            // object, empty or opening with a key, and no raw newline.
            let spliceable = object.starts_with('{')
                && object.ends_with('}')
                && (object == "{}" || object.as_bytes().get(1) == Some(&b'"'))
                && !object.contains('\n');
            if spliceable {
                writer.write_str("{\"timestamp\":\"")?;
                SystemTime.format_time(&mut writer)?;
                write!(
                    writer,
                    "\",\"level\":\"{}\",\"target\":\"{TRACE_TARGET}\"",
                    meta.level()
                )?;
                if object.len() > 2 {
                    writer.write_char(',')?;
                }
                writer.write_str(&object[1..])?;
                return writer.write_char('\n');
            }
        }
        self.other.format_event(ctx, writer, event)
    }
}

/// Takes an event's `message` field.
struct Message(String);

impl tracing::field::Visit for Message {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.0);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            use fmt::Write as _;
            self.0.clear();
            let _ = write!(self.0, "{value:?}");
        }
    }
}

/// The process's Prometheus recorder, installed on first use.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("whydenied_request_duration_seconds".into()),
                    &[
                        0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(target: "whydenied", "a metrics recorder was already installed; /metrics shows only whydenied's own view");
            }
            // Listed from the start, so that an alert on it works before the
            // first drop.
            metrics::counter!(DROPPED).increment(0);
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Output shared with the test; `gate`, if set, holds the first write
    /// until the test sends on it.
    #[derive(Clone, Default)]
    struct Shared {
        out: Arc<Mutex<Vec<u8>>>,
        gate: Option<Arc<Mutex<Receiver<()>>>>,
    }

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(gate) = self.gate.take() {
                let _ = gate.lock().unwrap().recv();
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn text(shared: &Shared) -> String {
        String::from_utf8(shared.out.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_stuck_stderr_costs_dropped_lines_not_a_blocked_caller() {
        let (open, gate) = mpsc::channel();
        let shared = Shared {
            gate: Some(Arc::new(Mutex::new(gate))),
            ..Shared::default()
        };
        // Room for two 10-byte lines: the writer holds the first one until
        // the gate opens, and its bytes count until it is written.
        let queue = LogQueue::spawn(shared.clone(), 2 * (10 + LINE_OVERHEAD), ATOMIC_WRITE);
        assert!(queue.push(b"line one\n\n"));
        assert!(queue.push(b"line two\n\n"));
        assert!(!queue.push(b"line 3...\n"), "a full queue drops");
        open.send(()).unwrap();
        queue.flush(Duration::from_secs(30));
        assert_eq!(text(&shared), "line one\n\nline two\n\n");
        // Written lines give their room back.
        assert!(queue.push(b"line four\n"));
        queue.flush(Duration::from_secs(30));
        assert!(text(&shared).ends_with("line four\n"));
    }

    /// Records the size of every write; fails them all when `fail`.
    #[derive(Clone, Default)]
    struct Writes {
        sizes: Arc<Mutex<Vec<usize>>>,
        out: Arc<Mutex<Vec<u8>>>,
        fail: bool,
    }

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.fail {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            self.sizes.lock().unwrap().push(buf.len());
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_carry_whole_lines_and_at_most_a_pipes_atomic_size() {
        let writes = Writes::default();
        let queue = LogQueue::spawn(writes.clone(), LOG_QUEUE_BYTES, ATOMIC_WRITE);
        let line = |c: u8, n: usize| {
            let mut l = vec![c; n - 1];
            l.push(b'\n');
            l
        };
        for i in 0..40 {
            assert!(queue.push(&line(b'a' + (i % 26), 1000)));
        }
        assert!(queue.push(&line(b'L', 9000)));
        assert!(queue.push(&line(b'z', 10)));
        assert!(queue.flush(Duration::from_secs(30)));
        let sizes = writes.sizes.lock().unwrap().clone();
        let out = writes.out.lock().unwrap().clone();
        assert_eq!(out.len(), 40 * 1000 + 9000 + 10);
        let mut at = 0;
        for size in sizes {
            let chunk = &out[at..at + size];
            at += size;
            assert!(chunk.ends_with(b"\n"), "a write ended inside a line");
            assert!(
                size <= ATOMIC_WRITE || chunk.iter().filter(|&&b| b == b'\n').count() == 1,
                "a write of {size} bytes"
            );
        }
        assert_eq!(
            queue.queued.load(Ordering::Acquire),
            0,
            "all room given back"
        );
    }

    #[test]
    fn lines_a_failing_stderr_refuses_give_their_room_back() {
        let writes = Writes {
            fail: true,
            ..Writes::default()
        };
        let queue = LogQueue::spawn(writes, 2 * (10 + LINE_OVERHEAD), ATOMIC_WRITE);
        for _ in 0..10 {
            assert!(queue.push(b"lost line\n"));
            assert!(queue.flush(Duration::from_secs(30)));
        }
        assert_eq!(queue.queued.load(Ordering::Acquire), 0);
    }

    #[test]
    fn no_event_has_a_field_the_log_line_puts_first() {
        let schema = serde_json::to_value(schemars::schema_for!(crate::events::AnyEvent)).unwrap();
        // Every object schema with an id field is an event's top level.
        fn walk(v: &serde_json::Value, tops: &mut Vec<serde_json::Map<String, serde_json::Value>>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::Object(props)) = m.get("properties")
                        && (props.contains_key("denial_id") || props.contains_key("escalation_id"))
                    {
                        tops.push(props.clone());
                    }
                    m.values().for_each(|v| walk(v, tops));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, tops)),
                _ => {}
            }
        }
        let mut tops = Vec::new();
        walk(&schema, &mut tops);
        assert!(tops.len() >= 2, "both event kinds: {schema}");
        for props in tops {
            for key in ["timestamp", "level", "target"] {
                assert!(!props.contains_key(key), "an event has `{key}`");
            }
        }
    }

    fn logged(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let shared = Shared::default();
        let queue = LogQueue::spawn(shared.clone(), LOG_QUEUE_BYTES, ATOMIC_WRITE);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .event_format(JsonLines::default())
            .with_writer(queue.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        queue.flush(Duration::from_secs(30));
        text(&shared)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn an_event_is_the_log_lines_own_fields_and_other_lines_stay_as_they_were() {
        let line = r#"{"schema":1,"event":"denial","denial_id":"abc","url":"/a\"b\\c"}"#;
        let lines = logged(|| {
            tracing::info!(target: TRACE_TARGET, event = "denial", "{line}");
            tracing::info!(target: "whydenied", port = 8080, "listening");
            tracing::info!(target: TRACE_TARGET, event = "odd", "not an object");
            tracing::info!(target: TRACE_TARGET, event = "odd", "{{ }}");
            tracing::info!(target: TRACE_TARGET, event = "empty", "{{}}");
        });
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[3]["message"], "{ }", "not spliced");
        assert_eq!(lines[4]["target"], "whydenied::events");
        assert!(lines[4].get("message").is_none());
        let e = &lines[0];
        assert_eq!(e["target"], "whydenied::events");
        assert_eq!(e["level"], "INFO");
        assert!(e["timestamp"].as_str().is_some_and(|t| t.len() >= 20));
        assert_eq!(e["event"], "denial");
        assert_eq!(e["denial_id"], "abc");
        assert_eq!(e["url"], "/a\"b\\c");
        assert!(e.get("message").is_none(), "not escaped into a string");
        assert_eq!(lines[1]["message"], "listening");
        assert_eq!(lines[1]["port"], 8080);
        assert_eq!(lines[2]["message"], "not an object");
        assert_eq!(lines[2]["target"], "whydenied::events");
    }
}
