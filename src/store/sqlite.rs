//! The embedded store (the default): SQLite in WAL mode under `storage.path`, with versioned
//! migrations. One writer thread owns the write connection and group-commits whatever commands
//! have queued up while the previous commit ran; reads run on blocking threads with a small pool
//! of read-only connections. `synchronous = NORMAL`: a commit reaches the WAL file (and so
//! survives a crash of the process) without waiting for an fsync; commits become durable at
//! checkpoints, which the store runs itself on a thread of its own (`modrun-ckpt`), so that
//! the writer never waits for an fsync. Output bytes are in segment files beside the database
//! (`store::segments`), written before the commit that refers to them and synced before every
//! checkpoint.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Row, ToSql, Transaction, params, params_from_iter,
};
use tokio::sync::oneshot;

use super::chunk::{Encoding, chunks, decode_chunk};
use super::record::{DeliveryColumns, StateColumns, StoredRun, StoredState, micros};
use super::segments::{ActiveFile, Place, SEGMENT_BYTES, SegmentReader, Segments};
use super::{
    Created, DeliveryResult, DeliveryState, DeliveryStatus, DueDelivery, Expect, Held,
    IdempotencyKey, ListQuery, NewRun, Outage, Page, Recovered, Retention, RunStore, StoreError,
    StoreFuture,
};
use crate::run::{Line, Outcome, Run, RunId, RunState};

/// The schema version this binary writes (migration `i` upgrades from version `i`).
pub const SCHEMA_VERSION: i64 = 6;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE runs (
        id BLOB PRIMARY KEY,            -- UUID v7, 16 bytes big-endian: sorts by creation
        module_id TEXT NOT NULL,
        module_name TEXT NOT NULL,
        parameters TEXT NOT NULL,       -- JSON object
        argv TEXT NOT NULL,             -- JSON array
        mode TEXT NOT NULL,
        timeout_ms INTEGER NOT NULL,
        created_at INTEGER NOT NULL,    -- microseconds since the Unix epoch
        status TEXT NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        pid INTEGER,
        stopping INTEGER NOT NULL DEFAULT 0,
        outcome TEXT,                   -- exited | spawn_failed | cancelled | timed_out | lost | limit (v2)
        exit_code INTEGER,
        signal INTEGER,
        cancel_reason TEXT,             -- request | shutdown
        message TEXT,                   -- spawn error
        output_lines INTEGER NOT NULL DEFAULT 0,
        idem_key TEXT UNIQUE,
        idem_fp INTEGER,
        stdin TEXT                      -- kept while queued
    ) WITHOUT ROWID;
    CREATE INDEX runs_by_status ON runs (status, id);
    CREATE INDEX runs_by_module ON runs (module_id, id);
    CREATE INDEX runs_by_finish ON runs (finished_at) WHERE finished_at IS NOT NULL;
    -- Output in chunks of consecutive lines (one row per flushed batch piece, not per line):
    -- a few rows per MiB keep inserts cheap and the file close to the size of the text.
    CREATE TABLE chunks (
        run_id BLOB NOT NULL,
        last_seq INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        data BLOB NOT NULL,             -- per line: stream u8, ts i64 LE (µs), len u32 LE, text
        PRIMARY KEY (run_id, last_seq)
    );",
    // 1 -> 2: who created and who cancelled a run (API token names); a queued run's secret
    // parameter values, kept (like stdin) only until it starts.
    "ALTER TABLE runs ADD COLUMN created_by TEXT;
    ALTER TABLE runs ADD COLUMN cancelled_by TEXT;
    ALTER TABLE runs ADD COLUMN secrets TEXT;
    -- One row rewritten by the probe that finds out when a full disk has room again.
    CREATE TABLE probe (k INTEGER PRIMARY KEY, v BLOB NOT NULL);",
    // 2 -> 3: completion callbacks. A run's URLs; one delivery per URL, written by a trigger in
    // the same transaction as the run's final status (every path to it: transition, recovery).
    "ALTER TABLE runs ADD COLUMN callbacks TEXT;   -- JSON array of URLs, NULL when none
    CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,            -- msg_<run id hex>_<n>: the webhook-id of every attempt
        run_id BLOB NOT NULL,
        url TEXT NOT NULL,
        state TEXT NOT NULL,            -- pending | delivered | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,    -- µs: when the run ended
        next_at INTEGER NOT NULL,       -- µs: when the next attempt is due (or the held one lapses)
        last_status INTEGER,
        last_error TEXT,
        done_at INTEGER
    );
    CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
    CREATE INDEX deliveries_by_run ON deliveries (run_id);
    CREATE TRIGGER runs_deliveries AFTER UPDATE OF status ON runs
    WHEN NEW.callbacks IS NOT NULL AND OLD.status IN ('queued', 'running')
        AND NEW.status NOT IN ('queued', 'running')
    BEGIN
        INSERT OR IGNORE INTO deliveries (id, run_id, url, state, created_at, next_at)
        SELECT 'msg_' || lower(hex(NEW.id)) || '_' || (j.key + 1), NEW.id, j.value, 'pending',
            coalesce(NEW.finished_at, CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
            coalesce(NEW.finished_at, CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
        FROM json_each(NEW.callbacks) AS j;
    END;",
    // 3 -> 4: when a cancel was asked for a running run (µs); kept after it ends.
    "ALTER TABLE runs ADD COLUMN cancel_requested_at INTEGER;",
    // 4 -> 5: output chunks are written in the compact encoding from now on (chunk.rs; the
    // older ones stay as they are and read the same). Nothing to change in the tables: the
    // version is there so that an older modrun refuses this file instead of misreading them.
    "",
    // 5 -> 6: output bytes in segment files (segments.rs): a chunk written from now on keeps
    // an empty `data` and says where its bytes are and their CRC-32; older ones keep theirs.
    "ALTER TABLE chunks ADD COLUMN seg INTEGER;
    ALTER TABLE chunks ADD COLUMN pos INTEGER;
    ALTER TABLE chunks ADD COLUMN len INTEGER;
    ALTER TABLE chunks ADD COLUMN crc INTEGER;",
];

/// WAL pages after which the writer asks the checkpointer thread for a checkpoint, and again
/// after as many more (SQLite's own default for its automatic checkpoints, which the store
/// replaces: see [`writer_loop`]).
const CHECKPOINT_PAGES: i32 = 1000;
/// WAL pages past which the writer checkpoints itself. SQLite starts the WAL over only when a
/// write finds every page of it checkpointed, and a checkpoint beside the writer copies only
/// the commits before it began: under a steady load the writer commits again before the
/// checkpointer is done, and the WAL would grow without end. Here the writer copies what is
/// left (the checkpointer keeps that to about [`CHECKPOINT_PAGES`]), so the WAL stays under
/// ~16 MiB.
const WAL_LIMIT_PAGES: i32 = 4 * CHECKPOINT_PAGES;

thread_local! {
    /// Pages in the WAL after the last commit of this thread's connection (the writer's), as
    /// SQLite's WAL hook reports them. A thread-local because the hook is a plain `fn`.
    static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// The writer connection's WAL hook. Registering it turns SQLite's automatic checkpoints off:
/// the writer runs them itself, after syncing the output segments.
fn note_wal(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

/// Commands group-committed per transaction, at most.
const MAX_BATCH: usize = 512;
/// Read connections kept for reuse.
const READ_POOL: usize = 4;
/// Output chunks deleted per purge call (so that a purge never holds the writer for long).
const PURGE_CHUNKS: i64 = 512;

const RUN_COLUMNS: &str = "id, module_id, module_name, parameters, argv, mode, timeout_ms, \
    created_at, status, started_at, finished_at, pid, stopping, outcome, exit_code, signal, \
    cancel_reason, message, output_lines, created_by, cancelled_by, callbacks, cancel_requested_at";
/// How many columns [`RUN_COLUMNS`] names (a query's own columns come after them).
const RUN_COLUMN_COUNT: usize = 23;

/// Why the store could not be opened. modrun refuses to start; it never replaces or resets a
/// store it cannot read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another modrun holds the lock.
    #[error(
        "another modrun is already using the store at {} (the lock {} is held{}); stop it or use another storage.path",
        path.display(), lock.display(), holder.as_deref().map(|p| format!(" by pid {p}")).unwrap_or_default()
    )]
    Locked {
        /// The storage folder.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The pid written in the lock file, if readable.
        holder: Option<String>,
    },
    /// The database file was written by a newer modrun.
    #[error(
        "the store {} has schema version {found}, newer than this modrun knows ({known}); upgrade modrun or point storage.path elsewhere",
        file.display()
    )]
    TooNew {
        /// The database file.
        file: PathBuf,
        /// Its version.
        found: i64,
        /// The newest this binary knows.
        known: i64,
    },
    /// Anything else: I/O, a corrupt file, ...
    #[error("cannot open the store {}: {detail}", file.display())]
    Other {
        /// The database file (or folder).
        file: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Work for the writer thread.
enum Cmd {
    Create(Box<NewRun>, Reply<Created>),
    Transition(RunId, Expect, Box<RunState>, Reply<()>),
    Append(RunId, Vec<Line>, Reply<()>),
    /// A run's last output and its end.
    Finish(RunId, Vec<Line>, Expect, Box<RunState>, Reply<()>),
    Purge(Retention, SystemTime, Reply<usize>),
    Recover(Reply<Recovered>),
    Probe(Reply<()>),
    ClaimDeliveries(SystemTime, Duration, usize, Reply<Vec<DueDelivery>>),
    RecordDelivery(String, DeliveryResult, Reply<()>),
    CancelRequested(RunId, SystemTime, Reply<()>),
}

impl Cmd {
    /// Answer the command with `e` without running it.
    fn fail(self, e: StoreError) {
        match self {
            Cmd::Create(_, to) => drop(to.send(Err(e))),
            Cmd::Transition(_, _, _, to) => drop(to.send(Err(e))),
            Cmd::Append(_, _, to) => drop(to.send(Err(e))),
            Cmd::Finish(_, _, _, _, to) => drop(to.send(Err(e))),
            Cmd::Purge(_, _, to) => drop(to.send(Err(e))),
            Cmd::Recover(to) => drop(to.send(Err(e))),
            Cmd::Probe(to) => drop(to.send(Err(e))),
            Cmd::ClaimDeliveries(_, _, _, to) => drop(to.send(Err(e))),
            Cmd::RecordDelivery(_, _, to) => drop(to.send(Err(e))),
            Cmd::CancelRequested(_, _, to) => drop(to.send(Err(e))),
        }
    }
}

/// Checkpoints of one store, by who ran them: the checkpointer should run nearly all of them
/// (logged at debug level when the writer ends; the tests check it).
#[derive(Debug, Default)]
struct Checkpoints {
    /// By the checkpointer thread.
    background: AtomicU64,
    /// By the writer, past [`WAL_LIMIT_PAGES`].
    writer: AtomicU64,
    /// Whether the checkpointer thread is in a checkpoint now (the tests wait for it to be
    /// done).
    running: AtomicBool,
}

/// SQLite under a folder.
pub struct SqliteStore {
    file: PathBuf,
    /// The folder: the output segments are there.
    dir: PathBuf,
    /// Commands for the writer thread. Unbounded by type but bounded by construction: every
    /// sender awaits its reply, and the senders are bounded (submissions by `max_queued`,
    /// transitions and output flushes by the runs holding a slot, one at a time each).
    writer: mpsc::Sender<Cmd>,
    /// Idle read-only connections, at most [`READ_POOL`].
    readers: Arc<Mutex<Vec<Connection>>>,
    #[cfg(test)]
    checkpoints: Arc<Checkpoints>,
    /// Held for the store's life: a second modrun on the same folder is refused.
    _lock: File,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// An SQLite error as a store error: the ones that pass (full disk, read-only file system,
/// locked database, I/O error) are an outage; anything else is a failure of the store.
fn backend(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    let outage = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DiskFull => Some(Outage::DiskFull),
            ErrorCode::ReadOnly => Some(Outage::ReadOnly),
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => Some(Outage::Busy),
            ErrorCode::SystemIoFailure | ErrorCode::CannotOpen => Some(Outage::Io),
            _ => None,
        },
        _ => None,
    };
    match outage {
        Some(o) => StoreError::Unavailable(o, e.to_string()),
        None => StoreError::Backend(e.to_string()),
    }
}

/// Any other failure of the store.
fn failure(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn id_bytes(id: RunId) -> [u8; 16] {
    *id.as_uuid().as_bytes()
}

impl SqliteStore {
    /// Open (or create) the store in `dir`: take the lock, check the schema version, migrate.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    /// [`SqliteStore::open`], with output segments closed at `segment_bytes`.
    fn open_with(dir: &Path, segment_bytes: u64) -> Result<Self, OpenError> {
        let other = |file: &Path, detail: String| OpenError::Other {
            file: file.to_owned(),
            detail,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| other(dir, format!("cannot create the folder: {e}")))?;
        let lock_path = dir.join("modrun.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| other(&lock_path, e.to_string()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path)
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty());
                return Err(OpenError::Locked {
                    path: dir.to_owned(),
                    lock: lock_path,
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(other(&lock_path, e.to_string())),
        }
        let _ = std::fs::write(&lock_path, format!("{}\n", std::process::id()));

        let file = dir.join("modrun.db");
        let conn = Connection::open(&file).map_err(|e| other(&file, e.to_string()))?;
        migrate(&conn, &file)?;
        let mut segments = open_segments(&conn, dir).map_err(|e| other(dir, e.to_string()))?;
        segments.set_limit(segment_bytes);
        conn.wal_hook(Some(note_wal));
        let checkpoints = Arc::new(Checkpoints::default());
        let checkpointer = Checkpointer::start(&file, segments.active_file(), checkpoints.clone())
            .map_err(|e| other(&file, e))?;
        let (tx, rx) = mpsc::channel();
        let store = Self {
            file: file.clone(),
            dir: dir.to_owned(),
            writer: tx,
            readers: Arc::new(Mutex::new(Vec::new())),
            #[cfg(test)]
            checkpoints: checkpoints.clone(),
            _lock: lock,
        };
        std::thread::Builder::new()
            .name("modrun-store".into())
            .spawn(move || writer_loop(conn, segments, rx, checkpointer, checkpoints))
            .map_err(|e| other(&file, format!("cannot start the writer thread: {e}")))?;
        Ok(store)
    }

    /// The database file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn send<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> StoreFuture<'_, T> {
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(make(tx));
        Box::pin(async move {
            sent.map_err(|_| failure("the store's writer has stopped"))?;
            rx.await
                .map_err(|_| failure("the store's writer has stopped"))?
        })
    }

    fn read<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.readers.clone();
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let conn = match conn {
                    Some(c) => c,
                    None => open_reader(&file)?,
                };
                let out = f(&conn);
                let mut idle = pool.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < READ_POOL {
                    idle.push(conn);
                }
                out
            })
            .await
            .map_err(failure)?
        })
    }
}

fn open_reader(file: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(backend)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(backend)?;
    Ok(conn)
}

fn migrate(conn: &Connection, file: &Path) -> Result<(), OpenError> {
    let other = |detail: String| OpenError::Other {
        file: file.to_owned(),
        detail,
    };
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| other(e.to_string()))?;
    // Touch the schema so that a file that is not a database fails here, not later.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(|e| other(e.to_string()))?;
    if version > SCHEMA_VERSION {
        return Err(OpenError::TooNew {
            file: file.to_owned(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    if version == 0 {
        // Both only take effect before the first table exists (an existing file keeps its
        // size). 4 KiB pages: every commit of a run's record writes whole pages to the WAL, so
        // smaller pages nearly halve the bytes written per run (42 -> 24 KB measured), while
        // output throughput (chunks up to 256 KiB in overflow pages) measured the same.
        conn.execute_batch("PRAGMA page_size = 4096; PRAGMA auto_vacuum = INCREMENTAL;")
            .map_err(|e| other(e.to_string()))?;
    }
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF;",
    )
    .map_err(|e| other(e.to_string()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| other(e.to_string()))?;
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let to = from as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {to}; COMMIT;"
        ))
        .map_err(|e| other(format!("migration to schema version {to} failed: {e}")))?;
    }
    Ok(())
}

/// The output segments in `dir`, checked against the chunk rows (see [`Segments::open`]); rows
/// whose bytes did not survive a power loss are deleted.
fn open_segments(conn: &Connection, dir: &Path) -> Result<Segments, StoreError> {
    let rows: std::collections::HashMap<u64, u64> = conn
        .prepare("SELECT seg, count(*) FROM chunks WHERE seg IS NOT NULL GROUP BY seg")
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?
            .collect()
        })
        .map_err(backend)?;
    let last_rows = |seg: u64| {
        conn.prepare(
            "SELECT run_id, last_seq, pos, len, crc FROM chunks WHERE seg = ?1 ORDER BY pos",
        )
        .and_then(|mut s| {
            s.query_map([seg as i64], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    Place {
                        seg,
                        pos: r.get::<_, i64>(2)? as u64,
                        len: r.get(3)?,
                        crc: r.get(4)?,
                    },
                ))
            })?
            .collect()
        })
        .map_err(backend)
    };
    let (segments, torn) = Segments::open(dir, rows, last_rows)?;
    if !torn.is_empty() {
        tracing::warn!(
            chunks = torn.len(),
            "output chunks whose bytes did not survive (a power loss) were dropped"
        );
        let tx = conn.unchecked_transaction().map_err(backend)?;
        for (run, last_seq) in &torn {
            tx.execute(
                "DELETE FROM chunks WHERE run_id = ?1 AND last_seq = ?2",
                params![run, last_seq],
            )
            .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
    }
    Ok(segments)
}

/// The writer: group commit. SQLite's automatic checkpoints are off (the WAL hook
/// [`note_wal`] replaces them): every [`CHECKPOINT_PAGES`] pages of WAL the writer asks the
/// checkpointer thread for one, and again whenever it runs out of work while the WAL holds
/// that many (the WAL starts over only if a checkpoint caught up while the writer paused);
/// past [`WAL_LIMIT_PAGES`] it runs one itself.
fn writer_loop(
    mut conn: Connection,
    mut segments: Segments,
    rx: mpsc::Receiver<Cmd>,
    checkpointer: Checkpointer,
    checkpoints: Arc<Checkpoints>,
) {
    // WAL pages when the checkpointer was last asked.
    let mut asked_at = 0;
    let mut next = rx.recv().ok();
    while let Some(first) = next {
        commit_batch(&mut conn, &mut segments, first, &rx);
        let mut pages = WAL_PAGES.get();
        if pages < asked_at {
            // The WAL started over.
            asked_at = 0;
        }
        if pages >= WAL_LIMIT_PAGES {
            // Past the limit the checkpointer is not asked again, and the writer checkpoints
            // once it is not running (waiting for it would add its fsyncs to the writer's;
            // a checkpoint while another runs does nothing).
            if let Some(_turn) = checkpointer.turn()
                && checkpoint(&conn, &mut segments)
            {
                checkpoints.writer.fetch_add(1, Ordering::Relaxed);
                asked_at = 0;
                pages = 0;
            }
        } else if pages >= asked_at + CHECKPOINT_PAGES {
            checkpointer.ask();
            asked_at = pages;
        }
        next = match rx.try_recv() {
            Ok(cmd) => Some(cmd),
            Err(mpsc::TryRecvError::Empty) => {
                if (CHECKPOINT_PAGES..WAL_LIMIT_PAGES).contains(&pages) && pages > asked_at {
                    checkpointer.ask();
                    asked_at = pages;
                }
                rx.recv().ok()
            }
            Err(mpsc::TryRecvError::Disconnected) => None,
        };
    }
    // Its last checkpoint done before the writer's (closing the connection checkpoints too).
    checkpointer.stop();
    tracing::debug!(
        beside = checkpoints.background.load(Ordering::Relaxed),
        by_writer = checkpoints.writer.load(Ordering::Relaxed),
        "store closed: checkpoints run beside the writer and by it"
    );
    if let Err(e) = segments.sync() {
        tracing::error!(error = %e, "cannot sync the output segments");
    }
}

/// The writer's own checkpoint: sync the segments, then checkpoint (not at all if the sync
/// fails: the next commit tries again). Whether it ran.
fn checkpoint(conn: &Connection, segments: &mut Segments) -> bool {
    if let Err(e) = segments.sync() {
        tracing::error!(error = %e, "cannot sync the output segments; no checkpoint yet");
        return false;
    }
    let ran = passive_checkpoint(conn);
    if ran {
        WAL_PAGES.set(0);
    }
    ran
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: whether it ran (not when another checkpoint was running:
/// SQLite answers that with its "busy" column, not an error).
fn passive_checkpoint(conn: &Connection) -> bool {
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
        Ok(busy) => busy == 0,
        Err(e) => {
            tracing::warn!(error = %e, "checkpoint failed");
            false
        }
    }
}

/// The thread that runs the store's checkpoints beside the writer (SQLite lets a checkpoint
/// run while another connection writes), so that the writer never waits for the fsyncs of a
/// checkpoint: the WAL's, the database's and the output segment's.
struct Checkpointer {
    /// Requests. Bounded at one: a request made while one waits is dropped (the waiting one
    /// checkpoints everything committed before it runs).
    asks: mpsc::SyncSender<()>,
    /// Held while a checkpoint runs (by the thread, or by the writer past the limit).
    running: Arc<Mutex<()>>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(
        file: &Path,
        active: ActiveFile,
        checkpoints: Arc<Checkpoints>,
    ) -> Result<Self, String> {
        // Its own connection for the checkpoints, and a read-only one that holds a snapshot
        // while the segment is synced (see `checkpoint_beside`).
        let conn = Connection::open(file).map_err(|e| e.to_string())?;
        let pin = open_reader(file).map_err(|e| e.to_string())?;
        let (asks, rx) = mpsc::sync_channel(1);
        let running = Arc::new(Mutex::new(()));
        let turn = running.clone();
        let thread = std::thread::Builder::new()
            .name("modrun-ckpt".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let _turn = turn.lock().unwrap_or_else(|e| e.into_inner());
                    checkpoints.running.store(true, Ordering::Relaxed);
                    if checkpoint_beside(&conn, &pin, &active) {
                        checkpoints.background.fetch_add(1, Ordering::Relaxed);
                    }
                    checkpoints.running.store(false, Ordering::Relaxed);
                }
            })
            .map_err(|e| format!("cannot start the checkpointer thread: {e}"))?;
        Ok(Self {
            asks,
            running,
            thread,
        })
    }

    /// Unless a checkpoint runs: keep the checkpointer from starting one while the guard
    /// lives.
    fn turn(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        match self.running.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Ask for a checkpoint (never waits).
    fn ask(&self) {
        // Full: one is waiting already. Disconnected: the thread is gone (it only ends when
        // `stop` drops the sender); the writer's own checkpoints past the limit remain.
        let _ = self.asks.try_send(());
    }

    /// Let the thread finish its checkpoint, if one runs, and end.
    fn stop(self) {
        drop(self.asks);
        if self.thread.join().is_err() {
            tracing::error!("the store's checkpointer thread panicked");
        }
    }
}

/// One checkpoint beside the writer. The commits it makes durable must not refer to output
/// bytes that are not synced yet, and the writer keeps committing while it runs: a read
/// transaction pins a snapshot first (a checkpoint copies nothing newer than the snapshot of
/// any reader), then the active segment is synced (every byte a commit of the snapshot refers
/// to was written before that commit), then the checkpoint copies at most the snapshot's
/// commits. Whether it ran.
fn checkpoint_beside(conn: &Connection, pin: &Connection, active: &ActiveFile) -> bool {
    let pinned = pin
        .execute_batch("BEGIN")
        .and_then(|()| pin.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())));
    let done = match pinned {
        Err(e) => {
            tracing::warn!(error = %e, "checkpoint failed: cannot read the database");
            false
        }
        Ok(()) => match active.sync() {
            Err(e) => {
                tracing::error!(error = %e, "cannot sync the output segments; no checkpoint yet");
                false
            }
            Ok(()) => passive_checkpoint(conn),
        },
    };
    if !pin.is_autocommit()
        && let Err(e) = pin.execute_batch("COMMIT")
    {
        tracing::warn!(error = %e, "cannot end the checkpoint's read transaction");
    }
    done
}

fn commit_batch(
    conn: &mut Connection,
    segments: &mut Segments,
    first: Cmd,
    rx: &mpsc::Receiver<Cmd>,
) {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => batch.push(c),
            Err(_) => break,
        }
    }
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // No transaction (a locked database, a full disk): every command gets the error.
            let e = backend(e);
            tracing::error!(error = %e, "store transaction cannot begin");
            for cmd in batch {
                cmd.fail(e.clone());
            }
            return;
        }
    };
    let mut replies: Vec<Box<dyn FnOnce(Option<StoreError>) + Send>> = Vec::new();
    let mut failed = None;
    for cmd in batch {
        replies.push(apply(&tx, segments, cmd, &mut failed));
    }
    // Dropping the transaction rolls it back.
    let result = if failed.is_some() {
        Ok(())
    } else {
        tx.commit()
    };
    let failure = failed.or_else(|| result.err().map(backend));
    match &failure {
        Some(e) => {
            segments.rolled_back();
            tracing::error!(error = %e, "store commit failed");
        }
        None => segments.committed(),
    }
    for reply in replies {
        reply(failure.clone());
    }
}

/// Run one command inside the batch's transaction; the returned closure sends its reply once
/// the batch committed. Commands detect refusals (wrong state, key conflict) before writing,
/// so a refused command leaves nothing behind; an SQL error fails the whole batch
/// (`*failed` is set and the transaction is rolled back), since a command may have written
/// part of its rows. (No savepoint per command: sub-journaling every page cost more than the
/// commands themselves.)
fn apply(
    tx: &Transaction<'_>,
    segments: &mut Segments,
    cmd: Cmd,
    failed: &mut Option<StoreError>,
) -> Box<dyn FnOnce(Option<StoreError>) + Send> {
    fn reply<T: Send + 'static>(
        to: Reply<T>,
        r: Result<T, StoreError>,
        failed: &mut Option<StoreError>,
    ) -> Box<dyn FnOnce(Option<StoreError>) + Send> {
        if let Err(e) = &r
            && e.is_failure()
        {
            failed.get_or_insert_with(|| e.clone());
        }
        Box::new(move |commit_error| {
            let _ = to.send(match commit_error {
                Some(e) => Err(e),
                None => r,
            });
        })
    }
    match cmd {
        Cmd::Create(new, to) => reply(to, create(tx, *new), failed),
        Cmd::Transition(id, expect, next, to) => {
            reply(to, transition(tx, id, expect, *next), failed)
        }
        Cmd::Append(id, lines, to) => reply(to, append(tx, segments, id, &lines), failed),
        Cmd::Finish(id, lines, expect, next, to) => {
            // The state first: a refused end writes no output (both are in this batch's
            // transaction, so the order is not visible otherwise).
            let r = transition(tx, id, expect, *next).and_then(|()| {
                if lines.is_empty() {
                    Ok(())
                } else {
                    append(tx, segments, id, &lines)
                }
            });
            reply(to, r, failed)
        }
        Cmd::Purge(policy, now, to) => reply(to, purge(tx, segments, policy, now), failed),
        Cmd::Recover(to) => reply(to, recover(tx), failed),
        Cmd::Probe(to) => reply(to, probe(tx).and_then(|()| segments.probe()), failed),
        Cmd::ClaimDeliveries(now, hold, limit, to) => {
            reply(to, claim_deliveries(tx, now, hold, limit), failed)
        }
        Cmd::RecordDelivery(id, result, to) => reply(to, record_delivery(tx, &id, &result), failed),
        Cmd::CancelRequested(id, at, to) => reply(to, cancel_requested(tx, id, at), failed),
    }
}

/// Note the first cancel request of a running run.
fn cancel_requested(c: &Connection, id: RunId, at: SystemTime) -> Result<(), StoreError> {
    c.prepare_cached(
        "UPDATE runs SET cancel_requested_at = coalesce(cancel_requested_at, ?2) \
         WHERE id = ?1 AND status = 'running'",
    )
    .and_then(|mut st| st.execute(rusqlite::params![&id_bytes(id)[..], micros(at)]))
    .map_err(backend)?;
    Ok(())
}

fn get_run(c: &Connection, id: RunId) -> Result<Option<Run>, StoreError> {
    c.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))
        .map_err(backend)?
        .query_row([&id_bytes(id)[..]], run_from_row)
        .optional()
        .map_err(backend)
}

fn create(c: &Connection, new: NewRun) -> Result<Created, StoreError> {
    if let Some(k) = &new.key
        && let Some(existing) = by_key(c, k)?
    {
        return Ok(Created::Existing(existing));
    }
    let r = &new.run;
    let (key, fp) = match &new.key {
        Some(k) => (Some(k.key.as_str()), Some(k.fingerprint as i64)),
        None => (None, None),
    };
    // The run's state goes in with it (one statement: a run started at once is inserted
    // `running`). What a run is held with (stdin, secret values) is kept only while it waits.
    let cols = StateColumns::of(&r.state);
    let queued = matches!(r.state, RunState::Queued);
    let secrets = match queued && !new.held.secrets.is_empty() {
        true => Some(serde_json::to_string(&new.held.secrets).map_err(failure)?),
        false => None,
    };
    c.prepare_cached(
        "INSERT INTO runs (id, module_id, module_name, parameters, argv, mode, timeout_ms,
             created_at, status, idem_key, idem_fp, stdin, created_by, secrets, callbacks,
             started_at, finished_at, pid, stopping, outcome, exit_code, signal, cancel_reason,
             message, cancelled_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
             ?19, ?20, ?21, ?22, ?23, ?24, ?25)",
    )
    .map_err(backend)?
    .execute(params_from_iter(
        params![
            &id_bytes(r.id)[..],
            r.module_id,
            r.module_name,
            serde_json::to_string(&r.parameters).map_err(failure)?,
            serde_json::to_string(&r.argv).map_err(failure)?,
            r.mode.as_str(),
            i64::try_from(r.timeout.as_millis()).unwrap_or(i64::MAX),
            micros(r.created_at),
            cols.status,
            key,
            fp,
            new.held.stdin.as_deref().filter(|_| queued),
            r.created_by,
            secrets,
            (!r.callbacks.is_empty())
                .then(|| serde_json::to_string(&r.callbacks).unwrap_or_else(|_| "[]".into())),
        ]
        .iter()
        .copied()
        .chain(state_values(&cols)),
    ))
    .map_err(backend)?;
    let mut run = new.run;
    run.output_lines = 0;
    Ok(Created::New(run))
}

fn by_key(c: &Connection, k: &IdempotencyKey) -> Result<Option<Run>, StoreError> {
    let found: Option<(Vec<u8>, i64)> = c
        .prepare_cached("SELECT id, idem_fp FROM runs WHERE idem_key = ?1")
        .map_err(backend)?
        .query_row([&k.key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(backend)?;
    match found {
        None => Ok(None),
        Some((_, fp)) if fp != k.fingerprint as i64 => Err(StoreError::IdempotencyConflict),
        Some((id, _)) => {
            let id = RunId::from_bytes(&id).ok_or_else(|| failure("bad run id in the store"))?;
            get_run(c, id)
        }
    }
}

/// A state's columns after `status`, in the order of the INSERT and the UPDATE that write them
/// (`started_at` .. `cancelled_by`).
fn state_values(cols: &StateColumns) -> [&dyn ToSql; 10] {
    [
        &cols.started_at,
        &cols.finished_at,
        &cols.pid,
        &cols.stopping,
        &cols.outcome,
        &cols.exit_code,
        &cols.signal,
        &cols.cancel_reason,
        &cols.message,
        &cols.cancelled_by,
    ]
}

/// `UPDATE runs` to a new state, for the run with id `?1`, followed by the condition `$from`
/// on its present status (a literal: each variant is one cached statement).
macro_rules! update_state {
    ($from:literal) => {
        concat!(
            "UPDATE runs SET status = ?2, started_at = ?3, finished_at = ?4, pid = ?5, stopping = ?6,
             outcome = ?7, exit_code = ?8, signal = ?9, cancel_reason = ?10, message = ?11,
             cancelled_by = ?12,
             stdin = CASE WHEN ?2 = 'queued' THEN stdin ELSE NULL END,
             secrets = CASE WHEN ?2 = 'queued' THEN secrets ELSE NULL END
         WHERE id = ?1",
            $from
        )
    };
}

/// Write `state` as run `id`'s, if its present status is one `expect` allows (`None`: any).
/// Returns whether it was written.
fn write_state(
    c: &Connection,
    id: RunId,
    state: &RunState,
    expect: Option<Expect>,
) -> Result<bool, StoreError> {
    let cols = StateColumns::of(state);
    let sql = match expect {
        None => update_state!(""),
        Some(Expect::Queued) => update_state!(" AND status = 'queued'"),
        Some(Expect::Running) => update_state!(" AND status = 'running'"),
        Some(Expect::Active) => update_state!(" AND status IN ('queued', 'running')"),
    };
    let changed = c
        .prepare_cached(sql)
        .map_err(backend)?
        .execute(params_from_iter(
            params![&id_bytes(id)[..], cols.status]
                .iter()
                .copied()
                .chain(state_values(&cols)),
        ))
        .map_err(backend)?;
    Ok(changed > 0)
}

/// One statement on the hot path (every run makes two or three transitions): the update is
/// conditional on the present status; only a refusal reads the run, to say why.
fn transition(c: &Connection, id: RunId, expect: Expect, next: RunState) -> Result<(), StoreError> {
    if write_state(c, id, &next, Some(expect))? {
        return Ok(());
    }
    match get_run(c, id)? {
        None => Err(StoreError::NotFound(id)),
        Some(run) => Err(StoreError::WrongState(Box::new(run))),
    }
}

fn append(
    c: &Connection,
    segments: &mut Segments,
    id: RunId,
    lines: &[Line],
) -> Result<(), StoreError> {
    let key = id_bytes(id);
    let stored: i64 = c
        .prepare_cached("SELECT coalesce(max(last_seq), 0) FROM chunks WHERE run_id = ?1")
        .and_then(|mut s| s.query_row([&key[..]], |r| r.get(0)))
        .map_err(backend)?;
    // Lines already stored (a retried batch) are skipped.
    let fresh: Vec<&Line> = lines.iter().filter(|l| l.seq as i64 > stored).collect();
    let Some(last) = fresh.last().map(|l| l.seq) else {
        return Ok(());
    };
    let mut insert = c
        .prepare_cached(
            "INSERT INTO chunks (run_id, last_seq, first_seq, data, seg, pos, len, crc)
             VALUES (?1, ?2, ?3, x'', ?4, ?5, ?6, ?7)",
        )
        .map_err(backend)?;
    for (first, last, data) in chunks(&fresh, Encoding::Compact) {
        let at = segments.write(&data)?;
        insert
            .execute(params![
                &key[..],
                last as i64,
                first as i64,
                at.seg as i64,
                at.pos as i64,
                at.len,
                at.crc
            ])
            .map_err(backend)?;
    }
    c.prepare_cached("UPDATE runs SET output_lines = max(output_lines, ?2) WHERE id = ?1")
        .map_err(backend)?
        .execute(params![&key[..], last as i64])
        .map_err(backend)?;
    Ok(())
}

/// A chunk row as read: its first line's number, and its bytes or where they are.
type ChunkRow = (i64, Vec<u8>, Option<Place>);

fn read_output(
    c: &Connection,
    dir: &Path,
    id: RunId,
    after: u64,
    limit: usize,
) -> Result<Vec<Line>, StoreError> {
    let mut out = Vec::with_capacity(limit.min(4096));
    let mut stmt = c
        .prepare_cached(
            "SELECT first_seq, data, seg, pos, len, crc FROM chunks
             WHERE run_id = ?1 AND last_seq > ?2 ORDER BY last_seq LIMIT 2",
        )
        .map_err(backend)?;
    let mut segments = SegmentReader::new(dir);
    let mut cursor = after;
    while out.len() < limit {
        let chunks: Vec<ChunkRow> = stmt
            .query_map(
                params![&id_bytes(id)[..], cursor.min(i64::MAX as u64) as i64],
                |r| {
                    let place = match r.get::<_, Option<i64>>(2)? {
                        None => None,
                        Some(seg) => Some(Place {
                            seg: seg as u64,
                            pos: r.get::<_, i64>(3)? as u64,
                            len: r.get(4)?,
                            crc: r.get(5)?,
                        }),
                    };
                    Ok((r.get(0)?, r.get(1)?, place))
                },
            )
            .and_then(|rows| rows.collect())
            .map_err(backend)?;
        if chunks.is_empty() {
            break;
        }
        for (first, data, place) in &chunks {
            match place {
                None => decode_chunk(*first as u64, data, after, limit, &mut out)?,
                Some(place) => match segments.read(*place)? {
                    Some(data) => decode_chunk(*first as u64, &data, after, limit, &mut out)?,
                    // Purged while this was read.
                    None => return Ok(out),
                },
            }
        }
        match out.last() {
            Some(l) if l.seq > cursor => cursor = l.seq,
            _ => break,
        }
    }
    Ok(out)
}

fn purge(
    c: &Connection,
    segments: &mut Segments,
    policy: Retention,
    now: SystemTime,
) -> Result<usize, StoreError> {
    let cutoff = now.checked_sub(policy.keep_for).map_or(i64::MIN, micros);
    let doomed: Vec<Vec<u8>> = c
        .prepare_cached(
            "SELECT id FROM (
                 SELECT id, finished_at FROM runs WHERE finished_at IS NOT NULL
                 ORDER BY finished_at DESC LIMIT -1 OFFSET ?1)
             UNION
             SELECT id FROM runs WHERE finished_at < ?2
             LIMIT 1000",
        )
        .and_then(|mut s| {
            s.query_map(params![policy.keep_runs as i64, cutoff], |r| r.get(0))?
                .collect()
        })
        .map_err(backend)?;
    let mut removed = 0usize;
    let mut budget = PURGE_CHUNKS;
    for id in doomed {
        let freed: Vec<Option<i64>> = c
            .prepare_cached(
                "DELETE FROM chunks WHERE run_id = ?1 AND last_seq IN (
                     SELECT last_seq FROM chunks WHERE run_id = ?1 ORDER BY last_seq LIMIT ?2)
                 RETURNING seg",
            )
            .and_then(|mut s| {
                s.query_map(params![&id[..], budget], |r| r.get(0))?
                    .collect()
            })
            .map_err(backend)?;
        for seg in freed.iter().flatten() {
            segments.released(*seg as u64);
        }
        let deleted = freed.len() as i64;
        removed += deleted as usize;
        budget -= deleted;
        if budget <= 0 {
            break;
        }
        c.prepare_cached("DELETE FROM deliveries WHERE run_id = ?1")
            .and_then(|mut s| s.execute([&id[..]]))
            .map_err(backend)?;
        removed += c
            .prepare_cached("DELETE FROM runs WHERE id = ?1")
            .and_then(|mut s| s.execute([&id[..]]))
            .map_err(backend)?;
    }
    if removed > 0 {
        c.execute_batch("PRAGMA incremental_vacuum(2000);")
            .map_err(backend)?;
    }
    Ok(removed)
}

/// Due deliveries, held until `now + hold`.
fn claim_deliveries(
    c: &Connection,
    now: SystemTime,
    hold: Duration,
    limit: usize,
) -> Result<Vec<DueDelivery>, StoreError> {
    let until = micros(now + hold);
    let mut stmt = c
        .prepare_cached(
            "UPDATE deliveries SET next_at = ?2
             WHERE id IN (SELECT id FROM deliveries WHERE state = 'pending' AND next_at <= ?1
                          ORDER BY next_at LIMIT ?3)
             RETURNING id, run_id, url, attempts, created_at",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![micros(now), until, limit as i64], |r| {
            let run: Vec<u8> = r.get(1)?;
            Ok((
                r.get::<_, String>(0)?,
                run,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, run, url, attempts, created_at) = row.map_err(backend)?;
        let run_id = RunId::from_bytes(&run).ok_or_else(|| failure("bad run id in the store"))?;
        out.push(DueDelivery {
            id,
            run_id,
            url,
            attempts: u32::try_from(attempts).unwrap_or(0),
            created_at: super::record::from_micros(created_at),
        });
    }
    Ok(out)
}

fn record_delivery(c: &Connection, id: &str, result: &DeliveryResult) -> Result<(), StoreError> {
    let DeliveryColumns {
        state,
        next_at,
        last_status: status,
        last_error: error,
        done_at: done,
    } = DeliveryColumns::of(result);
    c.prepare_cached(
        "UPDATE deliveries SET state = ?2, attempts = attempts + 1, next_at = coalesce(?3, next_at),
             last_status = ?4, last_error = ?5, done_at = ?6
         WHERE id = ?1 AND state = 'pending'",
    )
    .map_err(backend)?
    .execute(params![id, state, next_at, status, error, done])
    .map_err(backend)?;
    Ok(())
}

fn deliveries_of(c: &Connection, run: RunId) -> Result<Vec<DeliveryState>, StoreError> {
    let mut stmt = c
        .prepare_cached(
            "SELECT id, url, state, attempts, last_status, last_error, next_at, done_at
             FROM deliveries WHERE run_id = ?1",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map([&id_bytes(run)[..]], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, url, state, attempts, last_status, last_error, next_at, done_at) =
            row.map_err(backend)?;
        let status = DeliveryStatus::parse(&state)
            .ok_or_else(|| failure(format!("bad delivery state {state:?} in the store")))?;
        out.push(DeliveryState {
            id,
            url,
            status,
            attempts: u32::try_from(attempts).unwrap_or(0),
            last_status: last_status.and_then(|s| u16::try_from(s).ok()),
            last_error,
            next_at: (status == DeliveryStatus::Pending)
                .then(|| super::record::from_micros(next_at)),
            done_at: done_at.map(super::record::from_micros),
        });
    }
    super::sort_deliveries(&mut out);
    Ok(out)
}

/// A write that needs a fresh page (a full disk refuses it): a 4 KiB row, rewritten.
fn probe(c: &Connection) -> Result<(), StoreError> {
    c.prepare_cached("INSERT OR REPLACE INTO probe (k, v) VALUES (1, zeroblob(4096))")
        .and_then(|mut s| s.execute([]))
        .map_err(backend)?;
    Ok(())
}

fn recover(c: &Connection) -> Result<Recovered, StoreError> {
    let select = |status: &str| -> Result<Vec<(Run, Held)>, StoreError> {
        c.prepare(&format!(
            "SELECT {RUN_COLUMNS}, stdin, secrets FROM runs WHERE status = ?1 ORDER BY id"
        ))
        .and_then(|mut s| {
            s.query_map([status], |r| {
                let secrets = match r
                    .get::<_, Option<String>>(RUN_COLUMN_COUNT + 1)?
                    .map(|t| serde_json::from_str(&t))
                {
                    None => serde_json::Map::new(),
                    Some(Ok(serde_json::Value::Object(m))) => m,
                    Some(_) => {
                        return Err(rusqlite::Error::FromSqlConversionFailure(
                            RUN_COLUMN_COUNT + 1,
                            rusqlite::types::Type::Text,
                            "bad secrets in the store".into(),
                        ));
                    }
                };
                Ok((
                    run_from_row(r)?,
                    Held {
                        stdin: r.get(RUN_COLUMN_COUNT)?,
                        secrets,
                    },
                ))
            })?
            .collect()
        })
        .map_err(backend)
    };
    let now = SystemTime::now();
    let mut lost = Vec::new();
    for (run, _) in select("running")? {
        let next = RunState::Finished {
            started_at: run.started_at(),
            pid: run.pid(),
            finished_at: now,
            outcome: Outcome::Lost,
        };
        write_state(c, run.id, &next, None)?;
        lost.push(Run { state: next, ..run });
    }
    Ok(Recovered {
        lost,
        queued: select("queued")?,
    })
}

fn run_from_row(r: &Row<'_>) -> rusqlite::Result<Run> {
    let bad = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("{what} in the store").into(),
        )
    };
    let id: Vec<u8> = r.get(0)?;
    let id = RunId::from_bytes(&id).ok_or_else(|| bad("bad run id".into()))?;
    StoredRun {
        id,
        module_id: r.get(1)?,
        module_name: r.get(2)?,
        parameters: r.get(3)?,
        argv: r.get(4)?,
        mode: r.get(5)?,
        timeout_ms: r.get(6)?,
        created_at: r.get(7)?,
        output_lines: r.get(18)?,
        created_by: r.get(19)?,
        callbacks: r.get(21)?,
        cancel_requested_at: r.get(22)?,
        state: StoredState {
            status: r.get(8)?,
            started_at: r.get(9)?,
            finished_at: r.get(10)?,
            pid: r.get(11)?,
            stopping: r.get(12)?,
            outcome: r.get(13)?,
            exit_code: r.get(14)?,
            signal: r.get(15)?,
            cancel_reason: r.get(16)?,
            message: r.get(17)?,
            cancelled_by: r.get(20)?,
        },
    }
    .into_run()
    .map_err(bad)
}

impl RunStore for SqliteStore {
    fn create(&self, new: NewRun) -> StoreFuture<'_, Created> {
        self.send(|to| Cmd::Create(Box::new(new), to))
    }

    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>> {
        let key = key.clone();
        self.read(move |c| by_key(c, &key))
    }

    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>> {
        self.read(move |c| get_run(c, id))
    }

    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()> {
        self.send(|to| Cmd::Transition(id, expect, Box::new(next), to))
    }

    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()> {
        if lines.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.send(|to| Cmd::Append(id, lines, to))
    }

    fn finish(
        &self,
        id: RunId,
        lines: Vec<Line>,
        expect: Expect,
        next: RunState,
    ) -> StoreFuture<'_, ()> {
        self.send(|to| Cmd::Finish(id, lines, expect, Box::new(next), to))
    }

    fn read_output(&self, id: RunId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Line>> {
        let dir = self.dir.clone();
        self.read(move |c| read_output(c, &dir, id, after, limit))
    }

    fn list(&self, query: ListQuery) -> StoreFuture<'_, Page> {
        self.read(move |c| {
            let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(before) = query.before {
                sql.push_str(" AND id < ?");
                args.push(id_bytes(before).to_vec().into());
            }
            if let Some(m) = &query.module_id {
                sql.push_str(" AND module_id = ?");
                args.push(m.clone().into());
            }
            if let Some(patterns) = &query.modules {
                if patterns.is_empty() {
                    sql.push_str(" AND 0");
                } else {
                    let any = vec!["module_id GLOB ?"; patterns.len()].join(" OR ");
                    sql.push_str(&format!(" AND ({any})"));
                    args.extend(patterns.iter().map(|p| p.as_str().to_owned().into()));
                }
            }
            if let Some(statuses) = &query.statuses {
                let marks = vec!["?"; statuses.len()].join(", ");
                sql.push_str(&format!(" AND status IN ({marks})"));
                args.extend(statuses.iter().map(|s| s.as_str().to_owned().into()));
            }
            sql.push_str(" ORDER BY id DESC LIMIT ?");
            args.push((query.limit as i64 + 1).into());
            let mut runs: Vec<Run> = c
                .prepare_cached(&sql)
                .and_then(|mut s| {
                    s.query_map(rusqlite::params_from_iter(args), run_from_row)?
                        .collect()
                })
                .map_err(backend)?;
            let next_cursor = if runs.len() > query.limit {
                runs.truncate(query.limit);
                runs.last().map(|r| r.id)
            } else {
                None
            };
            Ok(Page { runs, next_cursor })
        })
    }

    fn purge(&self, policy: Retention, now: SystemTime) -> StoreFuture<'_, usize> {
        self.send(|to| Cmd::Purge(policy, now, to))
    }

    fn claim_deliveries(
        &self,
        now: SystemTime,
        hold: Duration,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DueDelivery>> {
        self.send(|to| Cmd::ClaimDeliveries(now, hold, limit, to))
    }

    fn record_delivery(&self, id: String, result: DeliveryResult) -> StoreFuture<'_, ()> {
        self.send(|to| Cmd::RecordDelivery(id, result, to))
    }

    fn cancel_requested(&self, id: RunId, at: SystemTime) -> StoreFuture<'_, ()> {
        self.send(|to| Cmd::CancelRequested(id, at, to))
    }

    fn deliveries(&self, run: RunId) -> StoreFuture<'_, Vec<DeliveryState>> {
        self.read(move |c| deliveries_of(c, run))
    }

    fn recover(&self) -> StoreFuture<'_, Recovered> {
        self.send(Cmd::Recover)
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        self.send(Cmd::Probe)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::run::Stream;

    /// Output that a modrun before schema version 5 stored (the fixed encoding) reads back
    /// after the upgrade, in order with what is appended since (compact).
    #[tokio::test]
    async fn output_stored_before_the_compact_encoding_reads_back_with_the_new() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("modrun.db");
        let run = Run::queued_for_test("m");
        let id = run.id;
        let line = |seq: u64, text: String| Line {
            seq,
            stream: if seq.is_multiple_of(2) {
                Stream::Stderr
            } else {
                Stream::Stdout
            },
            ts: UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000 + seq / 2),
            text: text.into(),
            raw: None,
        };
        // What an older modrun left: lines 1-3 in the fixed encoding in the database, at
        // schema version 4.
        let old: Vec<Line> = (1..=3).map(|s| line(s, format!("old {s}"))).collect();
        {
            let c = Connection::open(&file).unwrap();
            c.execute_batch("PRAGMA page_size = 4096; PRAGMA auto_vacuum = INCREMENTAL;")
                .unwrap();
            for sql in &MIGRATIONS[..4] {
                c.execute_batch(sql).unwrap();
            }
            c.execute_batch("PRAGMA user_version = 4;").unwrap();
            create(&c, new_run(run)).unwrap();
            let refs: Vec<&Line> = old.iter().collect();
            for (first, last, data) in chunks(&refs, Encoding::Fixed) {
                c.execute(
                    "INSERT INTO chunks (run_id, last_seq, first_seq, data) VALUES (?1, ?2, ?3, ?4)",
                    params![&id_bytes(id)[..], last as i64, first as i64, &data],
                )
                .unwrap();
            }
        }

        let store = SqliteStore::open(dir.path()).unwrap();
        let new: Vec<Line> = (4..=6).map(|s| line(s, format!("new {s}"))).collect();
        store.append_output(id, new.clone()).await.unwrap();

        let back = store.read_output(id, 0, 100).await.unwrap();
        assert_eq!(back, old.iter().chain(&new).cloned().collect::<Vec<_>>());
        assert_eq!(store.read_output(id, 2, 2).await.unwrap(), back[2..4]);
        let c = Connection::open(&file).unwrap();
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // The old chunk in the database; the new one in a segment, compact.
        let rows: Vec<(String, i64, Option<i64>)> = c
            .prepare(
                "SELECT hex(substr(data, 1, 1)), length(data), seg FROM chunks ORDER BY last_seq",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].0.as_str(), rows[0].2), ("00", None), "{rows:?}");
        assert_eq!((rows[1].1, rows[1].2), (0, Some(1)), "{rows:?}");
        let segment = std::fs::read(dir.path().join("output-0000000001.seg")).unwrap();
        assert_eq!(segment[0], super::super::chunk::COMPACT);
    }

    /// Queries that read columns past the run's count on [`RUN_COLUMN_COUNT`].
    fn new_run(run: Run) -> NewRun {
        NewRun {
            run,
            key: None,
            held: Held::default(),
            policy: Default::default(),
        }
    }

    fn text_line(seq: u64) -> Line {
        Line {
            seq,
            stream: Stream::Stdout,
            ts: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            text: format!("line {seq:05} {}", "x".repeat(60)).into(),
            raw: None,
        }
    }

    /// A running run with `lines` lines of output, appended in batches of `per_batch`.
    async fn run_with_output(store: &SqliteStore, lines: u64, per_batch: u64) -> RunId {
        let mut run = Run::queued_for_test("m");
        run.state = RunState::Running {
            started_at: SystemTime::now(),
            pid: None,
            stopping: false,
        };
        let id = run.id;
        store.create(new_run(run)).await.unwrap();
        for start in (1..=lines).step_by(per_batch as usize) {
            let batch = (start..(start + per_batch).min(lines + 1))
                .map(text_line)
                .collect();
            store.append_output(id, batch).await.unwrap();
        }
        id
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        names.sort();
        names
    }

    /// Output chunks live in segment files, not in the database; after a power loss that
    /// kept a row but not all of its bytes, the next start drops that chunk's row and every
    /// line before it still reads back (no error, nothing misread).
    #[tokio::test]
    async fn output_bytes_lost_with_the_power_drop_only_their_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let id = run_with_output(&store, 300, 100).await;
        let all = store.read_output(id, 0, 1000).await.unwrap();
        assert_eq!(all, (1..=300).map(text_line).collect::<Vec<_>>());
        drop(store);
        let c = Connection::open(dir.path().join("modrun.db")).unwrap();
        let in_db: i64 = c
            .query_row("SELECT sum(length(data)) FROM chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(in_db, 0, "no output bytes in the database");
        drop(c);
        assert_eq!(segment_files(dir.path()), ["output-0000000001.seg"]);
        // The last chunk's tail never reached the disk.
        let seg = dir.path().join("output-0000000001.seg");
        let len = std::fs::metadata(&seg).unwrap().len();
        std::fs::File::options()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 10)
            .unwrap();

        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.read_output(id, 0, 1000).await.unwrap(), all[..200]);
        // The run goes on in a new segment; the old one stays for its rows.
        store
            .append_output(id, (201..=210).map(text_line).collect())
            .await
            .unwrap();
        assert_eq!(
            store.read_output(id, 150, 100).await.unwrap(),
            all[150..210]
        );
        assert_eq!(
            segment_files(dir.path()),
            ["output-0000000001.seg", "output-0000000002.seg"]
        );
    }

    /// Retention deletes a segment file with the last run whose output is in it, and never
    /// the one being written.
    #[tokio::test]
    async fn retention_deletes_segments_with_their_last_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with(dir.path(), 20_000).unwrap();
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(run_with_output(&store, 200, 50).await);
        }
        let before = segment_files(dir.path());
        assert!(before.len() >= 4, "{before:?}");
        let now = SystemTime::now();
        for (i, id) in ids.iter().enumerate() {
            let next = RunState::Finished {
                started_at: Some(now),
                pid: None,
                finished_at: now - Duration::from_secs(60 - i as u64),
                outcome: Outcome::Lost,
            };
            store.transition(*id, Expect::Active, next).await.unwrap();
        }
        let keep = |n| Retention {
            keep_runs: n,
            keep_for: Duration::from_secs(3600),
        };
        while store.purge(keep(3), now).await.unwrap() > 0 {}
        let after = segment_files(dir.path());
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
        assert!(
            after.contains(before.last().unwrap()),
            "the active one stays"
        );
        for id in &ids[3..] {
            assert_eq!(store.read_output(*id, 0, 1000).await.unwrap().len(), 200);
        }
        while store.purge(keep(0), now).await.unwrap() > 0 {}
        assert_eq!(segment_files(dir.path()), [before.last().unwrap().clone()]);
        drop(store);
        // A start keeps only a new segment when no row names the old ones.
        let _store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(segment_files(dir.path()).len(), 1);
    }

    /// WAL frames in the file (its size: the WAL is not truncated when it starts over, so this
    /// is the most it held).
    fn wal_frames(dir: &Path) -> u64 {
        let wal = std::fs::metadata(dir.join("modrun.db-wal")).unwrap().len();
        // A frame is a page and a 24-byte header.
        wal / (4096 + 24)
    }

    /// The store runs SQLite's checkpoints itself (the automatic ones are off): the WAL does
    /// not grow with the number of commits, even when they come one after the other and the
    /// checkpoints beside the writer never catch up with it.
    #[tokio::test]
    async fn the_wal_is_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        // One commit each: every commit adds its pages to the WAL again (~28,800 frames in
        // all without checkpoints).
        for _ in 0..6000 {
            store
                .create(new_run(Run::queued_for_test("m")))
                .await
                .unwrap();
        }
        let frames = wal_frames(dir.path());
        // At most the limit, and what was committed past it while a checkpoint beside the
        // writer finished (the writer does not wait for one): how much that is depends on how
        // long the host takes to sync (5,241 and 7,167 frames were seen with the tests running
        // side by side). Half of what the WAL would hold without checkpoints leaves room for a
        // checkpoint twice as slow as the slowest seen.
        assert!(frames < 14_400, "{frames} frames in the WAL");
        assert!(store.checkpoints.background.load(Ordering::Relaxed) > 0);
    }

    /// Where the commits pause now and then (any load but a flood), the checkpointer thread
    /// alone keeps the WAL short: the writer never waits for a checkpoint.
    #[tokio::test]
    async fn checkpoints_run_beside_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        for i in 0..3000 {
            store
                .create(new_run(Run::queued_for_test("m")))
                .await
                .unwrap();
            if i % 300 == 299 {
                // A pause, as any load but a flood has: until the checkpointer has been idle
                // for 50 ms (at most 10 s), however slowly this host syncs.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let mut idle = 0;
                while idle < 5 && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    idle = if store.checkpoints.running.load(Ordering::Relaxed) {
                        0
                    } else {
                        idle + 1
                    };
                }
            }
        }
        let (beside, by_writer) = (
            store.checkpoints.background.load(Ordering::Relaxed),
            store.checkpoints.writer.load(Ordering::Relaxed),
        );
        assert!(beside > 0, "no checkpoint beside the writer");
        assert_eq!(by_writer, 0, "the writer checkpointed {by_writer} time(s)");
        // After each pause the WAL starts over: it holds at most one stretch of commits.
        let frames = wal_frames(dir.path());
        assert!(
            frames < 3 * CHECKPOINT_PAGES as u64,
            "{frames} frames in the WAL"
        );
    }

    #[test]
    fn the_run_column_count_is_right() {
        assert_eq!(RUN_COLUMNS.split(',').count(), RUN_COLUMN_COUNT);
    }

    /// The SQLite failures that pass are outages with a plain reason; the rest are failures.
    #[test]
    fn sqlite_errors_are_classified() {
        let err = |code: i32| {
            backend(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        let outage = |e: StoreError| match e {
            StoreError::Unavailable(o, _) => Some(o),
            _ => None,
        };
        assert_eq!(
            outage(err(rusqlite::ffi::SQLITE_FULL)),
            Some(Outage::DiskFull)
        );
        assert_eq!(
            outage(err(rusqlite::ffi::SQLITE_READONLY)),
            Some(Outage::ReadOnly)
        );
        assert_eq!(outage(err(rusqlite::ffi::SQLITE_BUSY)), Some(Outage::Busy));
        assert_eq!(
            outage(err(rusqlite::ffi::SQLITE_LOCKED)),
            Some(Outage::Busy)
        );
        assert_eq!(outage(err(rusqlite::ffi::SQLITE_IOERR)), Some(Outage::Io));
        assert_eq!(outage(err(rusqlite::ffi::SQLITE_CORRUPT)), None);
        assert_eq!(
            Outage::ReadOnly.to_string(),
            "cannot write: read-only file system"
        );
    }
}
