//! Keeping hold of every process of a run, also those that leave its process group (`setsid`,
//! `setpgid`, a double fork), so that none outlives the run.
//!
//! Three mechanisms, chosen once per process ([`init`]):
//! - **cgroup** (preferred): each run is in a cgroup (v2) of its own (taken from a pool, see
//!   `cgroup`), which the child joins before exec; nothing a process does takes it out.
//!   Stopping writes `cgroup.kill` (the kernel kills every member at once) and waits until the
//!   cgroup is empty. A SIGTERM for a cancel or a timeout reaches every member too.
//! - **subreaper** (where no cgroup can be made): orphans of a run become modrun's children
//!   instead of init's; at the run's end modrun kills those that carry the run's environment
//!   marker and reaps them (see `subreaper`). A process that escaped and whose parent still
//!   lives is found when that parent dies; one that also cleared its environment is not found
//!   (cgroups do not have that gap).
//! - **group**: the process group only (the library's `execute_module` and an embedded
//!   `ModuleRunner` unless the program opts in): a process that leaves the group survives.
//!
//! After a crash, start-up kills what is left in the pools of modrun processes that are gone,
//! and every process carrying a lost run's marker (`group::kill_leftovers`).
//!
//! `limits` turns a module's limits into `setrlimit` calls and names the one that ended a run.

mod cgroup;
pub(crate) use cgroup::CgroupFds;
mod guard;
mod limits;
mod subreaper;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::group::{kill_rest, signal_group};
pub(crate) use limits::rlimits;
pub use limits::set_child_open_files;
pub(crate) use subreaper::{LeaderGuard, leader_reaped};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A cgroup per run.
    Cgroup,
    /// Subreaper plus marker.
    Subreaper,
    /// Process group only.
    Group,
}

/// The mechanism chosen by [`init`], with the cgroup pool when cgroups are in use.
struct Chosen {
    mode: Mode,
    /// `<our cgroup>/modrun`, where the pools are.
    base: Option<PathBuf>,
    pool: Option<cgroup::Pool>,
    /// Kills the pool's processes if this process dies without stopping them (see
    /// [`guard`]); held open for the life of the process.
    _guard: Option<guard::Guard>,
}

static CHOSEN: OnceLock<Chosen> = OnceLock::new();
/// Set when joining a cgroup failed at spawn: later runs use the subreaper instead.
static CGROUPS_FAILED: AtomicBool = AtomicBool::new(false);
/// How long a run's end waits for its cgroup (or its orphans) to be empty.
const EMPTY_LIMIT: Duration = Duration::from_secs(2);

/// Choose the mechanism for this process (the first call decides; later calls return it).
/// `Err` when `Cgroup` is asked for and no cgroup can be made here.
pub fn init(wanted: Containment) -> Result<Mode, String> {
    if let Some(c) = CHOSEN.get() {
        return Ok(c.mode);
    }
    let pooled = || -> Result<Chosen, String> {
        let base = cgroup_base()?;
        let pool = cgroup::Pool::create(&base)
            .map_err(|e| format!("cannot create a cgroup pool under {}: {e}", base.display()))?;
        let guard = guard::start(pool.dir())
            .map_err(|e| format!("cannot start the pool's guard process: {e}"))?;
        Ok(Chosen {
            mode: Mode::Cgroup,
            base: Some(base),
            pool: Some(pool),
            _guard: Some(guard),
        })
    };
    let plain = |mode| Chosen {
        mode,
        base: None,
        pool: None,
        _guard: None,
    };
    let chosen = match wanted {
        Containment::Group => plain(Mode::Group),
        Containment::Subreaper => {
            subreaper()?;
            plain(Mode::Subreaper)
        }
        Containment::Cgroup => pooled()?,
        Containment::Auto => match pooled() {
            Ok(c) => c,
            Err(why) => {
                tracing::info!(reason = %why, "no cgroup for runs: using the child subreaper");
                subreaper()?;
                plain(Mode::Subreaper)
            }
        },
    };
    Ok(CHOSEN.get_or_init(|| chosen).mode)
}

/// The mechanism in effect (the process group only until [`init`] chose another).
pub fn mode() -> Mode {
    match CHOSEN.get().map(|c| c.mode) {
        Some(Mode::Cgroup) if CGROUPS_FAILED.load(Ordering::Relaxed) => Mode::Subreaper,
        Some(m) => m,
        None => Mode::Group,
    }
}

fn pool() -> Option<&'static cgroup::Pool> {
    CHOSEN.get()?.pool.as_ref()
}

/// Remove this process's cgroup pool (at a graceful stop; a crash leaves it to the next
/// start's sweep).
pub fn shutdown() {
    if let Some(pool) = pool() {
        pool.remove();
    }
}

fn subreaper() -> Result<(), String> {
    subreaper::become_subreaper().map_err(|e| format!("cannot become the child subreaper: {e}"))
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

fn cgroups_failed(why: &str) {
    if !CGROUPS_FAILED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            reason = why,
            "cgroups for runs stop working: using the child subreaper"
        );
        if let Err(e) = subreaper::become_subreaper() {
            tracing::warn!(error = %e, "cannot become the child subreaper either");
        }
    }
}

/// One run's hold on its processes.
#[derive(Debug)]
pub(crate) struct Jail {
    /// The run's cgroup, while it holds one.
    slot: Option<cgroup::Slot>,
    /// `MODRUN_RUN_ID=<id>` of the run (subreaper mode), as bytes of an environ entry.
    marker: Option<Vec<u8>>,
    /// Set when [`Jail::finish`] saw the cgroup empty: it goes back to the pool without being
    /// read again (nothing can join it since: it is this run's, and the run is over).
    emptied: AtomicBool,
}

impl Jail {
    /// No hold beyond the process group.
    pub(crate) fn none() -> Self {
        Self {
            slot: None,
            marker: None,
            emptied: AtomicBool::new(false),
        }
    }

    /// The hold for run `id` under the mechanism in effect (`None`: a run without an id, such
    /// as `execute_module`'s, gets the process group only).
    pub(crate) fn for_run(id: Option<&str>) -> Self {
        let Some(id) = id else {
            return Self::none();
        };
        match (mode(), pool()) {
            (Mode::Cgroup, Some(pool)) => match pool.take() {
                Ok(slot) => Self {
                    slot: Some(slot),
                    marker: None,
                    emptied: AtomicBool::new(false),
                },
                Err(e) => {
                    cgroups_failed(&format!("cannot make a cgroup: {e}"));
                    Self::for_run(Some(id))
                }
            },
            (Mode::Subreaper, _) => Self {
                slot: None,
                marker: Some(format!("{}={id}", super::RUN_MARKER).into_bytes()),
                emptied: AtomicBool::new(false),
            },
            _ => Self::none(),
        }
    }

    /// The descriptors of the cgroup for the child to be born in or move itself into (open
    /// for as long as this jail lives).
    pub(crate) fn cgroup_fds(&self) -> Option<cgroup::CgroupFds> {
        self.slot.as_ref().map(cgroup::Slot::fds)
    }

    /// Joining the cgroup failed in the child: from now on, runs use the subreaper; this run
    /// is retried without a cgroup.
    pub(crate) fn join_failed(self, id: Option<&str>, e: &std::io::Error) -> Self {
        cgroups_failed(&format!("a child cannot join its cgroup: {e}"));
        drop(self);
        Self::for_run(id)
    }

    /// Signal the run's process group and every other process in its cgroup.
    pub(crate) fn signal(&self, pgid: u32, sig: Signal) {
        let _ = signal_group(pgid, sig);
        if let Some(slot) = &self.slot {
            for pid in slot.members() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
            }
        }
    }

    /// SIGKILL everything of the run at once (the drop guard's path: no waiting).
    pub(crate) fn kill_now(&self, pgid: u32) {
        let _ = signal_group(pgid, Signal::SIGKILL);
        if let Some(slot) = &self.slot {
            slot.kill();
        }
    }

    /// The leader has exited: kill what is left of the run (its group, its cgroup, its
    /// orphans) and wait until it is dead, at most a couple of seconds.
    pub(crate) async fn finish(&self, pgid: u32) {
        kill_rest(pgid).await;
        if let Some(slot) = &self.slot {
            let mut populated = slot.populated();
            if populated {
                slot.kill();
                let deadline = tokio::time::Instant::now() + EMPTY_LIMIT;
                let mut pause = Duration::from_millis(1);
                while populated && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                    populated = slot.populated();
                }
                if populated {
                    tracing::warn!("run's cgroup still has processes after SIGKILL");
                }
            }
            self.emptied.store(!populated, Ordering::Relaxed);
        }
        if let Some(marker) = self.marker.clone()
            && subreaper::any_orphan()
        {
            let _ =
                tokio::task::spawn_blocking(move || subreaper::reap_orphans(&marker, EMPTY_LIMIT))
                    .await;
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // Back to the pool: an empty cgroup for the next run; one whose processes are still
        // dying (a dropped run) waits in the pool until it is empty.
        if let (Some(slot), Some(pool)) = (self.slot.take(), pool()) {
            pool.give_back(slot, self.emptied.load(Ordering::Relaxed));
        }
    }
}

/// At start-up: kill what is left in the cgroup pools of modrun processes that are gone (a
/// crash), wait (at most `limit`) until they are empty, and remove them. Returns how many
/// processes were killed. Blocking.
pub(crate) fn sweep(limit: Duration) -> usize {
    match CHOSEN.get().and_then(|c| c.base.as_deref()) {
        Some(base) => cgroup::sweep_stale(base, limit),
        None => 0,
    }
}
