//! What a run is asked with: the runner's limits, one run's request (a command line, or a
//! declared module with valid parameters), and the errors of submitting and cancelling.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use super::handle::RunHandle;
use crate::module::{Limits, Module, RunAs, ValidParams};
use crate::output::OutputLimits;
use crate::run::{Run, RunId, RunMode};
use crate::store::{IdempotencyKey, RunPolicy, StoreError};

/// Limits of a [`ModuleRunner`](super::ModuleRunner).
#[derive(Debug, Clone, Copy)]
pub struct RunnerSettings {
    /// Runs executing at once, all modules together.
    pub max_concurrent: NonZeroUsize,
    /// Runs waiting for a slot; past it [`ModuleRunner::submit`](super::ModuleRunner::submit) refuses.
    pub max_queued: usize,
    /// SIGTERM -> wait this long -> SIGKILL, on cancel and timeout.
    pub kill_grace: Duration,
    /// Per-run output limits.
    pub output: OutputLimits,
}

impl Default for RunnerSettings {
    /// The defaults of `[runner]` and `[output]` in the config file (which takes them from
    /// here).
    fn default() -> Self {
        Self {
            max_concurrent: NonZeroUsize::new(4).expect("not zero"),
            max_queued: 1000,
            kill_grace: Duration::from_secs(5),
            output: OutputLimits::default(),
        }
    }
}

/// One run to submit. Build it with [`RunRequest::new`] (a command line) or
/// [`RunRequest::for_module`] (a declared module and valid parameters), then adjust the fields.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The module's id (any label for ad-hoc runs); per-module limits apply by this id.
    pub module_id: String,
    /// Display name.
    pub module_name: String,
    /// Program then arguments. A bare program name is looked up on the child's `PATH`; a
    /// relative path resolves against `cwd`.
    pub argv: Vec<String>,
    /// Parameters to record with the run (informational).
    pub parameters: Map<String, Value>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The child's whole environment (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// Text written to the child's stdin, then closed; `None` for a null stdin.
    pub stdin: Option<String>,
    /// Stop the run (TERM, grace, KILL) after this long.
    pub timeout: Duration,
    /// How to spawn it.
    pub mode: RunMode,
    /// Per-module limit on runs executing at once.
    pub max_concurrent: Option<NonZeroUsize>,
    /// Deduplicates submissions: a known key with an equal fingerprint returns the first run.
    pub idempotency: Option<IdempotencyKey>,
    /// The name of the API token that asked for it (recorded as the run's `created_by`).
    pub created_by: Option<String>,
    /// Values masked as `***` in the run's argv and output (a module's secrets, secret
    /// parameter values).
    pub secrets: Vec<String>,
    /// The secret parameters' values (`parameters` shows them as `***`), kept by the store
    /// while the run is queued.
    pub secret_params: Map<String, Value>,
    /// Resource limits set in the child.
    pub limits: Limits,
    /// The user the child runs as (`None`: modrun's own).
    pub run_as: Option<RunAs>,
    /// How a shared store schedules it (cluster-wide module limit, retry of a lost run).
    pub policy: RunPolicy,
    /// The id of the HTTP request that asked for it, for its log lines (`None` from the
    /// library, and for a run claimed from the shared queue by another node).
    pub request_id: Option<String>,
    /// URLs told when the run ends (the module's, then the request's).
    pub callbacks: Vec<String>,
}

impl RunRequest {
    /// An ad-hoc run of `argv` in the current directory, with the parent's environment, a one
    /// hour timeout and the automatic mode.
    pub fn new<I, S>(module_id: impl Into<String>, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let module_id = module_id.into();
        Self {
            module_name: module_id.clone(),
            module_id,
            argv: argv.into_iter().map(Into::into).collect(),
            parameters: Map::new(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env: std::env::vars().collect(),
            stdin: None,
            timeout: Duration::from_secs(3600),
            mode: RunMode::Auto,
            max_concurrent: None,
            idempotency: None,
            created_by: None,
            secrets: Vec::new(),
            secret_params: Map::new(),
            limits: Limits::default(),
            run_as: None,
            policy: RunPolicy {
                module_limit: None,
                retry_on_lost: false,
                max_attempts: 1,
            },
            request_id: None,
            callbacks: Vec::new(),
        }
    }

    /// A run of a declared module with parameters that passed [`Module::validate`]. The child's
    /// environment is `base_env` (the variables the operator allows it to inherit), then the
    /// module's env, then env parameters; its stdin is the stdin parameter's value, if the
    /// module has one. Secret parameters are recorded as `***`, their values kept aside.
    pub fn for_module(
        module: &Module,
        params: ValidParams,
        base_env: &[(String, String)],
        timeout: Duration,
        mode: RunMode,
    ) -> Self {
        let inv = module.invocation(&params);
        let secrets = module.secrets_of(&params);
        let secret_params = params.secret_values(module);
        let parameters = params.shown(module);
        let mut env: Vec<(String, String)> = base_env.to_vec();
        for (k, v) in inv.env {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        Self {
            module_id: module.id.clone(),
            module_name: module.name.clone(),
            argv: inv.argv,
            parameters,
            cwd: module.cwd.clone(),
            env,
            stdin: inv.stdin,
            timeout,
            mode,
            max_concurrent: module.max_concurrent,
            idempotency: None,
            created_by: None,
            secrets,
            secret_params,
            limits: module.limits,
            run_as: module.run_as.clone(),
            policy: RunPolicy {
                module_limit: module.max_concurrent.map(|n| n.get()),
                retry_on_lost: module.retry_on_lost,
                max_attempts: module.max_attempts,
            },
            request_id: None,
            callbacks: module.callbacks.clone(),
        }
    }
}

/// Why a submission was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// `max_queued` runs are waiting.
    #[error("the queue is full ({0} runs waiting)")]
    QueueFull(usize),
    /// The runner is shutting down.
    #[error("modrun is shutting down")]
    ShuttingDown,
    /// The request has no program.
    #[error("argv is empty: a run needs a program")]
    EmptyArgv,
    /// The idempotency key was used with a different request.
    #[error("the idempotency key was already used with a different request")]
    IdempotencyConflict,
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

/// Why a cancel did nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CancelError {
    /// No such run.
    #[error("run {0} not found")]
    NotFound(RunId),
    /// It already finished.
    #[error("run {} already finished ({})", .0.id, .0.status())]
    AlreadyFinished(Box<Run>),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

/// What [`ModuleRunner::submit`](super::ModuleRunner::submit) did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new run was created.
    New(RunHandle),
    /// The idempotency key matched an existing run.
    Existing(RunHandle),
}

impl Submitted {
    /// The handle, whichever it was.
    pub fn into_handle(self) -> RunHandle {
        match self {
            Submitted::New(h) | Submitted::Existing(h) => h,
        }
    }
}
