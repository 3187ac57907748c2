//! Raw pipe bytes to lines: split at `\n` (a trailing `\r` dropped), over-long lines cut into
//! pieces of at most `max` bytes (never inside a UTF-8 sequence when the bytes are valid there),
//! decoded lossily, with the bytes themselves kept beside the text of a piece that is not valid
//! UTF-8. The work per call is linear in the bytes given, however long a line gets. The lines
//! that a read holds whole (valid UTF-8, no secret in them) share one allocation.

use std::sync::Arc;

use super::redact::Redactor;
use crate::run::Text;

/// One line (or piece of an over-long one) as the splitter gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The text; invalid UTF-8 replaced by U+FFFD.
    pub text: Text,
    /// The bytes, when they are not valid UTF-8 (secrets masked in them too).
    pub raw: Option<Arc<[u8]>>,
}

impl std::ops::Deref for Piece {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

/// One pipe's line splitter: keeps the bytes of a line whose `\n` has not arrived yet.
#[derive(Debug)]
pub struct LineSplitter {
    /// Bytes of the unfinished line, as read (not yet redacted); at most `max` plus one read
    /// plus the longest secret, since full-size pieces are cut off as soon as they are
    /// complete.
    partial: Vec<u8>,
    max: usize,
    redactor: Option<Arc<Redactor>>,
}

impl LineSplitter {
    /// A splitter that cuts lines longer than `max` bytes (at least 4, room for any UTF-8
    /// character).
    pub fn new(max: usize) -> Self {
        Self {
            partial: Vec::new(),
            max: max.max(4),
            redactor: None,
        }
    }

    /// The same, with secrets masked in every line it gives.
    pub fn redacting(max: usize, redactor: Option<Arc<Redactor>>) -> Self {
        Self {
            redactor,
            ..Self::new(max)
        }
    }

    /// Take `data`: every complete line (and every full-size piece of an over-long unfinished
    /// one) goes to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Piece>) {
        let r = self.redactor.as_deref();
        let mut rest = data;
        // The end of the unfinished line.
        if !self.partial.is_empty()
            && let Some(i) = memchr::memchr(b'\n', rest)
        {
            self.partial.extend_from_slice(&rest[..i]);
            emit_line(&self.partial, self.max, r, out);
            self.partial.clear();
            rest = &rest[i + 1..];
        }
        // The lines this read holds whole: one buffer for them all when they are valid UTF-8
        // and hold no secret (it holds their text and line endings only, never the start of a
        // later line, nor a secret that a line's mask hides).
        if self.partial.is_empty()
            && let Some(end) = memchr::memrchr(b'\n', rest)
        {
            let (whole, tail) = rest.split_at(end + 1);
            let clean = r.is_none_or(|r| matches!(r.redact(whole), std::borrow::Cow::Borrowed(_)));
            match std::str::from_utf8(whole) {
                Ok(text) if clean => {
                    let buf: Arc<str> = Arc::from(text);
                    let mut start = 0;
                    for i in memchr::memchr_iter(b'\n', whole) {
                        emit_shared(&buf, start, i, self.max, out);
                        start = i + 1;
                    }
                }
                _ => {
                    for line in whole[..end].split(|&b| b == b'\n') {
                        emit_line(line, self.max, r, out);
                    }
                }
            }
            rest = tail;
        }
        self.partial.extend_from_slice(rest);
        // Cut full-size pieces off an over-long unfinished line right away, so that the buffer
        // stays bounded and readers see them live; one drain at the end keeps this linear.
        // With secrets, a cut never falls inside one, and a tail that may begin one waits.
        let mut start = 0;
        while self.partial.len() - start > self.max {
            let piece = &self.partial[start..];
            let mut cut = utf8_cut(piece, self.max);
            if let Some(r) = r {
                cut = r.safe_cut(piece, cut.min(piece.len() - r.held_tail(piece)));
            }
            if cut == 0 {
                break;
            }
            out.push(decode_redacted(&piece[..cut], r));
            start += cut;
        }
        self.partial.drain(..start);
    }

    /// The pipe reached EOF: a final line without `\n` goes to `out`.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            emit_line(&rest, self.max, self.redactor.as_deref(), out);
        }
    }

    /// Bytes held for an unfinished line.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// Push one complete line (without its `\n`): a trailing `\r` is dropped, secrets are masked,
/// and a line longer than `max` bytes becomes several.
fn emit_line(line: &[u8], max: usize, r: Option<&Redactor>, out: &mut Vec<Piece>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let redacted = match r {
        Some(r) => r.redact(line),
        None => std::borrow::Cow::Borrowed(line),
    };
    let mut line = &redacted[..];
    while line.len() > max {
        let cut = utf8_cut(line, max);
        out.push(decode(&line[..cut]));
        line = &line[cut..];
    }
    out.push(decode(line));
}

/// [`emit_line`] for the line `buf[start..end]` of a shared buffer (valid UTF-8, no secret in
/// it): its pieces are slices of `buf`.
fn emit_shared(buf: &Arc<str>, start: usize, end: usize, max: usize, out: &mut Vec<Piece>) {
    let bytes = buf.as_bytes();
    let end = if end > start && bytes[end - 1] == b'\r' {
        end - 1
    } else {
        end
    };
    let mut at = start;
    loop {
        let cut = if end - at > max {
            utf8_cut(&bytes[at..end], max)
        } else {
            end - at
        };
        match Text::slice(buf, at..at + cut) {
            Some(text) => out.push(Piece { text, raw: None }),
            // Not on a character boundary (cannot happen for valid text): copy it.
            None => out.push(decode(&bytes[at..at + cut])),
        }
        at += cut;
        if at >= end {
            return;
        }
    }
}

fn decode_redacted(piece: &[u8], r: Option<&Redactor>) -> Piece {
    match r {
        Some(r) => decode(&r.redact(piece)),
        None => decode(piece),
    }
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

fn decode(bytes: &[u8]) -> Piece {
    // The strict check is much faster than the lossy decoder on valid text.
    match std::str::from_utf8(bytes) {
        Ok(s) => Piece {
            text: s.into(),
            raw: None,
        },
        Err(_) => Piece {
            text: String::from_utf8_lossy(bytes).into_owned().into(),
            raw: Some(Arc::from(bytes)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_all(chunks: &[Vec<u8>], max: usize) -> Vec<Piece> {
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

    /// A line that is not valid UTF-8 keeps its bytes (cut where its pieces are cut, secrets
    /// masked in them too); a valid one keeps only its text.
    #[test]
    fn invalid_utf8_keeps_its_bytes() {
        let r = Arc::new(Redactor::new(["hunter2"]).unwrap());
        let mut s = LineSplitter::redacting(8, Some(r));
        let mut out = Vec::new();
        s.push(b"ok \xc3\xa9\n\xff\x00bin\r\nab\xfehunter2\n", &mut out);
        s.finish(&mut out);
        let raws: Vec<Option<&[u8]>> = out.iter().map(|p| p.raw.as_deref()).collect();
        assert_eq!(
            raws,
            [None, Some(&b"\xff\x00bin"[..]), Some(&b"ab\xfe***"[..])]
        );
        assert_eq!(&*out[0].text, "ok é");
        assert_eq!(&*out[1].text, "\u{FFFD}\0bin");
    }

    /// The lines a read holds whole share one buffer that holds nothing else; a line that
    /// continues an earlier read, one with a secret masked, and one that is not valid UTF-8
    /// have buffers of their own.
    #[test]
    fn the_whole_lines_of_a_read_share_one_buffer() {
        let r = Arc::new(Redactor::new(["hunter2"]).unwrap());
        let mut s = LineSplitter::redacting(1000, Some(r));
        let mut out = Vec::new();
        s.push(b"one\ntwo\r\n\nunfin", &mut out);
        s.push(b"ished\nfour hunter2\nfive\nsi", &mut out);
        s.push(b"x\xff\nseven\n", &mut out);
        let texts: Vec<&str> = out.iter().map(|p| &*p.text).collect();
        assert_eq!(
            texts,
            [
                "one",
                "two",
                "",
                "unfinished",
                "four ***",
                "five",
                "six\u{FFFD}",
                "seven"
            ]
        );
        let shares = |a: usize, b: usize| out[a].text.shares_buffer_with(&out[b].text);
        assert!(shares(0, 1) && shares(1, 2));
        assert!(!shares(2, 3) && !shares(3, 5) && !shares(4, 5));
        assert!(!shares(6, 7));
        // The buffer of a read's whole lines holds them and their line breaks only.
        assert_eq!(out[0].text.len() + out[1].text.len(), 6);
    }

    /// The splitter before lines shared buffers (one copy per line), for comparison.
    fn one_copy_per_line(chunks: &[Vec<u8>], max: usize) -> Vec<Piece> {
        let mut partial: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for data in chunks {
            let mut rest = &data[..];
            while let Some(i) = memchr::memchr(b'\n', rest) {
                partial.extend_from_slice(&rest[..i]);
                emit_line(&partial, max, None, &mut out);
                partial.clear();
                rest = &rest[i + 1..];
            }
            partial.extend_from_slice(rest);
            let mut start = 0;
            while partial.len() - start > max {
                let cut = utf8_cut(&partial[start..], max);
                out.push(decode(&partial[start..start + cut]));
                start += cut;
            }
            partial.drain(..start);
        }
        if !partial.is_empty() {
            emit_line(&partial, max, None, &mut out);
        }
        out
    }

    /// A secret is masked wherever the reads and the cuts of long lines fall.
    #[test]
    fn secrets_split_across_reads_and_cuts_are_masked() {
        let r = Arc::new(Redactor::new(["hunter2-secret"]).unwrap());
        let text = b"a hunter2-secret b\nxxxxhunter2-secretyyyyhunter2-secret\nhunter2-secret";
        for max in [4usize, 5, 8, 13, 64] {
            for split in 0..text.len() {
                let mut s = LineSplitter::redacting(max, Some(r.clone()));
                let mut out = Vec::new();
                s.push(&text[..split], &mut out);
                s.push(&text[split..], &mut out);
                s.finish(&mut out);
                let joined: String = out.iter().map(|p| p.to_string()).collect();
                assert!(
                    !joined.contains("hunter2"),
                    "max {max} split {split}: {out:?}"
                );
                assert!(
                    !joined.contains("secret"),
                    "max {max} split {split}: {out:?}"
                );
                assert_eq!(
                    joined.matches("***").count(),
                    4,
                    "max {max} split {split}: {out:?}"
                );
            }
        }
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

        /// Any text with a secret in it, any chunking and line length: the secret never
        /// comes out, whole or in a piece that a cut made.
        #[test]
        fn secrets_never_come_out(
            before in "[a-z ]{0,20}", after in "[a-z ]{0,20}",
            secret in "[a-z]{2,10}", cuts in prop::collection::vec(0usize..60, 0..6),
            max in 4usize..12,
        ) {
            let text = format!("{before}{secret}{after}");
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            points.sort_unstable();
            let r = Arc::new(Redactor::new([secret.as_str()]).unwrap());
            let mut s = LineSplitter::redacting(max, Some(r));
            let mut out = Vec::new();
            let mut last = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                s.push(&bytes[last..p], &mut out);
                last = p;
            }
            s.finish(&mut out);
            // One line: its pieces join back to what a reader sees.
            let joined: String = out.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("");
            prop_assert!(!joined.contains(secret.as_str()), "{:?}", out);
            prop_assert!(out.iter().all(|p| p.len() <= max.max(3) + secret.len()));
        }

        /// Any bytes, any chunking, any line length: the same pieces (text and bytes) as when
        /// every line was a copy of its own.
        #[test]
        fn shared_buffers_give_the_same_pieces(chunks in chunks(), max in 4usize..16) {
            prop_assert_eq!(split_all(&chunks, max), one_copy_per_line(&chunks, max));
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
