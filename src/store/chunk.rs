//! Output chunks: a run's consecutive lines encoded as one blob, the unit in which both stores
//! write and read output (a row per chunk, not per line). Two encodings, told apart by the
//! first byte; every store reads both.
//!
//! - **Fixed** (what PostgreSQL writes, and SQLite wrote before schema version 5): per line,
//!   flags u8 ([`STDERR`], [`RAW`]), the time i64 LE (µs since the Unix epoch), the text's
//!   length u32 LE, the text, and with [`RAW`] the bytes' length u32 LE and the bytes. Its first
//!   byte is a line's flags, so it is never above 3.
//! - **Compact** (SQLite from schema version 5): the byte [`COMPACT`], then per line: flags u8
//!   ([`STDERR`], [`RAW`], [`SAME_TS`]); unless [`SAME_TS`], the time as the zigzag LEB128
//!   difference from the line before (from 0 for the first line); the text's length as LEB128;
//!   the text; with [`RAW`], the bytes' length as LEB128 and the bytes. The lines of one pipe
//!   read share their time, so a line usually carries 2 or 3 bytes of header instead of 13: an
//!   80-byte line takes 82 bytes, not 93; a 20-byte one 22, not 33. Fewer bytes per line is
//!   less for the store to write (SQLite writes output twice: to its WAL, then the checkpoint),
//!   less to read back, and a smaller file.
//!
//! PostgreSQL keeps writing the fixed encoding: nodes of two versions may share one database
//! during an upgrade, and one that predates the compact encoding would misread it.

use std::sync::Arc;

use super::StoreError;
use super::record::{from_micros, micros};
use crate::run::{Line, Stream, Text};

/// A stored output chunk holds at most this much text (or [`CHUNK_LINES`] lines).
pub(super) const CHUNK_BYTES: usize = 256 * 1024;
/// A stored output chunk holds at most this many lines.
pub(super) const CHUNK_LINES: usize = 4096;

/// Flag bit: the line came from stderr.
const STDERR: u8 = 1;
/// Flag bit: the line's raw bytes follow its text (it is not valid UTF-8).
const RAW: u8 = 2;
/// Flag bit (compact only): the line has the time of the line before; no time follows.
const SAME_TS: u8 = 4;
/// The first byte of a compact chunk (a fixed chunk starts with flags, at most 3).
pub(super) const COMPACT: u8 = 0xC1;

/// How a store encodes the chunks it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    /// 13 bytes of header per line.
    Fixed,
    /// A marker byte, then usually 2 or 3 bytes of header per line.
    Compact,
}

/// Encodes one chunk's lines, remembering the time of the line before (compact).
struct Encoder {
    encoding: Encoding,
    prev_ts: i64,
}

impl Encoder {
    /// Begin a chunk in `out` (empty).
    fn start(&mut self, out: &mut Vec<u8>) {
        if self.encoding == Encoding::Compact {
            out.push(COMPACT);
        }
        self.prev_ts = 0;
    }

    fn line(&mut self, out: &mut Vec<u8>, l: &Line) {
        let mut flags = 0;
        if matches!(l.stream, Stream::Stderr) {
            flags |= STDERR;
        }
        if l.raw.is_some() {
            flags |= RAW;
        }
        let ts = micros(l.ts);
        match self.encoding {
            Encoding::Fixed => {
                out.push(flags);
                out.extend_from_slice(&ts.to_le_bytes());
                out.extend_from_slice(&(l.text.len() as u32).to_le_bytes());
                out.extend_from_slice(l.text.as_bytes());
                if let Some(raw) = &l.raw {
                    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
                    out.extend_from_slice(raw);
                }
            }
            Encoding::Compact => {
                // `micros` is never negative, so the difference cannot overflow.
                let delta = ts - self.prev_ts;
                self.prev_ts = ts;
                if delta == 0 {
                    flags |= SAME_TS;
                }
                out.push(flags);
                if delta != 0 {
                    put_varint(out, zigzag(delta));
                }
                put_varint(out, l.text.len() as u64);
                out.extend_from_slice(l.text.as_bytes());
                if let Some(raw) = &l.raw {
                    put_varint(out, raw.len() as u64);
                    out.extend_from_slice(raw);
                }
            }
        }
    }
}

/// Split `lines` (consecutive seqs) into chunks: (first seq, last seq, data).
pub(super) fn chunks(lines: &[&Line], encoding: Encoding) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut encoder = Encoder {
        encoding,
        prev_ts: 0,
    };
    let mut data = Vec::new();
    let mut first = None;
    for (i, l) in lines.iter().enumerate() {
        let start = *first.get_or_insert_with(|| {
            // Room for the chunk's lines at the fixed encoding's size (one allocation, not a
            // growth per doubling).
            let wanted: usize = lines[i..]
                .iter()
                .take(CHUNK_LINES)
                .map(|l| 13 + l.text.len() + l.raw.as_ref().map_or(0, |r| 4 + r.len()))
                .scan(0, |sum, n| {
                    let before = *sum;
                    *sum += n;
                    (before < CHUNK_BYTES).then_some(n)
                })
                .sum();
            data.reserve_exact(wanted + 1);
            encoder.start(&mut data);
            l.seq
        });
        encoder.line(&mut data, l);
        if data.len() >= CHUNK_BYTES
            || (l.seq - start) as usize + 1 >= CHUNK_LINES
            || i + 1 == lines.len()
        {
            out.push((start, l.seq, std::mem::take(&mut data)));
            first = None;
        }
    }
    out
}

/// One line as a chunk holds it.
struct Entry<'a> {
    stream: Stream,
    ts: i64,
    text: &'a [u8],
    raw: Option<&'a [u8]>,
}

/// Reads the lines of a chunk in either encoding, checking every length against the data.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    compact: bool,
    prev_ts: i64,
}

fn corrupt() -> StoreError {
    StoreError::Backend("a stored output chunk is corrupt".into())
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        let compact = data.first() == Some(&COMPACT);
        Self {
            data,
            pos: usize::from(compact),
            compact,
            prev_ts: 0,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self.pos.checked_add(n).ok_or_else(corrupt)?;
        let bytes = self.data.get(self.pos..end).ok_or_else(corrupt)?;
        self.pos = end;
        Ok(bytes)
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            // The tenth byte may only hold the top bit of a u64.
            if shift == 63 && b > 1 {
                return Err(corrupt());
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(corrupt())
    }

    /// A length (u32 LE when fixed, LEB128 when compact), then that many bytes.
    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let len = if self.compact {
            usize::try_from(self.varint()?).map_err(|_| corrupt())?
        } else {
            let b = self.take(4)?;
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        };
        self.take(len)
    }

    /// The next line, or `None` at the end of the data.
    fn next(&mut self) -> Result<Option<Entry<'a>>, StoreError> {
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let flags = self.take(1)?[0];
        let stream = if flags & STDERR != 0 {
            Stream::Stderr
        } else {
            Stream::Stdout
        };
        let ts = if self.compact {
            if flags & !(STDERR | RAW | SAME_TS) != 0 {
                return Err(corrupt());
            }
            if flags & SAME_TS == 0 {
                let delta = unzigzag(self.varint()?);
                self.prev_ts = self.prev_ts.checked_add(delta).ok_or_else(corrupt)?;
            }
            self.prev_ts
        } else {
            let b = self.take(8)?;
            i64::from_le_bytes(b.try_into().map_err(|_| corrupt())?)
        };
        let text = self.bytes()?;
        let raw = match flags & RAW != 0 {
            true => Some(self.bytes()?),
            false => None,
        };
        Ok(Some(Entry {
            stream,
            ts,
            text,
            raw,
        }))
    }
}

/// Decode the lines of a chunk (either encoding) with `seq > after`, at most `limit` of them,
/// into `out`.
pub(super) fn decode_chunk(
    first_seq: u64,
    data: &[u8],
    after: u64,
    limit: usize,
    out: &mut Vec<Line>,
) -> Result<(), StoreError> {
    // The texts of the lines wanted, gathered into one buffer (one allocation, not one per
    // line); the lines are slices of it.
    struct Wanted<'a> {
        seq: u64,
        stream: Stream,
        ts: i64,
        text: std::ops::Range<usize>,
        raw: Option<&'a [u8]>,
    }
    let mut wanted: Vec<Wanted<'_>> = Vec::new();
    let mut texts = String::with_capacity(data.len());
    let mut reader = Reader::new(data);
    let mut seq = first_seq;
    while out.len() + wanted.len() < limit {
        let Some(e) = reader.next()? else { break };
        if seq > after {
            let at = texts.len();
            texts.push_str(std::str::from_utf8(e.text).map_err(|_| corrupt())?);
            wanted.push(Wanted {
                seq,
                stream: e.stream,
                ts: e.ts,
                text: at..texts.len(),
                raw: e.raw,
            });
        }
        seq += 1;
    }
    let buf: Arc<str> = Arc::from(texts);
    out.reserve(wanted.len());
    for w in wanted {
        out.push(Line {
            seq: w.seq,
            stream: w.stream,
            ts: from_micros(w.ts),
            text: Text::slice(&buf, w.text).ok_or_else(corrupt)?,
            raw: w.raw.map(Arc::from),
        });
    }
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;

    use super::*;

    fn line(seq: u64, stderr: bool, ts_us: u64, text: &str, raw: Option<&[u8]>) -> Line {
        Line {
            seq,
            stream: if stderr {
                Stream::Stderr
            } else {
                Stream::Stdout
            },
            ts: UNIX_EPOCH + Duration::from_micros(ts_us),
            text: text.into(),
            raw: raw.map(Arc::from),
        }
    }

    fn decode_all(chunks: &[(u64, u64, Vec<u8>)], after: u64, limit: usize) -> Vec<Line> {
        let mut out = Vec::new();
        for (first, last, data) in chunks {
            if *last > after && out.len() < limit {
                decode_chunk(*first, data, after, limit, &mut out).unwrap();
            }
        }
        out
    }

    /// A chunk in the fixed encoding, byte by byte as modrun wrote it before the compact one
    /// (and as PostgreSQL still does), reads back.
    #[test]
    fn a_fixed_chunk_written_by_an_older_modrun_reads_back() {
        let mut data = vec![0u8];
        data.extend_from_slice(&1_700_000_000_000_001i64.to_le_bytes());
        data.extend_from_slice(&2u32.to_le_bytes());
        data.extend_from_slice(b"hi");
        data.push(STDERR | RAW);
        data.extend_from_slice(&1_700_000_000_000_002i64.to_le_bytes());
        data.extend_from_slice(&4u32.to_le_bytes());
        data.extend_from_slice("a\u{fffd}".as_bytes());
        data.extend_from_slice(&2u32.to_le_bytes());
        data.extend_from_slice(b"a\xff");
        let mut out = Vec::new();
        decode_chunk(7, &data, 0, 10, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                line(7, false, 1_700_000_000_000_001, "hi", None),
                line(8, true, 1_700_000_000_000_002, "a\u{fffd}", Some(b"a\xff")),
            ]
        );
    }

    /// The lines of one read (one time) cost 2 bytes of header each when compact, 13 when fixed.
    #[test]
    fn compact_lines_of_one_read_carry_two_bytes_of_header() {
        let text = "x".repeat(80);
        let lines: Vec<Line> = (1..=1000)
            .map(|s| line(s, false, 1_700_000_000_000_000, &text, None))
            .collect();
        let refs: Vec<&Line> = lines.iter().collect();
        let size = |e| -> usize { chunks(&refs, e).iter().map(|c| c.2.len()).sum() };
        assert_eq!(size(Encoding::Fixed), 1000 * 93);
        // The marker, the first line's time (8 bytes of LEB128), then 82 bytes per line.
        assert_eq!(size(Encoding::Compact), 1 + 8 + 1000 * 82);
    }

    fn arb_line() -> impl Strategy<Value = (bool, i64, String, Option<Vec<u8>>)> {
        (
            any::<bool>(),
            // Mostly the same time as the line before, sometimes later, sometimes earlier
            // (the clock may step back).
            prop_oneof![3 => Just(0i64), 1 => 1i64..5_000_000, 1 => -5_000_000i64..0],
            "\\PC{0,40}",
            prop::option::weighted(0.2, prop::collection::vec(any::<u8>(), 0..40)),
        )
    }

    proptest! {
        /// Any lines survive either encoding unchanged, and any `after`/`limit` selects the
        /// same lines from them.
        #[test]
        fn lines_round_trip_through_both_encodings(
            specs in prop::collection::vec(arb_line(), 1..300),
            start_ts in 0u64..4_000_000_000_000_000,
            first in 1u64..1000,
            after_frac in 0.0f64..1.0,
            limit in 1usize..400,
        ) {
            let mut ts = start_ts as i64;
            let lines: Vec<Line> = specs
                .iter()
                .enumerate()
                .map(|(i, (err, step, text, raw))| {
                    ts = (ts + step).max(0);
                    line(first + i as u64, *err, ts as u64, text, raw.as_deref())
                })
                .collect();
            let refs: Vec<&Line> = lines.iter().collect();
            let after = first - 1 + (after_frac * lines.len() as f64) as u64;
            let expected: Vec<Line> =
                lines.iter().filter(|l| l.seq > after).take(limit).cloned().collect();
            for encoding in [Encoding::Fixed, Encoding::Compact] {
                let cs = chunks(&refs, encoding);
                prop_assert_eq!(decode_all(&cs, first - 1, usize::MAX), lines.clone());
                prop_assert_eq!(decode_all(&cs, after, limit), expected.clone());
            }
        }

        /// Whatever bytes a chunk holds, decoding returns lines or an error: never a panic.
        #[test]
        fn any_bytes_decode_without_panicking(
            compact in any::<bool>(),
            bytes in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut data = Vec::new();
            if compact {
                data.push(COMPACT);
            }
            data.extend_from_slice(&bytes);
            let mut out = Vec::new();
            let _ = decode_chunk(1, &data, 0, 1000, &mut out);
        }
    }

    /// A compact chunk cut short or given an overlong number is reported corrupt.
    #[test]
    fn a_damaged_compact_chunk_is_corrupt() {
        let l = line(1, false, 1_700_000_000_000_000, "hello", None);
        let data = chunks(&[&l], Encoding::Compact).remove(0).2;
        for cut in 2..data.len() {
            let mut out = Vec::new();
            assert!(
                decode_chunk(1, &data[..cut], 0, 10, &mut out).is_err(),
                "cut at {cut}"
            );
        }
        let overlong = [
            COMPACT, SAME_TS, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ];
        assert!(decode_chunk(1, &overlong, 0, 10, &mut Vec::new()).is_err());
        let unknown_flag = [COMPACT, SAME_TS | 8, 0];
        assert!(decode_chunk(1, &unknown_flag, 0, 10, &mut Vec::new()).is_err());
    }
}
