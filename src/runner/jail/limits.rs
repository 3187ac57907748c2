//! Resource limits of a run: the `setrlimit` calls for a module's `limits` (and the open-files
//! limit every child gets), and naming the limit that ended a process.

use std::sync::OnceLock;

use super::Jail;
use crate::module::Limits;
use crate::run::Exit;

/// The open-files limit children get when their module sets none: modrun's own soft limit as
/// it was before modrun raised it (programs that use `select()` expect no more than that).
static CHILD_OPEN_FILES: OnceLock<u64> = OnceLock::new();

/// Record modrun's soft open-files limit before it raised it: what children get when their
/// module sets no `open_files` limit (programs that use `select()` expect no more than that).
pub fn set_child_open_files(soft: u64) {
    let _ = CHILD_OPEN_FILES.set(soft);
}

/// The `setrlimit` calls for a run's limits: (resource, soft, hard).
pub(crate) fn rlimits(l: &Limits) -> Vec<(libc::__rlimit_resource_t, u64, u64)> {
    let mut out = Vec::new();
    if let Some(m) = l.memory {
        out.push((libc::RLIMIT_AS, m, m));
    }
    if let Some(c) = l.cpu {
        // SIGXCPU at the limit, SIGKILL a second later if it is ignored.
        let s = c.as_secs().max(1);
        out.push((libc::RLIMIT_CPU, s, s + 1));
    }
    match (l.open_files, CHILD_OPEN_FILES.get()) {
        (Some(n), _) => out.push((libc::RLIMIT_NOFILE, n, n)),
        (None, Some(soft)) => {
            // Read once: modrun never changes its hard limit (a system call per run otherwise).
            static HARD: OnceLock<Option<u64>> = OnceLock::new();
            let hard = HARD.get_or_init(|| {
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .ok()
                    .map(|(_, hard)| hard)
            });
            out.push((libc::RLIMIT_NOFILE, *soft, hard.unwrap_or(*soft)));
        }
        (None, None) => {}
    }
    if let Some(n) = l.processes {
        out.push((libc::RLIMIT_NPROC, n, n));
    }
    if let Some(n) = l.file_size {
        out.push((libc::RLIMIT_FSIZE, n, n));
    }
    out
}

impl Jail {
    /// The limit that ended a process that exited this way, if one did: a CPU or file-size
    /// limit by its signal, the memory limit by a fatal signal of a process that had one
    /// (running out of address space makes allocations fail, which many programs die of; one
    /// that handles it, as Python does with MemoryError, exits with its own error instead).
    pub(crate) fn limit_hit(&self, exit: Exit, limits: &Limits) -> Option<String> {
        // A shell that runs the program reports its death by signal N as exit code 128 + N.
        let sig = match exit {
            Exit::Signal(sig) => sig,
            Exit::Code(c) if (129..160).contains(&c) => c - 128,
            Exit::Code(_) => return None,
        };
        let cpu = || {
            limits
                .cpu
                .map(|c| format!("cpu ({})", humantime::format_duration(c)))
        };
        let memory = || {
            limits
                .memory
                .map(|n| format!("memory ({} MiB of address space)", n >> 20))
        };
        match sig {
            libc::SIGXCPU => cpu(),
            libc::SIGXFSZ => limits.file_size.map(|n| format!("file_size ({n} bytes)")),
            // The CPU limit's hard stop is a SIGKILL a second after SIGXCPU.
            libc::SIGKILL => cpu().or_else(memory),
            libc::SIGSEGV | libc::SIGABRT | libc::SIGBUS => memory(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limits_are_named_by_how_the_process_died() {
        let limits = Limits {
            memory: Some(64 << 20),
            cpu: Some(Duration::from_secs(60)),
            file_size: Some(1024),
            ..Limits::default()
        };
        let j = Jail::none();
        let hit = |e| j.limit_hit(e, &limits);
        assert_eq!(
            hit(Exit::Signal(libc::SIGXCPU)).as_deref(),
            Some("cpu (1m)")
        );
        assert_eq!(
            hit(Exit::Code(128 + libc::SIGXFSZ)).as_deref(),
            Some("file_size (1024 bytes)")
        );
        assert!(
            hit(Exit::Signal(libc::SIGSEGV))
                .unwrap()
                .starts_with("memory (64 MiB")
        );
        assert_eq!(hit(Exit::Code(1)), None);
        assert_eq!(hit(Exit::Signal(libc::SIGTERM)), None);
        assert_eq!(
            j.limit_hit(Exit::Signal(libc::SIGXCPU), &Limits::default()),
            None
        );
        let nofile = rlimits(&Limits {
            open_files: Some(64),
            ..Limits::default()
        });
        assert!(nofile.contains(&(libc::RLIMIT_NOFILE, 64, 64)));
    }
}
