//! The shared store for several modrun nodes: PostgreSQL (`storage.url`).
//!
//! Every node writes the same tables; the database is the only thing they share. What makes
//! that safe (the README's "Cluster" section says what a user gets from it):
//! - **claims**: a queued run is taken by exactly one node with `FOR UPDATE SKIP LOCKED`; a
//!   module's `max_concurrent` holds across the cluster (claims of a limited module are
//!   serialised by a transaction-scoped advisory lock on the module, and count its running
//!   runs);
//! - **leases**: each node renews `nodes.lease_until` (the database's clock, not the node's);
//!   the reaper of any node marks the runs of a node whose lease lapsed `lost`, or queues them
//!   again when their module opts into `retry_on_lost`;
//! - **fencing**: a run's `attempt` is its fencing token: every write of the node that runs it
//!   (output, progress, end) is conditional on `owner = me AND attempt = mine AND status =
//!   'running'`; a write that matches nothing means another node took the run over, and the
//!   runner kills its child ([`StoreError::Fenced`]);
//! - **cancel**: a durable flag (`cancel_requested`) plus a NOTIFY; the owner acts on the
//!   notification at once, or on its next heartbeat (which reads the flag);
//! - **notifications are hints**: LISTEN/NOTIFY wakes readers and claimers, but every reader also
//!   polls, so a lost notification (a reconnect) costs latency, never data.
//!
//! Output is stored as in SQLite (chunks of consecutive lines, the same encoding), one
//! transaction and one NOTIFY per flushed batch.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use tokio::sync::{broadcast, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::chunk::{Encoding, chunks, decode_chunk};
use super::record::{DeliveryColumns, StateColumns, StoredRun, StoredState, micros};
use super::{
    CancelAck, Claimed, Cluster, ClusterSignal, Created, DeliveryResult, DeliveryState,
    DeliveryStatus, DueDelivery, Expect, Heartbeat, Held, IdempotencyKey, ListQuery, NewRun,
    Outage, Page, Recovered, Retention, RunStore, StoreError, StoreFuture,
};
use crate::run::{Line, Outcome, Run, RunId, RunState};

/// Our statements, parsed once per connection (deadpool's statement cache) rather than at
/// every call: a parse is a round trip of its own and, for the wide UPDATE of a run, most of
/// its cost. The SQL texts are ours and finite (a list query has at most 16 shapes), so the
/// cache stays small.
trait Cached: deadpool_postgres::GenericClient {
    async fn cexecute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let st = self.prepare_cached(sql).await?;
        self.execute(&st, params).await
    }

    async fn cquery(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let st = self.prepare_cached(sql).await?;
        self.query(&st, params).await
    }

    async fn cquery_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        let st = self.prepare_cached(sql).await?;
        self.query_one(&st, params).await
    }

    async fn cquery_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let st = self.prepare_cached(sql).await?;
        self.query_opt(&st, params).await
    }
}

impl<T: deadpool_postgres::GenericClient> Cached for T {}

/// The schema version this binary writes (migration `i` upgrades from version `i`).
pub const PG_SCHEMA_VERSION: i32 = 3;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE nodes (
        node_id uuid PRIMARY KEY,           -- new at each start of a node
        addr text NOT NULL,                 -- server.advertise
        started_at timestamptz NOT NULL DEFAULT now(),
        lease_until timestamptz NOT NULL    -- the database's clock
    );
    CREATE TABLE runs (
        id uuid PRIMARY KEY,                -- UUID v7: sorts by creation
        module_id text NOT NULL,
        module_name text NOT NULL,
        parameters text NOT NULL,           -- JSON object (secrets as ***)
        argv text NOT NULL,                 -- JSON array (secrets as ***)
        mode text NOT NULL,
        timeout_ms bigint NOT NULL,
        created_at bigint NOT NULL,         -- microseconds since the Unix epoch
        status text NOT NULL,
        started_at bigint,
        finished_at bigint,
        pid integer,
        stopping boolean NOT NULL DEFAULT false,
        outcome text,
        exit_code integer,
        signal integer,
        cancel_reason text,
        message text,
        output_lines bigint NOT NULL DEFAULT 0,
        idem_key text UNIQUE,
        idem_fp bigint,
        stdin text,                         -- kept while queued
        secrets text,                       -- kept while queued
        created_by text,
        cancelled_by text,
        owner uuid,                         -- the node that runs it
        attempt integer NOT NULL DEFAULT 0, -- the fencing token: +1 at each claim
        module_limit integer,               -- the module's max_concurrent, cluster-wide
        retry_on_lost boolean NOT NULL DEFAULT false,
        max_attempts integer NOT NULL DEFAULT 1,
        cancel_requested boolean NOT NULL DEFAULT false,
        cancel_by text
    );
    CREATE INDEX runs_queued ON runs (id) WHERE status = 'queued';
    CREATE INDEX runs_running ON runs (owner) WHERE status = 'running';
    CREATE INDEX runs_running_module ON runs (module_id) WHERE status = 'running';
    CREATE INDEX runs_by_status ON runs (status, id);
    CREATE INDEX runs_by_module ON runs (module_id, id);
    CREATE INDEX runs_by_finish ON runs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE chunks (
        run_id uuid NOT NULL REFERENCES runs ON DELETE CASCADE,
        last_seq bigint NOT NULL,
        first_seq bigint NOT NULL,
        data bytea NOT NULL,                -- per line: stream u8, ts i64 LE (µs), len u32 LE, text
        PRIMARY KEY (run_id, last_seq)
    );
    CREATE TABLE probe (k integer PRIMARY KEY, v bytea NOT NULL);",
    // 1 -> 2: completion callbacks. A run's URLs; one delivery per URL, written by a trigger in
    // the same transaction as the run's final status (every path to it: the owner's end, a
    // queued run's cancel, the reaper).
    "ALTER TABLE runs ADD COLUMN callbacks text;     -- JSON array of URLs, NULL when none
    CREATE TABLE deliveries (
        id text PRIMARY KEY,                -- msg_<run id hex>_<n>: the webhook-id of every attempt
        run_id uuid NOT NULL REFERENCES runs ON DELETE CASCADE,
        url text NOT NULL,
        state text NOT NULL,                -- pending | delivered | failed
        attempts integer NOT NULL DEFAULT 0,
        created_at bigint NOT NULL,         -- µs: when the run ended
        next_at bigint NOT NULL,            -- µs: when the next attempt is due (or the held one lapses)
        last_status integer,
        last_error text,
        done_at bigint
    );
    CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
    CREATE INDEX deliveries_by_run ON deliveries (run_id);
    CREATE FUNCTION modrun_deliveries() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        INSERT INTO deliveries (id, run_id, url, state, created_at, next_at)
        SELECT 'msg_' || replace(NEW.id::text, '-', '') || '_' || e.n, NEW.id, e.url, 'pending',
            coalesce(NEW.finished_at, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
            coalesce(NEW.finished_at, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
        FROM jsonb_array_elements_text(NEW.callbacks::jsonb) WITH ORDINALITY AS e(url, n)
        ON CONFLICT (id) DO NOTHING;
        RETURN NULL;
    END
    $fn$;
    CREATE TRIGGER runs_deliveries AFTER UPDATE OF status ON runs FOR EACH ROW
        WHEN (NEW.callbacks IS NOT NULL AND OLD.status IN ('queued', 'running')
              AND NEW.status NOT IN ('queued', 'running'))
        EXECUTE FUNCTION modrun_deliveries();",
    // 2 -> 3: when a cancel was asked for a running run (µs); kept after it ends.
    "ALTER TABLE runs ADD COLUMN cancel_requested_at bigint;",
];

/// Advisory lock keys (the first argument of the two-key form is modrun's).
const LOCK_SPACE: i32 = 0x6d72_756e; // "mrun"
const LOCK_MIGRATE: i32 = 1;
const LOCK_PURGE: i32 = 2;

/// NOTIFY channels (payload: a run id, or nothing).
const CH_QUEUED: &str = "modrun_queued";
const CH_RUN: &str = "modrun_run";
const CH_CANCEL: &str = "modrun_cancel";

const RUN_COLUMNS: &str = "id, module_id, module_name, parameters, argv, mode, timeout_ms, \
    created_at, status, started_at, finished_at, pid, stopping, outcome, exit_code, signal, \
    cancel_reason, message, output_lines, created_by, cancelled_by, attempt, callbacks, \
    cancel_requested_at";

/// Signals queued for the runner at most. Overflow policy: a lagging receiver treats the lag as
/// a resync (it re-reads what it waits for).
const SIGNALS: usize = 1024;

/// How the store is set up.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// `postgres://user@host/db` (libpq-style options allowed, e.g. `options=-csearch_path%3Dx`).
    pub url: String,
    /// The address this node advertises.
    pub addr: String,
    /// A node whose lease is older than this is dead.
    pub lease_ttl: Duration,
    /// Queued runs at most, cluster-wide.
    pub max_queued: usize,
    /// Connections per node.
    pub pool_size: usize,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PgOpenError {
    /// The URL cannot be used.
    #[error("storage.url: {0}")]
    Url(String),
    /// The database cannot be reached or refused the schema.
    #[error("cannot open the PostgreSQL store: {0}")]
    Open(String),
    /// The schema is newer than this binary.
    #[error(
        "the PostgreSQL store has schema version {found}, newer than this modrun knows ({known}); upgrade modrun"
    )]
    TooNew {
        /// Its version.
        found: i32,
        /// The newest this binary knows.
        known: i32,
    },
}

/// PostgreSQL, shared by the nodes of a cluster.
pub struct PgStore {
    pool: Pool,
    pg_config: tokio_postgres::Config,
    settings: PgSettings,
    node: Uuid,
    /// Runs this node holds, with the attempt it holds them at (its fencing token). A std
    /// mutex: sections are map operations. Bounded by the runs holding a slot here.
    claims: Mutex<HashMap<RunId, i32>>,
    /// Per-run change counters for readers on this node, poked by notifications. A std mutex;
    /// bounded: an entry goes when its last receiver is gone (pruned at each poke).
    watches: Mutex<HashMap<RunId, watch::Sender<u64>>>,
    /// Hints for the runner (see [`SIGNALS`] for the overflow policy).
    signals: broadcast::Sender<ClusterSignal>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL error as a store error: a connection that cannot be had or was lost, a server
/// shutting down, a full disk or a read-only server are an outage.
fn pg(e: tokio_postgres::Error) -> StoreError {
    let outage = match e.code() {
        None => Some(Outage::Unreachable),
        Some(c) if *c == SqlState::DISK_FULL => Some(Outage::DiskFull),
        Some(c) if *c == SqlState::READ_ONLY_SQL_TRANSACTION => Some(Outage::ReadOnly),
        Some(c)
            if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW =>
        {
            Some(Outage::Unreachable)
        }
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::LOCK_NOT_AVAILABLE =>
        {
            Some(Outage::Busy)
        }
        Some(_) => None,
    };
    // The server's own words (tokio-postgres's Display says only "db error").
    let text = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    match outage {
        Some(o) => StoreError::Unavailable(o, text),
        None => StoreError::Backend(text),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => StoreError::Unavailable(Outage::Unreachable, other.to_string()),
    }
}

fn uuid(id: RunId) -> Uuid {
    *id.as_uuid()
}

fn run_id(u: Uuid) -> RunId {
    RunId::from_bytes(u.as_bytes()).unwrap_or_default()
}

fn run_from_row(r: &Row) -> Result<Run, StoreError> {
    let bad = |e: tokio_postgres::Error| StoreError::Backend(format!("bad run row: {e}"));
    let stored = StoredRun {
        id: run_id(r.try_get(0).map_err(bad)?),
        module_id: r.try_get(1).map_err(bad)?,
        module_name: r.try_get(2).map_err(bad)?,
        parameters: r.try_get(3).map_err(bad)?,
        argv: r.try_get(4).map_err(bad)?,
        mode: r.try_get(5).map_err(bad)?,
        timeout_ms: r.try_get(6).map_err(bad)?,
        created_at: r.try_get(7).map_err(bad)?,
        output_lines: r.try_get(18).map_err(bad)?,
        created_by: r.try_get(19).map_err(bad)?,
        callbacks: r.try_get(22).map_err(bad)?,
        cancel_requested_at: r.try_get(23).map_err(bad)?,
        state: StoredState {
            status: r.try_get(8).map_err(bad)?,
            started_at: r.try_get(9).map_err(bad)?,
            finished_at: r.try_get(10).map_err(bad)?,
            pid: r
                .try_get::<_, Option<i32>>(11)
                .map_err(bad)?
                .and_then(|p| u32::try_from(p).ok()),
            stopping: r.try_get(12).map_err(bad)?,
            outcome: r.try_get(13).map_err(bad)?,
            exit_code: r.try_get(14).map_err(bad)?,
            signal: r.try_get(15).map_err(bad)?,
            cancel_reason: r.try_get(16).map_err(bad)?,
            message: r.try_get(17).map_err(bad)?,
            cancelled_by: r.try_get(20).map_err(bad)?,
        },
    };
    let attempt: i32 = r.try_get(21).map_err(bad)?;
    let mut run = stored.into_run().map_err(StoreError::Backend)?;
    run.attempt = u32::try_from(attempt).unwrap_or(0);
    Ok(run)
}

/// `SET` clause and parameters ($2..$12) for a state; `$1` is the run id.
const STATE_SET: &str = "status = $2, started_at = $3, finished_at = $4, pid = $5, stopping = $6, \
    outcome = $7, exit_code = $8, signal = $9, cancel_reason = $10, message = $11, \
    cancelled_by = $12, \
    stdin = CASE WHEN $2 = 'queued' OR ($2 = 'running' AND retry_on_lost) THEN stdin END, \
    secrets = CASE WHEN $2 = 'queued' OR ($2 = 'running' AND retry_on_lost) THEN secrets END";

/// What becomes of a run whose node is lost (the reaper) or gave it up (its lease lapsed while
/// the store was away): queued again for a new attempt when its module opts into it and
/// attempts are left (and no cancel was asked for), else `lost`. `$2` is the time (µs). What it needs to start (stdin,
/// secrets) is kept only while it may start again.
const LOSE_SET: &str = "\
    status = CASE WHEN retry_on_lost AND attempt < max_attempts AND NOT cancel_requested \
             THEN 'queued' ELSE 'lost' END, \
    outcome = CASE WHEN retry_on_lost AND attempt < max_attempts AND NOT cancel_requested \
              THEN NULL ELSE 'lost' END, \
    finished_at = CASE WHEN retry_on_lost AND attempt < max_attempts AND NOT cancel_requested \
                  THEN NULL ELSE $2::bigint END, \
    stdin = CASE WHEN retry_on_lost AND attempt < max_attempts AND NOT cancel_requested \
            THEN stdin END, \
    secrets = CASE WHEN retry_on_lost AND attempt < max_attempts AND NOT cancel_requested \
              THEN secrets END, \
    owner = NULL, pid = NULL, stopping = false";

/// The values of [`STATE_SET`] after the run id.
struct StateParams {
    status: String,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    pid: Option<i32>,
    stopping: bool,
    outcome: Option<String>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    cancel_reason: Option<String>,
    message: Option<String>,
    cancelled_by: Option<String>,
}

impl StateParams {
    fn of(state: &RunState) -> Self {
        let c = StateColumns::of(state);
        Self {
            status: c.status,
            started_at: c.started_at,
            finished_at: c.finished_at,
            pid: c.pid.and_then(|p| i32::try_from(p).ok()),
            stopping: c.stopping,
            outcome: c.outcome.map(str::to_owned),
            exit_code: c.exit_code,
            signal: c.signal,
            cancel_reason: c.cancel_reason.map(str::to_owned),
            message: c.message,
            cancelled_by: c.cancelled_by,
        }
    }

    fn params<'a>(&'a self, id: &'a Uuid) -> Vec<&'a (dyn ToSql + Sync)> {
        vec![
            id,
            &self.status,
            &self.started_at,
            &self.finished_at,
            &self.pid,
            &self.stopping,
            &self.outcome,
            &self.exit_code,
            &self.signal,
            &self.cancel_reason,
            &self.message,
            &self.cancelled_by,
        ]
    }
}

/// A module-id glob as a `LIKE` pattern (`*` → `%`, `?` → `_`, a literal `_` escaped).
fn like(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() + 4);
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '_' | '%' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

impl PgStore {
    /// Connect, migrate (one node at a time), and register this node (a fresh id).
    pub async fn open(settings: PgSettings) -> Result<Arc<Self>, PgOpenError> {
        let mut pg_config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgOpenError::Url(e.to_string()))?;
        pg_config.connect_timeout(Duration::from_secs(3));
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("modrun");
        }
        // A node that stops between two statements of a transaction (paused, starved of CPU)
        // would hold that transaction's row locks for as long as it is stopped, and the other
        // nodes' reaper (`FOR UPDATE SKIP LOCKED`) would skip its runs meanwhile: the database
        // ends such a session once it has been idle in a transaction for a lease. A node that
        // slow has lost its lease anyway (and its later writes are fenced).
        let idle_limit = format!(
            "-c idle_in_transaction_session_timeout={}",
            settings.lease_ttl.as_millis().max(1)
        );
        let options = match pg_config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {idle_limit}"),
            _ => idle_limit,
        };
        pg_config.options(&options);
        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(3)))
            .create_timeout(Some(Duration::from_secs(3)))
            .recycle_timeout(Some(Duration::from_secs(3)))
            .build()
            .map_err(|e| PgOpenError::Open(e.to_string()))?;
        let store = Arc::new(Self {
            pool,
            pg_config,
            settings,
            node: Uuid::now_v7(),
            claims: Mutex::default(),
            watches: Mutex::default(),
            signals: broadcast::channel(SIGNALS).0,
        });
        store.migrate().await?;
        store
            .join()
            .await
            .map_err(|e| PgOpenError::Open(e.to_string()))?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    fn claims(&self) -> MutexGuard<'_, HashMap<RunId, i32>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn migrate(&self) -> Result<(), PgOpenError> {
        let open = |e: tokio_postgres::Error| PgOpenError::Open(e.to_string());
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| PgOpenError::Open(e.to_string()))?;
        let tx = client.transaction().await.map_err(open)?;
        tx.cexecute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&LOCK_SPACE, &LOCK_MIGRATE],
        )
        .await
        .map_err(open)?;
        // Looked up first: CREATE ... IF NOT EXISTS would log a notice at every start.
        let exists: bool = tx
            .cquery_one("SELECT to_regclass('modrun_schema') IS NOT NULL", &[])
            .await
            .map_err(open)?
            .get(0);
        if !exists {
            tx.batch_execute("CREATE TABLE modrun_schema (version integer NOT NULL)")
                .await
                .map_err(open)?;
        }
        let version: i32 = match tx
            .cquery_opt("SELECT version FROM modrun_schema", &[])
            .await
            .map_err(open)?
        {
            Some(row) => row.get(0),
            None => {
                tx.cexecute("INSERT INTO modrun_schema (version) VALUES (0)", &[])
                    .await
                    .map_err(open)?;
                0
            }
        };
        if version > PG_SCHEMA_VERSION {
            return Err(PgOpenError::TooNew {
                found: version,
                known: PG_SCHEMA_VERSION,
            });
        }
        for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql).await.map_err(|e| {
                PgOpenError::Open(format!("migration to schema version {}: {e}", from + 1))
            })?;
            tx.cexecute(
                "UPDATE modrun_schema SET version = $1",
                &[&(from as i32 + 1)],
            )
            .await
            .map_err(open)?;
        }
        tx.commit().await.map_err(open)
    }

    fn ttl_secs(&self) -> f64 {
        self.settings.lease_ttl.as_secs_f64()
    }

    /// Register (or re-register) this node with a fresh lease.
    async fn join(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .cexecute(
                "INSERT INTO nodes (node_id, addr, lease_until) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (node_id) DO UPDATE SET lease_until = EXCLUDED.lease_until",
                &[&self.node, &self.settings.addr, &self.ttl_secs()],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    fn notify_run(&self, id: RunId) {
        self.poke(id);
    }

    /// Wake this node's readers of run `id` (and drop counters nobody holds any more).
    fn poke(&self, id: RunId) {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = w.get(&id) {
            if tx.receiver_count() == 0 {
                w.remove(&id);
            } else {
                tx.send_modify(|v| *v += 1);
            }
        }
    }

    fn poke_all(&self) {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|_, tx| tx.receiver_count() > 0);
        for tx in w.values() {
            tx.send_modify(|v| *v += 1);
        }
    }

    async fn get_run(
        client: &impl deadpool_postgres::GenericClient,
        id: RunId,
    ) -> Result<Option<Run>, StoreError> {
        let row = client
            .cquery_opt(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
                &[&uuid(id)],
            )
            .await
            .map_err(pg)?;
        row.as_ref().map(run_from_row).transpose()
    }

    /// The run a key was used for; a conflict when its body differs.
    async fn by_key(
        client: &impl deadpool_postgres::GenericClient,
        k: &IdempotencyKey,
    ) -> Result<Option<Run>, StoreError> {
        let Some(row) = client
            .cquery_opt(
                "SELECT id, idem_fp FROM runs WHERE idem_key = $1",
                &[&k.key],
            )
            .await
            .map_err(pg)?
        else {
            return Ok(None);
        };
        let fp: Option<i64> = row.get(1);
        if fp != Some(k.fingerprint as i64) {
            return Err(StoreError::IdempotencyConflict);
        }
        Self::get_run(client, run_id(row.get(0))).await
    }

    async fn create_run(&self, new: NewRun) -> Result<Created, StoreError> {
        let r = &new.run;
        let running = matches!(r.state, RunState::Running { .. });
        let (key, fp) = match &new.key {
            Some(k) => (Some(k.key.as_str()), Some(k.fingerprint as i64)),
            None => (None, None),
        };
        // What a run needs to start is kept only while it may start (again): queued, or
        // running with `retry_on_lost` (as STATE_SET does for later changes).
        let keep_held = !running || new.policy.retry_on_lost;
        let secrets = (keep_held && !new.held.secrets.is_empty())
            .then(|| serde_json::Value::Object(new.held.secrets.clone()).to_string());
        let stdin = new.held.stdin.as_ref().filter(|_| keep_held);
        let st = StateParams::of(&r.state);
        let id = uuid(r.id);
        let parameters = serde_json::Value::Object(r.parameters.clone()).to_string();
        let argv =
            serde_json::to_string(&r.argv).map_err(|e| StoreError::Backend(e.to_string()))?;
        let timeout_ms = i64::try_from(r.timeout.as_millis()).unwrap_or(i64::MAX);
        let created_at = micros(r.created_at);
        let owner = running.then_some(self.node);
        let attempt: i32 = i32::from(running);
        let module_limit = new.policy.module_limit.and_then(|n| i32::try_from(n).ok());
        let max_attempts = i32::try_from(new.policy.max_attempts.max(1)).unwrap_or(1);
        let callbacks = (!r.callbacks.is_empty())
            .then(|| serde_json::to_string(&r.callbacks).unwrap_or_else(|_| "[]".into()));
        let params: [&(dyn ToSql + Sync); 30] = [
            &id,
            &r.module_id,
            &r.module_name,
            &parameters,
            &argv,
            &r.mode.as_str(),
            &timeout_ms,
            &created_at,
            &st.status,
            &st.started_at,
            &key,
            &fp,
            &stdin,
            &secrets,
            &r.created_by,
            &owner,
            &attempt,
            &module_limit,
            &new.policy.retry_on_lost,
            &max_attempts,
            &st.finished_at,
            &st.pid,
            &st.stopping,
            &st.outcome,
            &st.exit_code,
            &st.signal,
            &st.cancel_reason,
            &st.message,
            &st.cancelled_by,
            &callbacks,
        ];
        const INSERT: &str = "INSERT INTO runs (id, module_id, module_name, parameters, argv, \
               mode, timeout_ms, created_at, status, started_at, idem_key, idem_fp, stdin, \
               secrets, created_by, owner, attempt, module_limit, retry_on_lost, max_attempts, \
               finished_at, pid, stopping, outcome, exit_code, signal, cancel_reason, message, \
               cancelled_by, callbacks) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
               $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30) \
             ON CONFLICT (idem_key) DO NOTHING";
        let mut client = self.client().await?;
        let inserted = if running {
            // Started at once on this node: one statement, no queue to check or wake.
            client.cexecute(INSERT, &params).await.map_err(pg)?
        } else {
            let tx = client.transaction().await.map_err(pg)?;
            if let Some(k) = &new.key
                && let Some(existing) = Self::by_key(&tx, k).await?
            {
                return Ok(Created::Existing(existing));
            }
            let queued: i64 = tx
                .cquery_one("SELECT count(*) FROM runs WHERE status = 'queued'", &[])
                .await
                .map_err(pg)?
                .get(0);
            if queued as usize >= self.settings.max_queued {
                return Err(StoreError::QueueFull(queued as usize));
            }
            let n = tx.cexecute(INSERT, &params).await.map_err(pg)?;
            if n > 0 {
                tx.cexecute(&format!("NOTIFY {CH_QUEUED}"), &[])
                    .await
                    .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)?;
            n
        };
        if inserted == 0 {
            // The key is taken (by another node a moment ago, or earlier): answer with its run.
            let k = new.key.as_ref().ok_or_else(|| {
                StoreError::Backend("a run insert matched nothing without a key".into())
            })?;
            return match Self::by_key(&client, k).await? {
                Some(run) => Ok(Created::Existing(run)),
                None => Err(StoreError::Backend("the idempotent run vanished".into())),
            };
        }
        if running {
            self.claims().insert(r.id, 1);
        }
        let mut run = new.run;
        run.output_lines = 0;
        run.attempt = u32::from(running);
        Ok(Created::New(run))
    }

    async fn transition_run(
        &self,
        id: RunId,
        expect: Expect,
        next: RunState,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let key = uuid(id);
        let Some(attempt) = self.claims().get(&id).copied() else {
            // Without a claim, only a queued run may change (a running one is its owner's).
            if expect == Expect::Running {
                return Err(StoreError::Fenced(id));
            }
            let st = StateParams::of(&next);
            let changed = client
                .cexecute(
                    &format!("UPDATE runs SET {STATE_SET} WHERE id = $1 AND status = 'queued'"),
                    &st.params(&key),
                )
                .await
                .map_err(pg)?;
            if changed == 0 {
                let run = Self::get_run(&client, id)
                    .await?
                    .ok_or(StoreError::NotFound(id))?;
                return Err(StoreError::WrongState(Box::new(run)));
            }
            client
                .cexecute("SELECT pg_notify($1, $2)", &[&CH_RUN, &id.to_string()])
                .await
                .map_err(pg)?;
            return Ok(());
        };
        // The owner's write: fenced by the attempt it holds.
        let lost = matches!(
            next,
            RunState::Finished {
                outcome: Outcome::Lost,
                ..
            }
        );
        // One round trip: the fenced update, the readers' wake-up, and the claimers' when it
        // was queued again or freed a slot of a limited module.
        let notify = format!(
            "SELECT u.status, pg_notify('{CH_RUN}', u.id::text)::text, \
               CASE WHEN u.status = 'queued' \
                      OR (u.status <> 'running' AND u.module_limit IS NOT NULL) \
                    THEN pg_notify('{CH_QUEUED}', '')::text END \
             FROM u"
        );
        let row = if lost {
            // It gave the run up (its lease lapsed while the store was away): the same as the
            // reaper would do.
            let now = micros(SystemTime::now());
            client
                .cquery_opt(
                    &format!(
                        "WITH u AS (UPDATE runs SET {LOSE_SET} WHERE id = $1 AND owner = $3 \
                         AND attempt = $4 AND status = 'running' \
                         RETURNING id, status, module_limit) {notify}"
                    ),
                    &[&key, &now, &self.node, &attempt],
                )
                .await
                .map_err(pg)?
        } else {
            let st = StateParams::of(&next);
            let mut params = st.params(&key);
            params.push(&self.node);
            params.push(&attempt);
            client
                .cquery_opt(
                    &format!(
                        "WITH u AS (UPDATE runs SET {STATE_SET} WHERE id = $1 AND owner = $13 \
                         AND attempt = $14 AND status = 'running' \
                         RETURNING id, status, module_limit) {notify}"
                    ),
                    &params,
                )
                .await
                .map_err(pg)?
        };
        if row.is_none() {
            self.claims().remove(&id);
            let _ = self.signals.send(ClusterSignal::Fenced(id));
            return Err(StoreError::Fenced(id));
        }
        if next.is_finished() {
            self.claims().remove(&id);
        }
        Ok(())
    }

    async fn append(&self, id: RunId, lines: Vec<Line>) -> Result<(), StoreError> {
        // Output is written by the node that runs the run, fenced by its attempt.
        let Some(attempt) = self.claims().get(&id).copied() else {
            return Err(StoreError::Fenced(id));
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let key = uuid(id);
        // Locks the run's row against a takeover until this commits, and checks it is ours;
        // a batch retried after an ambiguous commit skips the lines already in.
        let Some(row) = tx
            .cquery_opt(
                "SELECT (SELECT coalesce(max(last_seq), 0) FROM chunks WHERE run_id = $1) \
                 FROM runs WHERE id = $1 AND owner = $2 AND attempt = $3 AND status = 'running' \
                 FOR SHARE",
                &[&key, &self.node, &attempt],
            )
            .await
            .map_err(pg)?
        else {
            drop(tx);
            self.claims().remove(&id);
            let _ = self.signals.send(ClusterSignal::Fenced(id));
            return Err(StoreError::Fenced(id));
        };
        let stored: i64 = row.get(0);
        let fresh: Vec<&Line> = lines.iter().filter(|l| l.seq as i64 > stored).collect();
        let Some(last) = fresh.last().map(|l| l.seq as i64) else {
            return Ok(());
        };
        let (mut run_ids, mut lasts, mut firsts, mut datas) = (vec![], vec![], vec![], vec![]);
        for (first, end, data) in chunks(&fresh, Encoding::Fixed) {
            run_ids.push(key);
            lasts.push(end as i64);
            firsts.push(first as i64);
            datas.push(data);
        }
        tx.cexecute(
            "INSERT INTO chunks (run_id, last_seq, first_seq, data) \
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bytea[])",
            &[&run_ids, &lasts, &firsts, &datas],
        )
        .await
        .map_err(pg)?;
        tx.cexecute(
            &format!(
                "WITH u AS (UPDATE runs SET output_lines = greatest(output_lines, $2) \
                 WHERE id = $1 RETURNING id) \
                 SELECT pg_notify('{CH_RUN}', u.id::text)::text FROM u"
            ),
            &[&key, &last],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    async fn read_chunks(
        &self,
        id: RunId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Line>, StoreError> {
        let client = self.client().await?;
        let mut out = Vec::with_capacity(limit.min(4096));
        let mut cursor = after.min(i64::MAX as u64) as i64;
        let key = uuid(id);
        while out.len() < limit {
            let rows = client
                .cquery(
                    "SELECT first_seq, data FROM chunks WHERE run_id = $1 AND last_seq > $2 \
                     ORDER BY last_seq LIMIT 2",
                    &[&key, &cursor],
                )
                .await
                .map_err(pg)?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let first: i64 = row.get(0);
                let data: &[u8] = row.get(1);
                decode_chunk(first as u64, data, after, limit, &mut out)?;
            }
            match out.last() {
                Some(l) if l.seq as i64 > cursor => cursor = l.seq as i64,
                _ => break,
            }
        }
        Ok(out)
    }

    async fn list_runs(&self, query: ListQuery) -> Result<Page, StoreError> {
        let client = self.client().await?;
        let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE true");
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        if let Some(before) = query.before {
            params.push(Box::new(uuid(before)));
            sql.push_str(&format!(" AND id < ${}", params.len()));
        }
        if let Some(m) = &query.module_id {
            params.push(Box::new(m.clone()));
            sql.push_str(&format!(" AND module_id = ${}", params.len()));
        }
        if let Some(patterns) = &query.modules {
            let likes: Vec<String> = patterns.iter().map(|p| like(p.as_str())).collect();
            params.push(Box::new(likes));
            sql.push_str(&format!(" AND module_id LIKE ANY(${})", params.len()));
        }
        if let Some(statuses) = &query.statuses {
            let names: Vec<String> = statuses.iter().map(|s| s.as_str().to_owned()).collect();
            params.push(Box::new(names));
            sql.push_str(&format!(" AND status = ANY(${})", params.len()));
        }
        params.push(Box::new(query.limit as i64 + 1));
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = client.cquery(&sql, &refs).await.map_err(pg)?;
        let mut runs = rows
            .iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if runs.len() > query.limit {
            runs.truncate(query.limit);
            runs.last().map(|r| r.id)
        } else {
            None
        };
        Ok(Page { runs, next_cursor })
    }

    async fn purge_runs(&self, policy: Retention, now: SystemTime) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let locked: bool = tx
            .cquery_one(
                "SELECT pg_try_advisory_xact_lock($1, $2)",
                &[&LOCK_SPACE, &LOCK_PURGE],
            )
            .await
            .map_err(pg)?
            .get(0);
        if !locked {
            // Another node is purging.
            return Ok(0);
        }
        let cutoff = now.checked_sub(policy.keep_for).map_or(i64::MIN, micros);
        let removed = tx
            .cexecute(
                "DELETE FROM runs WHERE id IN (
                     (SELECT id FROM runs WHERE finished_at IS NOT NULL
                      ORDER BY finished_at DESC OFFSET $1)
                     UNION
                     (SELECT id FROM runs WHERE finished_at < $2)
                     LIMIT 500)",
                &[&(policy.keep_runs as i64), &cutoff],
            )
            .await
            .map_err(pg)?;
        // Nodes gone for long (no lease for ten leases, nothing of theirs running).
        tx.cexecute(
            "DELETE FROM nodes n WHERE lease_until < now() - make_interval(secs => $1) \
             AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.owner = n.node_id AND r.status = 'running')",
            &[&(self.ttl_secs() * 10.0)],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(removed as usize)
    }

    async fn claim_run(&self) -> Result<Option<Claimed>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let candidates = tx
            .cquery(
                "SELECT id, module_id, module_limit FROM runs r WHERE status = 'queued' \
                 AND (module_limit IS NULL OR module_limit > (SELECT count(*) FROM runs x \
                      WHERE x.module_id = r.module_id AND x.status = 'running')) \
                 ORDER BY id LIMIT 8 FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await
            .map_err(pg)?;
        // Runs of a module at its limit are left out above (no head-of-line blocking); the
        // count is checked again below, under the module's lock, before a claim counts.
        let mut chosen = None;
        let mut locked_one = false;
        for c in &candidates {
            let id: Uuid = c.get(0);
            let module: String = c.get(1);
            let limit: Option<i32> = c.get(2);
            if let Some(limit) = limit {
                // Claims of a limited module, node against node, one at a time; the count
                // comes after the lock, so it sees every claim committed before. Only the
                // first such lock is waited for: a transaction that waits holds no other
                // module's lock, so two claimers never wait for each other.
                let got = if locked_one {
                    tx.cquery_one(
                        "SELECT pg_try_advisory_xact_lock($1, hashtext($2))",
                        &[&LOCK_SPACE, &module],
                    )
                    .await
                    .map_err(pg)?
                    .get(0)
                } else {
                    tx.cexecute(
                        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                        &[&LOCK_SPACE, &module],
                    )
                    .await
                    .map_err(pg)?;
                    true
                };
                locked_one = true;
                if !got {
                    continue;
                }
                let running: i64 = tx
                    .cquery_one(
                        "SELECT count(*) FROM runs WHERE module_id = $1 AND status = 'running'",
                        &[&module],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                if running >= i64::from(limit) {
                    continue;
                }
            }
            chosen = Some(id);
            break;
        }
        let Some(id) = chosen else {
            return Ok(None);
        };
        let held = tx
            .cquery_one(
                "SELECT stdin, secrets, attempt, output_lines FROM runs WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg)?;
        let stdin: Option<String> = held.get(0);
        let secrets: Option<String> = held.get(1);
        let previous: i32 = held.get(2);
        let after_seq: i64 = if previous > 0 { held.get(3) } else { 0 };
        let attempt = previous + 1;
        let started = micros(SystemTime::now());
        if previous > 0 {
            // A retry: the output of the attempt it replaces goes; the seqs go on after it.
            tx.cexecute("DELETE FROM chunks WHERE run_id = $1", &[&id])
                .await
                .map_err(pg)?;
        }
        let row = tx
            .cquery_one(
                &format!(
                    "UPDATE runs SET status = 'running', owner = $2, attempt = $3, started_at = $4, \
                     finished_at = NULL, outcome = NULL, pid = NULL, stopping = false, \
                     stdin = CASE WHEN retry_on_lost THEN stdin END, \
                     secrets = CASE WHEN retry_on_lost THEN secrets END \
                     WHERE id = $1 RETURNING {RUN_COLUMNS}"
                ),
                &[&id, &self.node, &attempt, &started],
            )
            .await
            .map_err(pg)?;
        let run = run_from_row(&row)?;
        tx.cexecute("SELECT pg_notify($1, $2)", &[&CH_RUN, &run.id.to_string()])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        self.claims().insert(run.id, attempt);
        let secrets = match secrets.map(|t| serde_json::from_str(&t)) {
            None => serde_json::Map::new(),
            Some(Ok(serde_json::Value::Object(m))) => m,
            Some(_) => return Err(StoreError::Backend("bad secrets in the store".into())),
        };
        Ok(Some(Claimed {
            run,
            held: Held { stdin, secrets },
            after_seq: after_seq.max(0) as u64,
        }))
    }

    async fn unclaim_run(&self, id: RunId, held: Held) -> Result<(), StoreError> {
        let Some(attempt) = self.claims().remove(&id) else {
            return Ok(());
        };
        let secrets =
            (!held.secrets.is_empty()).then(|| serde_json::Value::Object(held.secrets).to_string());
        let client = self.client().await?;
        client
            .cexecute(
                &format!(
                    "WITH u AS (UPDATE runs SET status = 'queued', owner = NULL, \
                       attempt = attempt - 1, started_at = NULL, stdin = $4, secrets = $5 \
                     WHERE id = $1 AND owner = $2 AND attempt = $3 AND status = 'running' \
                     RETURNING id) \
                     SELECT pg_notify('{CH_QUEUED}', '')::text FROM u"
                ),
                &[&uuid(id), &self.node, &attempt, &held.stdin, &secrets],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn beat(&self) -> Result<Heartbeat, StoreError> {
        let client = self.client().await?;
        let renewed = client
            .cexecute(
                "UPDATE nodes SET lease_until = now() + make_interval(secs => $2) \
                 WHERE node_id = $1",
                &[&self.node, &self.ttl_secs()],
            )
            .await
            .map_err(pg)?;
        if renewed == 0 {
            drop(client);
            self.join().await?;
        }
        let client = self.client().await?;
        let cancels = client
            .cquery(
                "SELECT id, cancel_by FROM runs WHERE owner = $1 AND status = 'running' \
                 AND cancel_requested",
                &[&self.node],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| (run_id(r.get(0)), r.get::<_, Option<String>>(1)))
            .collect();
        let held: Vec<(RunId, i32)> = self.claims().iter().map(|(k, v)| (*k, *v)).collect();
        let mut gone = Vec::new();
        if !held.is_empty() {
            let ids: Vec<Uuid> = held.iter().map(|(id, _)| uuid(*id)).collect();
            let rows = client
                .cquery(
                    "SELECT id, owner, attempt, status FROM runs WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(pg)?;
            let current: HashMap<RunId, (Option<Uuid>, i32, String)> = rows
                .iter()
                .map(|r| (run_id(r.get(0)), (r.get(1), r.get(2), r.get(3))))
                .collect();
            for (id, attempt) in held {
                let ours = current.get(&id).is_some_and(|(owner, a, status)| {
                    *owner == Some(self.node) && *a == attempt && status == "running"
                });
                if !ours {
                    gone.push(id);
                }
            }
            // The claims stay until the runs end here: every write of theirs until then is
            // refused (fenced), never applied to the new attempt.
        }
        Ok(Heartbeat { cancels, gone })
    }

    async fn reap_lapsed(&self) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let now = micros(SystemTime::now());
        let rows = tx
            .cquery(
                &format!(
                    "WITH lapsed AS (
                   SELECT r.id FROM runs r
                   WHERE r.status = 'running'
                     AND NOT EXISTS (SELECT 1 FROM nodes n
                                     WHERE n.node_id = r.owner AND n.lease_until >= now())
                     AND now() - pg_postmaster_start_time() > make_interval(secs => $1)
                   FOR UPDATE SKIP LOCKED)
                 UPDATE runs r SET {LOSE_SET}
                 FROM lapsed WHERE r.id = lapsed.id
                 RETURNING r.id, r.status"
                ),
                &[&self.ttl_secs(), &now],
            )
            .await
            .map_err(pg)?;
        let mut requeued = false;
        for row in &rows {
            let id = run_id(row.get(0));
            let status: String = row.get(1);
            requeued |= status == "queued";
            tracing::warn!(run_id = %id, status = %status, "run of a node whose lease lapsed");
            tx.cexecute("SELECT pg_notify($1, $2)", &[&CH_RUN, &id.to_string()])
                .await
                .map_err(pg)?;
        }
        if requeued {
            tx.cexecute(&format!("NOTIFY {CH_QUEUED}"), &[])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(rows.len())
    }

    async fn cancel_request(&self, id: RunId, by: Option<String>) -> Result<CancelAck, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let key = uuid(id);
        let Some(row) = tx
            .cquery_opt("SELECT status FROM runs WHERE id = $1 FOR UPDATE", &[&key])
            .await
            .map_err(pg)?
        else {
            return Ok(CancelAck::NotFound);
        };
        let status: String = row.get(0);
        /// What this request did.
        enum Did {
            Cancelled,
            Requested,
            Nothing,
        }
        let did = match status.as_str() {
            "queued" => {
                let next = RunState::cancelled_while_queued(by);
                let st = StateParams::of(&next);
                tx.cexecute(
                    &format!("UPDATE runs SET {STATE_SET} WHERE id = $1"),
                    &st.params(&key),
                )
                .await
                .map_err(pg)?;
                tx.cexecute("SELECT pg_notify($1, $2)", &[&CH_RUN, &id.to_string()])
                    .await
                    .map_err(pg)?;
                Did::Cancelled
            }
            "running" => {
                tx.cexecute(
                    "UPDATE runs SET cancel_requested = true, cancel_by = coalesce(cancel_by, $2), \
                     cancel_requested_at = coalesce(cancel_requested_at, $3) WHERE id = $1",
                    &[&key, &by, &micros(SystemTime::now())],
                )
                .await
                .map_err(pg)?;
                tx.cexecute("SELECT pg_notify($1, $2)", &[&CH_CANCEL, &id.to_string()])
                    .await
                    .map_err(pg)?;
                Did::Requested
            }
            _ => Did::Nothing,
        };
        let run = Self::get_run(&tx, id)
            .await?
            .ok_or(StoreError::NotFound(id))?;
        tx.commit().await.map_err(pg)?;
        Ok(match did {
            Did::Cancelled => CancelAck::CancelledQueued(run),
            Did::Requested => CancelAck::RequestedRunning(run),
            Did::Nothing => CancelAck::AlreadyFinished(run),
        })
    }

    /// The notification listener: a connection of its own that LISTENs on the three channels
    /// and turns notifications into signals and pokes; on any loss of the connection it sends a
    /// resync (a notification may have been missed) and reconnects with a backoff.
    async fn listen_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut pause = Duration::from_millis(100);
        loop {
            if stop.is_cancelled() {
                return;
            }
            let connected = tokio::select! {
                r = self.pg_config.connect(NoTls) => r,
                () = stop.cancelled() => return,
            };
            match connected {
                Ok((client, mut conn)) => {
                    let sql = format!("LISTEN {CH_QUEUED}; LISTEN {CH_RUN}; LISTEN {CH_CANCEL};");
                    let listen = client.batch_execute(&sql);
                    let mut listened = false;
                    tokio::pin!(listen);
                    let since = Instant::now();
                    loop {
                        let msg = tokio::select! {
                            r = &mut listen, if !listened => {
                                listened = true;
                                if let Err(e) = r {
                                    tracing::warn!(error = %e, "cannot LISTEN");
                                    break;
                                }
                                // Whatever happened while we were not listening.
                                let _ = self.signals.send(ClusterSignal::Resync);
                                self.poke_all();
                                continue;
                            }
                            m = futures_util::future::poll_fn(|cx| conn.poll_message(cx)) => m,
                            () = stop.cancelled() => return,
                        };
                        match msg {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                let id = n.payload().parse::<RunId>().ok();
                                match (n.channel(), id) {
                                    (CH_QUEUED, _) => {
                                        let _ = self.signals.send(ClusterSignal::Queued);
                                    }
                                    (CH_RUN, Some(id)) => self.notify_run(id),
                                    (CH_CANCEL, Some(id)) => {
                                        let _ = self.signals.send(ClusterSignal::Cancel(id));
                                    }
                                    _ => {}
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "the notification connection failed");
                                break;
                            }
                            None => break,
                        }
                    }
                    if since.elapsed() > Duration::from_secs(5) {
                        pause = Duration::from_millis(100);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot connect for notifications"),
            }
            let _ = self.signals.send(ClusterSignal::Resync);
            self.poke_all();
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

fn boxed<'a, T: Send + 'a>(
    f: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'a,
) -> StoreFuture<'a, T> {
    Box::pin(f)
}

impl RunStore for PgStore {
    fn create(&self, new: NewRun) -> StoreFuture<'_, Created> {
        boxed(self.create_run(new))
    }

    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>> {
        let key = key.clone();
        boxed(async move {
            let client = self.client().await?;
            Self::by_key(&client, &key).await
        })
    }

    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>> {
        boxed(async move {
            let client = self.client().await?;
            Self::get_run(&client, id).await
        })
    }

    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()> {
        boxed(self.transition_run(id, expect, next))
    }

    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()> {
        if lines.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        boxed(self.append(id, lines))
    }

    fn read_output(&self, id: RunId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Line>> {
        boxed(self.read_chunks(id, after, limit))
    }

    fn list(&self, query: ListQuery) -> StoreFuture<'_, Page> {
        boxed(self.list_runs(query))
    }

    fn purge(&self, policy: Retention, now: SystemTime) -> StoreFuture<'_, usize> {
        boxed(self.purge_runs(policy, now))
    }

    /// Nothing to recover per node: a crashed node's runs are the reaper's (when its lease
    /// lapses), and queued runs wait in the database for any node.
    fn recover(&self) -> StoreFuture<'_, Recovered> {
        Box::pin(std::future::ready(Ok(Recovered::default())))
    }

    fn cancel_requested(&self, id: RunId, at: SystemTime) -> StoreFuture<'_, ()> {
        boxed(async move {
            let client = self.client().await?;
            client
                .cexecute(
                    "UPDATE runs SET cancel_requested_at = coalesce(cancel_requested_at, $2) \
                     WHERE id = $1 AND status = 'running'",
                    &[&uuid(id), &micros(at)],
                )
                .await
                .map_err(pg)?;
            Ok(())
        })
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        boxed(async move {
            let client = self.client().await?;
            client
                .cexecute(
                    "INSERT INTO probe (k, v) VALUES (1, '\\x00') \
                     ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(())
        })
    }

    fn claim_deliveries(
        &self,
        now: SystemTime,
        hold: Duration,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DueDelivery>> {
        boxed(async move {
            let client = self.client().await?;
            // Several nodes deliver: a row is taken by one of them (SKIP LOCKED) and held.
            let rows = client
                .cquery(
                    "UPDATE deliveries SET next_at = $2 WHERE id IN ( \
                       SELECT id FROM deliveries WHERE state = 'pending' AND next_at <= $1 \
                       ORDER BY next_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                     RETURNING id, run_id, url, attempts, created_at",
                    &[&micros(now), &micros(now + hold), &(limit as i64)],
                )
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    let bad = |e: tokio_postgres::Error| {
                        StoreError::Backend(format!("bad delivery row: {e}"))
                    };
                    Ok(DueDelivery {
                        id: r.try_get(0).map_err(bad)?,
                        run_id: run_id(r.try_get(1).map_err(bad)?),
                        url: r.try_get(2).map_err(bad)?,
                        attempts: u32::try_from(r.try_get::<_, i32>(3).map_err(bad)?).unwrap_or(0),
                        created_at: super::record::from_micros(r.try_get(4).map_err(bad)?),
                    })
                })
                .collect()
        })
    }

    fn record_delivery(&self, id: String, result: DeliveryResult) -> StoreFuture<'_, ()> {
        boxed(async move {
            let client = self.client().await?;
            let DeliveryColumns {
                state,
                next_at,
                last_status: status,
                last_error: error,
                done_at: done,
            } = DeliveryColumns::of(&result);
            client
                .cexecute(
                    "UPDATE deliveries SET state = $2, attempts = attempts + 1, \
                       next_at = coalesce($3, next_at), last_status = $4, last_error = $5, \
                       done_at = $6 \
                     WHERE id = $1 AND state = 'pending'",
                    &[&id, &state, &next_at, &status, &error, &done],
                )
                .await
                .map_err(pg)?;
            Ok(())
        })
    }

    fn deliveries(&self, run: RunId) -> StoreFuture<'_, Vec<DeliveryState>> {
        boxed(async move {
            let client = self.client().await?;
            let rows = client
                .cquery(
                    "SELECT id, url, state, attempts, last_status, last_error, next_at, done_at \
                     FROM deliveries WHERE run_id = $1",
                    &[&uuid(run)],
                )
                .await
                .map_err(pg)?;
            let bad =
                |e: tokio_postgres::Error| StoreError::Backend(format!("bad delivery row: {e}"));
            let mut out = Vec::new();
            for r in &rows {
                let state: String = r.try_get(2).map_err(bad)?;
                let status = DeliveryStatus::parse(&state).ok_or_else(|| {
                    StoreError::Backend(format!("bad delivery state {state:?} in the store"))
                })?;
                let next_at: i64 = r.try_get(6).map_err(bad)?;
                out.push(DeliveryState {
                    id: r.try_get(0).map_err(bad)?,
                    url: r.try_get(1).map_err(bad)?,
                    status,
                    attempts: u32::try_from(r.try_get::<_, i32>(3).map_err(bad)?).unwrap_or(0),
                    last_status: r
                        .try_get::<_, Option<i32>>(4)
                        .map_err(bad)?
                        .and_then(|s| u16::try_from(s).ok()),
                    last_error: r.try_get(5).map_err(bad)?,
                    next_at: (status == DeliveryStatus::Pending)
                        .then(|| super::record::from_micros(next_at)),
                    done_at: r
                        .try_get::<_, Option<i64>>(7)
                        .map_err(bad)?
                        .map(super::record::from_micros),
                });
            }
            super::sort_deliveries(&mut out);
            Ok(out)
        })
    }

    fn cluster(self: Arc<Self>) -> Option<Arc<dyn Cluster>> {
        Some(self)
    }
}

impl Cluster for PgStore {
    fn node_id(&self) -> Uuid {
        self.node
    }

    fn lease_ttl(&self) -> Duration {
        self.settings.lease_ttl
    }

    fn heartbeat(&self) -> StoreFuture<'_, Heartbeat> {
        boxed(self.beat())
    }

    fn claim(&self) -> StoreFuture<'_, Option<Claimed>> {
        boxed(self.claim_run())
    }

    fn unclaim(&self, id: RunId, held: Held) -> StoreFuture<'_, ()> {
        boxed(self.unclaim_run(id, held))
    }

    fn reap(&self) -> StoreFuture<'_, usize> {
        boxed(self.reap_lapsed())
    }

    fn request_cancel(&self, id: RunId, by: Option<String>) -> StoreFuture<'_, CancelAck> {
        boxed(self.cancel_request(id, by))
    }

    fn signals(&self) -> broadcast::Receiver<ClusterSignal> {
        self.signals.subscribe()
    }

    fn watch(&self, id: RunId) -> watch::Receiver<u64> {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        w.entry(id)
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    fn release(&self, id: RunId) {
        self.claims().remove(&id);
    }

    fn holds(&self) -> HashSet<RunId> {
        self.claims().keys().copied().collect()
    }

    fn queued_by_module(&self) -> StoreFuture<'_, Vec<(String, usize)>> {
        boxed(async move {
            let client = self.client().await?;
            let rows = client
                .cquery(
                    "SELECT module_id, count(*) FROM runs WHERE status = 'queued' \
                     GROUP BY module_id",
                    &[],
                )
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    let module: String = r
                        .try_get(0)
                        .map_err(|e| StoreError::Backend(e.to_string()))?;
                    let n: i64 = r
                        .try_get(1)
                        .map_err(|e| StoreError::Backend(e.to_string()))?;
                    Ok((module, usize::try_from(n).unwrap_or(0)))
                })
                .collect()
        })
    }

    fn leave(&self) -> StoreFuture<'_, ()> {
        boxed(async move {
            let client = self.client().await?;
            client
                .cexecute("DELETE FROM nodes WHERE node_id = $1", &[&self.node])
                .await
                .map_err(pg)?;
            Ok(())
        })
    }

    fn listen(self: Arc<Self>, stop: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(self.listen_loop(stop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{Exit, RunStatus, Stream};
    use crate::store::RunPolicy;
    use crate::store::contract::pg;

    #[test]
    fn globs_become_like_patterns() {
        assert_eq!(like("report-*"), "report-%");
        assert_eq!(like("a_b?"), "a\\_b_");
    }

    /// Two nodes on one fresh schema.
    async fn two_nodes(ttl: Duration) -> (String, Arc<PgStore>, Arc<PgStore>) {
        let (schema, url) = pg::fresh_schema().await;
        let open = |addr: &str| {
            PgStore::open(PgSettings {
                url: url.clone(),
                addr: addr.into(),
                lease_ttl: ttl,
                max_queued: 1000,
                pool_size: 4,
            })
        };
        let a = open("a").await.expect("node a");
        let b = open("b").await.expect("node b");
        (schema, a, b)
    }

    fn queued(module: &str, policy: RunPolicy) -> NewRun {
        NewRun {
            run: Run::queued_for_test(module),
            key: None,
            held: Held {
                stdin: Some("input".into()),
                secrets: serde_json::Map::from_iter([("token".into(), "s3cret".into())]),
            },
            policy,
        }
    }

    fn line(seq: u64) -> Line {
        Line {
            seq,
            stream: Stream::Stdout,
            ts: SystemTime::now(),
            text: format!("line {seq}").into(),
            raw: None,
        }
    }

    fn done() -> RunState {
        RunState::Finished {
            started_at: Some(SystemTime::now()),
            pid: None,
            finished_at: SystemTime::now(),
            outcome: Outcome::Exited(Exit::Code(0)),
        }
    }

    /// The lease of `node` lapsed long ago (by the database's clock).
    async fn lapse(store: &PgStore, node: Uuid) {
        store
            .client()
            .await
            .unwrap()
            .execute(
                "UPDATE nodes SET lease_until = now() - interval '1 hour' WHERE node_id = $1",
                &[&node],
            )
            .await
            .unwrap();
    }

    /// Queued runs are claimed once each, by two nodes claiming at the same time, with what
    /// they need to start; a module's limit holds across both.
    #[tokio::test]
    async fn claims_are_exclusive_and_module_limits_hold_across_nodes() {
        let (schema, a, b) = two_nodes(Duration::from_secs(10)).await;
        let mut ids = HashSet::new();
        for i in 0..40 {
            let policy = RunPolicy {
                module_limit: (i % 4 == 0).then_some(2),
                retry_on_lost: false,
                max_attempts: 1,
            };
            let module = if i % 4 == 0 { "limited" } else { "free" };
            let Created::New(run) = a.create(queued(module, policy)).await.unwrap() else {
                panic!("new run");
            };
            ids.insert(run.id);
        }
        let claim_all = |s: Arc<PgStore>| async move {
            let mut got = Vec::new();
            while let Some(c) = s.claim().await.unwrap() {
                got.push(c);
            }
            got
        };
        let (ca, cb) = tokio::join!(claim_all(a.clone()), claim_all(b.clone()));
        let claimed: Vec<&Claimed> = ca.iter().chain(&cb).collect();
        let limited = claimed
            .iter()
            .filter(|c| c.run.module_id == "limited")
            .count();
        assert_eq!(limited, 2, "the module's limit is 2, cluster-wide");
        assert_eq!(claimed.len(), 30 + 2);
        let unique: HashSet<RunId> = claimed.iter().map(|c| c.run.id).collect();
        assert_eq!(unique.len(), claimed.len(), "no run is claimed twice");
        assert!(unique.is_subset(&ids));
        for c in &claimed {
            assert_eq!(c.run.attempt, 1);
            assert_eq!(c.held.stdin.as_deref(), Some("input"));
            assert_eq!(c.held.secrets["token"], "s3cret");
        }
        // A limited run ends: one more of its module may start.
        let first = claimed
            .iter()
            .find(|c| c.run.module_id == "limited")
            .unwrap();
        let owner = if ca.iter().any(|c| c.run.id == first.run.id) {
            &a
        } else {
            &b
        };
        owner
            .transition(first.run.id, Expect::Running, done())
            .await
            .unwrap();
        let next = b
            .claim()
            .await
            .unwrap()
            .expect("a limited run can start again");
        assert_eq!(next.run.module_id, "limited");
        assert!(b.claim().await.unwrap().is_none());
        pg::drop_schema(&schema).await;
    }

    /// A node whose lease lapsed loses its runs: a retryable one is queued again and claimed as
    /// attempt 2 (its output goes on after what attempt 1 stored), the other becomes `lost`;
    /// every later write of the old owner is refused.
    #[tokio::test]
    async fn a_lapsed_node_is_fenced_and_its_runs_reaped() {
        let (schema, a, b) = two_nodes(Duration::from_secs(1)).await;
        let retry = RunPolicy {
            module_limit: None,
            retry_on_lost: true,
            max_attempts: 2,
        };
        let Created::New(r1) = a.create(queued("retry", retry)).await.unwrap() else {
            panic!()
        };
        let Created::New(r2) = a
            .create(queued("once", RunPolicy::default()))
            .await
            .unwrap()
        else {
            panic!()
        };
        let c1 = a.claim().await.unwrap().unwrap();
        let c2 = a.claim().await.unwrap().unwrap();
        assert_eq!((c1.run.id, c2.run.id), (r1.id, r2.id));
        a.append_output(r1.id, vec![line(1), line(2)])
            .await
            .unwrap();
        lapse(&b, a.node_id()).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(b.reap().await.unwrap(), 2);
        assert_eq!(
            b.get(r2.id).await.unwrap().unwrap().status(),
            RunStatus::Lost
        );
        assert_eq!(
            b.get(r1.id).await.unwrap().unwrap().status(),
            RunStatus::Queued
        );
        let again = b.claim().await.unwrap().expect("queued again");
        assert_eq!(again.run.id, r1.id);
        assert_eq!(again.run.attempt, 2);
        assert_eq!(again.after_seq, 2);
        assert_eq!(
            again.held.stdin.as_deref(),
            Some("input"),
            "kept for the retry"
        );
        // The old owner's writes are refused, and it is told to stop.
        let mut signals = a.signals();
        let err = a.append_output(r1.id, vec![line(3)]).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
        assert_eq!(signals.try_recv().unwrap(), ClusterSignal::Fenced(r1.id));
        let err = a
            .transition(r2.id, Expect::Running, done())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
        // The new attempt writes; its output goes on after attempt 1's.
        b.append_output(r1.id, vec![line(3), line(4)])
            .await
            .unwrap();
        b.transition(r1.id, Expect::Running, done()).await.unwrap();
        let out: Vec<u64> = b
            .read_output(r1.id, 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|l| l.seq)
            .collect();
        assert_eq!(out, [3, 4], "attempt 1's output went with it");
        let run = b.get(r1.id).await.unwrap().unwrap();
        assert_eq!((run.status(), run.attempt), (RunStatus::Succeeded, 2));
        pg::drop_schema(&schema).await;
    }

    /// A node stopped in the middle of a transaction on one of its runs (here: a row lock held
    /// by an open transaction of its pool) does not keep the other nodes from reaping that run:
    /// the database ends the session once it has been idle in the transaction for a lease.
    #[tokio::test]
    async fn a_node_stopped_inside_a_transaction_does_not_block_the_reaper() {
        let ttl = Duration::from_secs(1);
        let (schema, a, b) = two_nodes(ttl).await;
        let Created::New(run) = a
            .create(queued("once", RunPolicy::default()))
            .await
            .unwrap()
        else {
            panic!()
        };
        a.claim().await.unwrap().unwrap();
        // What a paused node mid-append leaves: an open transaction holding the run's row.
        let mut held = a.client().await.unwrap();
        let tx = held.transaction().await.unwrap();
        tx.execute(
            "SELECT 1 FROM runs WHERE id = $1 FOR SHARE",
            &[&uuid(run.id)],
        )
        .await
        .unwrap();
        lapse(&b, a.node_id()).await;
        let start = std::time::Instant::now();
        loop {
            if b.reap().await.unwrap() == 1 {
                break;
            }
            assert!(
                start.elapsed() < ttl * 10,
                "the run was never reaped: the stopped node's lock still holds it"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            b.get(run.id).await.unwrap().unwrap().status(),
            RunStatus::Lost
        );
        // The stopped node's transaction is gone with its session.
        assert!(tx.commit().await.is_err(), "the session was ended");
        pg::drop_schema(&schema).await;
    }

    /// A cancel is a durable flag the owner's heartbeat reads; a queued run is cancelled at
    /// once and never claimed.
    #[tokio::test]
    async fn cancels_reach_the_owner_and_queued_runs_never_start() {
        let (schema, a, b) = two_nodes(Duration::from_secs(10)).await;
        let Created::New(r1) = a.create(queued("m", RunPolicy::default())).await.unwrap() else {
            panic!()
        };
        let Created::New(r2) = a.create(queued("m", RunPolicy::default())).await.unwrap() else {
            panic!()
        };
        assert_eq!(a.claim().await.unwrap().unwrap().run.id, r1.id);
        match b.request_cancel(r2.id, Some("ops".into())).await.unwrap() {
            CancelAck::CancelledQueued(run) => assert_eq!(run.status(), RunStatus::Cancelled),
            other => panic!("{other:?}"),
        }
        assert!(
            a.claim().await.unwrap().is_none(),
            "a cancelled run is not claimed"
        );
        assert!(matches!(
            b.request_cancel(r1.id, Some("ops".into())).await.unwrap(),
            CancelAck::RequestedRunning(_)
        ));
        let hb = a.heartbeat().await.unwrap();
        assert_eq!(hb.cancels, vec![(r1.id, Some("ops".to_owned()))]);
        assert!(hb.gone.is_empty());
        assert!(b.heartbeat().await.unwrap().cancels.is_empty());
        assert!(matches!(
            b.request_cancel(RunId::new(), None).await.unwrap(),
            CancelAck::NotFound
        ));
        pg::drop_schema(&schema).await;
    }
}
