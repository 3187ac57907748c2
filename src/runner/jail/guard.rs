//! The pool's guard: a tiny process (`sh` and `cat`) started with the cgroup pool, that waits
//! for end-of-file on a pipe only this process holds the write end of (close-on-exec: no child
//! inherits it). When this process dies in any way, SIGKILL included, the kernel closes that
//! end; the guard then writes `1` to the pool's `cgroup.kill`, which kills every process of
//! every run of this process at once. So no process outlives its run even when modrun itself
//! is killed (a cluster node's lost runs must not go on running on their host), without
//! waiting for the next start's sweep.
//!
//! At a graceful stop the runs have already ended and the pool is removed; the guard's write
//! then fails quietly and it exits.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

/// The guard, alive while this is held: dropping it (or this process dying) fires it.
#[derive(Debug)]
pub(crate) struct Guard {
    _pipe: ChildStdin,
}

/// What the guard runs: wait for end-of-file, then kill the pool (`$0`).
const SCRIPT: &str = r#"exec 2>/dev/null; cat >/dev/null; echo 1 > "$0/cgroup.kill""#;

/// Start the guard of the pool at `pool`.
pub(crate) fn start(pool: &Path) -> std::io::Result<Guard> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg(pool)
        .stdin(Stdio::piped())
        // Held by the guard's shell alone (`cat` and `echo` write elsewhere): its end of file
        // says the guard has exited.
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C meant for modrun's group must not take it first.
        .process_group(0)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .spawn()?;
    let pipe = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no pipe"))?;
    // Reaped whenever it exits (at this process's graceful stop, or if someone kills it).
    std::thread::Builder::new()
        .name("modrun-guard".into())
        .spawn(move || reap(child))?;
    Ok(Guard { _pipe: pipe })
}

/// Wait until the guard has exited, then reap it. The thread blocks on the guard's stdout, not
/// in `wait`: every thread blocked in `wait` is woken at every exit of any child of this
/// process (one wake-up per run or so under load, each a context switch), while the pipe's
/// end of file comes only with the guard's own exit.
fn reap(mut child: Child) {
    if let Some(mut out) = child.stdout.take() {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    }
    let _ = child.wait();
}
