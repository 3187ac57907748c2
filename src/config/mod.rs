//! Typed settings, read once from a TOML file and validated at load. Every error names the
//! file, the dotted key (`modules[2].parameters[0].type`) and the problem.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::auth::TokenEntry;
use crate::module::Module;
use crate::output::OutputLimits;
use crate::run::RunMode;
use crate::runner::RunnerSettings;
use crate::runner::jail::Containment;
use crate::telemetry::LogFormat;

mod build;
mod env;
mod live;
mod modules;
mod raw;

use build::{build, check_token_unique, load_tokens_file};
pub use live::{Live, Snapshot};
use raw::RawConfig;
pub use raw::{parse_duration, parse_size};

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (absolute when it could be made so).
    pub file: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[runner]`.
    pub runner: RunnerConfig,
    /// `[output]`.
    pub output: OutputConfig,
    /// `[sse]`.
    pub sse: SseConfig,
    /// `[retention]`.
    pub retention: RetentionConfig,
    /// `[storage]`.
    pub storage: StorageConfig,
    /// `[cluster]`: how the nodes sharing a PostgreSQL store (`storage.url`) work together.
    pub cluster: ClusterConfig,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[callbacks]`: how runs' completion callbacks are signed and delivered.
    pub callbacks: CallbacksConfig,
    /// `[[modules]]`, in file order.
    pub modules: Vec<Arc<Module>>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// A request header must be complete this long after it began (or the connection opened).
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Open connections at most; `None`: derived from the file-descriptor limit at start.
    pub max_connections: Option<NonZeroUsize>,
    /// HTTPS: the certificate and key files, loaded.
    pub tls: Option<TlsFiles>,
    /// The address other nodes and operators reach this node at (recorded with its lease);
    /// `None`: the bound address.
    pub advertise: Option<String>,
}

/// `server.tls`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain (PEM), absolute.
    pub cert: PathBuf,
    /// The private key (PEM), absolute.
    pub key: PathBuf,
    /// Both, loaded and checked.
    pub config: crate::tls::TlsConfig,
}

/// `[runner]`.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Runs executing at once, all modules together.
    pub max_concurrent: NonZeroUsize,
    /// Runs in state `queued`; at this count new runs are refused.
    pub max_queued: usize,
    /// Timeout for modules that set none.
    pub default_timeout: Duration,
    /// SIGTERM -> wait this long -> SIGKILL.
    pub kill_grace: Duration,
    /// Default run mode.
    pub mode: RunMode,
    /// Parent environment variables a child may inherit.
    pub env_allow: Vec<String>,
    /// The run modes a request may ask for (`mode` in `POST /runs`).
    pub request_modes: Vec<RunMode>,
    /// How a run's processes are held beyond its process group.
    pub containment: Containment,
}

/// `[output]`.
#[derive(Debug, Clone, Copy)]
pub struct OutputConfig {
    /// Longer lines are split.
    pub max_line_bytes: NonZeroUsize,
    /// Output kept per run; past it lines are counted, not kept.
    pub max_run_bytes: u64,
}

/// `[sse]`.
#[derive(Debug, Clone, Copy)]
pub struct SseConfig {
    /// A comment is sent when a stream has been quiet this long.
    pub keep_alive: Duration,
    /// Open SSE streams at most (past it 429); `None`: half of the connection limit.
    pub max_streams: Option<NonZeroUsize>,
}

/// `[retention]`.
#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    /// Finished runs kept; the oldest finished go first.
    pub keep_runs: usize,
    /// Finished runs older than this go.
    pub keep_for: Duration,
}

/// `[auth]`: API tokens.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Serve requests without a token (as the anonymous caller, who may do everything) even
    /// when tokens exist or modrun listens beyond loopback.
    pub allow_anonymous: bool,
    /// The tokens: `[[auth.tokens]]` and those of `tokens_file`.
    pub tokens: Vec<TokenEntry>,
    /// The file the other tokens came from (absolute), if any.
    pub tokens_file: Option<PathBuf>,
}

impl AuthConfig {
    /// Whether a server listening on `ip` serves requests without a token: when
    /// `allow_anonymous` says so, or when no token is configured and it listens on loopback
    /// only. `Err` (a sentence for the operator) when no token is configured and it listens
    /// beyond loopback without `allow_anonymous`: modrun refuses to start.
    pub fn anonymous_on(&self, ip: std::net::IpAddr) -> Result<bool, String> {
        if self.allow_anonymous {
            return Ok(true);
        }
        if !self.tokens.is_empty() {
            return Ok(false);
        }
        if ip.is_loopback() {
            return Ok(true);
        }
        Err(format!(
            "modrun would listen on {ip} with no API token: anyone who reaches the port could run every module. \
             Add a token (`modrun token new --name NAME` prints one and its [[auth.tokens]] entry), \
             or set auth.allow_anonymous = true if the network is trusted"
        ))
    }
}

/// `[storage]`.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Folder of the embedded database (absolute); `None` keeps everything in memory only.
    /// Ignored when `url` is set.
    pub path: Option<PathBuf>,
    /// A PostgreSQL store shared by the nodes of a cluster (`storage.url`, or the
    /// `MODRUN_STORAGE_URL` environment variable, which wins).
    pub url: Option<DatabaseUrl>,
    /// Connections to PostgreSQL per node.
    pub pool_size: NonZeroUsize,
}

/// `[cluster]`.
#[derive(Debug, Clone, Copy)]
pub struct ClusterConfig {
    /// A node that has not renewed its lease for this long (by the database's clock) is dead:
    /// its running runs become `lost` (or are queued again).
    pub lease_ttl: Duration,
}

/// `[callbacks]`.
#[derive(Debug, Clone)]
pub struct CallbacksConfig {
    /// The signing keys: every delivery carries a signature by each (several during a key
    /// rotation).
    pub keys: Vec<crate::callbacks::SigningKey>,
    /// URL prefixes a request may name callbacks under (none: requests may name none).
    pub allow_urls: Vec<String>,
    /// One delivery attempt at most.
    pub timeout: Duration,
    /// A delivery that has not succeeded this long after the run ended is given up.
    pub retry_for: Duration,
}

/// `[log]`.
#[derive(Debug, Clone, Copy)]
pub struct LogConfig {
    /// How log lines are written (`MODRUN_LOG_FORMAT` wins over the file).
    pub format: LogFormat,
}

/// The environment variable that chooses the log format (it wins over the file).
pub const LOG_FORMAT_ENV: &str = "MODRUN_LOG_FORMAT";

/// The environment variable that names the PostgreSQL store (it wins over the file).
pub const STORAGE_URL_ENV: &str = "MODRUN_STORAGE_URL";

/// A PostgreSQL connection URL. It may hold a password: `Debug` and [`DatabaseUrl::redacted`]
/// show it as `***`, and nothing else prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Check that it is a URL (or key=value string) PostgreSQL's client accepts. The error
    /// never repeats the URL.
    pub fn new(url: String) -> Result<Self, String> {
        let scheme = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !scheme {
            return Err("must be a postgres:// or postgresql:// URL".into());
        }
        #[cfg(feature = "postgres")]
        if let Err(e) = url.parse::<tokio_postgres::Config>() {
            return Err(format!("not a PostgreSQL URL modrun can use: {e}"));
        }
        #[cfg(not(feature = "postgres"))]
        return Err(
            "this modrun was built without PostgreSQL support (cargo feature `postgres`)".into(),
        );
        #[cfg(feature = "postgres")]
        Ok(Self(url))
    }

    /// The URL itself, for the database client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password (if any) as `***`: what logs may show.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return "***".into();
        };
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let tail = match tail.split_once('?') {
            // Query options may carry a password too.
            Some((path, query)) => {
                let q: Vec<String> = query
                    .split('&')
                    .map(|kv| match kv.split_once('=') {
                        Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                        _ => kv.to_owned(),
                    })
                    .collect();
                format!("{path}?{}", q.join("&"))
            }
            None => tail.to_owned(),
        };
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                let pw = if userinfo.contains(':') { ":***" } else { "" };
                format!("{scheme}://{user}{pw}@{host}{tail}")
            }
            None => format!("{scheme}://{authority}{tail}"),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Default for RunnerConfig {
    /// The limits shared with the embedded runner come from [`RunnerSettings::default`].
    fn default() -> Self {
        let shared = RunnerSettings::default();
        Self {
            max_concurrent: shared.max_concurrent,
            max_queued: shared.max_queued,
            default_timeout: Duration::from_secs(3600),
            kill_grace: shared.kill_grace,
            mode: RunMode::Auto,
            env_allow: ["PATH", "HOME", "LANG", "TZ"].map(String::from).to_vec(),
            request_modes: vec![
                RunMode::Auto,
                RunMode::Async,
                RunMode::Threaded,
                RunMode::DryRun,
            ],
            containment: Containment::Auto,
        }
    }
}

impl Default for OutputConfig {
    /// From [`OutputLimits::default`].
    fn default() -> Self {
        let shared = OutputLimits::default();
        Self {
            max_line_bytes: NonZeroUsize::new(shared.max_line_bytes).expect("not zero"),
            max_run_bytes: shared.max_run_bytes,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{message}", file.display(), key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The dotted key, when the problem has one.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl Config {
    /// Read and validate a config file, with the environment's overrides
    /// (`MODRUN_<SECTION>__<KEY>`, `MODRUN_STORAGE_URL`, `MODRUN_LOG_FORMAT`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let mut config = Self::from_toml_env(&text, &file, std::env::vars_os())?;
        if let Some(url) = std::env::var_os(STORAGE_URL_ENV).filter(|v| !v.is_empty()) {
            let url = url
                .into_string()
                .map_err(|_| "is not UTF-8".to_owned())
                .and_then(DatabaseUrl::new)
                .map_err(|m| ConfigError {
                    file: file.clone(),
                    key: Some(format!("{STORAGE_URL_ENV} (environment)")),
                    message: m,
                })?;
            config.storage.url = Some(url);
        }
        if let Some(v) = std::env::var_os(LOG_FORMAT_ENV).filter(|v| !v.is_empty()) {
            config.log.format = match v.to_str() {
                Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                _ => {
                    return Err(ConfigError {
                        file: file.clone(),
                        key: Some(format!("{LOG_FORMAT_ENV} (environment)")),
                        message: "must be `text` or `json`".into(),
                    });
                }
            };
        }
        Ok(config)
    }

    /// Parse and validate TOML text as if it were read from `file` (relative paths in it are
    /// resolved against the file's folder), without overrides.
    pub fn from_toml(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Self::from_toml_env(text, file, std::iter::empty())
    }

    /// [`Config::from_toml`], with the `MODRUN_<SECTION>__<KEY>` overrides among `vars`
    /// applied before validation (an error about an overridden key names its variable).
    pub fn from_toml_env(
        text: &str,
        file: &Path,
        vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<Config, ConfigError> {
        let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            file: file.to_owned(),
            key: None,
            message: syntax_error(text, &e),
        })?;
        let overrides = env::apply(&mut doc, vars).map_err(|(key, message)| ConfigError {
            file: file.to_owned(),
            key: Some(key),
            message,
        })?;
        // The variable that set a key (or the table around it), for errors about it.
        let err = |key: Option<String>, message: String| {
            let var = key.as_deref().and_then(|k| {
                overrides
                    .iter()
                    .find(|o| k == o.key || k.starts_with(&format!("{}.", o.key)))
            });
            ConfigError {
                file: file.to_owned(),
                key: key.map(|k| match var {
                    Some(o) => format!("{k} (set by {})", o.var),
                    None => k,
                }),
                message,
            }
        };
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                let msg = inner.message().trim().to_owned();
                err((key != ".").then_some(key), msg)
            })?;
        let base = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let tokens_file = raw.auth.tokens_file.as_ref().map(|f| base.join(f));
        let mut config = build(raw, &base).map_err(|(key, message)| err(Some(key), message))?;
        config.file = file.to_owned();
        if let Some(path) = tokens_file {
            let more = load_tokens_file(&path)?;
            for (i, t) in more.into_iter().enumerate() {
                check_token_unique(&config.auth.tokens, &t).map_err(|(field, message)| {
                    ConfigError {
                        file: path.clone(),
                        key: Some(format!("tokens[{i}].{field}")),
                        message,
                    }
                })?;
                config.auth.tokens.push(t);
            }
            config.auth.tokens_file = Some(path);
        }
        Ok(config)
    }
}

/// A TOML syntax error on one line (for the log too): where, and what.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().trim_end_matches('.').replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML syntax error at line {line}, column {column}: {what}")
        }
        None => format!("TOML syntax error: {what}"),
    }
}

/// A problem at a dotted key: (key, message).
type KeyError = (String, String);

impl Config {
    /// A module by id.
    pub fn module(&self, id: &str) -> Option<&Arc<Module>> {
        self.modules.iter().find(|m| m.id == id)
    }

    /// The timeout a run of `module` gets when the request sets none.
    pub fn module_timeout(&self, module: &Module) -> Duration {
        module.timeout.unwrap_or(self.runner.default_timeout)
    }
}

#[cfg(test)]
mod tests;
