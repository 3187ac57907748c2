//! From the raw file to the validated [`Config`]: the sections, storage and tokens (modules
//! are `modules.rs`'s).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::modules::build_module;
use super::raw::*;
use super::*;
use crate::auth::{ModulePattern, Scope, TokenEntry, parse_sha256_hex};

/// The tokens of an `auth.tokens_file`; errors name that file.
pub(super) fn load_tokens_file(path: &Path) -> Result<Vec<TokenEntry>, ConfigError> {
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
pub(super) fn build_token(t: RawToken, key: &str) -> Result<TokenEntry, KeyError> {
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
pub(super) fn check_token_unique(have: &[TokenEntry], t: &TokenEntry) -> Result<(), KeyError> {
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

pub(super) fn build(raw: RawConfig, base: &Path) -> Result<Config, KeyError> {
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
    let callbacks = build_callbacks(raw.callbacks, base)?;
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
    let uses_callbacks =
        !callbacks.allow_urls.is_empty() || modules.iter().any(|m| !m.callbacks.is_empty());
    if uses_callbacks && callbacks.keys.is_empty() {
        return Err((
            "callbacks.secrets".into(),
            "is needed once a module names callbacks or callbacks.allow_urls is set: every delivery is signed (a secret is `whsec_` and base64 of 24 to 64 random bytes; `openssl rand -base64 32`)".into(),
        ));
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
        callbacks,
        auth: AuthConfig {
            allow_anonymous: raw.auth.allow_anonymous,
            tokens,
            tokens_file: None,
        },
        modules,
    })
}

/// `[storage]`: `path` or `url`, not both.
pub(super) fn build_storage(raw: RawStorage, base: &Path) -> Result<StorageConfig, KeyError> {
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

pub(super) fn is_module_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

pub(super) fn is_param_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

pub(super) fn check_env_name(s: &str) -> Result<(), String> {
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

/// `[callbacks]`.
fn build_callbacks(raw: RawCallbacks, base: &Path) -> Result<CallbacksConfig, KeyError> {
    let mut keys = Vec::new();
    for (i, v) in raw.secrets.into_iter().enumerate() {
        let key = format!("callbacks.secrets[{i}]");
        let (text, _) = resolve(v, base, &key)?;
        keys.push(crate::callbacks::SigningKey::parse(&text).map_err(|m| (key, m))?);
    }
    for (i, url) in raw.allow_urls.iter().enumerate() {
        crate::callbacks::check_prefix(url)
            .map_err(|m| (format!("callbacks.allow_urls[{i}]"), m))?;
    }
    let timeout = raw.timeout.unwrap_or(Duration::from_secs(10));
    if timeout.is_zero() {
        return Err(("callbacks.timeout".into(), "must be longer than 0s".into()));
    }
    let retry_for = raw.retry_for.unwrap_or(Duration::from_secs(86_400));
    Ok(CallbacksConfig {
        keys,
        allow_urls: raw.allow_urls,
        timeout,
        retry_for,
    })
}
