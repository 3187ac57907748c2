//! Secret values out of a run's output: every occurrence becomes `***` before a line is stored
//! or streamed. The line splitter calls it on whole lines, and on pieces of over-long lines
//! only at cut points that no secret straddles (it holds back a tail that may be the start of a
//! secret until the next read decides), so a value split across two reads of the pipe, or
//! across a cut, is caught too.

use std::borrow::Cow;

use aho_corasick::{AhoCorasick, MatchKind};

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// The secret values of one run, compiled for search.
#[derive(Debug)]
pub struct Redactor {
    ac: AhoCorasick,
    secrets: Vec<Vec<u8>>,
    longest: usize,
}

impl Redactor {
    /// A redactor for `secrets`; `None` when there is nothing to hide (no non-empty value). A
    /// value with line breaks is also hidden line by line (a program that prints it prints it
    /// on several lines).
    pub fn new<I, S>(secrets: I) -> Option<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut all: Vec<Vec<u8>> = Vec::new();
        let mut add = |s: &str| {
            if !s.is_empty() && !all.iter().any(|a| a == s.as_bytes()) {
                all.push(s.as_bytes().to_vec());
            }
        };
        for s in secrets {
            let s = s.as_ref();
            add(s);
            if s.contains('\n') {
                for line in s.split('\n') {
                    add(line.strip_suffix('\r').unwrap_or(line));
                }
            }
        }
        if all.is_empty() {
            return None;
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&all)
            .ok()?;
        let longest = all.iter().map(Vec::len).max().unwrap_or(0);
        Some(Self {
            ac,
            secrets: all,
            longest,
        })
    }

    /// `text` with every secret replaced by [`MASK`] (borrowed when there is none).
    pub fn redact<'a>(&self, text: &'a [u8]) -> Cow<'a, [u8]> {
        if self.ac.find(text).is_none() {
            return Cow::Borrowed(text);
        }
        Cow::Owned(
            self.ac
                .replace_all_bytes(text, &vec![MASK; self.secrets.len()]),
        )
    }

    /// A string with every secret replaced by [`MASK`].
    pub fn redact_str(&self, text: &str) -> String {
        match self.redact(text.as_bytes()) {
            Cow::Borrowed(_) => text.to_owned(),
            Cow::Owned(b) => String::from_utf8_lossy(&b).into_owned(),
        }
    }

    /// The length of the longest end of `text` that is the beginning (not all) of a secret:
    /// bytes that must wait for the next read before they can be cut off.
    pub fn held_tail(&self, text: &[u8]) -> usize {
        let mut held = 0;
        for s in &self.secrets {
            let window = text.len().min(s.len() - 1);
            let from = text.len() - window;
            for p in memchr::memchr_iter(s[0], &text[from..]) {
                let tail = &text[from + p..];
                if tail.len() > held && s.starts_with(tail) {
                    held = tail.len();
                    break;
                }
            }
        }
        held
    }

    /// A cut at or before `cut` in `text` that falls inside no secret: the start of a secret
    /// that straddles `cut`, or its end when it starts at 0.
    pub fn safe_cut(&self, text: &[u8], cut: usize) -> usize {
        let end = text.len().min(cut + self.longest);
        for m in self.ac.find_iter(&text[..end]) {
            if m.start() >= cut {
                break;
            }
            if m.end() > cut {
                return if m.start() > 0 { m.start() } else { m.end() };
            }
        }
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        let r = Redactor::new(["hunter2", "", "multi\nline"]).unwrap();
        assert_eq!(&*r.redact(b"pw=hunter2 ok"), b"pw=*** ok");
        assert_eq!(&*r.redact(b"nothing here"), b"nothing here");
        assert_eq!(&*r.redact(b"multi"), b"***");
        assert_eq!(r.redact_str("hunter2hunter2"), "******");
        assert!(Redactor::new([""]).is_none());
    }

    #[test]
    fn a_possible_start_of_a_secret_is_held() {
        let r = Redactor::new(["secret"]).unwrap();
        assert_eq!(r.held_tail(b"abc sec"), 3);
        assert_eq!(r.held_tail(b"abc s"), 1);
        assert_eq!(r.held_tail(b"abc"), 0);
        assert_eq!(
            r.held_tail(b"secret"),
            0,
            "a whole secret is not a beginning"
        );
        assert_eq!(r.safe_cut(b"xx secret yy", 5), 3);
        assert_eq!(r.safe_cut(b"secret yy", 3), 6);
        assert_eq!(r.safe_cut(b"xx secret yy", 2), 2);
    }
}
