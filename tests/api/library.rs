//! The library API: `execute_module` (every scenario of the usage guide, plus the edge cases)
//! and the embedded `ModuleRunner`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt, StreamExt};
use modrun::output::OutputLimits;
use modrun::registry::Registry;
use modrun::run::{Line, Run, RunId, RunState, RunStatus, Stream};
use modrun::runner::{ModuleRunner, RunRequest, RunnerSettings};
use modrun::store::{
    Created, Expect, IdempotencyKey, ListQuery, MemoryStore, NewRun, Page, Recovered, Retention,
    RunStore, SqliteStore, StoreError, StoreFuture,
};
use modrun::{ExecError, ModuleOutput, RunMode, execute_module};

use crate::helpers::{group_members, wait_until};

/// Write an executable script into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

const SPAWNING: [RunMode; 4] = [
    RunMode::Auto,
    RunMode::Async,
    RunMode::Threaded,
    RunMode::Local,
];

/// Guide, basic usage: args are passed, cwd is honoured, stdout and stderr are separate; in every
/// spawning mode.
#[tokio::test]
async fn basic_usage_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(
        dir.path(),
        "main.sh",
        "#!/bin/sh\necho \"args: $*\"\necho \"cwd: $(pwd)\"\necho 'to stderr' >&2\n",
    );
    let cwd = dir.path().canonicalize().unwrap();
    for mode in SPAWNING {
        let out = execute_module(&s, ["--param1", "value 1"], &cwd, mode)
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0, "{mode}");
        assert_eq!(
            out.stdout,
            format!("args: --param1 value 1\ncwd: {}\n", cwd.display()),
            "{mode}"
        );
        assert_eq!(out.stderr, "to stderr\n", "{mode}");
        let (code, stdout, stderr): (i32, String, String) = out.into();
        assert_eq!(
            (code, stdout.is_empty(), stderr.is_empty()),
            (0, false, false)
        );
    }
    // Paths and args of every accepted shape.
    let args: Vec<String> = vec!["a".into()];
    let s_str = s.to_str().unwrap();
    execute_module(s_str, &args, cwd.as_path(), RunMode::default())
        .await
        .unwrap();
    execute_module(s.clone(), args.clone(), cwd.clone(), RunMode::default())
        .await
        .unwrap();
    execute_module(&s, &["x", "y"][..], "/", RunMode::default())
        .await
        .unwrap();
}

/// Guide, error handling: a missing script, a script without permission, and a missing
/// interpreter are typed errors that name the path.
#[tokio::test]
async fn errors_are_typed_and_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.sh");
    match execute_module(&missing, [] as [&str; 0], dir.path(), RunMode::Auto).await {
        Err(e @ ExecError::NotFound { .. }) => assert!(e.to_string().contains("nope.sh"), "{e}"),
        other => panic!("{other:?}"),
    }
    let plain = dir.path().join("plain.sh");
    std::fs::write(&plain, "#!/bin/sh\necho hi\n").unwrap();
    match execute_module(&plain, [] as [&str; 0], dir.path(), RunMode::Threaded).await {
        Err(e @ ExecError::PermissionDenied { .. }) => {
            assert!(e.to_string().contains("plain.sh"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let bad_interp = script(
        dir.path(),
        "interp.sh",
        "#!/nonexistent/interpreter\necho hi\n",
    );
    for mode in SPAWNING {
        match execute_module(&bad_interp, [] as [&str; 0], dir.path(), mode).await {
            Err(e @ ExecError::Spawn { .. }) => assert!(e.to_string().contains("interp.sh"), "{e}"),
            other => panic!("{mode}: {other:?}"),
        }
    }
    let ok = script(dir.path(), "ok.sh", "#!/bin/sh\ntrue\n");
    match execute_module(
        &ok,
        [] as [&str; 0],
        dir.path().join("no-such-dir"),
        RunMode::Async,
    )
    .await
    {
        Err(e @ ExecError::Spawn { .. }) => assert!(e.to_string().contains("ok.sh"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// `.py` scripts run under MODRUN_PYTHON (read at each call, default python3). The only test
/// that touches that variable, so that parallel tests cannot race on it.
#[tokio::test]
async fn python_scripts_use_modrun_python() {
    let dir = tempfile::tempdir().unwrap();
    let py = dir.path().join("main.py");
    // Not executable: a .py script only needs to be readable.
    std::fs::write(&py, "import sys\nprint('py', sys.argv[1:])\n").unwrap();
    let out = execute_module(&py, ["--x", "1"], dir.path(), RunMode::Auto)
        .await
        .unwrap();
    assert_eq!(out.stdout, "py ['--x', '1']\n");

    let fake = script(dir.path(), "fake-python", "#!/bin/sh\necho \"fake $*\"\n");
    set_python(Some(fake.as_os_str()));
    let out = execute_module(&py, ["a"], dir.path(), RunMode::Auto).await;
    set_python(Some("/nonexistent/python9".as_ref()));
    let missing = execute_module(&py, ["a"], dir.path(), RunMode::Threaded).await;
    set_python(None);
    assert_eq!(out.unwrap().stdout, format!("fake {} a\n", py.display()));
    match missing {
        Err(e @ ExecError::Spawn { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("main.py") && msg.contains("python9"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[expect(
    unsafe_code,
    reason = "set_var: no other test reads MODRUN_PYTHON (see the caller)"
)]
fn set_python(v: Option<&std::ffi::OsStr>) {
    // SAFETY: only this test reads or writes MODRUN_PYTHON; the variable is read by
    // execute_module on this same task.
    unsafe {
        match v {
            Some(v) => std::env::set_var("MODRUN_PYTHON", v),
            None => std::env::remove_var("MODRUN_PYTHON"),
        }
    }
}

/// Guide, exit codes: 0, module errors, other codes, and negative codes for death by signal.
#[tokio::test]
async fn exit_code_classes() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(
        dir.path(),
        "exit.sh",
        "#!/bin/sh\n[ \"$1\" = kill ] && kill -9 $$\n[ \"$1\" = term ] && kill -TERM $$\necho \"fail $1\" >&2\nexit \"$1\"\n",
    );
    for mode in SPAWNING {
        let run = |arg: &'static str| execute_module(&s, [arg], dir.path(), mode);
        assert_eq!(run("0").await.unwrap().exit_code, 0);
        let one = run("1").await.unwrap();
        assert_eq!((one.exit_code, one.stderr.as_str()), (1, "fail 1\n"));
        assert_eq!(run("42").await.unwrap().exit_code, 42);
        assert_eq!(run("kill").await.unwrap().exit_code, -9, "{mode}");
        assert_eq!(run("term").await.unwrap().exit_code, -15, "{mode}");
    }
}

/// A child that closes its output before it exits is still waited for (its pipes closing is
/// not its end), and output larger than a pipe's first read arrives whole; in every mode.
#[tokio::test]
async fn a_child_that_closes_its_pipes_first_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(
        dir.path(),
        "closes.sh",
        "#!/bin/sh\nyes 'a line of the output' | head -n 3000\nexec >&- 2>&-\nsleep 0.3\nexit 7\n",
    );
    let want = "a line of the output\n".repeat(3000);
    for mode in SPAWNING {
        let out = execute_module(&s, [] as [&str; 0], dir.path(), mode)
            .await
            .unwrap();
        assert_eq!(out.exit_code, 7, "{mode}");
        assert!(
            out.stdout == want,
            "{mode}: {} bytes of output",
            out.stdout.len()
        );
    }
}

/// Unicode is kept, invalid UTF-8 is replaced, empty and stderr-only outputs work.
#[tokio::test]
async fn output_decoding_edge_cases() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(
        dir.path(),
        "bytes.sh",
        "#!/bin/sh\ncase $1 in\n  uni) echo 'héllo wörld ✓ 日本';;\n  bad) printf 'a\\377b\\n';;\n  err) echo only-err >&2;;\n  none) ;;\nesac\n",
    );
    for mode in SPAWNING {
        let out = |a: &'static str| execute_module(&s, [a], dir.path(), mode);
        assert_eq!(out("uni").await.unwrap().stdout, "héllo wörld ✓ 日本\n");
        assert_eq!(out("bad").await.unwrap().stdout, "a\u{fffd}b\n");
        let err = out("err").await.unwrap();
        assert_eq!(
            (err.stdout.as_str(), err.stderr.as_str()),
            ("", "only-err\n")
        );
        assert_eq!(out("none").await.unwrap(), ModuleOutput::default());
    }
}

/// 100 MB of stdout, and a child that fills stderr while writing stdout, do not deadlock.
#[tokio::test]
async fn large_outputs_and_both_pipes_full() {
    let dir = tempfile::tempdir().unwrap();
    let big = script(
        dir.path(),
        "big.sh",
        "#!/bin/sh\nhead -c 104857600 /dev/zero | tr '\\0' 'x'\n",
    );
    for mode in [RunMode::Async, RunMode::Threaded, RunMode::Local] {
        let out = execute_module(&big, [] as [&str; 0], dir.path(), mode)
            .await
            .unwrap();
        assert_eq!(out.stdout.len(), 100 * 1024 * 1024, "{mode}");
        assert!(out.stdout.bytes().all(|b| b == b'x'));
    }
    let both = script(
        dir.path(),
        "both.sh",
        "#!/bin/sh\nhead -c 2000000 /dev/zero | tr '\\0' 'e' >&2\nhead -c 2000000 /dev/zero | tr '\\0' 'o'\nhead -c 2000000 /dev/zero | tr '\\0' 'e' >&2\n",
    );
    for mode in SPAWNING {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            execute_module(&both, [] as [&str; 0], dir.path(), mode),
        )
        .await
        .expect("no deadlock")
        .unwrap();
        assert_eq!(
            (out.stdout.len(), out.stderr.len()),
            (2_000_000, 4_000_000),
            "{mode}"
        );
    }
}

/// Guide, concurrent execution: 200 calls at once, each with its own correct output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(
        dir.path(),
        "n.sh",
        "#!/bin/sh\necho \"out $1\"\necho \"err $1\" >&2\nexit $(( $1 % 7 ))\n",
    );
    let modes = [
        RunMode::Async,
        RunMode::Threaded,
        RunMode::Local,
        RunMode::Auto,
    ];
    let calls = (0..200).map(|i| {
        let s = s.clone();
        let cwd = dir.path().to_owned();
        async move {
            (
                i,
                execute_module(&s, [i.to_string()], &cwd, modes[i % 4]).await,
            )
        }
    });
    let results = futures_util::future::join_all(calls).await;
    for (i, r) in results {
        let out = r.unwrap();
        assert_eq!(out.stdout, format!("out {i}\n"));
        assert_eq!(out.stderr, format!("err {i}\n"));
        assert_eq!(out.exit_code, (i % 7) as i32);
    }
    let (a, b) = tokio::join!(
        execute_module(&s, ["1"], dir.path(), RunMode::Async),
        execute_module(&s, ["2"], dir.path(), RunMode::Threaded)
    );
    assert_eq!((a.unwrap().exit_code, b.unwrap().exit_code), (1, 2));
}

/// A script that records its pid (= its process-group id), ignores SIGTERM and has a
/// grandchild.
fn stubborn_tree(dir: &Path) -> (PathBuf, PathBuf) {
    let pidfile = dir.join("pid");
    let s = script(
        dir,
        "stubborn.sh",
        &format!(
            "#!/bin/sh\ntrap '' TERM\necho $$ > {}\nsleep 60 &\nsleep 60\n",
            pidfile.display()
        ),
    );
    (s, pidfile)
}

async fn read_pgid(pidfile: &Path) -> u64 {
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(pidfile)
            .is_ok_and(|s| s.ends_with('\n')))
        .await
    );
    std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Guide, timeout: `tokio::time::timeout` around a child that ignores SIGTERM and forked a
/// grandchild leaves no process of its group behind, in every spawning mode.
#[tokio::test]
async fn timeout_kills_the_whole_group() {
    for mode in SPAWNING {
        let dir = tempfile::tempdir().unwrap();
        let (s, pidfile) = stubborn_tree(dir.path());
        // Long enough for a loaded machine to start the tree (the pid file must get written).
        let r = tokio::time::timeout(
            Duration::from_millis(1500),
            execute_module(&s, [] as [&str; 0], dir.path(), mode),
        )
        .await;
        assert!(r.is_err(), "timed out");
        let pgid = read_pgid(&pidfile).await;
        assert!(
            wait_until(Duration::from_secs(3), || group_members(pgid).is_empty()).await,
            "{mode}: group {pgid} still has {:?}",
            group_members(pgid)
        );
    }
}

/// Guide, cancellation: aborting the task, or losing a `select!`, kills the group too.
#[tokio::test]
async fn abort_and_select_kill_the_group() {
    for mode in SPAWNING {
        let dir = tempfile::tempdir().unwrap();
        let (s, pidfile) = stubborn_tree(dir.path());
        let cwd = dir.path().to_owned();
        let task =
            tokio::spawn(async move { execute_module(&s, [] as [&str; 0], &cwd, mode).await });
        let pgid = read_pgid(&pidfile).await;
        assert!(wait_until(Duration::from_secs(3), || group_members(pgid).len() >= 3).await);
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(
            wait_until(Duration::from_secs(3), || group_members(pgid).is_empty()).await,
            "{mode}"
        );

        let dir = tempfile::tempdir().unwrap();
        let (s, pidfile) = stubborn_tree(dir.path());
        tokio::select! {
            _ = execute_module(&s, [] as [&str; 0], dir.path(), mode) => panic!("cannot finish first"),
            () = tokio::time::sleep(Duration::from_millis(1500)) => {}
        }
        let pgid = read_pgid(&pidfile).await;
        assert!(
            wait_until(Duration::from_secs(3), || group_members(pgid).is_empty()).await,
            "{mode}"
        );
    }
}

/// Guide, dry run: nothing runs; exit 0 with the shell-quoted command line.
#[tokio::test]
async fn dry_run_spawns_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let s = script(
        dir.path(),
        "touch me.sh",
        &format!("#!/bin/sh\ntouch {}\n", marker.display()),
    );
    let out = execute_module(&s, ["--test", "it's"], dir.path(), RunMode::DryRun)
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout, format!("'{}' --test 'it'\\''s'\n", s.display()));
    assert!(!marker.exists());
    let py = execute_module("/nowhere/main.py", ["-v"], "/", RunMode::DryRun)
        .await
        .unwrap();
    assert!(
        py.stdout.ends_with("/nowhere/main.py -v\n"),
        "{}",
        py.stdout
    );
}

/// The embedded ModuleRunner: submit, stream with replay from any seq, wait, and cancel with
/// TERM -> grace -> KILL.
#[tokio::test]
async fn embedded_module_runner() {
    let runner = ModuleRunner::new(RunnerSettings {
        kill_grace: Duration::from_millis(300),
        ..RunnerSettings::default()
    });
    let mut req = RunRequest::new("demo", ["sh", "-c", "echo one; echo two >&2; echo three"]);
    req.timeout = Duration::from_secs(10);
    let h = runner.submit(req).await.unwrap().into_handle();
    let lines: Vec<_> = h.lines(0).collect().await;
    let texts: Vec<(u64, Stream, &str)> =
        lines.iter().map(|l| (l.seq, l.stream, &*l.text)).collect();
    // Seqs are contiguous; order holds within a stream (two pipes have no order between them).
    let seqs: Vec<u64> = texts.iter().map(|t| t.0).collect();
    assert_eq!(seqs, [1, 2, 3]);
    let of = |stream| -> Vec<&str> {
        texts
            .iter()
            .filter(|t| t.1 == stream)
            .map(|t| t.2)
            .collect()
    };
    assert_eq!(of(Stream::Stdout), ["one", "three"]);
    assert_eq!(of(Stream::Stderr), ["two"]);
    let run = h.wait().await.unwrap();
    assert_eq!(run.status(), RunStatus::Succeeded);
    let replay: Vec<_> = h.lines(2).map(|l| l.seq).collect().await;
    assert_eq!(replay, [3]);

    let h = runner
        .submit(RunRequest::new(
            "stubborn",
            ["sh", "-c", "trap '' TERM; echo ready; sleep 30"],
        ))
        .await
        .unwrap()
        .into_handle();
    let mut live = std::pin::pin!(h.lines(0));
    assert_eq!(&*live.next().await.unwrap().text, "ready");
    let pgid = h.run().await.unwrap().pid().unwrap() as u64;
    h.cancel().await.unwrap();
    let run = h.wait().await.unwrap();
    assert_eq!(run.status(), RunStatus::Cancelled);
    assert_eq!(run.signal(), Some(9), "SIGKILL after the grace period");
    assert!(group_members(pgid).is_empty());
    assert!(
        h.cancel().await.is_err(),
        "finished runs cannot be cancelled"
    );
}

/// A run is finished only once every process of its group is dead: a leader that exits and
/// leaves background processes behind (one holding the output pipe, one slow to die: it ignores
/// SIGTERM, holds no pipe and has 256 MiB to unmap) has them killed before `wait` returns, with
/// no polling on the caller's side. Every mode.
#[tokio::test]
async fn finished_runs_leave_no_live_process() {
    let runner = ModuleRunner::new(RunnerSettings::default());
    let dir = tempfile::tempdir().unwrap();
    for mode in SPAWNING {
        let ready = dir.path().join(format!("ready-{mode}"));
        let script = format!(
            "trap '' TERM; sleep 30 & \
             python3 -c \"import time; b = b'x' * (256 << 20); open('{r}', 'w').close(); time.sleep(30)\" \
               </dev/null >/dev/null 2>&1 & \
             while [ ! -e '{r}' ]; do sleep 0.01; done; echo started",
            r = ready.display()
        );
        let mut req = RunRequest::new("bg", ["sh", "-c", &script]);
        req.mode = mode;
        let h = runner.submit(req).await.unwrap().into_handle();
        let run = h.wait().await.unwrap();
        assert_eq!(run.status(), RunStatus::Succeeded, "{mode}");
        let pgid = run.pid().unwrap() as u64;
        assert_eq!(group_members(pgid), Vec::<u64>::new(), "{mode}");
    }
}

/// A runner over a SQLite store in `dir`.
fn sqlite_runner(dir: &Path, settings: RunnerSettings) -> ModuleRunner {
    let store = Arc::new(SqliteStore::open(dir).unwrap());
    let registry = Arc::new(Registry::new(store, settings.output));
    ModuleRunner::with_registry(settings, registry)
}

/// A caller that stops waiting for `submit` (an HTTP client that hangs up mid-request drops the
/// handler's future) never leaves a recorded run that nobody starts: the run still runs.
/// (SQLite store: recording is asynchronous there, so the drop lands before the commit.)
#[tokio::test]
async fn dropped_submit_still_runs_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let settings = RunnerSettings::default();
    let runner = sqlite_runner(dir.path(), settings);
    for _ in 0..3 {
        let submit = runner.submit(RunRequest::new("quick", ["true"]));
        // Polled once, then dropped: recording is under way, not finished.
        assert!(
            submit.now_or_never().is_none(),
            "dropped before it finished"
        );
    }
    let start = std::time::Instant::now();
    loop {
        let page = runner
            .list(ListQuery {
                limit: 10,
                ..ListQuery::default()
            })
            .await
            .unwrap();
        let statuses: Vec<RunStatus> = page.runs.iter().map(|r| r.status()).collect();
        if statuses == [RunStatus::Succeeded; 3] {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same for `cancel`: a caller that stops waiting for the cancel of a queued run still
/// leaves it `cancelled` (not shown as queued forever, not started later).
#[tokio::test]
async fn dropped_cancel_still_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let settings = RunnerSettings {
        max_concurrent: std::num::NonZeroUsize::MIN,
        kill_grace: Duration::from_millis(100),
        ..RunnerSettings::default()
    };
    let runner = sqlite_runner(dir.path(), settings);
    let blocker = runner
        .submit(RunRequest::new("block", ["sleep", "30"]))
        .await
        .unwrap()
        .into_handle();
    let queued = runner
        .submit(RunRequest::new("quick", ["true"]))
        .await
        .unwrap()
        .into_handle();
    assert_eq!(queued.run().await.unwrap().status(), RunStatus::Queued);
    assert!(
        runner.cancel(queued.id()).now_or_never().is_none(),
        "dropped before it finished"
    );
    let start = std::time::Instant::now();
    while queued.run().await.unwrap().status() != RunStatus::Cancelled {
        assert!(start.elapsed() < Duration::from_secs(10), "never cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blocker.cancel().await.unwrap();
    blocker.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(queued.run().await.unwrap().status(), RunStatus::Cancelled);
}

/// A memory store whose transitions to a finished state fail (a store error) `fail` times,
/// and its output appends `fail_appends` times; its appends can be made slow, and it counts
/// appends of one run that overlap (a shared store's transactions would contend).
struct FlakyStore {
    inner: MemoryStore,
    fail: AtomicUsize,
    fail_appends: AtomicUsize,
    append_delay: Duration,
    appending: std::sync::Mutex<std::collections::HashSet<RunId>>,
    overlaps: AtomicUsize,
}

impl FlakyStore {
    fn new(fail: usize, fail_appends: usize) -> Arc<Self> {
        Self::slow(fail, fail_appends, Duration::ZERO)
    }

    fn slow(fail: usize, fail_appends: usize, append_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryStore::new(),
            fail: AtomicUsize::new(fail),
            fail_appends: AtomicUsize::new(fail_appends),
            append_delay,
            appending: std::sync::Mutex::default(),
            overlaps: AtomicUsize::new(0),
        })
    }
}

/// Take one of the failures left in `n`, if any.
fn take_failure(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl RunStore for FlakyStore {
    fn create(&self, new: NewRun) -> StoreFuture<'_, Created> {
        self.inner.create(new)
    }
    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>> {
        self.inner.find_idempotent(key)
    }
    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>> {
        self.inner.get(id)
    }
    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()> {
        if next.is_finished() && take_failure(&self.fail) {
            return Box::pin(async { Err(StoreError::Backend("disk full".into())) });
        }
        self.inner.transition(id, expect, next)
    }
    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()> {
        if take_failure(&self.fail_appends) {
            return Box::pin(async { Err(StoreError::Backend("disk full".into())) });
        }
        Box::pin(async move {
            let first = self.appending.lock().unwrap().insert(id);
            if !first {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(self.append_delay).await;
            let r = self.inner.append_output(id, lines).await;
            if first {
                self.appending.lock().unwrap().remove(&id);
            }
            r
        })
    }
    fn read_output(&self, id: RunId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Line>> {
        self.inner.read_output(id, after, limit)
    }
    fn list(&self, query: ListQuery) -> StoreFuture<'_, Page> {
        self.inner.list(query)
    }
    fn purge(&self, policy: Retention, now: SystemTime) -> StoreFuture<'_, usize> {
        self.inner.purge(policy, now)
    }
    fn recover(&self) -> StoreFuture<'_, Recovered> {
        self.inner.recover()
    }
    fn probe(&self) -> StoreFuture<'_, ()> {
        self.inner.probe()
    }
}

/// Run `sh -c script` over `store` (with the registry's flusher running, as the service runs
/// it) until it is seen to end.
async fn run_over(store: Arc<FlakyStore>, script: &str) -> (RunId, Run) {
    let registry = Arc::new(Registry::new(store, OutputLimits::default()));
    tokio::spawn(
        registry
            .clone()
            .flush_loop(tokio_util::sync::CancellationToken::new()),
    );
    let runner = ModuleRunner::with_registry(RunnerSettings::default(), registry);
    let h = runner
        .submit(RunRequest::new("quick", ["sh", "-c", script]))
        .await
        .unwrap()
        .into_handle();
    let run = tokio::time::timeout(Duration::from_secs(10), h.wait())
        .await
        .expect("the run is seen to end")
        .unwrap();
    (h.id(), run)
}

/// A run's output is written by one flush at a time: the flusher and the run's end never
/// append the same run's lines at once (on PostgreSQL two such transactions deadlocked, a
/// second each), and every line arrives once, in order.
#[tokio::test]
async fn a_runs_output_is_flushed_one_batch_at_a_time() {
    for _ in 0..3 {
        let store = FlakyStore::slow(0, 0, Duration::from_millis(20));
        let (id, run) = run_over(store.clone(), "seq 1 30000").await;
        assert_eq!(run.status(), RunStatus::Succeeded);
        assert_eq!(
            store.overlaps.load(Ordering::SeqCst),
            0,
            "overlapping appends of one run"
        );
        let lines = store.read_output(id, 0, 100_000).await.unwrap();
        let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, (1..=30000).collect::<Vec<u64>>());
        assert!(lines.iter().zip(1..).all(|(l, n)| *l.text == n.to_string()));
    }
}

/// A store error on a run's final status or its last output is retried (by the flusher, once
/// the quick retry has failed too); a store that keeps failing still lets the run be seen to end
/// (instead of `running` forever).
#[tokio::test]
async fn final_status_and_output_survive_store_errors() {
    let store = FlakyStore::new(2, 2);
    let (id, run) = run_over(store.clone(), "echo a; echo b").await;
    assert_eq!(run.status(), RunStatus::Succeeded);
    let start = std::time::Instant::now();
    while store.get(id).await.unwrap().unwrap().status() != RunStatus::Succeeded {
        assert!(start.elapsed() < Duration::from_secs(10), "never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = store.read_output(id, 0, 10).await.unwrap();
    let texts: Vec<&str> = lines.iter().map(|l| &*l.text).collect();
    assert_eq!(texts, ["a", "b"], "output stored on a retry");

    let store = FlakyStore::new(usize::MAX, 0);
    let (id, run) = run_over(store.clone(), "true").await;
    assert_eq!(run.status(), RunStatus::Succeeded);
    let stored = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        stored.status(),
        RunStatus::Running,
        "the store never took it"
    );
}

/// A child starts with the signal dispositions a program expects: SIGPIPE at its default
/// (the Rust runtime of the server ignores it), the other signals the server ignores still
/// ignored (as any child inherits them), nothing caught, nothing blocked.
#[tokio::test]
async fn a_child_starts_with_default_signal_dispositions() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(
        dir.path(),
        "sigs.sh",
        "#!/bin/sh\nexec cat /proc/self/status\n",
    );
    let out = execute_module(&s, Vec::<String>::new(), dir.path(), RunMode::Async)
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", out.stderr);
    let mask = |status: &str, name: &str| {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {status}"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let pipe = 1u64 << (13 - 1);
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_ne!(
        mask(&ours, "SigIgn:") & pipe,
        0,
        "the server ignores SIGPIPE"
    );
    assert_eq!(
        mask(&out.stdout, "SigIgn:"),
        mask(&ours, "SigIgn:") & !pipe,
        "{}",
        out.stdout
    );
    assert_eq!(mask(&out.stdout, "SigCgt:"), 0, "{}", out.stdout);
    assert_eq!(mask(&out.stdout, "SigBlk:"), 0, "{}", out.stdout);
}

/// A child gets its stdin, stdout and stderr and no other descriptor of the server: not its
/// sockets and pipes (close-on-exec), nor one it holds without close-on-exec (as a descriptor
/// inherited from whatever started it would be), in every spawning mode.
#[tokio::test]
async fn a_child_gets_no_descriptor_but_its_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(dir.path(), "fds.sh", "#!/bin/sh\nexec ls /proc/self/fd\n");
    let file = std::fs::File::open(dir.path().join("fds.sh")).unwrap();
    // `dup` leaves close-on-exec off.
    let inheritable = nix::unistd::dup(&file).unwrap();
    for mode in SPAWNING {
        let out = execute_module(&s, Vec::<String>::new(), dir.path(), mode)
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0, "{mode:?}: {}", out.stderr);
        // 3 is `ls`'s own, open on the folder it lists.
        assert_eq!(out.stdout, "0\n1\n2\n3\n", "{mode:?}");
    }
    drop(inheritable);
}
