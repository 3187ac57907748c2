//! Raw pipe bytes to lines: split at `\n` (a trailing `\r` dropped), over-long lines cut into
//! pieces of at most `max` bytes (never inside a UTF-8 sequence when the bytes are valid there),
//! decoded lossily. The work per call is linear in the bytes given, however long a line gets.

use std::sync::Arc;

/// One pipe's line splitter: keeps the bytes of a line whose `\n` has not arrived yet.
#[derive(Debug)]
pub struct LineSplitter {
    /// Bytes of the unfinished line; at most `max` plus one read, since full-size pieces are
    /// cut off as soon as they are complete.
    partial: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter that cuts lines longer than `max` bytes (at least 4, room for any UTF-8
    /// character).
    pub fn new(max: usize) -> Self {
        Self {
            partial: Vec::new(),
            max: max.max(4),
        }
    }

    /// Take `data`: every complete line (and every full-size piece of an over-long unfinished
    /// one) goes to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Arc<str>>) {
        let mut rest = data;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            if self.partial.is_empty() {
                emit_line(&rest[..i], self.max, out);
            } else {
                self.partial.extend_from_slice(&rest[..i]);
                emit_line(&self.partial, self.max, out);
                self.partial.clear();
            }
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        // Cut full-size pieces off an over-long unfinished line right away, so that the buffer
        // stays bounded and readers see them live; one drain at the end keeps this linear.
        let mut start = 0;
        while self.partial.len() - start > self.max {
            let piece = &self.partial[start..];
            let cut = utf8_cut(piece, self.max);
            out.push(decode(&piece[..cut]));
            start += cut;
        }
        self.partial.drain(..start);
    }

    /// The pipe reached EOF: a final line without `\n` goes to `out`.
    pub fn finish(&mut self, out: &mut Vec<Arc<str>>) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            emit_line(&rest, self.max, out);
        }
    }

    /// Bytes held for an unfinished line.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// Push one complete line (without its `\n`): a trailing `\r` is dropped, and a line longer
/// than `max` bytes becomes several.
fn emit_line(line: &[u8], max: usize, out: &mut Vec<Arc<str>>) {
    let mut line = line.strip_suffix(b"\r").unwrap_or(line);
    while line.len() > max {
        let cut = utf8_cut(line, max);
        out.push(decode(&line[..cut]));
        line = &line[cut..];
    }
    out.push(decode(line));
}

/// The largest cut `<= max` that does not fall inside a UTF-8 sequence (when the bytes are
/// valid UTF-8 there; invalid bytes are cut at `max`).
fn utf8_cut(bytes: &[u8], max: usize) -> usize {
    let mut cut = max;
    // A UTF-8 sequence is at most 4 bytes: step back over at most 3 continuation bytes.
    while cut > max.saturating_sub(3) && cut > 0 && (bytes[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    if cut == 0 || (bytes[cut] & 0xC0) == 0x80 {
        max
    } else {
        cut
    }
}

fn decode(bytes: &[u8]) -> Arc<str> {
    // The strict check is much faster than the lossy decoder on valid text.
    match std::str::from_utf8(bytes) {
        Ok(s) => Arc::from(s),
        Err(_) => Arc::from(&*String::from_utf8_lossy(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_all(chunks: &[Vec<u8>], max: usize) -> Vec<Arc<str>> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
            assert!(s.pending() <= max + c.len());
        }
        s.finish(&mut out);
        out
    }

    /// A line of 64 MiB without a newline, given in one piece, is cut in linear time (it took
    /// 49 s for 200 MB when every piece shifted the rest of the buffer).
    #[test]
    fn a_huge_unfinished_line_is_cut_in_linear_time() {
        let data = vec![b'a'; 64 << 20];
        let started = std::time::Instant::now();
        let mut s = LineSplitter::new(65536);
        let mut out = Vec::new();
        s.push(&data, &mut out);
        s.finish(&mut out);
        assert_eq!(out.len(), 1024);
        assert!(out.iter().all(|l| l.len() == 65536));
        // Generous: a quadratic cut takes minutes here.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let byte = prop_oneof![
            4 => b'a'..=b'e',
            2 => Just(b'\n'),
            1 => Just(b'\r'),
            1 => any::<u8>(),
            1 => prop::sample::select(vec![0xC3u8, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F]),
        ];
        prop::collection::vec(prop::collection::vec(byte, 0..40), 0..12)
    }

    proptest! {
        /// For valid UTF-8 input without `\r`: the pieces, joined back with the line breaks that
        /// ended lines, equal the input, however it was chunked; no piece is longer than `max`.
        #[test]
        fn pieces_join_back_to_the_input(text in "[a-zé€😀\n]{0,200}", cuts in prop::collection::vec(0usize..200, 0..8), max in 4usize..12) {
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                chunks.push(bytes[last..p].to_vec());
                last = p;
            }
            let pieces = split_all(&chunks, max);
            prop_assert!(pieces.iter().all(|p| p.len() <= max));
            // Lines cut for length join without a separator; split at '\n' and compare each
            // line with the concatenation of its pieces.
            let mut joined = String::new();
            let mut expected_lines: Vec<&str> = text.split('\n').collect();
            if text.ends_with('\n') || text.is_empty() {
                expected_lines.pop();
            }
            let mut it = pieces.iter();
            for line in expected_lines {
                joined.clear();
                while joined.len() < line.len() {
                    let Some(p) = it.next() else { break };
                    joined.push_str(p);
                }
                if line.is_empty() {
                    prop_assert_eq!(it.next().map(|p| p.to_string()), Some(String::new()));
                } else {
                    prop_assert_eq!(&joined, line);
                }
            }
            prop_assert!(it.next().is_none());
        }

        /// Any bytes, any chunking: never panics, no piece over `max` bytes of text (a
        /// replacement character counts 3 bytes for each invalid byte, so pieces of invalid
        /// input may grow up to 3x), and the buffer stays bounded.
        #[test]
        fn arbitrary_bytes_never_panic(chunks in chunks(), max in 4usize..16) {
            let pieces = split_all(&chunks, max);
            prop_assert!(pieces.iter().all(|p| p.len() <= 3 * max));
            let newlines: usize = chunks.iter().map(|c| c.iter().filter(|b| **b == b'\n').count()).sum();
            prop_assert!(pieces.len() >= newlines);
        }
    }
}
