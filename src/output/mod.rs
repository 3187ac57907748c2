//! The per-run output log: raw pipe bytes become seq-numbered lines, counted against a byte
//! budget, held in memory until persisted (then only a recent window stays), with a change
//! signal that wakes readers.
//!
//! Readers never receive pushed lines: each one keeps its own cursor (the last seq it saw) and
//! copies the next batch out of the log when the change signal fires. So a slow reader can never
//! slow the writer or other readers, never lags out of a buffer and never loses a line; "replay
//! then live" is the same loop, with no gap and no duplicate by construction.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::{Semaphore, SemaphorePermit, watch};

use crate::metrics::OutputMeter;
use crate::run::{Line, Stream};

mod lines;
mod redact;

pub use lines::{LineSplitter, Piece};
pub use redact::{MASK, Redactor};

/// Persisted lines kept in memory per live run for readers that follow closely; older ones are
/// read back from the store.
pub const WINDOW_BYTES: u64 = 1 << 20;

/// Unpersisted bytes a run may hold before its pipe readers pause (so that a store slower than
/// the child's output slows the child rather than growing memory).
pub const BACKLOG_BYTES: u64 = 8 << 20;

/// Limits applied to one run's output.
#[derive(Debug, Clone, Copy)]
pub struct OutputLimits {
    /// Longer lines (in raw bytes) are split into several lines, never inside a UTF-8 sequence.
    pub max_line_bytes: usize,
    /// Bytes of line text kept per run; past it lines are counted, not kept.
    pub max_run_bytes: u64,
}

impl Default for OutputLimits {
    /// The defaults of `[output]` in the config file.
    fn default() -> Self {
        Self {
            max_line_bytes: 65536,
            max_run_bytes: 64 << 20,
        }
    }
}

/// One run's output.
#[derive(Debug)]
pub struct OutputLog {
    /// The lines and counters. A std mutex: every critical section is a push of a batch or a
    /// copy of a slice (no I/O, no `.await`), so an async mutex would only add overhead.
    inner: Mutex<LogInner>,
    /// Per-stream partial-line buffers. Each stream has a single writer (its pipe pump), so these
    /// are uncontended; they are separate from `inner` so that splitting happens outside it.
    splitters: [Mutex<LineSplitter>; 2],
    /// Bumped after every append, close or status change of the run. Overflow policy: a watch
    /// channel holds only the latest value, so nothing ever queues up for a slow reader; a woken
    /// reader re-reads the log from its own cursor.
    changes: watch::Sender<u64>,
    limits: OutputLimits,
    /// The run's secrets, masked in every line (also in lines modrun adds).
    redactor: Option<Arc<Redactor>>,
    /// One permit: one flush of this log at a time (the flusher, the run's end and a held-back
    /// end may all want to write it). Two at once would send the same lines twice, and on a
    /// shared store two transactions would contend for the same rows. Waiters queue in FIFO
    /// order; there are at most three.
    flush_turn: Semaphore,
    /// Lines and bytes read from the pipes, for the metrics.
    meter: OutputMeter,
}

#[derive(Debug, Default)]
struct LogInner {
    /// Lines in memory, contiguous seqs ending at `last_seq`. Bounded: unpersisted lines (at most
    /// [`BACKLOG_BYTES`] plus one read, since pumps pause past it, or lines are dropped past it
    /// during an outage) plus a window of persisted ones ([`WINDOW_BYTES`]).
    lines: VecDeque<Line>,
    last_seq: u64,
    /// Highest seq persisted by the store.
    flushed: u64,
    /// Text bytes in `lines`, and of those, the unpersisted ones.
    mem_bytes: u64,
    unflushed_bytes: u64,
    /// Text bytes kept over the run's life (the budget).
    kept_bytes: u64,
    /// Set once a line did not fit: every later line is counted, not kept.
    truncated: bool,
    dropped_lines: u64,
    dropped_bytes: u64,
    closed: bool,
    /// The store cannot write: readers do not pause, and past [`BACKLOG_BYTES`] of unpersisted
    /// text lines are counted here instead of kept (a marker says how many when it ends).
    outage: bool,
    outage_lines: u64,
    outage_bytes: u64,
}

impl LogInner {
    fn push(&mut self, stream: Stream, ts: SystemTime, piece: Piece) {
        // The bytes kept beside the text of an invalid line count towards memory too.
        self.last_seq += 1;
        self.lines.push_back(Line {
            seq: self.last_seq,
            stream,
            ts,
            text: piece.text,
            raw: piece.raw,
        });
        let len = self.lines.back().map_or(0, mem_len);
        self.mem_bytes += len;
        self.unflushed_bytes += len;
    }

    /// Where the first line with `seq > after` is in `lines`: `None` when there is none yet,
    /// `Err(Evicted)` when it was persisted and dropped from memory.
    fn index_after(&self, after: u64) -> Result<Option<usize>, Evicted> {
        let first = self.lines.front().map_or(self.last_seq + 1, |l| l.seq);
        if after >= self.last_seq {
            return Ok(None);
        }
        if after + 1 < first {
            return Err(Evicted);
        }
        Ok(Some((after + 1 - first) as usize))
    }

    /// A line of modrun's own (valid UTF-8).
    fn push_text(&mut self, stream: Stream, ts: SystemTime, text: String) {
        self.push(
            stream,
            ts,
            Piece {
                text: text.into(),
                raw: None,
            },
        );
    }
}

/// Some requested lines are no longer in memory: they are in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("these lines were persisted and dropped from memory")]
pub struct Evicted;

/// Memory a kept line counts for: its text, and its bytes when those are kept beside it.
fn mem_len(l: &Line) -> u64 {
    (l.text.len() + l.raw.as_ref().map_or(0, |r| r.len())) as u64
}

fn idx(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl OutputLog {
    /// An empty log.
    pub fn new(limits: OutputLimits) -> Self {
        Self::redacting(limits, None)
    }

    /// An empty log that masks the secrets of `redactor` in every line.
    pub fn redacting(limits: OutputLimits, redactor: Option<Arc<Redactor>>) -> Self {
        Self {
            inner: Mutex::new(LogInner::default()),
            splitters: [
                Mutex::new(LineSplitter::redacting(
                    limits.max_line_bytes,
                    redactor.clone(),
                )),
                Mutex::new(LineSplitter::redacting(
                    limits.max_line_bytes,
                    redactor.clone(),
                )),
            ],
            redactor,
            flush_turn: Semaphore::new(1),
            meter: OutputMeter::default(),
            changes: watch::Sender::new(0),
            limits: OutputLimits {
                max_line_bytes: limits.max_line_bytes.max(4),
                ..limits
            },
        }
    }

    /// The same log, its first line numbered `after_seq + 1` (a run that goes on after an
    /// earlier attempt's output).
    pub fn starting_after(self, after_seq: u64) -> Self {
        {
            let mut inner = self.lock();
            inner.last_seq = after_seq;
            inner.flushed = after_seq;
        }
        self
    }

    /// The same log, counting what its pipes deliver into `meter`.
    pub fn metered(mut self, meter: OutputMeter) -> Self {
        self.meter = meter;
        self
    }

    /// Whether lines were dropped for the run's output budget.
    pub fn truncated(&self) -> bool {
        self.lock().truncated
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panic while holding the lock leaves consistent data (pushes are atomic), so a
        // poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feed raw bytes read from a pipe; complete lines are appended.
    pub fn write(&self, stream: Stream, data: &[u8]) {
        // One allocation for the read's lines (a piece per `\n`, and a possible last one):
        // growing the vector line by line was a realloc and a copy every doubling.
        let mut texts = Vec::with_capacity(memchr::memchr_iter(b'\n', data).count() + 1);
        self.splitter(stream).push(data, &mut texts);
        self.meter.add(stream, texts.len(), data.len());
        self.append(stream, texts);
    }

    fn splitter(&self, stream: Stream) -> MutexGuard<'_, LineSplitter> {
        self.splitters[idx(stream)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The pipe reached EOF: a final line without `\n` is kept.
    pub fn finish_stream(&self, stream: Stream) {
        let mut texts = Vec::new();
        self.splitter(stream).finish(&mut texts);
        self.meter.add(stream, texts.len(), 0);
        self.append(stream, texts);
    }

    /// Append one whole line of text (a message from modrun itself, such as a spawn error).
    pub fn push_line(&self, stream: Stream, text: &str) {
        let mut texts = Vec::new();
        let mut splitter =
            LineSplitter::redacting(self.limits.max_line_bytes, self.redactor.clone());
        splitter.push(text.as_bytes(), &mut texts);
        splitter.finish(&mut texts);
        self.append(stream, texts);
    }

    fn append(&self, stream: Stream, texts: Vec<Piece>) {
        if texts.is_empty() {
            return;
        }
        let ts = SystemTime::now();
        {
            let mut inner = self.lock();
            inner.lines.reserve(texts.len());
            for text in texts {
                let len = text.len() as u64;
                if inner.outage && inner.unflushed_bytes >= BACKLOG_BYTES {
                    inner.outage_lines += 1;
                    inner.outage_bytes += len;
                    continue;
                }
                if inner.truncated || inner.kept_bytes + len > self.limits.max_run_bytes {
                    inner.truncated = true;
                    inner.dropped_lines += 1;
                    inner.dropped_bytes += len;
                    continue;
                }
                inner.kept_bytes += len;
                inner.push(stream, ts, text);
            }
        }
        self.changes.send_modify(|v| *v += 1);
    }

    /// The store cannot write (`true`) or writes again (`false`). While it cannot, pipe readers
    /// keep reading (the child keeps running) and lines past the backlog are counted, not
    /// kept; when it can again, a marker line on stderr says how many were lost.
    pub fn set_outage(&self, on: bool) {
        {
            let mut inner = self.lock();
            if inner.outage == on {
                return;
            }
            inner.outage = on;
            if on {
                return;
            }
            Self::outage_marker(&mut inner);
        }
        self.changes.send_modify(|v| *v += 1);
    }

    fn outage_marker(inner: &mut LogInner) {
        if inner.outage_lines == 0 {
            return;
        }
        let text = format!(
            "[modrun] the run store could not be written: {} lines ({} bytes) of output were not kept",
            inner.outage_lines, inner.outage_bytes
        );
        inner.outage_lines = 0;
        inner.outage_bytes = 0;
        inner.push_text(Stream::Stderr, SystemTime::now(), text);
    }

    /// No more output will come. If lines were dropped for the budget, one marker line on
    /// stderr says how many lines and bytes were not kept (and one for lines an outage of the
    /// store cost).
    pub fn close(&self) {
        {
            let mut inner = self.lock();
            if inner.closed {
                return;
            }
            inner.closed = true;
            Self::outage_marker(&mut inner);
            if inner.dropped_lines > 0 {
                let text = format!(
                    "[modrun] output limit of {} bytes reached: {} more lines ({} bytes) were not kept",
                    self.limits.max_run_bytes, inner.dropped_lines, inner.dropped_bytes
                );
                inner.push_text(Stream::Stderr, SystemTime::now(), text);
            }
        }
        self.changes.send_modify(|v| *v += 1);
    }

    /// Wake every reader (the run's status changed).
    pub fn touch(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// A receiver that fires after each change. Mark it seen (`borrow_and_update`) *before*
    /// reading, so that no change between the read and the wait is missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Up to `limit` lines with `seq > after`, in order, from memory; `Err(Evicted)` when some
    /// of them were persisted and dropped from memory (read those from the store).
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Line>, Evicted> {
        let inner = self.lock();
        Ok(match inner.index_after(after)? {
            Some(start) => inner.lines.range(start..).take(limit).cloned().collect(),
            None => Vec::new(),
        })
    }

    /// [`read_after`](Self::read_after) as text: of up to `limit` lines with `seq > after`,
    /// holding at most `max_bytes` with their `\n`s (but always at least one line), the bytes
    /// of those `keep` passes, each with `\n`, appended to `out`: copied under the lock rather
    /// than the lines cloned first, with room reserved for exactly what is kept. The last seq
    /// read (kept or not), `None` when the log holds nothing after `after`; `Err(Evicted)` as
    /// for `read_after`.
    pub fn text_after(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
        keep: impl Fn(&Line) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<Option<u64>, Evicted> {
        let inner = self.lock();
        let Some(start) = inner.index_after(after)? else {
            return Ok(None);
        };
        // First the batch's end and the size of what it keeps, then the copy.
        let (mut n, mut bytes, mut kept) = (0, 0, 0);
        for l in inner.lines.range(start..).take(limit) {
            let len = l.bytes().len() + 1;
            if n > 0 && bytes + len > max_bytes {
                break;
            }
            n += 1;
            bytes += len;
            if keep(l) {
                kept += len;
            }
        }
        out.reserve_exact(kept);
        let batch = inner.lines.range(start..start + n);
        let last = batch.clone().next_back().map_or(after, |l| l.seq);
        for l in batch.filter(|l| keep(l)) {
            out.extend_from_slice(l.bytes());
            out.push(b'\n');
        }
        Ok(Some(last))
    }

    /// The seq of the last kept line (0 when there is none).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Wait for this log's turn to be flushed (see `flush_turn`); the turn ends when the
    /// permit is dropped.
    pub async fn flush_turn(&self) -> SemaphorePermit<'_> {
        self.flush_turn
            .acquire()
            .await
            .expect("the flush semaphore is never closed")
    }

    /// Up to `limit` lines not persisted yet.
    pub fn unflushed(&self, limit: usize) -> Vec<Line> {
        let inner = self.lock();
        let first = inner.lines.front().map_or(inner.last_seq + 1, |l| l.seq);
        let start = inner.flushed.saturating_add(1).saturating_sub(first) as usize;
        inner.lines.range(start..).take(limit).cloned().collect()
    }

    /// Lines up to `seq` are persisted: drop what is beyond the window and wake paused readers.
    pub fn mark_flushed(&self, seq: u64) {
        {
            let mut inner = self.lock();
            if seq <= inner.flushed {
                return;
            }
            let first = inner.lines.front().map_or(inner.last_seq + 1, |l| l.seq);
            let from = inner.flushed.saturating_add(1).max(first);
            let to = seq.min(inner.last_seq);
            let newly: u64 = (from..=to)
                .filter_map(|s| inner.lines.get((s - first) as usize))
                .map(mem_len)
                .sum();
            inner.unflushed_bytes = inner.unflushed_bytes.saturating_sub(newly);
            inner.flushed = to;
            while inner.mem_bytes > WINDOW_BYTES
                && inner.lines.front().is_some_and(|l| l.seq <= inner.flushed)
            {
                if let Some(l) = inner.lines.pop_front() {
                    inner.mem_bytes -= mem_len(&l);
                }
            }
        }
    }

    /// Highest persisted seq.
    pub fn flushed(&self) -> u64 {
        self.lock().flushed
    }

    /// False while the unpersisted backlog is full and the store is writing: pipe readers
    /// should pause (during an outage they go on; see [`OutputLog::set_outage`]).
    pub fn has_room(&self) -> bool {
        let inner = self.lock();
        inner.unflushed_bytes < BACKLOG_BYTES || inner.outage
    }

    /// True once [`OutputLog::close`] ran: every line is in.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The limits it applies.
    pub fn limits(&self) -> OutputLimits {
        self.limits
    }

    /// Output that never reached this log (held back and discarded before it was handed
    /// over) counts as lines not kept for the budget: the closing marker includes it.
    pub fn count_dropped(&self, lines: u64, bytes: u64) {
        let mut inner = self.lock();
        inner.truncated = true;
        inner.dropped_lines += lines;
        inner.dropped_bytes += bytes;
    }

    /// Lines and bytes not kept because of the budget.
    pub fn dropped(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.dropped_lines, inner.dropped_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(max_line: usize, max_run: u64) -> OutputLog {
        OutputLog::new(OutputLimits {
            max_line_bytes: max_line,
            max_run_bytes: max_run,
        })
    }

    fn texts(log: &OutputLog) -> Vec<String> {
        log.read_after(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|l| l.text.to_string())
            .collect()
    }

    #[test]
    fn lines_split_across_reads_and_keep_a_final_partial_line() {
        let l = log(100, 1 << 20);
        l.write(Stream::Stdout, b"he");
        l.write(Stream::Stdout, b"llo\r\nwor");
        l.write(Stream::Stdout, b"ld\n\nlast");
        l.finish_stream(Stream::Stdout);
        assert_eq!(texts(&l), ["hello", "world", "", "last"]);
        let seqs: Vec<u64> = l.read_after(0, 10).unwrap().iter().map(|l| l.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(l.read_after(2, 1).unwrap()[0].text.as_ref(), "");
        assert!(l.read_after(4, 10).unwrap().is_empty());
        assert!(l.read_after(u64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn long_lines_split_on_character_boundaries() {
        let l = log(10, 1 << 20);
        // 4 x "é" (2 bytes) + "abcdef" = 14 bytes; then a 3-byte char crossing byte 10.
        l.write(Stream::Stdout, "ééééabcdef\n".as_bytes());
        l.write(Stream::Stdout, "123456789€xyz\n".as_bytes());
        let t = texts(&l);
        assert_eq!(t, ["ééééab", "cdef", "123456789", "€xyz"]);
        assert!(t.iter().all(|s| s.len() <= 10));
    }

    #[test]
    fn an_unfinished_long_line_is_cut_while_it_arrives() {
        let l = log(8, 1 << 20);
        l.write(Stream::Stdout, b"0123456789abcdefXY");
        assert_eq!(texts(&l), ["01234567", "89abcdef"]);
        l.finish_stream(Stream::Stdout);
        assert_eq!(texts(&l), ["01234567", "89abcdef", "XY"]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let l = log(100, 1 << 20);
        l.write(Stream::Stderr, b"ok \xff\xfe end\n");
        assert_eq!(texts(&l), ["ok \u{fffd}\u{fffd} end"]);
        assert_eq!(l.read_after(0, 1).unwrap()[0].stream, Stream::Stderr);
    }

    #[test]
    fn past_the_budget_lines_are_counted_and_a_marker_is_added() {
        let l = log(100, 10);
        l.write(Stream::Stdout, b"12345\n12345\n1\n22\n");
        assert_eq!(texts(&l), ["12345", "12345"]);
        assert_eq!(l.dropped(), (2, 3));
        l.close();
        let all = l.read_after(0, 10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].seq, 3);
        assert_eq!(all[2].stream, Stream::Stderr);
        assert!(
            all[2].text.contains("2 more lines (3 bytes)"),
            "{}",
            all[2].text
        );
        assert!(l.is_closed());
    }

    #[test]
    fn seqs_are_contiguous_across_streams() {
        let l = log(100, 1 << 20);
        l.write(Stream::Stdout, b"a\n");
        l.write(Stream::Stderr, b"b\n");
        l.write(Stream::Stdout, b"c\n");
        let got: Vec<(u64, Stream)> = l
            .read_after(0, 10)
            .unwrap()
            .iter()
            .map(|x| (x.seq, x.stream))
            .collect();
        assert_eq!(
            got,
            [
                (1, Stream::Stdout),
                (2, Stream::Stderr),
                (3, Stream::Stdout)
            ]
        );
    }

    #[test]
    fn persisted_lines_leave_memory_past_the_window() {
        let l = log(1 << 20, 1 << 30);
        let line = "x".repeat(1000);
        for _ in 0..3000 {
            l.push_line(Stream::Stdout, &line);
        }
        assert_eq!(l.unflushed(usize::MAX).len(), 3000);
        l.mark_flushed(2000);
        assert_eq!(l.flushed(), 2000);
        assert_eq!(l.unflushed(10)[0].seq, 2001);
        // About 1 MiB of persisted lines stays; older reads must go to the store.
        assert_eq!(l.read_after(0, 10), Err(Evicted));
        assert_eq!(l.read_after(1951, 10), Err(Evicted));
        let window = l.read_after(1952, 10).unwrap();
        assert_eq!(window[0].seq, 1953);
        l.mark_flushed(3000);
        assert!(l.unflushed(10).is_empty());
        assert_eq!(l.read_after(2999, 10).unwrap()[0].seq, 3000);
        assert!(l.read_after(3000, 10).unwrap().is_empty());
    }

    #[test]
    fn text_after_copies_the_bytes_as_written_within_its_limits() {
        let l = log(1 << 20, 1 << 30);
        l.write(Stream::Stdout, b"one\n\xff\xfebad\n");
        l.write(Stream::Stderr, b"err\n");
        l.write(Stream::Stdout, b"four\n");
        let all = |l: &Line| l.seq > 0;
        let mut out = Vec::new();
        assert_eq!(l.text_after(0, 100, 1 << 20, all, &mut out), Ok(Some(4)));
        // The invalid line as its bytes, not its lossy text.
        assert_eq!(out, b"one\n\xff\xfebad\nerr\nfour\n");
        // A filter skips lines but the position moves past them.
        out.clear();
        let stdout = |l: &Line| l.stream == Stream::Stdout;
        assert_eq!(l.text_after(2, 100, 1 << 20, stdout, &mut out), Ok(Some(4)));
        assert_eq!(out, b"four\n");
        // At most `limit` lines, and at most `max_bytes` in all, but always one line.
        out.clear();
        assert_eq!(l.text_after(0, 2, 1 << 20, all, &mut out), Ok(Some(2)));
        out.clear();
        assert_eq!(l.text_after(0, 100, 1, all, &mut out), Ok(Some(1)));
        assert_eq!(out, b"one\n");
        out.clear();
        assert_eq!(l.text_after(0, 100, 11, all, &mut out), Ok(Some(2)));
        assert_eq!(out, b"one\n\xff\xfebad\n");
        out.clear();
        assert_eq!(l.text_after(0, 100, 10, all, &mut out), Ok(Some(2)));
        // Room is reserved for what the filter keeps, not for the lines it skips.
        let mixed = log(1 << 20, 1 << 30);
        mixed.push_line(Stream::Stderr, &"e".repeat(100_000));
        mixed.push_line(Stream::Stdout, "kept");
        let mut small = Vec::new();
        assert_eq!(
            mixed.text_after(0, 100, 1 << 20, stdout, &mut small),
            Ok(Some(2))
        );
        assert_eq!(small, b"kept\n");
        assert!(
            small.capacity() < 1000,
            "{} bytes reserved",
            small.capacity()
        );
        // Nothing after the last line; persisted lines past the window are the store's.
        assert_eq!(l.text_after(4, 100, 1 << 20, all, &mut out), Ok(None));
        let big = log(1 << 20, 1 << 30);
        let line = "x".repeat(1000);
        for _ in 0..3000 {
            big.push_line(Stream::Stdout, &line);
        }
        big.mark_flushed(3000);
        assert_eq!(big.text_after(0, 10, 1 << 20, all, &mut out), Err(Evicted));
        out.clear();
        assert_eq!(
            big.text_after(2998, 10, 1 << 20, all, &mut out),
            Ok(Some(3000))
        );
        assert_eq!(out.len(), 2 * 1001);
    }

    #[test]
    fn an_outage_keeps_readers_going_and_counts_what_it_cannot_hold() {
        let l = log(1 << 20, 1 << 40);
        let line = "x".repeat(1024);
        let fill = (BACKLOG_BYTES / 1024) as usize;
        for _ in 0..fill {
            l.push_line(Stream::Stdout, &line);
        }
        assert!(!l.has_room(), "a writing store makes readers pause");
        l.set_outage(true);
        assert!(l.has_room(), "during an outage they go on");
        for _ in 0..100 {
            l.push_line(Stream::Stdout, &line);
        }
        let kept = l.last_seq();
        assert!(
            kept <= fill as u64 + 9,
            "past the backlog lines are not kept: {kept}"
        );
        l.mark_flushed(kept);
        l.set_outage(false);
        let last = l.read_after(l.last_seq() - 1, 1).unwrap();
        assert_eq!(last[0].stream, Stream::Stderr);
        assert!(
            last[0].text.contains("could not be written"),
            "{}",
            last[0].text
        );
        assert!(last[0].text.contains("lines"), "{}", last[0].text);
        assert_eq!(
            last[0].seq,
            kept + 1,
            "the marker takes the next seq: no gap"
        );
    }

    #[tokio::test]
    async fn readers_are_woken_by_appends() {
        let l = Arc::new(log(100, 1 << 20));
        let mut rx = l.subscribe();
        rx.borrow_and_update();
        let w = l.clone();
        tokio::spawn(async move { w.write(Stream::Stdout, b"x\n") });
        rx.changed().await.unwrap();
        assert_eq!(texts(&l), ["x"]);
    }
}
