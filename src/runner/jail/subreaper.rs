//! The fallback where no cgroup can be made: modrun is the child subreaper, so the orphans of a
//! run (processes whose parent died, as after `setsid cmd &` in a shell that exits) become
//! modrun's children instead of init's; at a run's end, those that carry the run's environment
//! marker are killed and reaped.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Make this process the child subreaper.
pub(super) fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// The children of this process that are run leaders (their waiters reap them). Only kept in
/// subreaper mode, where orphans also become children and are reaped by [`reap_orphans`]: a
/// leader must never be reaped by that sweep. A std mutex, held across `clone` in subreaper
/// mode so that a leader is in the set before it can exit.
static LEADERS: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

fn leaders() -> MutexGuard<'static, Option<HashSet<u32>>> {
    LEADERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held while a child is started in subreaper mode: [`LeaderGuard::started`] records it.
pub(crate) struct LeaderGuard(Option<MutexGuard<'static, Option<HashSet<u32>>>>);

impl LeaderGuard {
    /// Lock the leader set if the subreaper is in use.
    pub(crate) fn new() -> Self {
        Self((super::mode() == super::Mode::Subreaper).then(leaders))
    }

    /// The child `pid` was started.
    pub(crate) fn started(mut self, pid: u32) {
        if let Some(set) = self.0.as_mut() {
            set.get_or_insert_with(HashSet::new).insert(pid);
        }
    }
}

/// A run leader was reaped by its waiter.
pub(crate) fn leader_reaped(pid: u32) {
    if let Some(set) = leaders().as_mut() {
        set.remove(&pid);
    }
}

/// The children of the main thread: where the kernel hands orphans to a subreaper (its first
/// live thread). Run leaders are children of the threads that started them.
fn orphans_parent_children() -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
        .map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// True if an orphan (a child of ours that is not a run leader) exists: the cheap check before
/// [`reap_orphans`] (one small `/proc` read).
pub(super) fn any_orphan() -> bool {
    let children = orphans_parent_children();
    if children.is_empty() {
        return false;
    }
    let guard = leaders();
    children
        .iter()
        .any(|pid| guard.as_ref().is_none_or(|l| !l.contains(pid)))
}

/// At a run's end: kill the orphans that carry `marker`, and reap every orphan that has died,
/// until none with the marker is left (their own children come to us as they die) or `limit`
/// passes. Blocking.
pub(super) fn reap_orphans(marker: &[u8], limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut ours_alive = false;
        {
            let guard = leaders();
            let leaders = guard.as_ref();
            for pid in orphans_parent_children() {
                if leaders.is_some_and(|l| l.contains(&pid)) {
                    continue;
                }
                let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                if environ.split(|b| *b == 0).any(|v| v == marker) {
                    ours_alive = true;
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                // Reap it if it is dead (an orphan's status is nobody else's).
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(pid as i32),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
        }
        if !ours_alive || std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
