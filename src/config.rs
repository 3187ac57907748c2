//! Typed settings, read once from a TOML file and validated at load. Every error names the
//! file, the dotted key (`modules[2].parameters[0].type`) and the problem.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::Value;

use crate::auth::{ModulePattern, Scope, TokenEntry, parse_sha256_hex};
use crate::module::{Limits, MAX_ARG_BYTES, Module, ParamKind, Parameter, Passing, Pattern, RunAs};
use crate::output::OutputLimits;
use crate::run::RunMode;
use crate::runner::RunnerSettings;
use crate::runner::jail::Containment;
use crate::telemetry::LogFormat;

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

// ---- raw, as written in the file ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    runner: RawRunner,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    sse: RawSse,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    modules: Vec<RawModule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    allow_anonymous: bool,
    #[serde(default)]
    tokens: Vec<RawToken>,
    tokens_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    sha256: String,
    scopes: Vec<String>,
    modules: Option<Vec<String>>,
}

/// `auth.tokens_file`: the same table format, at the top level.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokensFile {
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    bind: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    header_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    idle_timeout: Option<Duration>,
    max_connections: Option<NonZeroUsize>,
    tls: Option<RawTls>,
    advertise: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRunner {
    max_concurrent: Option<NonZeroUsize>,
    max_queued: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    default_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    kill_grace: Option<Duration>,
    mode: Option<RunMode>,
    env_allow: Option<Vec<String>>,
    request_modes: Option<Vec<RunMode>>,
    containment: Option<Containment>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    #[serde(default, deserialize_with = "de_opt_size")]
    max_line_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_size")]
    max_run_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSse {
    #[serde(default, deserialize_with = "de_opt_duration")]
    keep_alive: Option<Duration>,
    max_streams: Option<NonZeroUsize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    keep_runs: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    keep_for: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<PathBuf>,
    url: Option<RawValue>,
    pool_size: Option<NonZeroUsize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default, deserialize_with = "de_opt_duration")]
    lease_ttl: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModule {
    id: String,
    name: Option<String>,
    description: Option<String>,
    command: Vec<RawValue>,
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, RawValue>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    timeout: Option<Duration>,
    max_concurrent: Option<NonZeroUsize>,
    #[serde(default)]
    parameters: Vec<RawParameter>,
    #[serde(default)]
    end_of_options: bool,
    #[serde(default)]
    limits: RawLimits,
    user: Option<String>,
    group: Option<String>,
    #[serde(default)]
    retry_on_lost: bool,
    max_attempts: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default, deserialize_with = "de_opt_size")]
    memory: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    cpu: Option<Duration>,
    open_files: Option<u64>,
    processes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_size")]
    file_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParameter {
    name: String,
    #[serde(rename = "type")]
    kind: RawType,
    #[serde(default)]
    required: bool,
    default: Option<Value>,
    min: Option<Value>,
    max: Option<Value>,
    choices: Option<Vec<String>>,
    pattern: Option<String>,
    max_length: Option<usize>,
    arg: Option<String>,
    #[serde(default)]
    positional: bool,
    env: Option<String>,
    description: Option<String>,
    #[serde(default)]
    multiline: bool,
    #[serde(default)]
    allow_leading_dash: bool,
    #[serde(default)]
    secret: bool,
    #[serde(default)]
    stdin: bool,
}

/// A fixed argument or environment value: text, or a table that says where the value comes
/// from (`{ from_env = "VAR" }`, `{ from_file = "path" }`, `{ value = "...", secret = true }`).
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a string, or a table with one of value, from_env, from_file"
)]
enum RawValue {
    Text(String),
    Table(RawSource),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    value: Option<String>,
    from_env: Option<String>,
    from_file: Option<PathBuf>,
    secret: Option<bool>,
}

/// A value and whether it is a secret. Values from the environment or a file always are (they
/// are kept out of the config text for that reason); a file's one trailing line break is
/// dropped.
fn resolve(v: RawValue, base: &Path, key: &str) -> Result<(String, bool), KeyError> {
    let s = match v {
        RawValue::Text(t) => return Ok((t, false)),
        RawValue::Table(s) => s,
    };
    let fail = |m: String| Err((key.to_owned(), m));
    match (s.value, s.from_env, s.from_file) {
        (Some(v), None, None) => Ok((v, s.secret.unwrap_or(false))),
        (None, Some(var), None) => match std::env::var(&var) {
            Ok(v) => Ok((v, true)),
            Err(_) => fail(format!(
                "from_env: the server's environment has no variable `{var}` (or it is not UTF-8)"
            )),
        },
        (None, None, Some(file)) => {
            let path = base.join(&file);
            match std::fs::read_to_string(&path) {
                Ok(mut v) => {
                    if v.ends_with('\n') {
                        v.pop();
                        if v.ends_with('\r') {
                            v.pop();
                        }
                    }
                    Ok((v, true))
                }
                Err(e) => fail(format!("from_file: cannot read `{}`: {e}", path.display())),
            }
        }
        _ => fail("give exactly one of value, from_env, from_file".into()),
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawType {
    String,
    Integer,
    Number,
    Boolean,
    Choice,
}

/// Parse a humantime duration such as `500ms`, `30s`, `1h30m` or `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration `{s}` ({e}); write it like \"500ms\", \"30s\", \"1h30m\"")
    })
}

/// Parse a size: an integer of bytes or a string with a unit (`64KiB`, `64MiB`, `1GiB`, `10MB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size `{s}`; write it like 65536 or \"64KiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit `{other}` in `{s}` (use B, KB, KiB, MB, MiB, GB or GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map(Some).map_err(de::Error::custom)
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size in bytes or a string such as \"64KiB\"")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom("a size cannot be negative"))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }
    d.deserialize_any(V).map(Some)
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let mut config = Self::from_toml(&text, &file)?;
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
    /// resolved against the file's folder).
    pub fn from_toml(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |key: Option<String>, message: String| ConfigError {
            file: file.to_owned(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| err(None, e.to_string()))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
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

type KeyError = (String, String);

/// The tokens of an `auth.tokens_file`; errors name that file.
fn load_tokens_file(path: &Path) -> Result<Vec<TokenEntry>, ConfigError> {
    let err = |key: Option<String>, message: String| ConfigError {
        file: path.to_owned(),
        key,
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(None, format!("cannot read the tokens file: {e}")))?;
    let de = toml::Deserializer::parse(&text).map_err(|e| err(None, e.to_string()))?;
    let raw: RawTokensFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let msg = e.into_inner().message().trim().to_owned();
        err((key != ".").then_some(key), msg)
    })?;
    let mut out: Vec<TokenEntry> = Vec::new();
    for (i, t) in raw.tokens.into_iter().enumerate() {
        let key = format!("tokens[{i}]");
        let entry = build_token(t, &key).map_err(|(k, m)| err(Some(k), m))?;
        check_token_unique(&out, &entry).map_err(|(f, m)| err(Some(format!("{key}.{f}")), m))?;
        out.push(entry);
    }
    Ok(out)
}

/// One `[[auth.tokens]]` entry.
fn build_token(t: RawToken, key: &str) -> Result<TokenEntry, KeyError> {
    let ok_name = (1..=64).contains(&t.name.len())
        && t.name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if !ok_name {
        return Err((
            format!("{key}.name"),
            format!("`{}` is not a token name ([A-Za-z0-9._-]{{1,64}})", t.name),
        ));
    }
    let sha256 = parse_sha256_hex(&t.sha256.to_ascii_lowercase()).ok_or_else(|| {
        let hint = if t.sha256.starts_with(crate::auth::TOKEN_PREFIX) {
            " (this looks like a token itself: write its SHA-256, never the token)"
        } else {
            ""
        };
        (
            format!("{key}.sha256"),
            format!("must be the SHA-256 of the token as 64 hex digits{hint}"),
        )
    })?;
    let mut scopes = Vec::new();
    for (i, s) in t.scopes.iter().enumerate() {
        let scope: Scope = s.parse().map_err(|m| (format!("{key}.scopes[{i}]"), m))?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    let modules = t
        .modules
        .unwrap_or_else(|| vec!["*".to_owned()])
        .iter()
        .enumerate()
        .map(|(i, p)| ModulePattern::new(p).map_err(|m| (format!("{key}.modules[{i}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TokenEntry {
        name: t.name,
        sha256,
        scopes,
        modules,
    })
}

/// A token's name and hash must be unique; `Err` names the field.
fn check_token_unique(have: &[TokenEntry], t: &TokenEntry) -> Result<(), KeyError> {
    if have.iter().any(|h| h.name == t.name) {
        return Err(("name".into(), format!("duplicate token name `{}`", t.name)));
    }
    if have.iter().any(|h| h.sha256 == t.sha256) {
        return Err((
            "sha256".into(),
            format!("token `{}` has the same hash as another token", t.name),
        ));
    }
    Ok(())
}

fn build(raw: RawConfig, base: &Path) -> Result<Config, KeyError> {
    let defaults = RunnerConfig::default();
    let runner = RunnerConfig {
        max_concurrent: raw.runner.max_concurrent.unwrap_or(defaults.max_concurrent),
        max_queued: raw.runner.max_queued.unwrap_or(defaults.max_queued),
        default_timeout: raw
            .runner
            .default_timeout
            .unwrap_or(defaults.default_timeout),
        kill_grace: raw.runner.kill_grace.unwrap_or(defaults.kill_grace),
        mode: raw.runner.mode.unwrap_or(defaults.mode),
        env_allow: raw.runner.env_allow.unwrap_or(defaults.env_allow),
        request_modes: raw.runner.request_modes.unwrap_or(defaults.request_modes),
        containment: raw.runner.containment.unwrap_or(defaults.containment),
    };
    if runner.default_timeout.is_zero() {
        return Err((
            "runner.default_timeout".into(),
            "must be longer than 0s".into(),
        ));
    }
    for (i, name) in runner.env_allow.iter().enumerate() {
        check_env_name(name).map_err(|m| (format!("runner.env_allow[{i}]"), m))?;
    }
    let out_defaults = OutputConfig::default();
    let max_line_bytes = match raw.output.max_line_bytes {
        None => out_defaults.max_line_bytes,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| *n >= 4)
            .and_then(NonZeroUsize::new)
            .ok_or((
                "output.max_line_bytes".to_owned(),
                "must be at least 4".to_owned(),
            ))?,
    };
    let output = OutputConfig {
        max_line_bytes,
        max_run_bytes: raw
            .output
            .max_run_bytes
            .unwrap_or(out_defaults.max_run_bytes),
    };
    let keep_alive = raw.sse.keep_alive.unwrap_or(Duration::from_secs(15));
    if keep_alive.is_zero() {
        return Err(("sse.keep_alive".into(), "must be longer than 0s".into()));
    }
    let header_timeout = raw.server.header_timeout.unwrap_or(Duration::from_secs(10));
    let idle_timeout = raw.server.idle_timeout.unwrap_or(Duration::from_secs(60));
    for (key, d) in [
        ("server.header_timeout", header_timeout),
        ("server.idle_timeout", idle_timeout),
    ] {
        if d.is_zero() {
            return Err((key.into(), "must be longer than 0s".into()));
        }
    }
    let tls = match raw.server.tls {
        None => None,
        Some(t) => {
            let (cert, key) = (base.join(t.cert), base.join(t.key));
            let config = crate::tls::load(&cert, &key).map_err(|m| ("server.tls".to_owned(), m))?;
            Some(TlsFiles { cert, key, config })
        }
    };
    if let Some(a) = &raw.server.advertise {
        let ok = (1..=255).contains(&a.len()) && a.bytes().all(|c| c.is_ascii_graphic());
        if !ok {
            return Err((
                "server.advertise".into(),
                "must be an address such as `10.0.0.5:8080` or `https://node1.example` (1 to 255 printable characters, no spaces)".into(),
            ));
        }
    }
    let storage = build_storage(raw.storage, base)?;
    let lease_ttl = raw.cluster.lease_ttl.unwrap_or(Duration::from_secs(10));
    if lease_ttl < Duration::from_secs(1) {
        return Err((
            "cluster.lease_ttl".into(),
            "must be at least 1s (nodes renew their lease every third of it)".into(),
        ));
    }
    let mut tokens: Vec<TokenEntry> = Vec::new();
    for (i, t) in raw.auth.tokens.into_iter().enumerate() {
        let key = format!("auth.tokens[{i}]");
        let entry = build_token(t, &key)?;
        check_token_unique(&tokens, &entry).map_err(|(f, m)| (format!("{key}.{f}"), m))?;
        tokens.push(entry);
    }
    let mut seen = HashSet::new();
    let mut modules = Vec::with_capacity(raw.modules.len());
    for (i, m) in raw.modules.into_iter().enumerate() {
        let key = format!("modules[{i}]");
        let module = build_module(m, base, &key)?;
        if !seen.insert(module.id.clone()) {
            return Err((
                format!("{key}.id"),
                format!("duplicate module id `{}`", module.id),
            ));
        }
        modules.push(Arc::new(module));
    }
    Ok(Config {
        file: PathBuf::new(),
        server: ServerConfig {
            bind: raw
                .server
                .bind
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            header_timeout,
            idle_timeout,
            max_connections: raw.server.max_connections,
            tls,
            advertise: raw.server.advertise,
        },
        runner,
        output,
        sse: SseConfig {
            keep_alive,
            max_streams: raw.sse.max_streams,
        },
        retention: RetentionConfig {
            keep_runs: raw.retention.keep_runs.unwrap_or(10_000),
            keep_for: raw
                .retention
                .keep_for
                .unwrap_or(Duration::from_secs(7 * 86_400)),
        },
        storage,
        cluster: ClusterConfig { lease_ttl },
        log: LogConfig {
            format: raw.log.format.unwrap_or_default(),
        },
        auth: AuthConfig {
            allow_anonymous: raw.auth.allow_anonymous,
            tokens,
            tokens_file: None,
        },
        modules,
    })
}

/// `[storage]`: `path` or `url`, not both.
fn build_storage(raw: RawStorage, base: &Path) -> Result<StorageConfig, KeyError> {
    let url = match raw.url {
        None => None,
        Some(v) => {
            if raw.path.is_some() {
                return Err((
                    "storage.url".into(),
                    "give `path` (an embedded database) or `url` (PostgreSQL), not both".into(),
                ));
            }
            let (text, _) = resolve(v, base, "storage.url")?;
            Some(DatabaseUrl::new(text).map_err(|m| ("storage.url".to_owned(), m))?)
        }
    };
    Ok(StorageConfig {
        path: match raw.path {
            None => Some(base.join("data")),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(base.join(p)),
        },
        url,
        pool_size: raw
            .pool_size
            .unwrap_or(NonZeroUsize::new(10).expect("not zero")),
    })
}

fn is_module_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn is_param_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

fn check_env_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a valid environment variable name (letters, digits and _, not starting with a digit)"
        ))
    }
}

fn build_module(m: RawModule, base: &Path, key: &str) -> Result<Module, KeyError> {
    if !is_module_id(&m.id) {
        return Err((
            format!("{key}.id"),
            format!(
                "`{}` is not a valid module id ([a-z0-9][a-z0-9_-]{{0,63}})",
                m.id
            ),
        ));
    }
    let mut secrets = Vec::new();
    let mut command = Vec::with_capacity(m.command.len());
    for (i, raw) in m.command.into_iter().enumerate() {
        let (arg, secret) = resolve(raw, base, &format!("{key}.command[{i}]"))?;
        if secret {
            if i == 0 {
                return Err((
                    format!("{key}.command[0]"),
                    "the program cannot be a secret".into(),
                ));
            }
            secrets.push(arg.clone());
        }
        command.push(arg);
    }
    let mut env = BTreeMap::new();
    for (name, raw) in m.env {
        let (value, secret) = resolve(raw, base, &format!("{key}.env.{name}"))?;
        if secret {
            secrets.push(value.clone());
        }
        env.insert(name, value);
    }
    if command.is_empty() || command[0].is_empty() {
        return Err((
            format!("{key}.command"),
            "must name a program: command = [\"program\", \"arg\", ...]".into(),
        ));
    }
    let cwd = match &m.cwd {
        Some(c) => base.join(c),
        None => base.to_owned(),
    };
    if !cwd.is_dir() {
        return Err((
            format!("{key}.cwd"),
            format!("`{}` is not a directory", cwd.display()),
        ));
    }
    for (i, arg) in command.iter().enumerate() {
        if arg.len() > MAX_ARG_BYTES || arg.contains('\0') {
            return Err((
                format!("{key}.command[{i}]"),
                format!("must be at most {MAX_ARG_BYTES} bytes, without NUL characters"),
            ));
        }
    }
    for (name, value) in &env {
        check_env_name(name).map_err(|msg| (format!("{key}.env.{name}"), msg))?;
        if name.len() + 1 + value.len() > MAX_ARG_BYTES || value.contains('\0') {
            return Err((
                format!("{key}.env.{name}"),
                format!(
                    "`{name}=value` must be at most {MAX_ARG_BYTES} bytes (the kernel's limit for one environment string), without NUL characters"
                ),
            ));
        }
    }
    let limits = build_limits(&m.limits, key)?;
    let max_attempts = match (m.retry_on_lost, m.max_attempts) {
        (_, Some(0)) => {
            return Err((format!("{key}.max_attempts"), "must be at least 1".into()));
        }
        (false, Some(n)) if n > 1 => {
            return Err((
                format!("{key}.max_attempts"),
                "more than one attempt needs retry_on_lost = true".into(),
            ));
        }
        (true, None) => 3,
        (_, Some(n)) => n,
        (false, None) => 1,
    };
    let run_as = build_run_as(m.user.as_deref(), m.group.as_deref(), key)?;
    if m.timeout.is_some_and(|t| t.is_zero()) {
        return Err((format!("{key}.timeout"), "must be longer than 0s".into()));
    }
    let mut parameters: Vec<Parameter> = Vec::with_capacity(m.parameters.len());
    for (j, p) in m.parameters.into_iter().enumerate() {
        let pkey = format!("{key}.parameters[{j}]");
        let param = build_parameter(p, &pkey)?;
        if parameters.iter().any(|q| q.name == param.name) {
            return Err((
                format!("{pkey}.name"),
                format!("duplicate parameter `{}`", param.name),
            ));
        }
        parameters.push(param);
    }
    if let [_, second, ..] = parameters
        .iter()
        .filter(|p| matches!(p.passing, Passing::Stdin))
        .collect::<Vec<_>>()[..]
    {
        return Err((
            format!("{key}.parameters"),
            format!(
                "only one parameter can be passed on stdin (`{}` is a second one)",
                second.name
            ),
        ));
    }
    Ok(Module {
        name: m.name.unwrap_or_else(|| m.id.clone()),
        id: m.id,
        description: m.description,
        command,
        cwd,
        env,
        secrets,
        timeout: m.timeout,
        max_concurrent: m.max_concurrent,
        parameters,
        end_of_options: m.end_of_options,
        limits,
        run_as,
        retry_on_lost: m.retry_on_lost,
        max_attempts,
    })
}

fn build_limits(l: &RawLimits, key: &str) -> Result<Limits, KeyError> {
    let positive = |field: &str, v: Option<u64>| -> Result<Option<u64>, KeyError> {
        match v {
            Some(0) => Err((
                format!("{key}.limits.{field}"),
                "must be more than 0".into(),
            )),
            other => Ok(other),
        }
    };
    if l.cpu.is_some_and(|c| c.as_secs() == 0) {
        return Err((
            format!("{key}.limits.cpu"),
            "must be at least 1s (the kernel counts CPU time in seconds)".into(),
        ));
    }
    Ok(Limits {
        memory: positive("memory", l.memory)?,
        cpu: l.cpu,
        open_files: positive("open_files", l.open_files)?,
        processes: positive("processes", l.processes)?,
        file_size: positive("file_size", l.file_size)?,
    })
}

/// `user` / `group` of a module: looked up once, here; only root can switch to them.
fn build_run_as(
    user: Option<&str>,
    group: Option<&str>,
    key: &str,
) -> Result<Option<RunAs>, KeyError> {
    use nix::unistd::{Group, User};
    let Some(name) = user else {
        if group.is_some() {
            return Err((format!("{key}.group"), "is only allowed with user".into()));
        }
        return Ok(None);
    };
    if !nix::unistd::geteuid().is_root() {
        return Err((
            format!("{key}.user"),
            "modrun can switch users only when it runs as root".into(),
        ));
    }
    let u = User::from_name(name).ok().flatten().ok_or_else(|| {
        (
            format!("{key}.user"),
            format!("no user `{name}` on this system"),
        )
    })?;
    let gid = match group {
        None => u.gid.as_raw(),
        Some(g) => Group::from_name(g)
            .ok()
            .flatten()
            .ok_or_else(|| {
                (
                    format!("{key}.group"),
                    format!("no group `{g}` on this system"),
                )
            })?
            .gid
            .as_raw(),
    };
    if u.uid.is_root() {
        return Err((
            format!("{key}.user"),
            "names root: leave user out to run as modrun's own user".into(),
        ));
    }
    Ok(Some(RunAs {
        user: name.to_owned(),
        uid: u.uid.as_raw(),
        gid,
    }))
}

fn build_parameter(p: RawParameter, key: &str) -> Result<Parameter, KeyError> {
    let k = |field: &str| format!("{key}.{field}");
    if !is_param_name(&p.name) {
        return Err((
            k("name"),
            format!(
                "`{}` is not a valid parameter name ([a-z0-9_]{{1,64}})",
                p.name
            ),
        ));
    }
    let only_for = |field: &str, present: bool, types: &str| -> Result<(), KeyError> {
        if present {
            Err((k(field), format!("is only allowed for type {types}")))
        } else {
            Ok(())
        }
    };
    let numeric = matches!(p.kind, RawType::Integer | RawType::Number);
    only_for("min", p.min.is_some() && !numeric, "integer or number")?;
    only_for("max", p.max.is_some() && !numeric, "integer or number")?;
    only_for(
        "choices",
        p.choices.is_some() && p.kind != RawType::Choice,
        "choice",
    )?;
    only_for(
        "pattern",
        p.pattern.is_some() && p.kind != RawType::String,
        "string",
    )?;
    only_for(
        "max_length",
        p.max_length.is_some() && p.kind != RawType::String,
        "string",
    )?;
    only_for(
        "multiline",
        p.multiline && p.kind != RawType::String,
        "string",
    )?;
    only_for(
        "allow_leading_dash",
        p.allow_leading_dash && !matches!(p.kind, RawType::String | RawType::Choice),
        "string or choice",
    )?;

    let kind = match p.kind {
        RawType::String => ParamKind::String {
            pattern: p
                .pattern
                .as_deref()
                .map(Pattern::new)
                .transpose()
                .map_err(|e| (k("pattern"), format!("invalid regular expression: {e}")))?,
            max_length: p.max_length,
            multiline: p.multiline,
            allow_leading_dash: p.allow_leading_dash,
        },
        RawType::Integer => {
            let int = |v: &Option<Value>, field: &str| -> Result<Option<i64>, KeyError> {
                v.as_ref()
                    .map(|v| {
                        v.as_i64()
                            .ok_or((k(field), "must be an integer".to_owned()))
                    })
                    .transpose()
            };
            ParamKind::Integer {
                min: int(&p.min, "min")?,
                max: int(&p.max, "max")?,
            }
        }
        RawType::Number => {
            let num = |v: &Option<Value>, field: &str| -> Result<Option<f64>, KeyError> {
                v.as_ref()
                    .map(|v| v.as_f64().ok_or((k(field), "must be a number".to_owned())))
                    .transpose()
            };
            ParamKind::Number {
                min: num(&p.min, "min")?,
                max: num(&p.max, "max")?,
            }
        }
        RawType::Boolean => ParamKind::Boolean,
        RawType::Choice => {
            let choices = p
                .choices
                .ok_or((k("choices"), "is required for type choice".to_owned()))?;
            if choices.is_empty() {
                return Err((k("choices"), "must list at least one value".into()));
            }
            for (i, c) in choices.iter().enumerate() {
                if c.starts_with('-') && !p.allow_leading_dash {
                    return Err((
                        format!("{key}.choices[{i}]"),
                        format!(
                            "`{c}` starts with `-` and could be taken for an option; set allow_leading_dash = true if the program expects it"
                        ),
                    ));
                }
                if c.chars().any(char::is_control) {
                    return Err((
                        format!("{key}.choices[{i}]"),
                        "must not contain control characters".into(),
                    ));
                }
            }
            ParamKind::Choice { choices }
        }
    };
    if let ParamKind::Integer {
        min: Some(a),
        max: Some(b),
    } = &kind
        && a > b
    {
        return Err((k("min"), format!("min {a} is greater than max {b}")));
    }
    if let ParamKind::Number {
        min: Some(a),
        max: Some(b),
    } = &kind
        && a > b
    {
        return Err((k("min"), format!("min {a} is greater than max {b}")));
    }
    if let Some(d) = &p.default {
        kind.check(d)
            .map_err(|m| (k("default"), format!("the default {m}")))?;
    }
    let ways = [p.env.is_some(), p.positional, p.arg.is_some(), p.stdin]
        .iter()
        .filter(|w| **w)
        .count();
    if ways > 1 {
        return Err((
            k("env"),
            "a parameter is passed either as env, as positional, as an option or on stdin, not several"
                .into(),
        ));
    }
    let passing = if let Some(var) = p.env {
        check_env_name(&var).map_err(|m| (k("env"), m))?;
        Passing::Env(var)
    } else if p.stdin {
        Passing::Stdin
    } else if p.positional {
        if matches!(kind, ParamKind::Boolean) {
            return Err((k("positional"), "a boolean cannot be positional".into()));
        }
        Passing::Positional
    } else {
        let flag = p.arg.unwrap_or_else(|| format!("--{}", p.name));
        if flag.is_empty() {
            return Err((k("arg"), "must not be empty".into()));
        }
        Passing::Option(flag)
    };
    if p.secret && !matches!(passing, Passing::Env(_) | Passing::Stdin) {
        return Err((
            k("secret"),
            "a secret parameter must be passed by env or stdin: argv is readable by every local user in /proc"
                .into(),
        ));
    }
    Ok(Parameter {
        name: p.name,
        kind,
        required: p.required,
        default: p.default,
        description: p.description,
        passing,
        secret: p.secret,
    })
}

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
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir();
        Config::from_toml(text, &dir.join("modrun.toml"))
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.runner.max_concurrent.get(), 4);
        assert_eq!(c.runner.max_queued, 1000);
        assert_eq!(c.runner.kill_grace, Duration::from_secs(5));
        assert_eq!(c.output.max_run_bytes, 64 << 20);
        assert_eq!(c.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.retention.keep_runs, 10_000);
        assert_eq!(c.retention.keep_for, Duration::from_secs(7 * 86400));
        assert_eq!(c.storage.path, Some(std::env::temp_dir().join("data")));
        let mem = load("[storage]\npath = \"\"\n").unwrap();
        assert_eq!(mem.storage.path, None);
    }

    #[test]
    fn durations_and_sizes_parse_with_units() {
        let c = load(
            "[runner]\ndefault_timeout = \"1h30m\"\nkill_grace = \"500ms\"\n\
             [output]\nmax_line_bytes = \"64KiB\"\nmax_run_bytes = 1000\n",
        )
        .unwrap();
        assert_eq!(c.runner.default_timeout, Duration::from_secs(5400));
        assert_eq!(c.runner.kill_grace, Duration::from_millis(500));
        assert_eq!(c.output.max_line_bytes.get(), 65536);
        assert_eq!(c.output.max_run_bytes, 1000);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
    }

    #[test]
    fn errors_name_the_dotted_key() {
        let e = load("[runner]\nmax_concurrent = 0\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("runner.max_concurrent"), "{e}");
        assert!(e.to_string().contains("modrun.toml"), "{e}");

        let e = load(
            "[[modules]]\nid = \"a\"\ncommand = [\"true\"]\n\
             [[modules]]\nid = \"b\"\ncommand = [\"true\"]\n\
             [[modules]]\nid = \"c\"\ncommand = [\"true\"]\n\
             [[modules.parameters]]\nname = \"x\"\ntype = \"float\"\n",
        )
        .unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("modules[2].parameters[0].type"),
            "{e}"
        );

        let e = load("[runner]\nkill_grace = \"soon\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("runner.kill_grace"), "{e}");
        assert!(e.message.contains("invalid duration"), "{e}");

        let e = load("[runner]\nbogus = 1\n").unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn module_rules_are_checked() {
        let bad = [
            ("id = \"Bad\"\ncommand = [\"true\"]", "modules[0].id"),
            ("id = \"a\"\ncommand = []", "modules[0].command"),
            (
                "id = \"a\"\ncommand = [\"true\"]\ncwd = \"/nonexistent-dir\"",
                "modules[0].cwd",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"integer\"\ndefault = \"3\"",
                "modules[0].parameters[0].default",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"boolean\"\npositional = true",
                "modules[0].parameters[0].positional",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"choice\"",
                "modules[0].parameters[0].choices",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\npattern = \"(\"",
                "modules[0].parameters[0].pattern",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\nmin = 1",
                "modules[0].parameters[0].min",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"choice\"\nchoices = [\"ok\", \"--force\"]",
                "modules[0].parameters[0].choices[1]",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\ndefault = \"-x\"",
                "modules[0].parameters[0].default",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"integer\"\nmultiline = true",
                "modules[0].parameters[0].multiline",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\nsecret = true\npositional = true",
                "modules[0].parameters[0].secret",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\nstdin = true\n[[modules.parameters]]\nname = \"m\"\ntype = \"string\"\nstdin = true",
                "modules[0].parameters",
            ),
            (
                "id = \"a\"\ncommand = [\"true\", { from_env = \"MODRUN_NO_SUCH_VARIABLE_X\" }]",
                "modules[0].command[1]",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\nenv = { K = { from_file = \"/nonexistent/secret\" } }",
                "modules[0].env.K",
            ),
            (
                "id = \"a\"\ncommand = [\"true\"]\nenv = { K = { value = \"x\", from_env = \"HOME\" } }",
                "modules[0].env.K",
            ),
        ];
        for (module, key) in bad {
            let e = load(&format!("[[modules]]\n{module}\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{module}: {e}");
        }
        let e = load(
            "[[modules]]\nid = \"a\"\ncommand = [\"true\"]\n[[modules]]\nid = \"a\"\ncommand = [\"true\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("modules[1].id"));
    }

    #[test]
    fn the_bundled_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/modrun.toml");
        let c = Config::load(&path).unwrap();
        assert!(c.modules.len() >= 3);
    }
}
