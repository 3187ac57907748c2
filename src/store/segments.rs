//! The SQLite store's output bytes, outside the database: append-only segment files next to
//! it (`output-<n>.seg`). A chunk row keeps where its bytes are (segment, offset, length) and
//! their CRC-32; the bytes are written once, where SQLite would write them twice (to its WAL,
//! then again at the checkpoint), in 4 KiB pages.
//!
//! - **One active segment**, written only by the store's writer thread; a new one at every
//!   start (a crash's torn tail is never appended to) and once the active one holds
//!   [`SEGMENT_BYTES`].
//! - **Written before the commit that refers to them.** A batch's chunks go to the file at the
//!   tentative end; the commit makes that end the real one, a rollback takes it back (the next
//!   batch overwrites the bytes, which no row refers to).
//! - **Durable before the rows are**: SQLite (`synchronous = NORMAL`) makes commits durable at
//!   its checkpoints, and the store runs those itself: the active segment is `fdatasync`ed
//!   first, through [`ActiveFile`] when the store's checkpointer thread runs it (and at every
//!   switch to a new segment, and before the store closes). After a power
//!   loss a commit newer than the last checkpoint may still survive (the kernel writes the WAL
//!   back when it likes); the start checks the last segment of the run before against its rows
//!   and drops those whose bytes did not survive ([`Segments::open`]).
//! - **Deleted whole** once no row refers to them (retention deletes the rows): the store
//!   counts rows per segment, from the database at the start and by each commit after.
//! - **Read** with `pread` by the read connections, the CRC checked.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Outage, StoreError};

/// A segment is closed once it holds this much (a new one is created: one `openat` per this
/// many bytes of output). Small enough that retention frees space in steps of this size.
pub(super) const SEGMENT_BYTES: u64 = 8 << 20;
const PREFIX: &str = "output-";
const SUFFIX: &str = ".seg";

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Place {
    /// The segment's number.
    pub seg: u64,
    /// The offset in it.
    pub pos: u64,
    /// The length.
    pub len: u32,
    /// CRC-32 (IEEE) of the bytes.
    pub crc: u32,
}

/// The segment files of one store (the writer thread's).
#[derive(Debug)]
pub(super) struct Segments {
    dir: PathBuf,
    /// The segment written to.
    active: Arc<File>,
    /// The same, for the checkpointer thread (replaced at every switch of segment).
    shared: ActiveFile,
    active_no: u64,
    /// Committed bytes of the active segment: rows refer to bytes before it only.
    end: u64,
    /// Where this batch writes next (`end` again after a rollback).
    tentative: u64,
    /// Bytes written since the last `fdatasync`.
    unsynced: bool,
    /// Rows per segment, as committed.
    rows: HashMap<u64, u64>,
    /// Changes of this batch to `rows`, applied when it commits.
    delta: Vec<(u64, i64)>,
    /// A segment is closed once it holds this much ([`SEGMENT_BYTES`]; less in tests).
    limit: u64,
}

/// The active segment's file as another thread sees it, to `fdatasync` it: the store's
/// checkpointer, before a checkpoint makes the rows that refer to its bytes durable. Syncing
/// it syncs every byte any committed row refers to: the segments before it were synced when
/// they were closed, before it became the active one.
#[derive(Debug, Clone)]
pub(super) struct ActiveFile(Arc<Mutex<Arc<File>>>);

impl ActiveFile {
    /// `fdatasync` the active segment (the file it is when this is called).
    pub fn sync(&self) -> io::Result<()> {
        // The lock is held only to clone the handle, not across the sync.
        let file = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        file.sync_data()
    }
}

/// A segment's file name.
fn file_name(no: u64) -> String {
    format!("{PREFIX}{no:010}{SUFFIX}")
}

/// The segment numbers in `dir`, ascending.
fn existing(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found: Vec<u64> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.strip_prefix(PREFIX)?
                .strip_suffix(SUFFIX)?
                .parse()
                .ok()
        })
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// An I/O error as a store error: a full disk, a read-only file system and other I/O errors
/// are outages (they pass), like SQLite's own.
pub(super) fn io_error(what: &str, e: io::Error) -> StoreError {
    let outage = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Outage::DiskFull,
        Some(libc::EROFS) => Outage::ReadOnly,
        _ => Outage::Io,
    };
    StoreError::Unavailable(outage, format!("{what}: {e}"))
}

/// Rows (run key, last seq) of the segment written last before the start whose bytes are not
/// all there or not as written (after a power loss).
pub(super) type Torn = Vec<(Vec<u8>, i64)>;

impl Segments {
    /// The segments in `dir`, with `rows` (rows per segment, from the database): segments no
    /// row refers to are deleted, and a new active segment is created after the last.
    /// `last_rows` are the rows (key, place) of the newest existing segment, checked against
    /// its file: the ones that did not survive are returned, for the caller to delete. That
    /// segment is synced: the run before may have crashed before it could, and its rows
    /// become durable at this run's checkpoints.
    pub fn open(
        dir: &Path,
        mut rows: HashMap<u64, u64>,
        last_rows: impl FnOnce(u64) -> Result<Vec<(Vec<u8>, i64, Place)>, StoreError>,
    ) -> Result<(Self, Torn), StoreError> {
        let found = existing(dir).map_err(|e| io_error("cannot list the output segments", e))?;
        let mut torn = Torn::new();
        if let Some(&last) = found.last() {
            let file = File::open(dir.join(file_name(last)))
                .map_err(|e| io_error("cannot open an output segment", e))?;
            file.sync_data()
                .map_err(|e| io_error("cannot sync an output segment", e))?;
            for (key, seq, place) in last_rows(last)? {
                if read_at(&file, place).is_err() {
                    torn.push((key, seq));
                    if let Some(n) = rows.get_mut(&last) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
        for no in &found {
            if rows.get(no).copied().unwrap_or(0) == 0 {
                rows.remove(no);
                std::fs::remove_file(dir.join(file_name(*no)))
                    .map_err(|e| io_error("cannot delete an unused output segment", e))?;
            }
        }
        // After every segment a row or a file names (a row may name a file deleted by hand:
        // its number is not reused).
        let active_no = found
            .last()
            .copied()
            .into_iter()
            .chain(rows.keys().copied())
            .max()
            .map_or(1, |n| n + 1);
        let active = Arc::new(create(dir, active_no)?);
        Ok((
            Self {
                dir: dir.to_owned(),
                shared: ActiveFile(Arc::new(Mutex::new(active.clone()))),
                active,
                active_no,
                end: 0,
                tentative: 0,
                unsynced: false,
                rows,
                delta: Vec::new(),
                limit: SEGMENT_BYTES,
            },
            torn,
        ))
    }

    /// Write a chunk's bytes for this batch; its row must be inserted in the same batch.
    pub fn write(&mut self, data: &[u8]) -> Result<Place, StoreError> {
        let pos = self.tentative;
        self.active
            .write_all_at(data, pos)
            .map_err(|e| io_error("cannot write output", e))?;
        self.tentative += data.len() as u64;
        self.unsynced = true;
        self.delta.push((self.active_no, 1));
        Ok(Place {
            seg: self.active_no,
            pos,
            len: u32::try_from(data.len())
                .map_err(|_| StoreError::Backend("chunk too long".into()))?,
            crc: crc32fast::hash(data),
        })
    }

    /// A row referring to segment `seg` was deleted in this batch.
    pub fn released(&mut self, seg: u64) {
        self.delta.push((seg, -1));
    }

    /// The batch committed: its bytes and counts are the segments' now. Segments no row
    /// refers to any more are deleted; a full active segment is synced and replaced.
    pub fn committed(&mut self) {
        self.end = self.tentative;
        for (seg, change) in std::mem::take(&mut self.delta) {
            let n = self.rows.entry(seg).or_default();
            *n = n.saturating_add_signed(change);
            if *n == 0 && seg != self.active_no {
                self.delete(seg);
            }
        }
        if self.end >= self.limit
            && let Err(e) = self.rotate()
        {
            tracing::warn!(error = %e, "cannot start a new output segment; the active one grows");
        }
    }

    /// The batch was rolled back: forget what it wrote.
    pub fn rolled_back(&mut self) {
        self.tentative = self.end;
        self.delta.clear();
    }

    /// `fdatasync` the active segment if it has bytes not yet synced (the segments before it
    /// were synced when they were closed).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.active.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// The active segment, for the checkpointer thread.
    pub fn active_file(&self) -> ActiveFile {
        self.shared.clone()
    }

    /// Whether output can be written again (during an outage): a page written where the next
    /// chunk goes (and overwritten by it).
    pub fn probe(&mut self) -> Result<(), StoreError> {
        self.active
            .write_all_at(&[0u8; 4096], self.tentative)
            .map_err(|e| io_error("cannot write output", e))
    }

    /// Close segments at `limit` bytes instead of [`SEGMENT_BYTES`].
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Forget and delete a segment no row refers to.
    fn delete(&mut self, seg: u64) {
        self.rows.remove(&seg);
        if let Err(e) = std::fs::remove_file(self.dir.join(file_name(seg))) {
            tracing::warn!(error = %e, segment = seg, "cannot delete an output segment");
        }
    }

    fn rotate(&mut self) -> Result<(), StoreError> {
        self.sync()
            .map_err(|e| io_error("cannot sync an output segment", e))?;
        let next = self.active_no + 1;
        self.active = Arc::new(create(&self.dir, next)?);
        // After the sync above: the checkpointer syncs the new segment from now on.
        *self.shared.0.lock().unwrap_or_else(|e| e.into_inner()) = self.active.clone();
        // The closed segment is deleted once its last row is, as any other.
        let old = std::mem::replace(&mut self.active_no, next);
        if self.rows.get(&old).copied().unwrap_or(0) == 0 {
            self.delete(old);
        }
        self.end = 0;
        self.tentative = 0;
        Ok(())
    }
}

fn create(dir: &Path, no: u64) -> Result<File, StoreError> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(file_name(no)))
        .map_err(|e| io_error("cannot create an output segment", e))
}

/// Why a chunk's bytes cannot be read.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The file could not be opened or read.
    Io(io::Error),
    /// Fewer bytes than the row says, or not the bytes written (a power loss).
    Damaged,
}

fn read_at(file: &File, place: Place) -> Result<Vec<u8>, ReadError> {
    let mut data = vec![0u8; place.len as usize];
    file.read_exact_at(&mut data, place.pos)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ReadError::Damaged,
            _ => ReadError::Io(e),
        })?;
    if crc32fast::hash(&data) != place.crc {
        return Err(ReadError::Damaged);
    }
    Ok(data)
}

/// Reads chunks' bytes for one reader, keeping the segment files it opened.
#[derive(Debug)]
pub(super) struct SegmentReader<'a> {
    dir: &'a Path,
    open: Vec<(u64, File)>,
}

impl<'a> SegmentReader<'a> {
    /// A reader of the segments in `dir`.
    pub fn new(dir: &'a Path) -> Self {
        Self {
            dir,
            open: Vec::new(),
        }
    }

    /// The bytes at `place`, checked; `None` when its segment is gone (retention deleted the
    /// run's rows and then the file, after this reader's snapshot was taken).
    pub fn read(&mut self, place: Place) -> Result<Option<Vec<u8>>, StoreError> {
        let file = match self.open.iter().position(|(no, _)| *no == place.seg) {
            Some(i) => &self.open[i].1,
            None => match File::open(self.dir.join(file_name(place.seg))) {
                Ok(f) => {
                    self.open.push((place.seg, f));
                    &self.open[self.open.len() - 1].1
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_error("cannot open an output segment", e)),
            },
        };
        match read_at(file, place) {
            Ok(data) => Ok(Some(data)),
            Err(ReadError::Io(e)) => Err(io_error("cannot read output", e)),
            Err(ReadError::Damaged) => Err(StoreError::Backend(
                "a stored output chunk is damaged (its bytes did not survive)".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<u64> {
        existing(dir).unwrap()
    }

    fn fresh(dir: &Path) -> Segments {
        Segments::open(dir, HashMap::new(), |_| Ok(Vec::new()))
            .unwrap()
            .0
    }

    /// Bytes written and committed read back as written; a rolled-back batch's bytes are
    /// overwritten by the next batch, whose places start where the committed bytes end.
    #[test]
    fn committed_bytes_read_back_and_rolled_back_ones_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = fresh(dir.path());
        let a = segs.write(b"first chunk").unwrap();
        segs.committed();
        let lost = segs.write(b"rolled back").unwrap();
        segs.rolled_back();
        let b = segs.write(b"second").unwrap();
        segs.committed();
        assert_eq!(lost.pos, b.pos, "the rolled-back bytes' place is reused");
        assert_eq!(b.pos, a.pos + a.len as u64);
        let mut r = SegmentReader::new(dir.path());
        assert_eq!(r.read(a).unwrap().unwrap(), b"first chunk");
        assert_eq!(r.read(b).unwrap().unwrap(), b"second");
        let wrong = Place {
            crc: a.crc ^ 1,
            ..a
        };
        assert!(matches!(r.read(wrong), Err(StoreError::Backend(_))));
        let beyond = Place { pos: 1 << 20, ..a };
        assert!(matches!(r.read(beyond), Err(StoreError::Backend(_))));
    }

    /// Full segments are closed and a new one started; a closed segment is deleted when its
    /// last row is, never the active one; a reader whose segment is gone gets `None`.
    #[test]
    fn segments_rotate_and_go_with_their_last_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = fresh(dir.path());
        segs.set_limit(10);
        let a = segs.write(b"0123456789ab").unwrap();
        segs.committed();
        let b = segs.write(b"next").unwrap();
        segs.committed();
        assert_eq!((a.seg, b.seg), (1, 2));
        assert_eq!(files(dir.path()), [1, 2]);
        // A rolled-back release deletes nothing.
        segs.released(a.seg);
        segs.rolled_back();
        segs.committed();
        assert_eq!(files(dir.path()), [1, 2]);
        segs.released(a.seg);
        segs.committed();
        assert_eq!(files(dir.path()), [2]);
        assert_eq!(SegmentReader::new(dir.path()).read(a).unwrap(), None);
        // The active segment stays even with no row.
        segs.released(b.seg);
        segs.committed();
        assert_eq!(files(dir.path()), [2]);
    }

    /// A start deletes segments no row names, writes to a new segment after every number in
    /// use, and reports the rows of the last segment whose bytes are not there or not as
    /// written (a power loss), keeping the others.
    #[test]
    fn a_start_drops_unused_segments_and_finds_torn_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = fresh(dir.path());
        let kept = segs.write(b"kept chunk").unwrap();
        let flipped = segs.write(b"flipped chunk").unwrap();
        let cut = segs.write(b"cut chunk").unwrap();
        segs.committed();
        segs.sync().unwrap();
        drop(segs);
        let path = dir.path().join(file_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[flipped.pos as usize] ^= 0xff;
        bytes.truncate((cut.pos + 3) as usize);
        std::fs::write(&path, bytes).unwrap();
        std::fs::write(dir.path().join(file_name(7)), b"unused").unwrap();
        let rows = [(1, 3), (9, 1)].into_iter().collect();
        let (segs, torn) = Segments::open(dir.path(), rows, |seg| {
            assert_eq!(seg, 7, "the newest file is checked");
            Ok(Vec::new())
        })
        .unwrap();
        assert!(torn.is_empty());
        assert_eq!(segs.active_no, 10, "after row 9's segment");
        assert_eq!(files(dir.path()), [1, 10], "7 had no rows");
        drop(segs);
        std::fs::remove_file(dir.path().join(file_name(10))).unwrap();
        let rows = [(1, 3)].into_iter().collect();
        let listed = [
            (b"k".to_vec(), 1, kept),
            (b"f".to_vec(), 2, flipped),
            (b"c".to_vec(), 3, cut),
        ];
        let (segs, torn) = Segments::open(dir.path(), rows, |_| Ok(listed.to_vec())).unwrap();
        assert_eq!(torn, [(b"f".to_vec(), 2), (b"c".to_vec(), 3)]);
        assert_eq!(segs.rows.get(&1), Some(&1));
        let mut r = SegmentReader::new(dir.path());
        assert_eq!(r.read(kept).unwrap().unwrap(), b"kept chunk");
    }
}
