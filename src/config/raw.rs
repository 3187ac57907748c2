//! The configuration as written in the file (serde structs, `deny_unknown_fields`), and the
//! parsers of its value kinds (durations, sizes, values read from the environment or a file).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::Value;

use super::KeyError;
use crate::run::RunMode;
use crate::runner::jail::Containment;
use crate::telemetry::LogFormat;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) runner: RawRunner,
    #[serde(default)]
    pub(super) output: RawOutput,
    #[serde(default)]
    pub(super) sse: RawSse,
    #[serde(default)]
    pub(super) retention: RawRetention,
    #[serde(default)]
    pub(super) storage: RawStorage,
    #[serde(default)]
    pub(super) cluster: RawCluster,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) callbacks: RawCallbacks,
    #[serde(default)]
    pub(super) modules: Vec<RawModule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCallbacks {
    #[serde(default)]
    pub(super) secrets: Vec<RawValue>,
    #[serde(default)]
    pub(super) allow_urls: Vec<String>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) retry_for: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    pub(super) allow_anonymous: bool,
    #[serde(default)]
    pub(super) tokens: Vec<RawToken>,
    pub(super) tokens_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    pub(super) name: String,
    pub(super) sha256: String,
    pub(super) scopes: Vec<String>,
    pub(super) modules: Option<Vec<String>>,
}

/// `auth.tokens_file`: the same table format, at the top level.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokensFile {
    #[serde(default)]
    pub(super) tokens: Vec<RawToken>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) bind: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) header_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_connections: Option<NonZeroUsize>,
    pub(super) tls: Option<RawTls>,
    pub(super) advertise: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRunner {
    pub(super) max_concurrent: Option<NonZeroUsize>,
    pub(super) max_queued: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) default_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) kill_grace: Option<Duration>,
    pub(super) mode: Option<RunMode>,
    pub(super) env_allow: Option<Vec<String>>,
    pub(super) request_modes: Option<Vec<RunMode>>,
    pub(super) containment: Option<Containment>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    #[serde(default, deserialize_with = "de_opt_size")]
    pub(super) max_line_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_size")]
    pub(super) max_run_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSse {
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) keep_alive: Option<Duration>,
    pub(super) max_streams: Option<NonZeroUsize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    pub(super) keep_runs: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) keep_for: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub(super) path: Option<PathBuf>,
    pub(super) url: Option<RawValue>,
    pub(super) pool_size: Option<NonZeroUsize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) lease_ttl: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModule {
    pub(super) id: String,
    pub(super) name: Option<String>,
    pub(super) description: Option<String>,
    pub(super) command: Vec<RawValue>,
    pub(super) cwd: Option<PathBuf>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, RawValue>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) timeout: Option<Duration>,
    pub(super) max_concurrent: Option<NonZeroUsize>,
    #[serde(default)]
    pub(super) parameters: Vec<RawParameter>,
    #[serde(default)]
    pub(super) end_of_options: bool,
    #[serde(default)]
    pub(super) limits: RawLimits,
    pub(super) user: Option<String>,
    pub(super) group: Option<String>,
    #[serde(default)]
    pub(super) retry_on_lost: bool,
    pub(super) max_attempts: Option<u32>,
    #[serde(default)]
    pub(super) callbacks: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default, deserialize_with = "de_opt_size")]
    pub(super) memory: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub(super) cpu: Option<Duration>,
    pub(super) open_files: Option<u64>,
    pub(super) processes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_size")]
    pub(super) file_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParameter {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) kind: RawType,
    #[serde(default)]
    pub(super) required: bool,
    pub(super) default: Option<Value>,
    pub(super) min: Option<Value>,
    pub(super) max: Option<Value>,
    pub(super) choices: Option<Vec<String>>,
    pub(super) pattern: Option<String>,
    pub(super) max_length: Option<usize>,
    pub(super) arg: Option<String>,
    #[serde(default)]
    pub(super) positional: bool,
    pub(super) env: Option<String>,
    pub(super) description: Option<String>,
    #[serde(default)]
    pub(super) multiline: bool,
    #[serde(default)]
    pub(super) allow_leading_dash: bool,
    #[serde(default)]
    pub(super) secret: bool,
    #[serde(default)]
    pub(super) stdin: bool,
}

/// A fixed argument or environment value: text, or a table that says where the value comes
/// from (`{ from_env = "VAR" }`, `{ from_file = "path" }`, `{ value = "...", secret = true }`).
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a string, or a table with one of value, from_env, from_file"
)]
pub(super) enum RawValue {
    Text(String),
    Table(RawSource),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) value: Option<String>,
    pub(super) from_env: Option<String>,
    pub(super) from_file: Option<PathBuf>,
    pub(super) secret: Option<bool>,
}

/// A value and whether it is a secret. Values from the environment or a file always are (they
/// are kept out of the config text for that reason); a file's one trailing line break is
/// dropped.
pub(super) fn resolve(v: RawValue, base: &Path, key: &str) -> Result<(String, bool), KeyError> {
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
pub(super) enum RawType {
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

pub(super) fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map(Some).map_err(de::Error::custom)
}

pub(super) fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
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
