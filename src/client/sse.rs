//! A Server-Sent Events parser for the client side: bytes in, whole events out (the WHATWG
//! rules modrun's streams follow: `event`, `id` and `data` fields, `:` comments, a blank line
//! ends an event, `\n`, `\r\n` or `\r`-less lines).

/// One event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// `event:` (`message` when absent).
    pub event: String,
    /// `id:`, when the event had one.
    pub id: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// The longest line accepted: a line event carries at most `output.max_line_bytes` of text
/// and its base64; a longer line is a broken stream, not something to buffer without end.
const MAX_LINE: usize = 16 << 20;

/// Parser state across reads.
#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of a line whose end has not arrived. Bounded by [`MAX_LINE`].
    partial: Vec<u8>,
    current: Event,
    has_data: bool,
}

/// The stream broke the protocol.
#[derive(Debug, thiserror::Error)]
#[error("an event stream line longer than {MAX_LINE} bytes")]
pub struct TooLong;

impl Parser {
    /// Take `bytes`; every event they complete goes to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), TooLong> {
        let mut rest = bytes;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            if self.partial.is_empty() {
                self.line(&rest[..i], out);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&rest[..i]);
                self.line(&line, out);
            }
            rest = &rest[i + 1..];
        }
        if self.partial.len() + rest.len() > MAX_LINE {
            return Err(TooLong);
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            let mut ev = std::mem::take(&mut self.current);
            if self.has_data || !ev.event.is_empty() {
                if ev.data.ends_with('\n') {
                    ev.data.pop();
                }
                if ev.event.is_empty() {
                    ev.event = "message".to_owned();
                }
                out.push(ev);
            }
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.current.event = value.into_owned(),
            b"data" => {
                self.current.data.push_str(&value);
                self.current.data.push('\n');
                self.has_data = true;
            }
            b"id" => self.current.id = Some(value.into_owned()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(text: &[u8], piece: usize) -> Vec<Event> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for c in text.chunks(piece) {
            p.push(c, &mut out).unwrap();
        }
        out
    }

    /// Events come out whole however the bytes are cut, with comments skipped, CRLF accepted
    /// and several data lines joined.
    #[test]
    fn events_survive_any_cut() {
        let text = b": keep-alive\n\nevent: stdout\nid: 7\ndata: {\"seq\":7}\n\n\
                     event: end\r\ndata: a\r\ndata: b\r\n\r\ndata: plain\n\n";
        for piece in 1..text.len() {
            let out = parse_in_pieces(text, piece);
            assert_eq!(
                out,
                [
                    Event {
                        event: "stdout".into(),
                        id: Some("7".into()),
                        data: "{\"seq\":7}".into()
                    },
                    Event {
                        event: "end".into(),
                        id: None,
                        data: "a\nb".into()
                    },
                    Event {
                        event: "message".into(),
                        id: None,
                        data: "plain".into()
                    },
                ],
                "piece {piece}"
            );
        }
    }

    /// A line without end past the bound is an error, not a buffer that grows.
    #[test]
    fn an_endless_line_is_refused() {
        let mut p = Parser::default();
        let mut out = Vec::new();
        let chunk = vec![b'a'; 1 << 20];
        let mut failed = false;
        for _ in 0..20 {
            if p.push(&chunk, &mut out).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }
}
