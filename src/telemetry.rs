//! Logging: `tracing` events, filtered by `RUST_LOG` (default `info`), formatted on the thread
//! that logs and handed to a bounded queue that one thread of its own drains into the sink
//! (stderr for `modrun serve`).
//!
//! Logging never blocks a request or a run and never panics: a sink that stops reading (a
//! FIFO nobody reads, a stalled journald or `| tee` on a slow disk) only blocks the drain thread;
//! once the queue is full, new lines are dropped and counted. A sink that is gone (EPIPE,
//! ENOSPC) is the same: the failed lines are counted. When the sink takes lines again, a line
//! saying how many were dropped goes first. Nothing here writes to stderr by other means, so a
//! broken stderr cannot panic the server.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting for the sink, at most (plus the batch being written, at most [`BATCH_BYTES`]).
/// Overflow policy: a line that finds the queue full is dropped (and counted), so that the
/// logging thread never waits for the sink.
pub const QUEUE_LINES: usize = 16 * 1024;

/// How long [`LogGuard`] gives the drain thread at exit to write what is queued.
pub const EXIT_FLUSH: Duration = Duration::from_millis(500);

/// A duration in milliseconds to the microsecond, for the `duration_ms` fields of log lines:
/// `1.381`, where the plain `f64` gave `1.3809390000000001`.
pub fn millis(d: Duration) -> f64 {
    // The quotient of an integer by 1000, correctly rounded, prints as its shortest decimal.
    d.as_micros() as f64 / 1000.0
}

/// Counters shared by the writers and the drain thread.
#[derive(Debug, Default)]
struct Counters {
    /// Lines handed to the queue and not yet written (or given up on).
    pending: AtomicU64,
    /// Lines dropped so far: the queue was full, or the sink refused them.
    dropped: AtomicU64,
}

/// The `MakeWriter` of the subscriber: each event is formatted into a buffer of its own, which
/// goes to the queue as one line when the event is done.
#[derive(Clone)]
pub struct QueueWriter {
    tx: SyncSender<Vec<u8>>,
    counters: Arc<Counters>,
}

/// One event's text on its way to the queue.
pub struct LineBuf<'a> {
    buf: Vec<u8>,
    to: &'a QueueWriter,
}

impl Write for LineBuf<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineBuf<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let c = &self.to.counters;
        c.pending.fetch_add(1, Ordering::Relaxed);
        match self.to.tx.try_send(std::mem::take(&mut self.buf)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                c.pending.fetch_sub(1, Ordering::Relaxed);
                c.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = LineBuf<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LineBuf {
            buf: Vec::with_capacity(256),
            to: self,
        }
    }
}

/// Keeps the drain thread's counters; at drop, gives the thread a moment to write what is
/// queued (never longer than [`EXIT_FLUSH`], whatever the sink does).
#[derive(Debug)]
pub struct LogGuard {
    counters: Arc<Counters>,
}

impl LogGuard {
    /// Lines dropped since start-up (queue full or sink failing).
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Wait until the queue is empty, at most `limit`; true if it is.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.counters.pending.load(Ordering::Relaxed) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.flush(EXIT_FLUSH);
    }
}

/// The line written before the next one once lines were dropped.
fn dropped_note(n: u64) -> Vec<u8> {
    format!(
        "{}  WARN modrun::telemetry: {n} log line(s) were dropped: the log sink was too slow or failed\n",
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    )
    .into_bytes()
}

/// What the drain thread writes at once, at most: the lines that queued up while it wrote the
/// last batch (one write and one flush for all of them, not one per line).
pub const BATCH_BYTES: usize = 64 * 1024;

/// The drain thread: write the queued lines in batches; count what the sink refuses; after
/// drops, say how many before the next lines that get through.
fn drain(rx: Receiver<Vec<u8>>, mut sink: Box<dyn Write + Send>, counters: Arc<Counters>) {
    let mut reported = 0;
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    while let Ok(first) = rx.recv() {
        batch.clear();
        let dropped = counters.dropped.load(Ordering::Relaxed);
        let noted = dropped > reported;
        if noted {
            batch.extend_from_slice(&dropped_note(dropped - reported));
        }
        batch.extend_from_slice(&first);
        let mut lines = 1;
        while batch.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(line) => {
                    batch.extend_from_slice(&line);
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        let ok = sink.write_all(&batch).is_ok() && sink.flush().is_ok();
        if ok && noted {
            reported = dropped;
        }
        if !ok {
            counters.dropped.fetch_add(lines, Ordering::Relaxed);
        }
        counters.pending.fetch_sub(lines, Ordering::Relaxed);
        // Let the next lines gather before looking again: while this thread is not parked in
        // `recv`, a line handed to the queue costs its writer no wake-up (no futex call, no
        // context switch); under load that was one of each per line. Idle, the thread parks
        // in `recv` and the first line wakes it.
        std::thread::sleep(LINGER);
    }
}

/// How long the drain thread lets lines gather after writing a batch (the most a line waits
/// for its write under load).
const LINGER: Duration = Duration::from_millis(5);

/// Install a global subscriber writing human-readable lines to `sink` through the bounded
/// queue (with colours when `ansi`, i.e. when it is a terminal). Returns `None` if one is
/// already installed (tests call it more than once) or the drain thread cannot start.
pub fn init<W>(default_filter: &str, sink: W, ansi: bool) -> Option<LogGuard>
where
    W: Write + Send + 'static,
{
    init_as(LogFormat::Text, default_filter, sink, ansi)
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event: time, level, target, message, `key=value` fields.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields` with `message`, and
    /// the spans, e.g. a run's `run_id`): for log shippers. Every value is a JSON string or
    /// number, so a client's text can never end a line or forge a field.
    Json,
}

/// [`init`], in `format` (`ansi` applies to text only).
pub fn init_as<W>(format: LogFormat, default_filter: &str, sink: W, ansi: bool) -> Option<LogGuard>
where
    W: Write + Send + 'static,
{
    if tracing::dispatcher::has_been_set() {
        return None;
    }
    let (writer, guard) = queue(Box::new(sink))?;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(true);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init().ok()?,
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init()
            .ok()?,
    }
    let _ = INSTALLED.set(guard.counters.clone());
    Some(guard)
}

/// The counters of the queue behind the global subscriber, once [`init_as`] installed it.
static INSTALLED: std::sync::OnceLock<Arc<Counters>> = std::sync::OnceLock::new();

/// Log lines the global subscriber's queue has dropped since start-up (0 before [`init`]).
pub fn dropped() -> u64 {
    INSTALLED
        .get()
        .map_or(0, |c| c.dropped.load(Ordering::Relaxed))
}

/// A queue in front of `sink`, with its drain thread.
pub fn queue(sink: Box<dyn Write + Send>) -> Option<(QueueWriter, LogGuard)> {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let counters = Arc::new(Counters::default());
    let for_thread = counters.clone();
    std::thread::Builder::new()
        .name("modrun-log".into())
        .spawn(move || drain(rx, sink, for_thread))
        .ok()?;
    Some((
        QueueWriter {
            tx,
            counters: counters.clone(),
        },
        LogGuard { counters },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that blocks until released, then keeps what it is given.
    struct Gate {
        open: Arc<Mutex<bool>>,
        out: Arc<Mutex<Vec<u8>>>,
        fail: bool,
    }

    impl Write for Gate {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            while !*self.open.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.fail {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            self.out.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn durations_are_logged_to_the_microsecond() {
        assert_eq!(
            format!("{:?}", millis(Duration::from_nanos(1_380_939))),
            "1.38"
        );
        assert_eq!(
            format!("{:?}", millis(Duration::from_nanos(1_381_939))),
            "1.381"
        );
        assert_eq!(format!("{:?}", millis(Duration::from_secs(90))), "90000.0");
        assert_eq!(millis(Duration::ZERO), 0.0);
    }

    fn log_line(w: &QueueWriter, text: &str) {
        let mut line = w.make_writer();
        line.write_all(text.as_bytes()).unwrap();
    }

    /// A stalled sink never blocks a writer: past the queue, lines are dropped and counted, and
    /// the count is written once the sink takes lines again.
    #[test]
    fn a_stalled_sink_drops_and_reports() {
        let open = Arc::new(Mutex::new(false));
        let out = Arc::new(Mutex::new(Vec::new()));
        let (w, guard) = queue(Box::new(Gate {
            open: open.clone(),
            out: out.clone(),
            fail: false,
        }))
        .unwrap();
        let started = Instant::now();
        // The queue holds QUEUE_LINES, the stalled batch at most BATCH_BYTES (~6,000 of these).
        for i in 0..QUEUE_LINES + 10_000 {
            log_line(&w, &format!("line {i}\n"));
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "writers never wait"
        );
        assert!(guard.dropped() >= 1_000, "dropped {}", guard.dropped());
        *open.lock().unwrap() = true;
        assert!(guard.flush(Duration::from_secs(20)));
        log_line(&w, "after\n");
        assert!(guard.flush(Duration::from_secs(20)));
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert!(text.contains("line 0\n"));
        assert!(
            text.contains("log line(s) were dropped"),
            "{}",
            &text[text.len() - 300..]
        );
        assert!(text.ends_with("after\n"));
    }

    /// A failing sink (EPIPE) counts the lines it refuses and never panics.
    #[test]
    fn a_broken_sink_counts_failures() {
        let (w, guard) = queue(Box::new(Gate {
            open: Arc::new(Mutex::new(true)),
            out: Arc::new(Mutex::new(Vec::new())),
            fail: true,
        }))
        .unwrap();
        for i in 0..10 {
            log_line(&w, &format!("line {i}\n"));
        }
        assert!(guard.flush(Duration::from_secs(10)));
        assert_eq!(guard.dropped(), 10);
    }
}
