//! A minimal, fast SSE client that parses every event (and its JSON data).

use std::time::Duration;

use serde::Deserialize;

/// One event, borrowed from the read buffer.
pub struct Event<'a> {
    pub kind: &'a str,
    pub data: &'a [u8],
}

/// The data of a line event.
#[derive(Deserialize)]
pub struct LineData<'a> {
    pub seq: u64,
    #[serde(borrow)]
    pub line: std::borrow::Cow<'a, str>,
}

/// The data of a status/end event (the run).
#[derive(Deserialize)]
pub struct RunData {
    pub status: String,
}

/// Read a stream to its end, calling `each` on every event. Returns false if `limit` passed.
pub async fn follow(
    mut res: reqwest::Response,
    limit: Duration,
    mut each: impl FnMut(Event<'_>),
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut start = 0;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, res.chunk()).await {
            Err(_) => return false,
            Ok(Err(_)) | Ok(Ok(None)) => return true,
            Ok(Ok(Some(c))) => c,
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = memchr::memmem::find(&buf[start..], b"\n\n") {
            let block = &buf[start..start + end];
            start += end + 2;
            if let Some(ev) = parse(block) {
                each(ev);
            }
        }
        if start > 0 && start * 2 > buf.len() {
            buf.drain(..start);
            start = 0;
        }
    }
}

fn parse(block: &[u8]) -> Option<Event<'_>> {
    let mut kind = None;
    let mut data: &[u8] = &[];
    for line in block.split(|b| *b == b'\n') {
        if let Some(v) = line.strip_prefix(b"event: ") {
            kind = std::str::from_utf8(v).ok();
        } else if let Some(v) = line.strip_prefix(b"data: ") {
            data = v;
        }
    }
    Some(Event { kind: kind?, data })
}
