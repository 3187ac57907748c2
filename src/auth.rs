//! Who may do what: API tokens, their scopes and the modules they may see. No HTTP here: the
//! API turns a request's `Authorization` header into a [`Caller`] with [`Auth::authenticate`]
//! and asks it [`Caller::can`] and [`Caller::sees_module`].
//!
//! Tokens are never stored: the config holds the SHA-256 of each one, and a presented token is
//! hashed and looked up. (A lookup by hash reveals nothing usable about a token through timing:
//! finding a token from its hash is the preimage problem.)

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// What a token may do. Every route but `/healthz` needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `GET /modules`, `GET /modules/{id}`.
    ModulesRead,
    /// `POST /runs`.
    RunsCreate,
    /// `GET /runs`, `GET /runs/{id}`, its output and its stream.
    RunsRead,
    /// `DELETE /runs/{id}`.
    RunsCancel,
    /// `GET /metrics`.
    MetricsRead,
}

impl Scope {
    /// Every scope, in documentation order.
    pub const ALL: [Scope; 5] = [
        Scope::ModulesRead,
        Scope::RunsCreate,
        Scope::RunsRead,
        Scope::RunsCancel,
        Scope::MetricsRead,
    ];

    /// What `modrun token new` gives when no scope is named: running modules and watching
    /// them (not the metrics, which are for a scraper's token).
    pub const DEFAULT: [Scope; 4] = [
        Scope::ModulesRead,
        Scope::RunsCreate,
        Scope::RunsRead,
        Scope::RunsCancel,
    ];

    /// The wire name (`runs:create`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::ModulesRead => "modules:read",
            Scope::RunsCreate => "runs:create",
            Scope::RunsRead => "runs:read",
            Scope::RunsCancel => "runs:cancel",
            Scope::MetricsRead => "metrics:read",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|sc| sc.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown scope `{s}` (expected one of {})",
                    Scope::ALL.map(|s| s.as_str()).join(", ")
                )
            })
    }
}

/// A module-id pattern: `*` matches any run of characters, `?` any one; everything else
/// matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulePattern(String);

impl ModulePattern {
    /// A pattern of module-id characters (`[a-z0-9_-]`) and the wildcards `*` and `?`.
    pub fn new(p: &str) -> Result<Self, String> {
        let ok = (1..=64).contains(&p.len())
            && p.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*?".contains(&c));
        if ok {
            Ok(Self(p.to_owned()))
        } else {
            Err(format!(
                "`{p}` is not a module pattern (module-id characters [a-z0-9_-] with * and ?)"
            ))
        }
    }

    /// The pattern as written (also valid SQLite `GLOB` syntax: no `[` can occur).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True if `id` matches the whole pattern.
    pub fn matches(&self, id: &str) -> bool {
        glob(self.0.as_bytes(), id.as_bytes())
    }
}

/// `*`/`?` matching, iterative with one backtrack point (linear for these patterns).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// One configured token (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// Shown as a run's `created_by` / `cancelled_by` and in log lines.
    pub name: String,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The modules it may see (and run).
    pub modules: Vec<ModulePattern>,
}

/// Who is calling: a token's name, scopes and module patterns, or the anonymous caller (every
/// scope, every module) where anonymous access is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    name: Option<String>,
    scopes: Vec<Scope>,
    /// `None`: every module.
    modules: Option<Vec<ModulePattern>>,
}

impl Caller {
    /// The anonymous caller: may do everything.
    pub fn anonymous() -> Self {
        Self {
            name: None,
            scopes: Scope::ALL.to_vec(),
            modules: None,
        }
    }

    /// The token's name; `None` when anonymous.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// True if it has `scope`.
    pub fn can(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Every scope it has.
    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
    }

    /// True if it may see (and run) module `id`.
    pub fn sees_module(&self, id: &str) -> bool {
        self.modules
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(id)))
    }

    /// Its module patterns; `None` when it sees every module.
    pub fn module_patterns(&self) -> Option<&[ModulePattern]> {
        self.modules.as_deref()
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, and anonymous access is not allowed.
    #[error("this request needs an API token (Authorization: Bearer <token>)")]
    Missing,
    /// A token that is not configured (or a malformed header).
    #[error("the API token is not valid")]
    Invalid,
}

/// The configured tokens and the anonymous policy.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    by_hash: HashMap<[u8; 32], Arc<Caller>>,
    anonymous: Option<Arc<Caller>>,
}

impl Auth {
    /// Tokens from the config; `anonymous`: whether requests without a token are served (as
    /// the anonymous caller).
    pub fn new(tokens: &[TokenEntry], anonymous: bool) -> Self {
        let by_hash = tokens
            .iter()
            .map(|t| {
                (
                    t.sha256,
                    Arc::new(Caller {
                        name: Some(t.name.clone()),
                        scopes: t.scopes.clone(),
                        modules: Some(t.modules.clone()),
                    }),
                )
            })
            .collect();
        Self {
            by_hash,
            anonymous: anonymous.then(|| Arc::new(Caller::anonymous())),
        }
    }

    /// True when at least one token is configured.
    pub fn has_tokens(&self) -> bool {
        !self.by_hash.is_empty()
    }

    /// True when requests without a token are served.
    pub fn allows_anonymous(&self) -> bool {
        self.anonymous.is_some()
    }

    /// The caller of a request with this `Authorization` header value (if any).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<Caller>, AuthError> {
        let Some(header) = authorization else {
            return self.anonymous.clone().ok_or(AuthError::Missing);
        };
        let token = bearer(header).ok_or(AuthError::Invalid)?;
        self.by_hash
            .get(&sha256(token))
            .cloned()
            .ok_or(AuthError::Invalid)
    }
}

/// The token of a `Bearer` authorization header (the scheme is case-insensitive).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from 64 hex digits.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The prefix of every token modrun makes, so that one is recognisable (in a leaked file, a
/// secret scanner, a shell history).
pub const TOKEN_PREFIX: &str = "mrt_";

/// A fresh token: [`TOKEN_PREFIX`] and 256 random bits from the kernel, in hex.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_ids() {
        let p = |s: &str| ModulePattern::new(s).unwrap();
        assert!(p("report-*").matches("report-daily"));
        assert!(p("report-*").matches("report-"));
        assert!(!p("report-*").matches("xreport-daily"));
        assert!(p("greet").matches("greet"));
        assert!(!p("greet").matches("greeting"));
        assert!(p("*").matches("anything"));
        assert!(p("a?c").matches("abc"));
        assert!(!p("a?c").matches("ac"));
        assert!(p("*-x-*").matches("a-x-b-x-c"));
        assert!(ModulePattern::new("Greet").is_err());
        assert!(ModulePattern::new("a[b]").is_err());
    }

    #[test]
    fn tokens_are_looked_up_by_hash() {
        let token = new_token().unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == 4 + 64);
        assert_ne!(token, new_token().unwrap());
        let entry = TokenEntry {
            name: "ci".into(),
            sha256: sha256(token.as_bytes()),
            scopes: vec![Scope::RunsRead],
            modules: vec![ModulePattern::new("report-*").unwrap()],
        };
        assert_eq!(parse_sha256_hex(&hex(&entry.sha256)), Some(entry.sha256));
        let auth = Auth::new(&[entry], false);
        let header = format!("Bearer {token}");
        let caller = auth.authenticate(Some(header.as_bytes())).unwrap();
        assert_eq!(caller.name(), Some("ci"));
        assert!(caller.can(Scope::RunsRead) && !caller.can(Scope::RunsCreate));
        assert!(caller.sees_module("report-x") && !caller.sees_module("greet"));
        let lower = format!("bearer  {token} ");
        assert!(auth.authenticate(Some(lower.as_bytes())).is_ok());
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            auth.authenticate(Some(b"Bearer mrt_wrong")),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.authenticate(Some(token.as_bytes())),
            Err(AuthError::Invalid),
            "no scheme"
        );
        let open = Auth::new(&[], true);
        assert_eq!(open.authenticate(None).unwrap().name(), None);
    }
}
