//! Reloading the configuration file while serving (SIGHUP in `modrun serve`). The whole new
//! file is validated first; if it is invalid the configuration in force stays and the log says
//! why. If it is valid, new requests and new runs use it at once (the module catalog, the
//! tokens, timeouts, run modes, the environment children inherit, the SSE keep-alive); runs
//! already queued or running keep the definition they were created with. What cannot change
//! while serving (the listener, the store, the cluster, the log format, output limits,
//! retention, the runner's global limits, containment) is reported and kept until a restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::{Config, Live, Snapshot};
use crate::metrics::{Metrics, ResultLabel};

/// Asks a serving [`super::App`] to reload its configuration file. Cheap to clone.
///
/// Overflow policy: requests that arrive while a reload is pending or running coalesce into
/// one more reload (a `Notify` keeps at most one wake-up), which reads the file as it is then.
#[derive(Clone, Debug, Default)]
pub struct ReloadHandle(pub(super) Arc<Notify>);

impl ReloadHandle {
    /// Reload the configuration file soon; the log and `modrun_config_reloads_total` say how
    /// it went.
    pub fn request(&self) {
        self.0.notify_one();
    }
}

/// What a reload needs.
pub(super) struct Reloader {
    /// The configuration file, as it was loaded at start.
    pub(super) file: PathBuf,
    /// The configuration in force.
    pub(super) live: Arc<Live>,
    /// Where the reloads are counted (and the new modules' series declared).
    pub(super) metrics: Arc<Metrics>,
    /// The address the server listens on (a changed `server.bind` needs a restart).
    pub(super) bind: SocketAddr,
}

/// Reload whenever `wake` fires, until `stop`.
pub(super) async fn reload_loop(wake: Arc<Notify>, reloader: Reloader, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = stop.cancelled() => return,
        }
        let result = match reloader.reload().await {
            Ok(()) => "ok",
            Err(why) => {
                tracing::warn!(error = %why, "configuration reload failed; the configuration in force stays");
                "error"
            }
        };
        reloader
            .metrics
            .config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

impl Reloader {
    async fn reload(&self) -> Result<(), String> {
        let file = self.file.clone();
        let mut next = tokio::task::spawn_blocking(move || Config::load(&file))
            .await
            .map_err(|e| format!("the reload task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let now = self.live.get();
        let old = &now.config;
        let ip = self.live.bound().unwrap_or(self.bind.ip());
        let anonymous = next.auth.anonymous_on(ip)?;
        let ignored = keep_restart_only(old, &mut next);
        let base_env = super::inherited_env(&next.runner.env_allow);
        for m in &next.modules {
            let unchanged = old
                .module(&m.id)
                .is_some_and(|o| format!("{o:?}") == format!("{m:?}"));
            if !unchanged && let Err(why) = crate::runner::check_module_program(m, &base_env) {
                tracing::warn!(module = %m.id, error = %why, "the module's program cannot be started: its runs will fail until it can");
            }
        }
        let ids = |c: &Config| c.modules.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        let (old_ids, new_ids) = (ids(old), ids(&next));
        let added: Vec<String> = new_ids
            .iter()
            .filter(|i| !old_ids.contains(i))
            .cloned()
            .collect();
        let removed: Vec<String> = old_ids
            .iter()
            .filter(|i| !new_ids.contains(i))
            .cloned()
            .collect();
        let changed: Vec<String> = next
            .modules
            .iter()
            .filter(|m| {
                old.module(&m.id)
                    .is_some_and(|o| format!("{o:?}") != format!("{m:?}"))
            })
            .map(|m| m.id.clone())
            .collect();
        self.metrics
            .declare_modules(next.modules.iter().map(|m| m.id.as_str()));
        let tokens = next.auth.tokens.len();
        let auth = Arc::new(Auth::new(&next.auth.tokens, anonymous));
        self.live.replace(Snapshot {
            config: Arc::new(next),
            auth,
            base_env: Arc::new(base_env),
        });
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(",")
            }
        };
        tracing::info!(
            modules = new_ids.len(),
            added = %list(&added),
            removed = %list(&removed),
            changed = %list(&changed),
            tokens,
            "configuration reloaded"
        );
        if !ignored.is_empty() {
            tracing::warn!(
                keys = %ignored.join(", "),
                "these settings changed in the file but take effect only at the next start"
            );
        }
        Ok(())
    }
}

/// Put back into `next` what cannot change while serving, as `old` has it; returns the
/// sections (or keys) whose value in the file differs, for the log.
///
/// Compared through their `Debug` text: every settings type has one (secrets in it are never
/// printed from here, only compared).
fn keep_restart_only(old: &Config, next: &mut Config) -> Vec<&'static str> {
    fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }
    let mut ignored = Vec::new();
    // The listener is the one bound at start (`--bind` may have chosen it).
    next.server.bind = old.server.bind;
    if !same(&old.server, &next.server) {
        ignored.push("server");
    }
    next.server = old.server.clone();
    if !same(&old.storage, &next.storage) {
        ignored.push("storage");
    }
    next.storage = old.storage.clone();
    if !same(&old.cluster, &next.cluster) {
        ignored.push("cluster");
    }
    next.cluster = old.cluster;
    if !same(&old.log, &next.log) {
        ignored.push("log");
    }
    next.log = old.log;
    if !same(&old.output, &next.output) {
        ignored.push("output");
    }
    next.output = old.output;
    if !same(&old.retention, &next.retention) {
        ignored.push("retention");
    }
    next.retention = old.retention;
    if next.sse.max_streams != old.sse.max_streams {
        ignored.push("sse.max_streams");
    }
    next.sse.max_streams = old.sse.max_streams;
    let (o, n) = (&old.runner, &mut next.runner);
    if n.max_concurrent != o.max_concurrent {
        ignored.push("runner.max_concurrent");
    }
    if n.max_queued != o.max_queued {
        ignored.push("runner.max_queued");
    }
    if n.kill_grace != o.kill_grace {
        ignored.push("runner.kill_grace");
    }
    if !same(&o.containment, &n.containment) {
        ignored.push("runner.containment");
    }
    n.max_concurrent = o.max_concurrent;
    n.max_queued = o.max_queued;
    n.kill_grace = o.kill_grace;
    n.containment = o.containment;
    ignored
}
