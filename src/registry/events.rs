//! Run changes as one feed (`GET /events`): every creation and status change of a run on this
//! node, numbered, kept in a bounded ring so that a subscriber that reconnects resumes where
//! it was (`Last-Event-ID`), or learns that it fell behind and must reload (`reset`). Changes
//! are kept from the first subscription on: a server nobody watches copies nothing per run.
//!
//! An event id is `<feed>.<seq>`: `feed` names this feed (it changes at every start of the
//! process), `seq` counts its events from 1. An id of another feed, or one older than the
//! ring, cannot be resumed: the subscriber gets a `reset` and reads the runs afresh. (Across
//! several nodes each node has its own feed; a subscriber sees the runs of the node it
//! talks to, and the shared history through `GET /runs`.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::run::Run;

/// Events kept for resuming. Overflow policy: the oldest goes; a subscriber whose position
/// went with it gets a `reset`.
pub const RING: usize = 4096;

/// One change of a run: the run as it is after it.
#[derive(Debug, Clone)]
pub struct RunEvent {
    /// Its number in this feed, from 1.
    pub seq: u64,
    /// The run after the change.
    pub run: Arc<Run>,
}

/// Where a subscriber is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// After this seq of this feed.
    After(u64),
    /// Nowhere this feed can resume from (another feed's id, or one the ring no longer
    /// holds): start after the current last event, with a `reset`.
    Lost,
}

/// The feed.
#[derive(Debug)]
pub struct RunFeed {
    /// This feed's name: the process's start, in µs, as hex.
    id: String,
    inner: Mutex<Ring>,
    /// Bumped after every event. Overflow policy: a watch keeps only the latest value; a woken
    /// subscriber reads the ring from its own position, so nothing queues for a slow one.
    changes: watch::Sender<u64>,
    /// Set by the first subscription. Before it, nobody can hold a position in this feed (its
    /// ids are new at every start), so a change is not worth a copy of its run.
    watched: AtomicBool,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<RunEvent>,
    last: u64,
}

impl Default for RunFeed {
    fn default() -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        Self {
            id: format!("{started:x}"),
            inner: Mutex::default(),
            changes: watch::Sender::new(0),
            watched: AtomicBool::new(false),
        }
    }
}

impl RunFeed {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a change is worth publishing: someone has subscribed to this feed.
    pub fn watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// A run was created or changed: this is it now. (Nothing until the first subscription.)
    pub fn publish(&self, run: Run) {
        if !self.watched() {
            return;
        }
        let seq = {
            let mut ring = self.lock();
            ring.last += 1;
            let seq = ring.last;
            ring.events.push_back(RunEvent {
                seq,
                run: Arc::new(run),
            });
            if ring.events.len() > RING {
                ring.events.pop_front();
            }
            seq
        };
        self.changes.send_replace(seq);
    }

    /// The id of event `seq` of this feed.
    pub fn event_id(&self, seq: u64) -> String {
        format!("{}.{seq}", self.id)
    }

    /// Where a `Last-Event-ID` (absent: from now) puts a subscriber.
    pub fn position(&self, last_event_id: Option<&str>) -> Position {
        let last = self.lock().last;
        let Some(id) = last_event_id else {
            return Position::After(last);
        };
        let Some((feed, seq)) = id.split_once('.') else {
            return Position::Lost;
        };
        match seq.parse::<u64>() {
            Ok(seq) if feed == self.id && seq <= last => Position::After(seq),
            _ => Position::Lost,
        }
    }

    /// The current last seq.
    pub fn last(&self) -> u64 {
        self.lock().last
    }

    /// Up to `limit` events after `after`; `Err(())` when some of them are gone from the ring.
    #[allow(clippy::result_unit_err, reason = "the one failure is a gap")]
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<RunEvent>, ()> {
        let ring = self.lock();
        let first = ring.events.front().map_or(ring.last + 1, |e| e.seq);
        if after >= ring.last {
            return Ok(Vec::new());
        }
        if after + 1 < first {
            return Err(());
        }
        let start = (after + 1 - first) as usize;
        Ok(ring.events.range(start..).take(limit).cloned().collect())
    }

    /// A receiver that fires after each event; mark it seen before reading. From the first
    /// subscription on, every change is kept in the ring.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.watched.store(true, Ordering::Relaxed);
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Run {
        Run::queued_for_test("m")
    }

    /// A subscriber resumes from its id while the ring holds it; another feed's id, a bad one,
    /// or one the ring dropped is a reset.
    #[test]
    fn positions_resume_or_reset() {
        let feed = RunFeed::default();
        // Nobody watching yet: nothing kept.
        feed.publish(run());
        assert_eq!(feed.last(), 0);
        let _rx = feed.subscribe();
        for _ in 0..3 {
            feed.publish(run());
        }
        let id2 = feed.event_id(2);
        assert_eq!(feed.position(Some(&id2)), Position::After(2));
        assert_eq!(feed.read_after(2, 10).unwrap().len(), 1);
        assert_eq!(feed.position(None), Position::After(3));
        assert_eq!(feed.position(Some("abc.2")), Position::Lost);
        assert_eq!(feed.position(Some("2")), Position::Lost);
        assert_eq!(
            feed.position(Some(&feed.event_id(99))),
            Position::Lost,
            "ahead of the feed"
        );
        for _ in 0..RING {
            feed.publish(run());
        }
        assert!(feed.read_after(2, 10).is_err(), "dropped from the ring");
        let last = feed.last();
        assert_eq!(feed.read_after(last - 5, 10).unwrap().len(), 5);
    }
}
