//! Wiring: open the store, recover what a previous run of modrun left, build the runner and
//! the router, serve a bound listener until a shutdown future fires, then shut down in order.
//! `reload` replaces the configuration in force while serving.

mod reload;

pub use reload::ReloadHandle;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::api::server::ServerSettings;
use crate::api::{self, AppState};
use crate::auth::Auth;
use crate::config::{Config, Live, Snapshot};
use crate::metrics::Metrics;
use crate::output::{OutputLimits, Redactor};
use crate::registry::Registry;
use crate::run::{Outcome, Run, RunState};
use crate::runner::{self, ModuleRunner, RunRequest, RunnerSettings};
use crate::store::{
    Expect, Held, MemoryStore, Metered, Retention, RunStore, SqliteStore, StoreError,
};

/// The runtime `modrun serve` runs on: tokio's multi-threaded scheduler (a worker per core),
/// with the workers' LIFO slot off in a build with `--cfg tokio_unstable` (which
/// `.cargo/config.toml` sets; see [`LIFO_SLOT_OFF`]).
///
/// The slot makes the task a worker has just woken run next on that worker, before the tasks
/// already waiting in its queue, and out of reach of the other worker's stealing. Under load
/// (every core busy, each run a chain of wake-ups: request, record, spawn, child's exit, answer)
/// that ordering cost more than it saved. Measured on the run-throughput load (50 connections
/// of `POST /runs?wait` for `/bin/true`, interleaved pairs on 2 cores): with the slot off, runs/s
/// +3-8% in memory and +3-4% with SQLite, the server's CPU per run -16 to -21% and -7 to -11%,
/// p99 latency -7 to -16%; the 1,000-line run-and-answer load +2-8% runs/s.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.enable_all().build()
}

/// Whether [`runtime`] turns the LIFO slot off: this build has `--cfg tokio_unstable`. A
/// `RUSTFLAGS` in the environment replaces the flag `.cargo/config.toml` gives, and modrun then
/// builds with the slot on.
pub const LIFO_SLOT_OFF: bool = cfg!(tokio_unstable);

/// How long start-up waits for the SIGKILLed leftovers of lost runs to die before it goes on.
const LEFTOVER_KILL_LIMIT: Duration = Duration::from_secs(2);

/// Why modrun cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store cannot be opened (locked, corrupt, too new, ...).
    #[error(transparent)]
    Store(#[from] crate::store::OpenError),
    /// Recovery failed.
    #[error("cannot recover the runs of the previous start: {0}")]
    Recover(#[from] StoreError),
    /// `runner.containment` cannot be had here.
    #[error("runner.containment: {0}")]
    Containment(String),
    /// The PostgreSQL store cannot be opened.
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] crate::store::PgOpenError),
}

/// The parent environment variables a child may inherit.
pub fn inherited_env(allow: &[String]) -> Vec<(String, String)> {
    allow
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect()
}

/// A built service, ready to serve.
pub struct App {
    config: Arc<Config>,
    registry: Arc<Registry>,
    runner: ModuleRunner,
    base_env: Arc<Vec<(String, String)>>,
    reload: ReloadHandle,
}

impl App {
    /// Open the store named by the config and build the runner. Recovery (runs that were
    /// executing become `lost` and their leftover processes are killed; queued runs are queued
    /// again, oldest first) happens in [`App::serve`], while `/readyz` says so.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let containment =
            runner::jail::init(config.runner.containment).map_err(StartError::Containment)?;
        tracing::info!(?containment, "how runs are held");
        let store: Arc<dyn RunStore> = match (&config.storage.url, &config.storage.path) {
            #[cfg(feature = "postgres")]
            (Some(url), _) => {
                let addr = config
                    .server
                    .advertise
                    .clone()
                    .unwrap_or_else(|| config.server.bind.to_string());
                let store = crate::store::PgStore::open(crate::store::PgSettings {
                    url: url.expose().to_owned(),
                    addr: addr.clone(),
                    lease_ttl: config.cluster.lease_ttl,
                    max_queued: config.runner.max_queued,
                    pool_size: config.storage.pool_size.get(),
                })
                .await?;
                tracing::info!(
                    store = %url.redacted(),
                    node_id = %crate::store::Cluster::node_id(&*store),
                    advertise = %addr,
                    lease_ttl_ms = config.cluster.lease_ttl.as_millis() as u64,
                    "run store: PostgreSQL, shared by the cluster's nodes"
                );
                store
            }
            #[cfg(not(feature = "postgres"))]
            (Some(_), _) => {
                unreachable!("storage.url is refused at load without the postgres feature")
            }
            (None, None) => Arc::new(MemoryStore::new()),
            (None, Some(dir)) => {
                let dir = dir.clone();
                let opened = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
                    .await
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                Arc::new(opened?)
            }
        };
        Ok(Self::with_store(config, store))
    }

    /// Build the service on a store that is already open (the store of [`App::build`], or one
    /// of the caller's).
    pub fn with_store(config: Config, store: Arc<dyn RunStore>) -> App {
        let metrics = Arc::new(Metrics::new());
        metrics.declare_modules(config.modules.iter().map(|m| m.id.as_str()));
        let store: Arc<dyn RunStore> = Metered::new(store, metrics.clone());
        let limits = OutputLimits {
            max_line_bytes: config.output.max_line_bytes.get(),
            max_run_bytes: config.output.max_run_bytes,
        };
        let registry = Arc::new(Registry::with_metrics(store, limits, metrics));
        let runner = ModuleRunner::with_registry(
            RunnerSettings {
                max_concurrent: config.runner.max_concurrent,
                max_queued: config.runner.max_queued,
                kill_grace: config.runner.kill_grace,
                output: limits,
            },
            registry.clone(),
        );
        let base_env = inherited_env(&config.runner.env_allow);
        for m in &config.modules {
            if let Err(why) = runner::check_module_program(m, &base_env) {
                tracing::warn!(module = %m.id, error = %why, "the module's program cannot be started: its runs will fail until it can (`modrun check-config` checks every module)");
            }
        }
        App {
            base_env: Arc::new(base_env),
            config: Arc::new(config),
            registry,
            runner,
            reload: ReloadHandle::default(),
        }
    }

    /// A handle that asks the server, once it serves, to reload its configuration file.
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// What the previous start left: runs that were executing become `lost` (their leftover
    /// processes are killed), queued runs are queued again, oldest first.
    async fn recover(&self) -> Result<(), StoreError> {
        let recovered = self.registry.store().recover().await?;
        let killed = runner::kill_leftovers(&recovered.lost, LEFTOVER_KILL_LIMIT).await;
        let metrics = self.registry.metrics();
        for (run, killed) in recovered.lost.iter().zip(killed) {
            tracing::warn!(run_id = %run.id, module = %run.module_id, killed, "run was executing when modrun stopped: marked lost");
            metrics.run_finished(&run.module_id, crate::run::RunStatus::Lost, None);
        }
        let n = recovered.queued.len();
        for (run, held) in recovered.queued {
            self.requeue(run, held).await?;
        }
        if n > 0 || !recovered.lost.is_empty() {
            tracing::info!(
                lost = recovered.lost.len(),
                queued = n,
                "recovered the runs of the previous start"
            );
        }
        Ok(())
    }

    async fn requeue(&self, run: Run, held: Held) -> Result<(), StoreError> {
        let id = run.id;
        match request_for(&self.config, &self.base_env, &run, held) {
            Ok(req) => {
                let redactor = Redactor::new(&req.secrets).map(Arc::new);
                self.registry.adopt(run, redactor, 0);
                self.runner.requeue(id, req);
            }
            Err(msg) => {
                tracing::warn!(run_id = %id, error = %msg, "queued run cannot start after the restart");
                let next = RunState::Finished {
                    started_at: None,
                    pid: None,
                    finished_at: std::time::SystemTime::now(),
                    outcome: Outcome::SpawnFailed(msg),
                };
                self.registry
                    .store()
                    .transition(id, Expect::Queued, next)
                    .await?;
            }
        }
        Ok(())
    }

    /// The runner.
    pub fn runner(&self) -> &ModuleRunner {
        &self.runner
    }

    /// Serve `listener` until `shutdown` completes, then:
    /// 1. drain: every request but the probes and the metrics gets 503 (`/readyz` too, so that
    ///    a load balancer stops sending; `/healthz` stays 200);
    /// 2. cancel running runs (the same path as `DELETE`), leave queued runs queued, and wait
    ///    for the running ones to record their final status (at most `kill_grace` + 1 s);
    /// 3. stop accepting connections, send every open SSE stream its `end` event and close
    ///    it; answer pending `?wait`s;
    /// 4. persist the remaining output, and return once the connections are closed.
    ///
    /// Until start-up recovery is done, only the probes, the metrics and the spec are served
    /// (`/readyz` 503 saying why).
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> std::io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let config = self.config.clone();
        let addr = listener.local_addr()?;
        let ip = addr.ip();
        let anonymous = config
            .auth
            .anonymous_on(ip)
            .map_err(std::io::Error::other)?;
        let auth = Auth::new(&config.auth.tokens, anonymous);
        tracing::info!(
            tokens = config.auth.tokens.len(),
            anonymous,
            "API access: {}",
            match (config.auth.tokens.is_empty(), anonymous) {
                (true, _) => "anyone who reaches the port (no token configured)",
                (false, true) => "tokens, and anonymous requests (auth.allow_anonymous)",
                (false, false) => "API tokens only",
            }
        );
        let connections = connection_limit(&config);
        let streams = config
            .sse
            .max_streams
            .map_or((connections / 2).max(1), |n| n.get());
        tracing::info!(
            max_connections = connections,
            max_streams = streams,
            tls = config.server.tls.is_some(),
            "connection limits"
        );
        let live = Arc::new(Live::new(Snapshot {
            config: config.clone(),
            auth: Arc::new(auth),
            base_env: self.base_env.clone(),
        }));
        live.set_bound(ip);
        let state =
            AppState::with_live(live.clone(), self.runner.clone()).with_stream_limit(streams);
        // Until recovery is done, only the probes, the metrics and the spec are served.
        state.starting.store(true, Ordering::Relaxed);
        let router = api::router(state.clone());

        let stop_accepting = CancellationToken::new();
        let server = api::server::serve(
            listener,
            router,
            ServerSettings {
                header_timeout: config.server.header_timeout,
                idle_timeout: config.server.idle_timeout,
                max_connections: connections,
                tls: config.server.tls.as_ref().map(|t| t.config.clone()),
            },
            stop_accepting.clone(),
        );
        tokio::pin!(server);
        tokio::pin!(shutdown);

        let mut served = None;
        let recovered = {
            let recovery = self.recover();
            tokio::pin!(recovery);
            tokio::select! {
                r = &mut recovery => Some(r),
                r = &mut server => {
                    served = Some(r);
                    None
                }
                () = &mut shutdown => None,
            }
        };
        let App {
            config,
            registry,
            runner,
            reload,
            ..
        } = self;
        let ready = matches!(recovered, Some(Ok(())));
        let failed = match recovered {
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot recover the runs of the previous start; stopping");
                Some(e)
            }
            _ => None,
        };

        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();
        let cluster = registry.cluster().cloned();
        if ready {
            state.starting.store(false, Ordering::Relaxed);
            // Said once the server is ready (recovery done): what scripts wait for.
            tracing::info!(
                config = %config.file.display(),
                modules = config.modules.len(),
                "listening on http://{addr}"
            );
            background.spawn(
                registry
                    .clone()
                    .flush_loop(stop_background.clone())
                    .instrument(tracing::info_span!("flusher")),
            );
            background.spawn(
                registry
                    .clone()
                    .purge_loop(
                        Retention {
                            keep_runs: config.retention.keep_runs,
                            keep_for: config.retention.keep_for,
                        },
                        stop_background.clone(),
                    )
                    .instrument(tracing::info_span!("retention")),
            );
            if let Some(cluster) = &cluster {
                background.spawn(
                    cluster
                        .clone()
                        .listen(stop_background.clone())
                        .instrument(tracing::info_span!("cluster_listen")),
                );
                let catalog = live.clone();
                let builder: Arc<runner::RequestBuilder> =
                    Arc::new(move |run: &Run, held: Held| {
                        let now = catalog.get();
                        request_for(&now.config, &now.base_env, run, held)
                    });
                if let Some(node) = runner.cluster_loop(builder, stop_background.clone()) {
                    background.spawn(node.instrument(tracing::info_span!("cluster")));
                }
            }
            match crate::callbacks::Deliverer::new(
                registry.store().clone(),
                live.clone(),
                registry.metrics().clone(),
                registry.ended(),
            ) {
                Ok(deliverer) => {
                    background.spawn(
                        deliverer
                            .run(stop_background.clone())
                            .instrument(tracing::info_span!("callbacks")),
                    );
                }
                Err(e) => tracing::error!(error = %e, "completion callbacks cannot be sent"),
            }
            let reloader = reload::Reloader {
                file: config.file.clone(),
                live: live.clone(),
                metrics: registry.metrics().clone(),
                bind: config.server.bind,
            };
            background.spawn(
                reload::reload_loop(reload.0.clone(), reloader, stop_background.clone())
                    .instrument(tracing::info_span!("reload")),
            );
            tokio::select! {
                r = &mut server => served = Some(r),
                () = &mut shutdown => {}
            }
        }
        background.close();

        if served.is_none() {
            tracing::info!("shutting down: new requests get 503, cancelling running runs");
        }
        state.draining.store(true, Ordering::Relaxed);
        runner.shutdown();
        let grace = config.runner.kill_grace + Duration::from_secs(1);
        // Keep serving the open connections (streams see the runs end) while runs stop.
        let idle = {
            let wait = runner.wait_idle(grace);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    idle = &mut wait => break idle,
                    r = &mut server, if served.is_none() => served = Some(r),
                }
            }
        };
        if !idle {
            tracing::warn!("some runs did not stop within kill_grace + 1s");
        }
        stop_accepting.cancel();
        state.streams_end.cancel();
        stop_background.cancel();
        if served.is_none() {
            match tokio::time::timeout(Duration::from_millis(700), &mut server).await {
                Ok(r) => served = Some(r),
                Err(_) => tracing::warn!("connections still open after shutdown; closing them"),
            }
        }
        if tokio::time::timeout(Duration::from_millis(300), background.wait())
            .await
            .is_err()
        {
            tracing::warn!("the last output flush did not finish in time");
        }
        if let Some(cluster) = cluster {
            // The other nodes need not wait for this node's lease to lapse.
            match tokio::time::timeout(Duration::from_secs(1), cluster.leave()).await {
                Ok(Ok(())) => tracing::info!("left the cluster"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot leave the cluster; its lease will lapse")
                }
                Err(_) => tracing::warn!("cannot leave the cluster in time; its lease will lapse"),
            }
        }
        tracing::info!(queued = runner.queued(), "stopped");
        served.transpose()?;
        match failed {
            Some(e) => Err(std::io::Error::other(StartError::Recover(e))),
            None => Ok(()),
        }
    }
}

/// The request that starts a stored run (queued before a restart, or claimed from a shared
/// store), from this node's module catalog; `Err` says why it cannot start (its module is gone,
/// its parameters are no longer valid).
fn request_for(
    config: &Config,
    base_env: &[(String, String)],
    run: &Run,
    held: Held,
) -> Result<RunRequest, String> {
    let mut parameters = run.parameters.clone();
    parameters.extend(held.secrets);
    let module = config.module(&run.module_id).ok_or_else(|| {
        format!(
            "module `{}` is no longer in the configuration",
            run.module_id
        )
    })?;
    let params = module.validate(&parameters).map_err(|errors| {
        format!(
            "the parameters are no longer valid for module `{}`: {}",
            module.id,
            errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let mut req = RunRequest::for_module(
        module,
        params,
        base_env,
        run.timeout.min(config.module_timeout(module)),
        run.mode,
    );
    if module.stdin_parameter().is_none() {
        req.stdin = held.stdin;
    }
    req.created_by = run.created_by.clone();
    Ok(req)
}

/// `server.max_connections`, or, when it is not set, what the file-descriptor limit leaves
/// after room for the runs (their pipes), the store and the log: three quarters of the rest.
pub fn connection_limit(config: &Config) -> usize {
    if let Some(n) = config.server.max_connections {
        return n.get();
    }
    let fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let reserved = 256 + 8 * config.runner.max_concurrent.get() as u64;
    let left = fds.saturating_sub(reserved) * 3 / 4;
    usize::try_from(left.clamp(16, 1 << 20)).unwrap_or(16)
}

/// Build and serve in one step (see [`App::build`] and [`App::serve`]).
pub async fn serve<F>(mut config: Config, listener: TcpListener, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    config.server.bind = listener.local_addr()?;
    App::build(config)
        .await
        .map_err(std::io::Error::other)?
        .serve(listener, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    /// The build keeps `.cargo/config.toml`'s `--cfg tokio_unstable`: without it the runtime
    /// keeps the LIFO slot, which costs throughput (see [`super::runtime`]).
    #[test]
    #[expect(
        clippy::assertions_on_constants,
        reason = "the constant is what this build was given; a test, not a compile error, says so"
    )]
    fn the_runtime_is_built_without_the_lifo_slot() {
        assert!(
            super::LIFO_SLOT_OFF,
            "built without --cfg tokio_unstable (a RUSTFLAGS in the environment replaces .cargo/config.toml's)"
        );
        let rt = super::runtime().unwrap();
        assert_eq!(rt.block_on(async { 1 + 1 }), 2);
    }
}
