//! Process groups and `/proc`: signalling a run's group, waiting until what is left of it is
//! dead, and finding a crashed run's leftovers by their environment marker. A leaf: it spawns
//! nothing and knows no driver.

use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long a run's end waits for the SIGKILLed rest of its process group to die (a process in
/// uninterruptible sleep dies only when its I/O returns).
const GROUP_EXIT_LIMIT: Duration = Duration::from_secs(2);

/// Signal a whole process group; a group that is already gone is not an error. True when the
/// group had a member to signal (zombies count until they are reaped).
pub(crate) fn signal_group(pgid: u32, sig: Signal) -> bool {
    let Some(pgid) = group_pid(pgid) else {
        return false;
    };
    match killpg(pgid, sig) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw(), signal = %sig, error = %e, "cannot signal process group");
            false
        }
    }
}

/// `pgid` as a group that modrun may signal: never 0 or 1 (ourselves, init).
fn group_pid(pgid: u32) -> Option<Pid> {
    i32::try_from(pgid)
        .ok()
        .filter(|raw| *raw > 1)
        .map(Pid::from_raw)
}

/// After the leader of group `pgid` exited: SIGKILL what is left of the group and wait until it
/// is really dead (gone, or zombies that only wait for their reaper), at most
/// [`GROUP_EXIT_LIMIT`], so that a run is never reported finished while a process of it still
/// runs. Free when the group is already empty (the usual case): one `killpg` that finds nobody.
pub(crate) async fn kill_rest(pgid: u32) {
    let Some(group) = group_pid(pgid) else { return };
    if !signal_group(pgid, Signal::SIGKILL) {
        return;
    }
    let deadline = tokio::time::Instant::now() + GROUP_EXIT_LIMIT;
    let mut pause = Duration::from_millis(1);
    loop {
        // Signal 0 probes: ESRCH once every member is reaped.
        if killpg(group, None) == Err(nix::errno::Errno::ESRCH) {
            return;
        }
        // Members left: dying, or zombies whose reaper (init, a subreaper) has not come yet.
        let live = tokio::task::spawn_blocking(move || group_has_live_member(pgid))
            .await
            .unwrap_or(false);
        if !live {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(pgid, "process group still alive after SIGKILL");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// True while a process of group `pgid` exists and is not a zombie. Blocking: scans `/proc`.
fn group_has_live_member(pgid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        let mut fields = stat_fields(&stat);
        let state = fields.next();
        let group = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
        group == Some(pgid) && is_live_state(state)
    })
}

/// The fields of a `/proc/PID/stat` after the ")" that closes the command name (which may hold
/// spaces and parentheses): state, ppid, pgrp, ...
fn stat_fields(stat: &str) -> impl Iterator<Item = &str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace())
        .into_iter()
        .flatten()
}

/// A process state from `/proc/PID/stat` that is still running code (not a zombie, not dead).
fn is_live_state(state: Option<&str>) -> bool {
    !matches!(state, Some("Z" | "X" | "x") | None)
}

/// After a crash: SIGKILL what is left of the lost runs `run_ids`: the processes that prove they
/// belong to one of them by its `MODRUN_RUN_ID` in their environment (PIDs and process groups
/// are reused; the marker is not, and it also finds processes that left the group). One scan of
/// `/proc` for all runs. Blocks until every signalled process has died (is gone or a zombie),
/// at most `limit`, so that start-up goes on only once they are really dead. Returns how many
/// processes were signalled per run, in the order of `run_ids`.
///
/// Blocking (reads `/proc`, sleeps while it waits): call it from a blocking thread.
pub(crate) fn kill_leftovers(run_ids: &[String], limit: Duration) -> Vec<usize> {
    let mut killed = vec![0; run_ids.len()];
    if run_ids.is_empty() {
        return killed;
    }
    let markers: Vec<Vec<u8>> = run_ids
        .iter()
        .map(|id| format!("{}={id}", super::RUN_MARKER).into_bytes())
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return killed;
    };
    let mut signalled = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let Some(run) = environ
            .split(|b| *b == 0)
            .find_map(|v| markers.iter().position(|m| v == m.as_slice()))
        else {
            continue;
        };
        if nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed[run] += 1;
            signalled.push(pid);
        }
    }
    let deadline = std::time::Instant::now() + limit;
    while !signalled.is_empty() && std::time::Instant::now() < deadline {
        signalled.retain(|pid| is_alive(*pid));
        if !signalled.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if !signalled.is_empty() {
        tracing::warn!(pids = ?signalled, "leftover processes still alive after SIGKILL");
    }
    killed
}

/// True while `pid` exists and is not a zombie (a killed process whose parent has not reaped it
/// yet is dead for our purposes).
fn is_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    is_live_state(stat_fields(&stat).next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_skip_a_command_name_with_parentheses_and_spaces() {
        let stat = "4242 (evil) Z 1 2) S 4200 4242 4200 0 -1";
        let fields: Vec<&str> = stat_fields(stat).take(3).collect();
        assert_eq!(fields, ["S", "4200", "4242"]);
        assert!(is_live_state(Some("S")));
        assert!(!is_live_state(Some("Z")));
        assert!(!is_live_state(None));
    }
}
