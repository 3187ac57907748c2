//! Starting a child without fork(2): `clone(CLONE_VM | CLONE_VFORK)`, the way `posix_spawn`
//! does, but with the two things `posix_spawn` cannot do: a parent-death signal and our own
//! process group, both set in the child before `execve`.
//!
//! Why not `std::process::Command` + `pre_exec`: a `pre_exec` hook forces std onto the fork
//! path, and forking a multi-threaded server copies its page tables, write-protects its memory
//! and shoots down TLBs on every core. Measured on the run-throughput benchmark: fork took
//! half of modrun's CPU per run (`copy_page_range`, `smp_call_function_many_cond`, page
//! faults), and runs/s nearly doubled without it. With `CLONE_VM` the child borrows the
//! parent's memory until it execs; the calling thread is suspended meanwhile.
//!
//! The child runs on its own small stack and must not allocate or take locks: everything it
//! needs (C strings, pointer arrays, file descriptors) is prepared before `clone`, and it only
//! makes async-signal-safe system calls. All signals but SIGCHLD (which only a process's own
//! children send) are blocked around `clone` and the child resets every caught signal to its
//! default before unblocking, so that no handler of the parent ever runs on the child's side
//! of the shared memory.
//!
//! The descriptor table: the child shares ours at first (`CLONE_FILES`) and copies only its
//! bottom, where its stdio waits on reserved numbers (see [`super::fd_table`]), so that a
//! spawn does not cost more the more connections the server holds; it closes everything but
//! 0, 1 and 2 before exec.
//!
//! Reaping: [`Child::try_reap`] (the asynchronous driver's first try, once the pipes have
//! closed), [`Child::wait`] (a pidfd, asynchronously) or [`Child::wait_blocking`]; a `Child`
//! dropped before it was reaped has its group killed and is handed to one background reaper
//! thread.

#![expect(
    unsafe_code,
    reason = "clone(CLONE_VM|CLONE_VFORK), signal masks and raw fds; each block says why it is sound"
)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::sync::mpsc;

use libc::{c_char, c_int, c_void};

use super::fd_table;
use super::jail::CgroupFds;
use super::process::ProcSpec;

mod clone3;

/// A started child: its pid (also its process-group id) and our ends of its pipes.
pub(crate) struct Child {
    pub pid: u32,
    /// Write end of its stdin, when the run sends input (otherwise its stdin is /dev/null).
    pub stdin: Option<OwnedFd>,
    /// Read end of its stdout.
    pub stdout: Option<OwnedFd>,
    /// Read end of its stderr.
    pub stderr: Option<OwnedFd>,
    reaped: bool,
}

/// Resource limits a child gets at most, one per kind (`setrlimit`).
const MAX_RLIMITS: usize = 8;

/// What the child needs, prepared by the parent (the child must not allocate).
struct ChildArgs {
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    /// Where the child writes its step and errno if it fails before exec: memory of the
    /// parent's frame, shared through `CLONE_VM` (no pipe: the parent reads it once `clone`
    /// has returned, which `CLONE_VFORK` delays until the child has exec'd or exited).
    report: *mut [c_int; 2],
    parent: libc::pid_t,
    /// `cgroup.procs` of the run's cgroup, open for writing; -1 for none (or born there).
    cgroup: RawFd,
    /// The kernel has reset the signal handlers already (`CLONE_CLEAR_SIGHAND`).
    handlers_cleared: bool,
    /// Resource limits to set, the first `rlimit_count` of them.
    rlimits: [(libc::__rlimit_resource_t, libc::rlimit); MAX_RLIMITS],
    rlimit_count: usize,
    /// Switch to this group and user (dropping supplementary groups) before exec.
    creds: Option<(libc::gid_t, libc::uid_t)>,
    /// Non-zero: the child shares the parent's descriptor table (`CLONE_FILES`) and first
    /// makes a private copy of the descriptors below this number (see [`super::fd_table`]).
    files_limit: u32,
    /// Close every descriptor above 2 before exec (`close_range` exists).
    close_rest: bool,
}

/// Which set-up step in the child failed (reported with its errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Joining the run's cgroup.
    Cgroup,
    /// Setting a resource limit or dropping privileges.
    Limits,
    /// Anything else (process group, stdio, cwd, exec).
    Exec,
}

const STEP_CGROUP: c_int = 1;
const STEP_LIMITS: c_int = 2;
const STEP_EXEC: c_int = 3;
/// The child never ran: killed before its first instruction.
const NOT_RUN: c_int = -1;
/// The child could not unshare the descriptor table (then nothing was done yet: the spawn is
/// retried with a copied table).
const STEP_FILES: c_int = 4;

/// Why a child could not be started.
#[derive(Debug)]
pub(crate) struct SpawnFailure {
    /// The step that failed.
    pub step: Step,
    /// The OS error.
    pub error: io::Error,
}

impl From<io::Error> for SpawnFailure {
    fn from(error: io::Error) -> Self {
        Self {
            step: Step::Exec,
            error,
        }
    }
}

/// What a child is set up with before exec, beyond `ProcSpec`.
#[derive(Debug, Default)]
pub(crate) struct Setup {
    /// The run's cgroup (the child is born there, or moves itself in); the caller keeps its
    /// descriptors open until `spawn` returns.
    pub cgroup: Option<CgroupFds>,
    /// Resource limits (resource, soft, hard).
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
    /// Group and user to switch to.
    pub creds: Option<(u32, u32)>,
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    // The text is not shown: it may be a secret.
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment value contains a NUL byte",
        )
    })
}

/// `KEY=value` as a C string, in one allocation.
fn env_entry(k: &OsStr, v: &OsStr) -> io::Result<CString> {
    let mut kv = Vec::with_capacity(k.len() + v.len() + 2);
    kv.extend_from_slice(k.as_bytes());
    kv.push(b'=');
    kv.extend_from_slice(v.as_bytes());
    // The room for the terminating NUL is there already: no second allocation.
    CString::new(kv).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment value contains a NUL byte",
        )
    })
}

fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A close-on-exec descriptor numbered 3 or higher (so that the child's dup2 onto 0, 1, 2 can
/// never clobber another of its descriptors, even if the server runs with a closed stdio fd).
fn high_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if fd > 2 {
        return Ok(owned);
    }
    // SAFETY: fcntl on a valid descriptor; the result is a new descriptor we own.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; `owned` (the low number) is closed when it goes out of scope.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((high_fd(fds[0])?, high_fd(fds[1])?))
}

/// Make our end of a pipe from [`spawn`] non-blocking (its only status flag: one call, where
/// reading the flags first would take two).
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_SETFL changes only its status flags.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// /dev/null open for reading (close-on-exec), opened once: the stdin of every run without
/// input (each child dup2s it onto its own descriptor 0).
pub(super) fn dev_null() -> io::Result<RawFd> {
    static NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    // SAFETY: a NUL-terminated literal path.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = high_fd(fd)?;
    // Two threads may open it at once: one descriptor is kept, the other closed.
    Ok(NULL.get_or_init(|| fd).as_raw_fd())
}

/// The stack a child runs on until it execs: 64 KiB, allocated once per thread that spawns
/// and reused (a fresh allocation per run cost a heap extension and its page faults). The
/// spawning thread is suspended while its child uses it (`CLONE_VFORK`), so one per thread
/// is never used twice at once.
const CHILD_STACK: usize = 64 * 1024;

thread_local! {
    static STACK: std::cell::Cell<Option<Box<[std::mem::MaybeUninit<u8>]>>> =
        const { std::cell::Cell::new(None) };
}

/// Start `program` as `spec` describes: own process group, parent-death signal SIGKILL, stdin
/// from the returned pipe or /dev/null, stdout and stderr to pipes, cwd, and exactly the
/// environment of `spec.env` (or the parent's); then what `setup` adds (its cgroup, resource
/// limits, another user), core dumps off and no new privileges (setuid binaries do not
/// elevate). Fails with the step and the OS error if the program cannot be executed.
pub(crate) fn spawn(program: &Path, spec: &ProcSpec, setup: &Setup) -> Result<Child, SpawnFailure> {
    let path = cstring(program.as_os_str())?;
    let argv_c = std::iter::once(spec.program.as_os_str())
        .chain(spec.args.iter().map(|a| a.as_os_str()))
        .map(cstring)
        .collect::<io::Result<Vec<_>>>()?;
    let envp_c = match &spec.env {
        Some(e) => e
            .iter()
            .map(|(k, v)| env_entry(k, v))
            .collect::<io::Result<Vec<_>>>()?,
        None => std::env::vars_os()
            .map(|(k, v)| env_entry(&k, &v))
            .collect::<io::Result<Vec<_>>>()?,
    };
    let argv = pointers(&argv_c);
    let envp = pointers(&envp_c);
    let cwd = cstring(spec.cwd.as_os_str())?;

    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (in_r, in_w) = match spec.stdin {
        Some(_) => {
            let (r, w) = pipe()?;
            (Some(r), Some(w))
        }
        None => (None, None),
    };
    let stdin = match &in_r {
        Some(r) => r.as_raw_fd(),
        None => dev_null()?,
    };
    // [NOT_RUN, 0] until the child runs; then [0, 0], or a failed step and its errno.
    let mut report: [c_int; 2] = [NOT_RUN, 0];
    let mut rlimits = [(
        0,
        libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        },
    ); MAX_RLIMITS];
    for (slot, (resource, soft, hard)) in rlimits.iter_mut().zip(&setup.rlimits) {
        *slot = (
            *resource,
            libc::rlimit {
                rlim_cur: *soft,
                rlim_max: *hard,
            },
        );
    }
    // Stdio on low reserved numbers, so that the child copies only the bottom of our
    // descriptor table (see `fd_table`); given back as soon as `clone` has returned.
    let mut reserved = fd_table::Reserved::get().and_then(|r| Some((r.take()?, r.limit())));
    let mut stdio = [stdin, out_w.as_raw_fd(), err_w.as_raw_fd()];
    if let Some((taken, _)) = &mut reserved {
        let pipes = [
            in_r.as_ref().map(|r| r.as_raw_fd()),
            Some(stdio[1]),
            Some(stdio[2]),
        ];
        let placed: io::Result<Vec<RawFd>> = pipes
            .iter()
            .enumerate()
            .map(|(which, fd)| taken.place(which, *fd))
            .collect();
        match placed {
            Ok(placed) => stdio.copy_from_slice(&placed),
            // Not expected (dup3 onto a number we hold); the whole table is copied instead.
            Err(_) => reserved = None,
        }
    }
    let mut args = ChildArgs {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: cwd.as_ptr(),
        stdin: stdio[0],
        stdout: stdio[1],
        stderr: stdio[2],
        report: &mut report,
        // SAFETY: getpid cannot fail.
        parent: unsafe { libc::getpid() },
        cgroup: -1,
        handlers_cleared: false,
        rlimits,
        rlimit_count: setup.rlimits.len().min(MAX_RLIMITS),
        creds: setup.creds,
        files_limit: reserved.as_ref().map_or(0, |(_, limit)| *limit),
        close_rest: fd_table::close_range_works(),
    };
    let share = if reserved.is_some() {
        libc::CLONE_FILES
    } else {
        0
    };
    // The child's stack: it runs there until it execs (or exits), while this thread waits.
    // Never read from Rust, so it need not be initialised.
    let mut stack = STACK
        .take()
        .unwrap_or_else(|| Box::new_uninit_slice(CHILD_STACK));
    let base = stack.as_mut_ptr();
    // SAFETY: one past the end of the allocation, aligned down to 16 bytes as the ABI wants;
    // the stack grows down from there and stays alive until clone returns.
    let top = unsafe { base.add(stack.len()) };
    let top = ((top as usize) & !15) as *mut c_void;

    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask only write into it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // Every signal but SIGCHLD. A signal blocked in the thread that is a child's parent is
    // not discarded at once even when nothing handles it: an exit of an earlier child during
    // this thread's wait for the exec below would be queued and wake another thread of ours
    // to discard it (one wake-up per few runs under load). SIGCHLD comes only from a
    // process's own children, and the new child has none before it execs: no handler (an
    // embedding program's, say) can run in it.
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigdelset(&mut all, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // In subreaper mode, held until the child is recorded as a run leader.
    let leader = super::jail::LeaderGuard::new();
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | share;
    // clone3 where the system has it: born in the cgroup, handlers reset by the kernel.
    let mut refused = None;
    let mut pid = -1;
    let mut born_in_cgroup = false;
    if clone3::available() {
        let mut c = clone3::CloneArgs {
            flags: flags as u64 | clone3::CLONE_CLEAR_SIGHAND,
            exit_signal: libc::SIGCHLD as u64,
            stack: base as u64,
            stack_size: top as u64 - base as u64,
            ..Default::default()
        };
        args.cgroup = setup.cgroup.map_or(-1, |c| c.procs);
        if let Some(dir) = setup.cgroup.and_then(|c| c.dir)
            && clone3::into_cgroup()
        {
            c.flags |= clone3::CLONE_INTO_CGROUP;
            c.cgroup = dir as u64;
            args.cgroup = -1;
        }
        args.handlers_cleared = true;
        // SAFETY: as for `clone` below; the stack's top is 16-byte aligned.
        match unsafe { clone3::clone3(&c, child_main, &args as *const ChildArgs as *mut c_void) } {
            Ok(p) => {
                pid = p;
                born_in_cgroup = c.flags & clone3::CLONE_INTO_CGROUP != 0;
            }
            Err(e) => refused = Some(e),
        }
    }
    if pid < 0 {
        args.cgroup = setup.cgroup.map_or(-1, |c| c.procs);
        args.handlers_cleared = false;
        // SAFETY: CLONE_VFORK suspends this thread until the child has exec'd or exited, so
        // everything `args` points to (owned by this frame) outlives the child's use of it;
        // the child only makes async-signal-safe calls (see `child_main`); every signal that
        // could have a handler of ours is blocked, so none runs in the child before it
        // resets them.
        pid = unsafe {
            libc::clone(
                child_main,
                top,
                flags | libc::SIGCHLD,
                &args as *const ChildArgs as *mut c_void,
            )
        };
        if pid >= 0
            && let Some(e) = &refused
        {
            clone3::refused(e);
        }
    }
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    STACK.set(Some(stack));
    // The child has its own copies now (or is gone): /dev/null back into the reserved set.
    drop(reserved);
    if pid < 0 {
        return Err(clone_error.into());
    }
    leader.started(pid as u32);
    // Our copies of the child's ends: closing them lets EOF and EPIPE work.
    drop((out_w, err_w, in_r));
    let mut child = Child {
        pid: pid as u32,
        stdin: in_w,
        stdout: Some(out_r),
        stderr: Some(err_r),
        reaped: false,
    };
    // The exec either happened (the report untouched) or failed (a step and an errno). The
    // child wrote it before `clone` returned; a volatile read, since the compiler cannot see
    // that write.
    // SAFETY: `report` is a live local of this frame.
    let [step, errno] = unsafe { std::ptr::read_volatile(&report) };
    if step != 0 {
        let _ = child.wait_blocking();
        if step == NOT_RUN && born_in_cgroup {
            clone3::into_cgroup_failed();
            return spawn(program, spec, setup);
        }
        if step == STEP_FILES {
            fd_table::Reserved::disable(&io::Error::from_raw_os_error(errno));
            return spawn(program, spec, setup);
        }
        let error = match step {
            NOT_RUN => io::Error::other("the process was killed before it could start"),
            _ => io::Error::from_raw_os_error(errno),
        };
        let step = match step {
            STEP_CGROUP => Step::Cgroup,
            STEP_LIMITS => Step::Limits,
            _ => Step::Exec,
        };
        return Err(SpawnFailure { step, error });
    }
    Ok(child)
}

/// Report the failed step and errno to the parent and exit (child side).
unsafe fn fail(report: *mut [c_int; 2], step: c_int) -> ! {
    // SAFETY: errno location of this (borrowed) thread; `report` points into the suspended
    // parent's frame (shared memory); _exit is async-signal-safe.
    unsafe {
        let e = *libc::__errno_location();
        std::ptr::write_volatile(report, [step, e]);
        libc::_exit(127)
    }
}

extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points to the parent's ChildArgs, alive until exec (CLONE_VFORK). Only
    // async-signal-safe system calls follow; nothing allocates.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        std::ptr::write_volatile(a.report, [0, 0]);
        // Handlers live in the parent's memory: every caught signal goes back to its default.
        // SIGPIPE too (the Rust runtime ignores it; programs expect the default). One call per
        // signal sets the default and returns what was there; the few the parent ignores are
        // ignored again (as exec keeps them). (Reading each first, then writing, took twice
        // the calls: ~120 per spawn, some 20 us here.) Every signal but SIGCHLD (which only
        // this child's own children could send) is blocked, so none arrives in between.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        // With CLONE_CLEAR_SIGHAND the kernel did it, but for SIGPIPE (ignored, so kept).
        let first = if a.handlers_cleared {
            libc::sigaction(libc::SIGPIPE, &dfl, std::ptr::null_mut());
            65
        } else {
            1
        };
        for sig in first..65 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut was: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, &dfl, &mut was) == 0
                && sig != libc::SIGPIPE
                && was.sa_sigaction == libc::SIG_IGN
            {
                libc::sigaction(sig, &was, std::ptr::null_mut());
            }
        }
        if libc::setpgid(0, 0) != 0 {
            fail(a.report, STEP_EXEC);
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(a.report, STEP_EXEC);
        }
        // The parent may have died before the death signal was armed.
        if libc::getppid() != a.parent {
            libc::_exit(127);
        }
        // Into the run's cgroup: every descendant stays in it, whatever it does to its
        // process group or session.
        if a.cgroup >= 0 && libc::write(a.cgroup, b"0".as_ptr().cast(), 1) != 1 {
            fail(a.report, STEP_CGROUP);
        }
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
            fail(a.report, STEP_LIMITS);
        }
        for (resource, limit) in &a.rlimits[..a.rlimit_count] {
            if libc::setrlimit(*resource, limit) != 0 {
                fail(a.report, STEP_LIMITS);
            }
        }
        // A table of our own before any descriptor changes: only the bottom of the parent's,
        // where the reserved stdio numbers are (the rest would be closed at exec anyway).
        if a.files_limit != 0
            && libc::syscall(
                libc::SYS_close_range,
                a.files_limit,
                u32::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) != 0
        {
            fail(a.report, STEP_FILES);
        }
        for (from, to) in [(a.stdin, 0), (a.stdout, 1), (a.stderr, 2)] {
            if libc::dup2(from, to) < 0 {
                fail(a.report, STEP_EXEC);
            }
        }
        // Nothing but stdio goes on to the program, not even a descriptor this process
        // inherited without close-on-exec.
        if a.close_rest && libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0) != 0 {
            fail(a.report, STEP_EXEC);
        }
        // Raw system calls, not the libc wrappers: glibc's setuid/setgid signal every thread
        // of the process to change them all, and this child shares the parent's memory.
        if let Some((gid, uid)) = a.creds
            && (libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0)
        {
            fail(a.report, STEP_LIMITS);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(a.report, STEP_LIMITS);
        }
        if libc::chdir(a.cwd) != 0 {
            fail(a.report, STEP_EXEC);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.path, a.argv, a.envp);
        fail(a.report, STEP_EXEC)
    }
}

impl Child {
    fn reap(&mut self, flags: c_int) -> io::Result<Option<ExitStatus>> {
        let mut status: c_int = 0;
        loop {
            // SAFETY: waitpid on our own child, writing into a local int.
            let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, flags) };
            if r > 0 {
                self.reaped = true;
                super::jail::leader_reaped(self.pid);
                return Ok(Some(ExitStatus::from_raw(status)));
            }
            if r == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Reap the child if it has exited, without waiting.
    pub fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    /// Wait for the child to exit and reap it, blocking the thread.
    pub fn wait_blocking(&mut self) -> io::Result<ExitStatus> {
        self.reap(0)?
            .ok_or_else(|| io::Error::other("waitpid returned no status"))
    }

    /// Wait for the child to exit and reap it, without blocking a thread (a pidfd in the
    /// runtime's reactor).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        // SAFETY: pidfd_open on our own unreaped child; the result is a new descriptor we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            // No pidfd (old kernel): wait on a blocking thread instead.
            let pid = self.pid as libc::pid_t;
            self.reaped = true;
            return tokio::task::spawn_blocking(move || {
                let mut status: c_int = 0;
                loop {
                    // SAFETY: as in `reap`.
                    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
                    if r > 0 {
                        super::jail::leader_reaped(pid as u32);
                        return Ok(ExitStatus::from_raw(status));
                    }
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            })
            .await
            .map_err(io::Error::other)?;
        }
        // SAFETY: a fresh descriptor returned by the kernel.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: the OwnedFd is moved into the AsyncFd and stays open, the same descriptor,
        // until the AsyncFd is dropped.
        let ready =
            unsafe { tokio::io::unix::AsyncFd::register(pidfd) }.map_err(io::Error::from)?;
        loop {
            if let Some(status) = self.reap(libc::WNOHANG)? {
                return Ok(status);
            }
            let mut guard = ready.readable().await?;
            guard.clear_ready();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // Unreaped, the group id cannot have been reused: kill the group, then reap.
            let _ = super::group::signal_group(self.pid, nix::sys::signal::Signal::SIGKILL);
            reap_later(self.pid);
        }
    }
}

/// Children dropped before they were reaped (their group has been SIGKILLed by then) are
/// waited for by one thread, for the life of the process. The channel is unbounded by type;
/// each entry is a child that is already dying, and the thread takes them as fast as they die.
fn reap_later(pid: u32) {
    static REAPER: OnceLock<mpsc::Sender<u32>> = OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<u32>();
        let spawned = std::thread::Builder::new()
            .name("modrun-reaper".into())
            .spawn(move || {
                for pid in rx {
                    let mut status: c_int = 0;
                    // SAFETY: waitpid on a child of this process that nobody else waits for.
                    while unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) } < 0
                        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
                    {}
                    super::jail::leader_reaped(pid);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the reaper thread; dropped children may stay zombies");
        }
        tx
    });
    let _ = tx.send(pid);
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Start `sh -c script` with `input` on its stdin; its stdout, stderr and exit code.
    fn sh(script: &str, input: &[u8]) -> (String, String, i32) {
        let spec = ProcSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: "/".into(),
            env: None,
            stdin: Some(input.to_vec()),
            run_id: None,
            limits: Default::default(),
            creds: None,
        };
        let mut child = spawn(Path::new("/bin/sh"), &spec, &Setup::default()).unwrap();
        std::fs::File::from(child.stdin.take().unwrap())
            .write_all(input)
            .unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        std::fs::File::from(child.stdout.take().unwrap())
            .read_to_string(&mut out)
            .unwrap();
        std::fs::File::from(child.stderr.take().unwrap())
            .read_to_string(&mut err)
            .unwrap();
        let code = child.wait_blocking().unwrap().code().unwrap();
        (out, err, code)
    }

    /// A child has its three pipes on 0, 1 and 2 and nothing else open, both when it shares
    /// our descriptor table at first and when every reserved set is in use (it copies the
    /// whole table); either way our ends see end of file once it exits.
    #[test]
    fn a_child_has_its_pipes_and_nothing_else_with_or_without_a_reserved_set() {
        let reserved = fd_table::Reserved::get().expect("close_range on this kernel");
        for exhausted in [false, true] {
            let held: Vec<_> = if exhausted {
                std::iter::from_fn(|| reserved.take()).collect()
            } else {
                vec![]
            };
            let (out, err, code) = sh("ls /proc/$$/fd; cat; echo oops >&2; exit 3", b"input\n");
            assert_eq!(
                (out.as_str(), err.as_str(), code),
                ("0\n1\n2\ninput\n", "oops\n", 3),
                "every set taken: {exhausted}"
            );
            drop(held);
        }
    }
}
