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
//!                   │  one tracked task per run: spawn -> pump pipes -> wait/timeout/cancel
//!                   ▼                                        -> record final status
//!                runner::process (the only code that spawns or signals a process)
//!                   │ raw pipe bytes
//!                   ▼
//!                output::OutputLog (seq-numbered lines, byte budget, change signal)
//!                   ▲ readers keep their own cursor: replay + live, no gap, no duplicate
//!                store::RunStore (run records + output logs; MemoryStore today)
//! ```
//!
//! - [`config`]: the TOML file, validated once into typed settings and the module catalog.
//! - [`module`]: the catalog's types, request-parameter validation, argv/env building.
//! - [`run`]: domain types without I/O: ids, run modes, the run state machine, outcomes.
//! - [`output`]: the per-run output log and reader cursors.
//! - [`store`]: the run-record boundary ([`store::RunStore`]); [`store::MemoryStore`].
//! - [`runner`]: [`runner::ModuleRunner`] (scheduling, supervision, cancel) and
//!   [`execute_module`] (one-shot runs), both on the same process code.
//! - [`api`]: the only code that knows HTTP.
//! - [`app`]: wiring: build the state, serve a bound listener until a shutdown future fires,
//!   then shut down in order (stop accepting, cancel runs, end streams).
//!
//! # Locks and tasks
//!
//! Three kinds of std mutex, each with short critical sections and never held across
//! `.await`: the runner's scheduler state, the store's records, and each output log. The
//! scheduler lock is never held while calling the store. Every run task is spawned on the
//! runner's `TaskTracker` with a `run` span; shutdown waits for them with a deadline.
//! Readers of output never get pushed data: they copy from the log when its `watch` signal
//! fires, so no queue exists that could grow or lag.

pub mod api;
pub mod app;
pub mod config;
pub mod module;
pub mod output;
pub mod registry;
pub mod run;
pub mod runner;
pub mod store;
pub mod telemetry;

pub use run::RunMode;
pub use runner::{ExecError, ModuleOutput, execute_module};
