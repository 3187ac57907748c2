//! Keeping hold of every process of a run, also those that leave its process group (`setsid`,
//! `setpgid`, a double fork), so that none outlives the run.
//!
//! Three mechanisms, chosen once per process ([`init`]):
//! - **cgroup** (preferred): each run gets a cgroup (v2) of its own, `<our cgroup>/modrun/run-<id>`,
//!   which the child joins before exec; nothing a process does takes it out. Stopping writes
//!   `cgroup.kill` (the kernel kills every member at once), then waits until the cgroup is
//!   empty and removes it. A SIGTERM for a cancel or a timeout reaches every member too.
//! - **subreaper** (where no cgroup can be made): modrun is the child subreaper, so orphans of
//!   a run become modrun's children instead of init's; at the run's end modrun kills those that
//!   carry the run's environment marker and reaps them. A process that escaped and whose
//!   parent still lives is found when that parent dies; one that also cleared its environment
//!   is not found (cgroups do not have that gap).
//! - **group**: the process group only (the library's `execute_module` and an embedded
//!   `ModuleRunner` unless the program opts in): a process that leaves the group survives.
//!
//! After a crash, start-up finds a lost run's processes by its cgroup and by its environment
//! marker (the marker also finds them in subreaper mode).

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::group::{kill_rest, signal_group};
use crate::module::Limits;
use crate::run::Exit;

/// How processes of a run are kept track of, as the config asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Containment {
    /// A cgroup per run where one can be made, else the subreaper.
    #[default]
    Auto,
    /// A cgroup per run; start-up fails where none can be made.
    Cgroup,
    /// modrun is the child subreaper; leftovers are found by their environment marker.
    Subreaper,
    /// The process group only.
    Group,
}

/// What is in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Run cgroups under this folder.
    Cgroup(PathBuf),
    /// Subreaper plus marker.
    Subreaper,
    /// Process group only.
    Group,
}

static MODE: OnceLock<Mode> = OnceLock::new();
/// Set when joining a cgroup failed at spawn: later runs use the subreaper instead.
static CGROUPS_FAILED: AtomicBool = AtomicBool::new(false);
/// How long a run's end waits for its cgroup (or its orphans) to be empty.
const EMPTY_LIMIT: Duration = Duration::from_secs(2);

/// Choose the mechanism for this process (the first call decides; later calls return it).
/// `Err` when `Cgroup` is asked for and no cgroup can be made here.
pub fn init(wanted: Containment) -> Result<Mode, String> {
    if let Some(m) = MODE.get() {
        return Ok(m.clone());
    }
    let mode = match wanted {
        Containment::Group => Mode::Group,
        Containment::Subreaper => subreaper()?,
        Containment::Cgroup => Mode::Cgroup(cgroup_base()?),
        Containment::Auto => match cgroup_base() {
            Ok(base) => Mode::Cgroup(base),
            Err(why) => {
                tracing::info!(reason = %why, "no cgroup for runs: using the child subreaper");
                subreaper()?
            }
        },
    };
    Ok(MODE.get_or_init(|| mode).clone())
}

/// The mechanism in effect (the process group only until [`init`] chose another).
pub fn mode() -> Mode {
    match MODE.get() {
        Some(Mode::Cgroup(_)) if CGROUPS_FAILED.load(Ordering::Relaxed) => Mode::Subreaper,
        Some(m) => m.clone(),
        None => Mode::Group,
    }
}

fn subreaper() -> Result<Mode, String> {
    set_subreaper().map_err(|e| format!("cannot become the child subreaper: {e}"))?;
    Ok(Mode::Subreaper)
}

fn set_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// `<cgroup2 mount><our cgroup>/modrun`, created, if this process may make cgroups there.
fn cgroup_base() -> Result<PathBuf, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 hierarchy")?
        .to_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split(' ').nth(4))?
        })
        .ok_or("no cgroup2 file system is mounted")?;
    let base = Path::new(mount)
        .join(own.trim_start_matches('/'))
        .join("modrun");
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    // A cgroup that can take processes and be killed: probe by making one.
    let probe = base.join(format!("probe-{}", std::process::id()));
    std::fs::create_dir(&probe).map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
    let usable = probe.join("cgroup.kill").exists() && probe.join("cgroup.procs").exists();
    let _ = std::fs::remove_dir(&probe);
    if !usable {
        return Err("the kernel's cgroups have no cgroup.kill (Linux 5.14 or newer)".into());
    }
    Ok(base)
}

/// The children of this process that are run leaders (their waiters reap them). Only used in
/// subreaper mode, where orphans also become children and are reaped by [`Jail::finish`]: a
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
        Self((mode() == Mode::Subreaper).then(leaders))
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

/// One run's hold on its processes.
#[derive(Debug)]
pub(crate) struct Jail {
    /// The run's cgroup, when one was made.
    cgroup: Option<PathBuf>,
    /// `MODRUN_RUN_ID=<id>` of the run (subreaper mode), as bytes of an environ entry.
    marker: Option<Vec<u8>>,
}

impl Jail {
    /// No hold beyond the process group.
    pub(crate) fn none() -> Self {
        Self {
            cgroup: None,
            marker: None,
        }
    }

    /// The hold for run `id` under the mechanism in effect (`None`: a run without an id, such
    /// as `execute_module`'s, gets the process group only).
    pub(crate) fn for_run(id: Option<&str>) -> Self {
        let Some(id) = id else {
            return Self::none();
        };
        match mode() {
            Mode::Cgroup(base) => {
                let dir = base.join(format!("run-{id}"));
                match std::fs::create_dir(&dir) {
                    Ok(()) => Self {
                        cgroup: Some(dir),
                        marker: None,
                    },
                    Err(e) => {
                        cgroups_failed(&format!("cannot create {}: {e}", dir.display()));
                        Self::for_run(Some(id))
                    }
                }
            }
            Mode::Subreaper => Self {
                cgroup: None,
                marker: Some(format!("{}={id}", super::RUN_MARKER).into_bytes()),
            },
            Mode::Group => Self::none(),
        }
    }

    /// The cgroup's `cgroup.procs`, open for the child to move itself in.
    pub(crate) fn procs_file(&self) -> Option<OwnedFd> {
        let dir = self.cgroup.as_ref()?;
        match std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
        {
            Ok(f) => Some(f.into()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the run's cgroup");
                None
            }
        }
    }

    /// Joining the cgroup failed in the child: from now on, runs use the subreaper; this run
    /// is retried without its cgroup.
    pub(crate) fn join_failed(&mut self, id: Option<&str>, e: &std::io::Error) -> Self {
        cgroups_failed(&format!("a child cannot join its cgroup: {e}"));
        self.remove_cgroup();
        Self::for_run(id)
    }

    /// Signal the run's process group and every other process in its cgroup.
    pub(crate) fn signal(&self, pgid: u32, sig: Signal) {
        let _ = signal_group(pgid, sig);
        if let Some(dir) = &self.cgroup {
            for pid in cgroup_members(dir) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
            }
        }
    }

    /// SIGKILL everything of the run at once (the drop guard's path: no waiting).
    pub(crate) fn kill_now(&self, pgid: u32) {
        let _ = signal_group(pgid, Signal::SIGKILL);
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
    }

    /// The leader has exited: kill what is left of the run (its group, its cgroup, its
    /// orphans) and wait until it is dead, at most a couple of seconds.
    pub(crate) async fn finish(&self, pgid: u32) {
        kill_rest(pgid).await;
        if let Some(dir) = self.cgroup.as_deref()
            && populated(dir)
        {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            let deadline = tokio::time::Instant::now() + EMPTY_LIMIT;
            let mut pause = Duration::from_millis(1);
            while populated(dir) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            if populated(dir) {
                tracing::warn!(cgroup = %dir.display(), "run's cgroup still has processes after SIGKILL");
            }
        }
        if let Some(marker) = self.marker.clone() {
            let _ = tokio::task::spawn_blocking(move || reap_orphans(&marker, EMPTY_LIMIT)).await;
        }
    }

    fn remove_cgroup(&mut self) {
        if let Some(dir) = self.cgroup.take()
            && let Err(e) = std::fs::remove_dir(&dir)
        {
            tracing::debug!(cgroup = %dir.display(), error = %e, "cannot remove the run's cgroup yet");
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // An empty cgroup goes now; one whose processes are still dying is swept at start-up.
        self.remove_cgroup();
    }
}

fn cgroups_failed(why: &str) {
    if !CGROUPS_FAILED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            reason = why,
            "cgroups for runs stop working: using the child subreaper"
        );
        if let Err(e) = set_subreaper() {
            tracing::warn!(error = %e, "cannot become the child subreaper either");
        }
    }
}

/// True while the cgroup has a process.
fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn cgroup_members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Our children (all threads'), from `/proc/self/task/*/children`.
fn own_children() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Subreaper mode, at a run's end: kill the orphans (our children that are not run leaders)
/// that carry `marker`, and reap every orphan that has died, until none with the marker is
/// left (their own children come to us as they die) or `limit` passes. Blocking.
fn reap_orphans(marker: &[u8], limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut ours_alive = false;
        {
            let guard = leaders();
            let leaders = guard.as_ref();
            for pid in own_children() {
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

/// At start-up: kill what is left in the cgroups of the lost runs `run_ids`, wait (at most
/// `limit`) until they are empty, and remove every empty run cgroup. Returns how many
/// processes each lost run's cgroup held. Blocking.
pub(crate) fn sweep(run_ids: &[String], limit: Duration) -> Vec<usize> {
    let Some(Mode::Cgroup(base)) = MODE.get() else {
        return vec![0; run_ids.len()];
    };
    let mut counts = Vec::with_capacity(run_ids.len());
    for id in run_ids {
        let dir = base.join(format!("run-{id}"));
        let n = cgroup_members(&dir).len();
        if n > 0 {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        counts.push(n);
    }
    let deadline = std::time::Instant::now() + limit;
    for id in run_ids {
        let dir = base.join(format!("run-{id}"));
        while populated(&dir) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Empty ones (also of runs that ended while their processes were still dying) go; a
    // populated one may be another modrun's on this host, and stays.
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("run-") && !populated(&e.path()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    counts
}

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
            let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(*soft, |(_, hard)| hard);
            out.push((libc::RLIMIT_NOFILE, *soft, hard));
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
