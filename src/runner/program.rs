//! Program resolution and spawn errors: where the program a run names is, whether it can be
//! executed, and how a failure to start it is told (in full to the operator's log; without
//! server paths or the server's PATH to clients).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::process::ProcSpec;
use super::spawn::Step;

/// Why a process could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot start `{program}`: {reason}")]
pub(crate) struct SpawnError {
    /// The program as resolved (or as declared, when it was not found).
    pub program: String,
    /// What went wrong.
    pub reason: SpawnReason,
}

/// What kept a program from starting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SpawnReason {
    /// A bare name that is on no directory of the child's `PATH`.
    #[error("not found on PATH ({path})")]
    NotOnPath {
        /// The child's `PATH`.
        path: String,
    },
    /// No such file.
    #[error("no such file")]
    NoSuchFile,
    /// `execve` said ENOENT for a file that exists: its interpreter (`#!`) or loader is missing.
    #[error("{0} (is its interpreter installed?)")]
    NoInterpreter(String),
    /// Not executable, a directory, or refused by the OS.
    #[error("permission denied ({0})")]
    PermissionDenied(String),
    /// Anything else the OS refused.
    #[error("{0}")]
    Os(String),
}

impl SpawnError {
    fn new(program: &Path, reason: SpawnReason) -> Self {
        Self {
            program: program.display().to_string(),
            reason,
        }
    }

    /// The sentence a client sees (a run's error): it names the program as the module
    /// declares it (a path outside the module's folder by its file name only) and never the
    /// server's PATH.
    pub fn public_message(&self, spec: &ProcSpec) -> String {
        let shown = shown_program(spec);
        let why = match &self.reason {
            SpawnReason::NotOnPath { .. } => "not found on the module's PATH".to_owned(),
            SpawnReason::NoSuchFile => "no such file".to_owned(),
            SpawnReason::NoInterpreter(_) => {
                "its interpreter was not found (check its #! line)".to_owned()
            }
            SpawnReason::PermissionDenied(why) => format!("permission denied ({why})"),
            SpawnReason::Os(why) => why.clone(),
        };
        format!("cannot start `{shown}`: {why}")
    }
}

/// The program of `spec` as a client may see it: a bare name or a relative path as declared; an
/// absolute path inside the working directory relative to it; any other absolute path by its
/// file name only.
fn shown_program(spec: &ProcSpec) -> String {
    let program = Path::new(&spec.program);
    if !program.is_absolute() {
        return program.display().to_string();
    }
    if let Ok(inside) = program.strip_prefix(&spec.cwd) {
        return format!("./{}", inside.display());
    }
    program
        .file_name()
        .map_or_else(|| "?".to_owned(), |n| n.to_string_lossy().into_owned())
}

/// The system's limit on a child's argv and environment together (`sysconf(_SC_ARG_MAX)`), less
/// a page for what `execve` adds (the program's path, the auxiliary vector). Read once.
pub(crate) fn arg_max() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let raw = nix::unistd::sysconf(nix::unistd::SysconfVar::ARG_MAX)
            .ok()
            .flatten()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(128 * 1024);
        raw.saturating_sub(4096)
    })
}

/// Resolve the program as the child would: a name with a `/` is a path (relative to `cwd`),
/// checked to be an executable file; a bare name is looked up on the child's `PATH`.
pub(crate) fn resolve_program(spec: &ProcSpec) -> Result<PathBuf, SpawnError> {
    locate(spec, true)
}

/// [`resolve_program`] for a spawn: a path is not checked first (one `stat` less per run);
/// if it is not an executable file, `execve` fails and [`spawn_error`] finds out why.
pub(crate) fn program_to_spawn(spec: &ProcSpec) -> Result<PathBuf, SpawnError> {
    locate(spec, false)
}

fn locate(spec: &ProcSpec, check_path: bool) -> Result<PathBuf, SpawnError> {
    let program = Path::new(&spec.program);
    if spec.program.is_empty() {
        return Err(SpawnError::new(program, SpawnReason::NoSuchFile));
    }
    let candidate = if program.as_os_str().as_encoded_bytes().contains(&b'/') {
        let p = spec.cwd.join(program);
        if check_path {
            check_executable(&p)?;
        }
        p
    } else {
        let path_var: Option<OsString> = match &spec.env {
            Some(env) => env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone()),
            None => std::env::var_os("PATH"),
        };
        let path_var = path_var.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let mut denied = None;
        let mut found = None;
        for dir in std::env::split_paths(&path_var) {
            let dir = if dir.is_relative() {
                spec.cwd.join(dir)
            } else {
                dir
            };
            let p = dir.join(program);
            match check_executable(&p) {
                Ok(()) => {
                    found = Some(p);
                    break;
                }
                Err(
                    e @ SpawnError {
                        reason: SpawnReason::PermissionDenied(_),
                        ..
                    },
                ) => {
                    denied.get_or_insert(e);
                }
                Err(_) => {}
            }
        }
        match (found, denied) {
            (Some(p), _) => p,
            (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(SpawnError::new(
                    program,
                    SpawnReason::NotOnPath {
                        path: path_var.to_string_lossy().into_owned(),
                    },
                ));
            }
        }
    };
    Ok(candidate)
}

/// Whether a declared module's program can be started as its runs will start it: a bare name
/// on the `PATH` its children get (`base_env`, then the module's `env`), a path relative to its
/// `cwd`. `Ok` is the resolved file; `Err` says why not, in full (for the operator: it may name
/// server paths).
pub fn check_module_program(
    module: &crate::module::Module,
    base_env: &[(String, String)],
) -> Result<PathBuf, String> {
    let Some(program) = module.command.first() else {
        return Err("the command is empty".into());
    };
    let mut env: Vec<(OsString, OsString)> =
        base_env.iter().map(|(k, v)| (k.into(), v.into())).collect();
    for (k, v) in &module.env {
        env.retain(|(name, _)| name.as_os_str() != std::ffi::OsStr::new(k));
        env.push((k.into(), v.into()));
    }
    let spec = ProcSpec {
        program: program.into(),
        args: Vec::new(),
        cwd: module.cwd.clone(),
        env: Some(env),
        stdin: None,
        run_id: None,
        limits: module.limits,
        creds: None,
    };
    resolve_program(&spec)
        // `cwd/./x` shown as `cwd/x`.
        .map(|p| p.components().collect())
        .map_err(|e| e.to_string())
}

/// Check that `p` is an existing regular file with an execute bit.
pub(crate) fn check_executable(p: &Path) -> Result<(), SpawnError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |reason| Err(SpawnError::new(p, reason));
    match std::fs::metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(SpawnReason::NoSuchFile),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            fail(SpawnReason::PermissionDenied(e.to_string()))
        }
        Err(e) => fail(SpawnReason::Os(e.to_string())),
        Ok(m) if m.is_dir() => fail(SpawnReason::PermissionDenied("it is a directory".into())),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => fail(SpawnReason::PermissionDenied(
            "the file is not executable".into(),
        )),
        Ok(_) => Ok(()),
    }
}

/// The error of an `execve` (or set-up) failure of `program` at `step`.
pub(crate) fn spawn_error(program: &Path, e: &std::io::Error, step: Step) -> SpawnError {
    if step == Step::Limits {
        return SpawnError::new(
            program,
            SpawnReason::Os(format!("cannot apply the module's limits or user: {e}")),
        );
    }
    // A spawn does not check its program beforehand (`program_to_spawn`): a file that is
    // missing, a directory or not executable is named as such now; an executable file that
    // `execve` could not find has a missing interpreter (`#!`) or loader.
    if step == Step::Exec
        && matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
        )
        && let Err(why) = check_executable(program)
    {
        return why;
    }
    let reason = match e.kind() {
        std::io::ErrorKind::NotFound => SpawnReason::NoInterpreter(e.to_string()),
        std::io::ErrorKind::PermissionDenied => SpawnReason::PermissionDenied(e.to_string()),
        _ => SpawnReason::Os(e.to_string()),
    };
    SpawnError::new(program, reason)
}

/// Shell-quote one word so that `sh` would read it back verbatim.
pub(crate) fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The command line of `spec`, shell-quoted.
pub(crate) fn command_line(spec: &ProcSpec) -> String {
    std::iter::once(&spec.program)
        .chain(&spec.args)
        .map(|w| shell_quote(&w.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_round_trips() {
        assert_eq!(shell_quote("abc-1.txt"), "abc-1.txt");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn bare_names_are_found_on_the_childs_path() {
        let spec = ProcSpec {
            program: "sh".into(),
            args: vec![],
            cwd: "/".into(),
            env: Some(vec![("PATH".into(), "/nonexistent:/bin:/usr/bin".into())]),
            stdin: None,
            run_id: None,
            limits: Default::default(),
            creds: None,
        };
        assert!(resolve_program(&spec).unwrap().ends_with("sh"));
        let missing = ProcSpec {
            program: "no-such-program-xyz".into(),
            ..spec.clone()
        };
        let err = resolve_program(&missing).unwrap_err();
        assert!(matches!(err.reason, SpawnReason::NotOnPath { .. }), "{err}");
        assert!(err.to_string().contains("not found on PATH"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain.txt");
        std::fs::write(&file, "not a program").unwrap();
        let not_exec = ProcSpec {
            program: file.into_os_string(),
            ..spec
        };
        let err = resolve_program(&not_exec).unwrap_err();
        assert!(
            matches!(err.reason, SpawnReason::PermissionDenied(_)),
            "{err}"
        );
    }

    #[test]
    fn clients_see_no_server_paths() {
        let spec = |program: &str, path: &str| ProcSpec {
            program: program.into(),
            args: vec![],
            cwd: "/srv/modules".into(),
            env: Some(vec![("PATH".into(), path.into())]),
            stdin: None,
            run_id: None,
            limits: Default::default(),
            creds: None,
        };
        let missing = spec("no-such-tool", "/secret/bin:/usr/bin");
        let err = resolve_program(&missing).unwrap_err();
        assert!(
            err.to_string().contains("/secret/bin"),
            "the log has it: {err}"
        );
        let public = err.public_message(&missing);
        assert_eq!(
            public,
            "cannot start `no-such-tool`: not found on the module's PATH"
        );
        let outside = spec("/opt/private/bin/tool", "/usr/bin");
        let err = resolve_program(&outside).unwrap_err();
        assert_eq!(
            err.public_message(&outside),
            "cannot start `tool`: no such file"
        );
        let inside = spec("/srv/modules/run.sh", "/usr/bin");
        let err = resolve_program(&inside).unwrap_err();
        assert_eq!(
            err.public_message(&inside),
            "cannot start `./run.sh`: no such file"
        );
    }
}
