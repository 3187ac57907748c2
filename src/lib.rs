//! modrun runs operator-declared programs ("modules") on demand over HTTP and streams their
//! output live; the same crate is a library for running them from Rust.
//!
//! # Map
//!
//! ```text
//!  HTTP client ──► api (axum router, handlers, SSE, problem+json errors, wire DTOs)
//!                   │  POST /runs: validate against the module catalog (module), submit
//!                   ▼
//!                runner::ModuleRunner ── queue (FIFO, bounded) + slots (global + per module)
//!                   │  submit: recorded in a task of its own (a dropped caller strands
//!                   │  nothing); recorded `running` at once when a slot is free
//!                   │  one tracked task per run: spawn -> pump pipes -> wait/timeout/cancel
//!                   ▼                          -> flush output -> record final status
//!                runner::process (the only code that spawns or signals a process)
//!                   │ raw pipe bytes (readers pause while the unpersisted backlog is full)
//!                   ▼
//!                output::OutputLog (seq-numbered lines, byte budget, window, change signal)
//!                   │ flusher task: batches every 50 ms
//!                   ▼
//!                registry::Registry (live runs in memory; everything else from the store)
//!                   │ readers: registry::Cursor (memory window, else the store): replay + live
//!                   ▼
//!                store::RunStore (async trait): SqliteStore (default) | MemoryStore
//!                                               | PgStore (storage.url: a cluster's shared store)
//!
//!  cluster mode (PgStore): runner::cluster loops on every node: claimer (queued run + free
//!  slot -> claim in the database), heartbeat (lease, cancel flags, runs taken over, reaper of
//!  lapsed nodes), signals (LISTEN/NOTIFY hints); readers follow runs of other nodes by polling
//!  the store, woken by those hints
//! ```
//!
//! - [`config`] — the TOML file, validated once into typed settings and the module catalog
//!   (`config::raw`: the file's serde shape and value parsers; `config::build`: sections,
//!   storage, tokens; `config::modules`: the catalog; `config::env`: `MODRUN_<SECTION>__<KEY>`
//!   overrides, applied before validation); [`config::Live`] is the snapshot in force, which a
//!   reload replaces whole.
//! - [`callbacks`] — completion callbacks: Standard Webhooks signing, URL allow-list, and the
//!   [`callbacks::Deliverer`] (a tracked task on every node) that claims due deliveries from
//!   the store (written there by the store itself, in the transaction of the run's final
//!   status), POSTs them without following redirects and records each attempt, with backoff.
//! - [`metrics`] — the Prometheus metrics (`prometheus-client`): counters and histograms
//!   updated where things happen, gauges of state read at scrape time; the store's writes are
//!   timed by `store::Metered`.
//! - [`auth`] — API tokens (stored as SHA-256), scopes and module patterns; the API checks every
//!   route's scope in one middleware (`api::access`), fail closed.
//! - [`module`] — the catalog's types, request-parameter validation, argv/env building.
//! - [`run`] — domain types without I/O: ids, run modes, output lines (their [`run::Text`]
//!   shares one buffer among the lines of a read or of a stored chunk), the run state machine,
//!   outcomes.
//! - [`output`] — the per-run output log (budget, persisted window, change signal), its line
//!   splitter (`output::lines`, linear in the bytes however long a line gets) and the redactor
//!   that masks a run's secrets in every line, also across reads and cuts (`output::redact`).
//! - [`registry`] — live runs in front of the store; `registry::persist` (the output flusher,
//!   run ends, the retention purger, store outages: bounded buffering, held-back run ends,
//!   a probe, [`registry::StoreHealth`] for readiness), `registry::cursor` (readers) and
//!   `registry::events` (the feed of run changes: a bounded ring with resumable ids).
//! - [`store`] — the persistence boundary ([`store::RunStore`], plus [`store::Cluster`] for a
//!   store that several nodes share): the embedded SQLite store (writer thread with group
//!   commit, a checkpointer thread beside it, read pool, migrations, lock file), the memory
//!   store, and the PostgreSQL store
//!   (`store::postgres`, feature `postgres`: claims with `SKIP LOCKED`, leases by the database
//!   clock, fenced writes, durable cancel flags, reaper, LISTEN/NOTIFY); `store::record` is the
//!   row codec the engines share, `store::chunk` the output-chunk codec (fixed and compact
//!   line framing; both read everywhere), `store::segments` the SQLite store's output bytes
//!   in append-only segment files (synced before each checkpoint, CRC-checked, deleted with
//!   their last row); `store::contract` one test suite that every engine passes.
//! - [`runner`] — [`runner::ModuleRunner`] (`runner::request`: what a run is asked with;
//!   `runner::sched`: queue, slots, recording, cancel; `runner::supervise`: one run's task;
//!   `runner::handle`: a run's handle; `runner::cluster`: the node's loops on a shared store)
//!   and [`execute_module`] (one-shot runs), both on the same
//!   process code: `runner::process`
//!   (the drivers), `runner::program` (program resolution, spawn errors: in full for the log,
//!   without server paths for clients), `runner::group` (group signals, `/proc` scans),
//!   `runner::jail` (containment: a cgroup per run from a pool, with a guard process that
//!   kills the pool if modrun dies; the subreaper fallback; rlimits).
//!   Children are started by `runner::spawn` with `clone(CLONE_VM | CLONE_VFORK)` (not fork:
//!   see its docs), sharing the descriptor table until the child copies its bottom, where
//!   `runner::fd_table` reserves low numbers for its stdio; `clone3` (in `runner::spawn::clone3`)
//!   where the kernel has it, so that the child is born in its cgroup. These are the crate's
//!   documented exceptions to `unsafe_code = "deny"`.
//! - [`api`] — the only code that knows HTTP. `api::events` is `GET /events` (every run's
//!   changes as SSE, from the registry's feed, `registry::events`); `api::session` the
//!   dashboard's sign-in cookie (checked with the CSRF header in `api::access`);
//!   `api::dashboard` serves the page of `ui/`, compiled in.
//!   `api::server` is the connection loop (hyper under
//!   the router): header and idle timeouts, the connection limit (503 past it, even out of file
//!   descriptors), TLS ([`tls`]), graceful shutdown. Domain errors become problem+json in one place
//!   (`api::error`): a store outage is a 503 with a plain reason, an internal failure a 500 that
//!   shows only the request id.
//! - [`client`] — a client of the HTTP API ([`client::Client`]: problem+json as one-line
//!   errors, `POST /runs` retried under one Idempotency-Key, a run's stream followed across
//!   reconnects with `Last-Event-ID`; `client::sse` parses event streams) and the binary's
//!   client commands on it (`client::cli`: `run`, `runs`, `logs`, `cancel`, `modules`, their
//!   exit codes).
//! - [`telemetry`] — logging through a bounded queue drained by one thread: a slow or broken
//!   log sink drops (and counts) lines, never blocks a request or a run.
//! - [`app`] — wiring: open the store, serve a bound listener (503 but for the probes while
//!   start-up recovery runs: running -> lost, queued -> queued again), reload the configuration
//!   on request (`app::reload`, SIGHUP), and when a shutdown future fires shut down in order
//!   (drain with 503, cancel runs, stop accepting, end streams, last flush); `app::runtime` is
//!   the tokio runtime `modrun serve` runs on (the workers' LIFO slot off).
//!
//! # Locks, tasks and bounds
//!
//! std mutexes only, each with short critical sections and never held across `.await`: the
//! runner's scheduler state, the registry's live map and recent-runs cache, each output log,
//! and the SQLite read pool. The scheduler lock is never held while calling the registry. Every run task is spawned
//! on the runner's `TaskTracker` with a `run` span; the flusher and the purger on the app's;
//! shutdown waits for them with deadlines. Readers of output never get pushed data: they copy
//! from the log (or the store) when its `watch` signal fires, so no queue exists that could
//! grow or lag. The store's writer channel is bounded by construction (every sender awaits its
//! reply; senders are bounded by `max_queued` and the runs holding a slot).

pub mod api;
pub mod app;
pub mod auth;
pub mod callbacks;
pub mod client;
pub mod config;
pub mod metrics;
pub mod module;
pub mod output;
pub mod registry;
pub mod run;
pub mod runner;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use run::RunMode;
pub use runner::{ExecError, ModuleOutput, execute_module};
