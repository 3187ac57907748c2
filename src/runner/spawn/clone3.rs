//! `clone3(2)` on x86-64, for two flags `clone` lacks: `CLONE_INTO_CGROUP` (Linux 5.7: the
//! child is born in its run's cgroup, where joining it by a write to `cgroup.procs` took a
//! migration, ~2% of all CPU under the throughput load) and `CLONE_CLEAR_SIGHAND` (5.5: the
//! kernel resets every caught signal to its default, where the child took one `sigaction`
//! per signal, another ~1%).
//!
//! glibc has no public wrapper, and the raw system call cannot be made through `syscall(3)`
//! with a new stack: the child would return into a frame that is not there. So it is a few
//! instructions of assembly: the child starts on its stack, calls the function and exits.
//!
//! Anything else (another architecture, a kernel without it, a seccomp filter that refuses
//! it: Docker's default answers ENOSYS) falls back to `clone`; see [`available`].

#![expect(
    unsafe_code,
    reason = "the clone3 system call in inline assembly: the child runs on a stack of its own"
)]

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use libc::{c_int, c_void};

/// The child's signal handlers are reset to their defaults (ignored ones stay ignored).
pub(super) const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
/// The child starts in the cgroup of `CloneArgs::cgroup` (a descriptor of its directory).
pub(super) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (version 2, 88 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// Set once a child born by `CLONE_INTO_CGROUP` was killed before it ran (see
/// [`into_cgroup_failed`]).
static INTO_CGROUP_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether to have children born in their cgroup.
pub(super) fn into_cgroup() -> bool {
    !INTO_CGROUP_FAILED.load(Ordering::Relaxed)
}

/// A child born by `CLONE_INTO_CGROUP` was killed before it ran a single instruction: the
/// kernel's kill-count check (see `jail::cgroup::Slot::fds`) disagrees with this process's
/// own cgroup (killed at some point before this process joined it, say). From now on
/// children join their cgroup by writing to it.
pub(super) fn into_cgroup_failed() {
    if !INTO_CGROUP_FAILED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a child born in its cgroup was killed at once (a kernel's kill count check); children join their cgroup by writing to it from now on"
        );
    }
}

/// Set once `clone3` has been refused for good (see [`refused`]).
static REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether to try `clone3` at all.
pub(super) fn available() -> bool {
    cfg!(target_arch = "x86_64") && !REFUSED.load(Ordering::Relaxed)
}

/// `clone3` failed with `error` where `clone` then worked: unless the error was a passing
/// one (no memory, no pid left, a signal), it is this system's answer every time, and
/// `clone` is used from now on.
pub(super) fn refused(error: &io::Error) {
    let passing = matches!(
        error.raw_os_error(),
        Some(libc::EAGAIN | libc::ENOMEM | libc::EINTR)
    );
    if !passing && !REFUSED.swap(true, Ordering::Relaxed) {
        tracing::debug!(%error, "clone3 refused: children join their cgroup and reset their signals themselves");
    }
}

/// `clone3(args)`; the child runs `main(arg)` on the stack `args` gives and exits with its
/// result. Returns the child's pid, or the error.
///
/// # Safety
/// As for `clone(2)` with the same flags: with `CLONE_VM` the child shares this memory, so
/// `main` must not allocate, take locks or touch anything the parent could change meanwhile
/// (with `CLONE_VFORK` this thread is suspended until the child execs or exits); the stack
/// (`args.stack`, `args.stack_size`, its top 16-byte aligned) must stay valid until then.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn clone3(
    args: &CloneArgs,
    main: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
) -> io::Result<libc::pid_t> {
    let ret: i64;
    // SAFETY: the caller's contract above. In the parent only rax, rcx and r11 change (the
    // system call's own); the child never comes back out of this block: it clears the frame
    // pointer (the end of its backtrace), calls `main` on its stack (aligned: rsp is the
    // 16-byte aligned top there) and exits with the result.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") main,
            in("r13") arg,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    Ok(ret as libc::pid_t)
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn clone3(
    _: &CloneArgs,
    _: extern "C" fn(*mut c_void) -> c_int,
    _: *mut c_void,
) -> io::Result<libc::pid_t> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}
