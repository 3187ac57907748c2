//! A pool of run cgroups under `<our cgroup>/modrun/pool-<pid>`: a run takes an empty one and
//! gives it back when it is empty again, so that a run costs a join (the child is born in it,
//! or writes to a descriptor kept open) and a read of `cgroup.events`, not a mkdir, an open and
//! an rmdir (they took about 7% of the CPU of a run of `/bin/true`). A cgroup that had to be
//! killed (processes left behind, a cancel, a timeout) is removed instead of reused (see
//! [`Slot::fds`]). A pool is named after its process and
//! that process's start time (`pool-<pid>-<start>`, PIDs are reused); after a crash, pools
//! whose process no longer exists are killed and removed at start-up.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Empty cgroups kept for reuse, at most; more are removed when given back.
const IDLE_MAX: usize = 256;

/// How a child gets into a cgroup: born there (`clone3` with the directory) or by writing 0
/// to its `cgroup.procs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CgroupFds {
    /// `cgroup.procs`, open for writing.
    pub procs: RawFd,
    /// The cgroup's directory, open for reading; `None` once the cgroup has been killed (see
    /// [`Slot::fds`]).
    pub dir: Option<RawFd>,
}

/// One cgroup of the pool, with its files open.
#[derive(Debug)]
pub(crate) struct Slot {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing: the child joins by writing to it (where it is not
    /// born in the cgroup already, see `spawn::clone3`).
    procs: File,
    /// The cgroup's directory, for `clone3`'s `CLONE_INTO_CGROUP`.
    dir_fd: File,
    /// `cgroup.events`, read (from offset 0) to see whether it still has a process.
    events: File,
    /// Set once `cgroup.kill` was written: such a cgroup is not reused (see [`Slot::fds`]).
    killed: AtomicBool,
}

impl Slot {
    fn open(dir: PathBuf) -> std::io::Result<Self> {
        let procs = File::options().write(true).open(dir.join("cgroup.procs"))?;
        let events = File::open(dir.join("cgroup.events"))?;
        let dir_fd = File::open(&dir)?;
        Ok(Self {
            dir,
            procs,
            dir_fd,
            events,
            killed: AtomicBool::new(false),
        })
    }

    /// The descriptors a child joins with: `cgroup.procs` (written to) and the directory
    /// (to be born there). Not the directory of a cgroup that was killed: Linux 6.18 (at
    /// least) SIGKILLs a child born by `CLONE_INTO_CGROUP` into a cgroup whose kill count
    /// differs from its parent's cgroup's (`cgroup_css_set_fork` reads the count before it
    /// knows the target). The pool does not reuse killed cgroups, so this is for the run
    /// that killed it.
    pub(crate) fn fds(&self) -> CgroupFds {
        CgroupFds {
            procs: self.procs.as_raw_fd(),
            dir: (!self.was_killed()).then(|| self.dir_fd.as_raw_fd()),
        }
    }

    fn was_killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    /// Close it and remove its (empty) folder.
    fn remove(self) {
        let dir = self.dir.clone();
        drop(self);
        let _ = std::fs::remove_dir(dir);
    }

    /// True while a process is in it.
    pub(crate) fn populated(&self) -> bool {
        let mut buf = [0u8; 128];
        match self.events.read_at(&mut buf, 0) {
            Ok(n) => memchr::memmem::find(&buf[..n], b"populated 1").is_some(),
            Err(_) => false,
        }
    }

    /// Its processes' pids.
    pub(crate) fn members(&self) -> Vec<i32> {
        members(&self.dir)
    }

    /// SIGKILL every process in it (the kernel does it at once).
    pub(crate) fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
    }
}

/// The pool of this process.
#[derive(Debug)]
pub(crate) struct Pool {
    dir: PathBuf,
    /// Empty cgroups ready to use, and ones given back still populated (processes dying):
    /// those are checked again at the next take. A std mutex: sections push or pop.
    slots: Mutex<(Vec<Slot>, Vec<Slot>)>,
    next: AtomicU64,
}

impl Pool {
    /// The pool of this process under `base` (created).
    pub(crate) fn create(base: &Path) -> std::io::Result<Self> {
        let me = std::process::id();
        let dir = base.join(format!("pool-{me}-{}", start_time(me).unwrap_or(0)));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            slots: Mutex::default(),
            next: AtomicU64::new(0),
        })
    }

    /// Its folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Slot>, Vec<Slot>)> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty cgroup: one given back before, or a new one.
    pub(crate) fn take(&self) -> std::io::Result<Slot> {
        let retired = {
            let mut s = self.lock();
            let (idle, dying) = &mut *s;
            if let Some(slot) = idle.pop() {
                return Ok(slot);
            }
            match dying.iter().position(|d| !d.populated()) {
                Some(i) if !dying[i].was_killed() => return Ok(dying.swap_remove(i)),
                Some(i) => Some(dying.swap_remove(i)),
                None => None,
            }
        };
        if let Some(slot) = retired {
            slot.remove();
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("slot-{n}"));
        std::fs::create_dir(&dir)?;
        Slot::open(dir)
    }

    /// A run is done with its cgroup (`emptied`: it was seen empty after the run ended).
    pub(crate) fn give_back(&self, slot: Slot, emptied: bool) {
        let populated = !emptied && slot.populated();
        let mut s = self.lock();
        let (idle, dying) = &mut *s;
        if populated {
            dying.push(slot);
        } else if idle.len() < IDLE_MAX && !slot.was_killed() {
            idle.push(slot);
        } else {
            drop(s);
            slot.remove();
        }
    }

    /// Remove the pool (at a graceful stop): its empty cgroups and its folder.
    pub(crate) fn remove(&self) {
        let (idle, dying) = std::mem::take(&mut *self.lock());
        for slot in idle.into_iter().chain(dying) {
            slot.remove();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// When process `pid` started (clock ticks since boot), if it exists.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name: state is the first, starttime the
    // twentieth.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// True if the pool named `name` belongs to a process that no longer exists (its pid is gone,
/// or taken by a process that started at another time).
fn is_stale(name: &str) -> bool {
    let Some((pid, start)) = name
        .strip_prefix("pool-")
        .and_then(|r| r.split_once('-'))
        .and_then(|(p, s)| Some((p.parse::<u32>().ok()?, s.parse::<u64>().ok()?)))
    else {
        return false;
    };
    pid != std::process::id() && start_time(pid) != Some(start)
}

/// At start-up: kill what is left in the pools of modrun processes that are gone (a crash),
/// wait (at most `limit`) until they are empty, and remove them. Returns how many processes
/// were killed. Blocking.
pub(crate) fn sweep_stale(base: &Path, limit: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let mut stale = Vec::new();
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(is_stale) {
            stale.push(e.path());
        }
    }
    let mut killed = 0;
    let mut slots = Vec::new();
    for pool in &stale {
        for slot in std::fs::read_dir(pool).into_iter().flatten().flatten() {
            if slot.file_type().is_ok_and(|t| t.is_dir()) {
                let n = members(&slot.path()).len();
                if n > 0 {
                    killed += n;
                    let _ = std::fs::write(slot.path().join("cgroup.kill"), "1");
                }
                slots.push(slot.path());
            }
        }
    }
    let deadline = std::time::Instant::now() + limit;
    for slot in &slots {
        while populated(slot) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = std::fs::remove_dir(slot);
    }
    for pool in &stale {
        let _ = std::fs::remove_dir(pool);
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_of_gone_processes_are_stale() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(!is_stale(&format!("pool-{me}-{start}")), "ours");
        assert!(is_stale(&format!("pool-{me}0-1")) || start_time(me * 10).is_some());
        assert!(
            is_stale(&format!("pool-1-{}", start_time(1).unwrap_or(0) + 1)),
            "pid reused"
        );
        assert!(!is_stale("probe-1"));
    }
}
