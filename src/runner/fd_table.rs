//! Keeping a child's copy of our descriptor table small.
//!
//! A child made by `clone` without `CLONE_FILES` gets a copy of the whole table: a reference
//! taken on every open file of the server (each connection, each running run's pipes), each
//! dropped again one by one when `execve` closes the close-on-exec ones. Under the throughput
//! benchmark's load (~200 descriptors open) that was some 30 us of CPU per run, about a tenth
//! of modrun's own cost (`do_close_on_exec`, `filp_flush`, `dup_fd` in `perf`).
//!
//! So a child shares the table at first (`CLONE_FILES`) and, before it touches any
//! descriptor, makes a private copy of only the lowest ones:
//! `close_range(limit, ~0, CLOSE_RANGE_UNSHARE)` copies the descriptors below `limit` and
//! nothing else. The descriptors it needs (its stdin, stdout and stderr) must therefore be
//! below `limit`: a few sets of low numbers are reserved once, holding /dev/null while idle
//! ([`Reserved`]). A spawn takes a set, `dup3`s its pipe ends onto it, and puts /dev/null back
//! once `clone` has returned (the child has exec'd by then, with its own copies on 0, 1, 2).
//! Everything below `limit` the child did not need is close-on-exec, as before.
//!
//! Without `close_range` (Linux < 5.9, or a seccomp filter that refuses it), or when every set
//! is in use, a spawn copies the whole table as before.
//!
//! Either way, where `close_range` exists, the child closes everything but 0, 1 and 2 before
//! exec: a descriptor this process inherited without close-on-exec (from whatever started
//! it) does not reach a module.

#![expect(unsafe_code, reason = "raw descriptors: dup3, fcntl, close_range")]

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The reserved sets, found (and taken) once per process.
static RESERVED: OnceLock<Option<Reserved>> = OnceLock::new();

/// Set when a child could not unshare its table after all: every later spawn copies it.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Whether this kernel (and seccomp filter, if any) has `close_range` (Linux 5.9): a child
/// then closes every descriptor but its stdio before exec, inherited ones without
/// close-on-exec included.
pub(crate) fn close_range_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        // Flags 0 on a number nobody has: closes nothing, or fails with ENOSYS. (Never with
        // CLOSE_RANGE_UNSHARE here: in a thread it would give that thread a table of its own.)
        // SAFETY: no descriptor has this number.
        unsafe { libc::syscall(libc::SYS_close_range, u32::MAX - 1, u32::MAX - 1, 0) == 0 }
    })
}

/// Sets of three low descriptor numbers (stdin, stdout, stderr of a child being started),
/// each holding /dev/null while no spawn uses it.
pub(crate) struct Reserved {
    sets: Box<[[RawFd; 3]]>,
    /// Bit `i` set: set `i` is free. Taken and given back with one atomic operation each (a
    /// spawn holds one set for the few microseconds of its `clone`); at most 32 sets (see `reserve`).
    free: AtomicU64,
    /// The /dev/null descriptor put back into a set after use.
    null: RawFd,
    /// One past the highest reserved number: what the child's `close_range` keeps below.
    limit: u32,
}

/// One reserved set, taken by a spawn; given back (holding /dev/null again) when dropped.
pub(crate) struct Taken<'a> {
    from: &'a Reserved,
    index: usize,
    /// Which of the set's descriptors hold something else than /dev/null now.
    dirty: [bool; 3],
}

impl Reserved {
    /// The reserved sets, reserving them at the first call (the lowest free numbers at that
    /// moment: call it early, as the runner does when it is built). `None` when this kernel
    /// cannot unshare part of a table, or a reservation failed.
    pub(crate) fn get() -> Option<&'static Reserved> {
        if BROKEN.load(Ordering::Relaxed) {
            return None;
        }
        RESERVED.get_or_init(Self::reserve).as_ref()
    }

    fn reserve() -> Option<Reserved> {
        if !close_range_works() {
            tracing::debug!("no close_range: children copy the whole descriptor table");
            return None;
        }
        let null = super::spawn::dev_null().ok()?;
        // Two sets per core (spawns run on the runtime's threads, each suspended for its
        // child's few microseconds before exec), between 4 and 32.
        let count = std::thread::available_parallelism()
            .map_or(4, |n| n.get() * 2)
            .clamp(4, 32);
        let mut sets = Vec::with_capacity(count);
        for _ in 0..count {
            let mut set = [-1; 3];
            for slot in &mut set {
                // SAFETY: duplicates our /dev/null onto the lowest free number >= 3, which we
                // then own for the life of the process.
                let fd = unsafe { libc::fcntl(null, libc::F_DUPFD_CLOEXEC, 3) };
                if fd < 0 {
                    tracing::warn!(error = %io::Error::last_os_error(), "cannot reserve descriptors for spawning; children copy the whole table");
                    for fd in sets
                        .iter()
                        .flatten()
                        .chain(set.iter())
                        .filter(|&&fd| fd >= 0)
                    {
                        // SAFETY: ours, from the fcntl above.
                        unsafe { libc::close(*fd) };
                    }
                    return None;
                }
                *slot = fd;
            }
            sets.push(set);
        }
        let limit = sets.iter().flatten().max().copied().unwrap_or(2) as u32 + 1;
        Some(Reserved {
            // One bit per set (count <= 32).
            free: AtomicU64::new((1u64 << count) - 1),
            sets: sets.into_boxed_slice(),
            null,
            limit,
        })
    }

    /// A free set, if there is one.
    pub(crate) fn take(&self) -> Option<Taken<'_>> {
        let mut free = self.free.load(Ordering::Acquire);
        loop {
            if free == 0 {
                return None;
            }
            let index = free.trailing_zeros() as usize;
            match self.free.compare_exchange_weak(
                free,
                free & !(1 << index),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Taken {
                        from: self,
                        index,
                        dirty: [false; 3],
                    });
                }
                Err(now) => free = now,
            }
        }
    }

    /// What the child passes to `close_range` with `CLOSE_RANGE_UNSHARE`.
    pub(crate) fn limit(&self) -> u32 {
        self.limit
    }

    /// A child could not unshare its table (`close_range` refused in it): spawn without
    /// sharing from now on.
    pub(crate) fn disable(error: &io::Error) {
        if !BROKEN.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "a child cannot unshare its descriptor table: children copy the whole table from now on");
        }
    }
}

impl Taken<'_> {
    /// Put `fd` (a stdio end of the child: 0 stdin, 1 stdout, 2 stderr) into this set;
    /// returns the reserved number the child finds it under. `None` for /dev/null, which the
    /// set holds already.
    pub(crate) fn place(&mut self, which: usize, fd: Option<RawFd>) -> io::Result<RawFd> {
        let target = self.from.sets[self.index][which];
        if let Some(fd) = fd {
            // SAFETY: replaces the reserved number (ours) with a duplicate of `fd`, atomically.
            if unsafe { libc::dup3(fd, target, libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            self.dirty[which] = true;
        }
        Ok(target)
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let set = self.from.sets[self.index];
        for (which, dirty) in self.dirty.iter().enumerate() {
            // /dev/null back in: this also drops our extra reference to the child's pipe end
            // (EOF and EPIPE need every write end closed).
            // SAFETY: as in `place`.
            if *dirty && unsafe { libc::dup3(self.from.null, set[which], libc::O_CLOEXEC) } < 0 {
                // Cannot happen short of a kernel out of memory; leaving the pipe end here
                // would keep a run's output open forever, so the set is closed and retired
                // instead (never given back).
                // SAFETY: ours.
                unsafe { libc::close(set[which]) };
                tracing::error!(error = %io::Error::last_os_error(), "cannot reset a reserved descriptor; retired");
                return;
            }
        }
        self.from.free.fetch_or(1 << self.index, Ordering::AcqRel);
    }
}
