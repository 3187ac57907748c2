//! The client commands of the real binary (`modrun run`, `runs`, `logs`, `cancel`,
//! `modules`) against a real server: exit codes, byte-exact output, Ctrl-C, a stream cut
//! mid-way, a POST whose answer is lost.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{TestApp, base_config, binary, spawn_app_with};

/// A module whose lines are not text: NUL, control bytes, 0xFF, on both streams.
const BINARY: &str = r#"
[[modules]]
id = "binary"
name = "Binary"
command = ["sh", "-c", 'printf "\000\001\002\n\377\000x\n"; printf "e\377\n" >&2; printf "tail\000"']
"#;

struct Done {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

fn command(server: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(args)
        .env("MODRUN_URL", server)
        .env_remove("MODRUN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Run `modrun ARGS` against `server` to its end.
async fn cli(server: &str, args: &[&str]) -> Done {
    let out = tokio::time::timeout(Duration::from_secs(60), command(server, args).output())
        .await
        .expect("the command ends")
        .expect("run the binary");
    Done {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn runs_of(app: &TestApp, module: &str) -> Vec<Value> {
    let res = app
        .client
        .get(app.url(&format!("/runs?module_id={module}")))
        .send()
        .await
        .unwrap();
    res.json::<Value>().await.unwrap()["runs"]
        .as_array()
        .unwrap()
        .clone()
}

/// `modrun run` prints stdout to stdout and stderr to stderr byte for byte (lines that are
/// not text too) and exits with the run's exit code, or the documented code for each other
/// way a run ends or is refused.
#[tokio::test]
async fn run_prints_the_bytes_and_exits_as_the_run() {
    let app = spawn_app_with(&format!("{}{BINARY}", base_config(""))).await;
    let s = app.base.as_str();

    let d = cli(s, &["run", "binary"]).await;
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(d.stdout, b"\x00\x01\x02\n\xff\x00x\ntail\x00\n");
    assert_eq!(d.stderr, "e\u{FFFD}\n");
    let d = cli(s, &["run", "bytes"]).await;
    assert_eq!(d.stdout, b"ok \xff\xfe end\nno newline at end\n");

    let d = cli(s, &["run", "mixed"]).await;
    assert_eq!(d.code, 3);
    assert_eq!(d.stdout, b"out1\nout2\n");
    assert_eq!(d.stderr, "err1\nerr2\n");

    let d = cli(s, &["run", "lines", "-p", "n=4"]).await;
    assert_eq!(
        (d.code, d.stdout.as_slice()),
        (0, &b"line 1\nline 2\nline 3\nline 4\n"[..])
    );

    // Timed out (a lower timeout asked for): 124, and why.
    let d = cli(s, &["run", "sleep", "-p", "s=30", "--timeout", "1"]).await;
    assert_eq!(d.code, 124, "{}", d.stderr);
    assert_eq!(d.stdout, b"started\n");
    assert!(d.stderr.contains("timed out"), "{}", d.stderr);

    // Could not start: 70.
    let d = cli(s, &["run", "missing"]).await;
    assert_eq!(d.code, 70, "{}", d.stderr);

    // Refused by the server: 65, the problem in one line; a value the module's type refuses
    // is said before anything is sent: 2.
    let d = cli(s, &["run", "no-such-module"]).await;
    assert_eq!(d.code, 65);
    assert_eq!(d.stderr.lines().count(), 1, "{}", d.stderr);
    assert!(d.stderr.contains("404"), "{}", d.stderr);
    let d = cli(s, &["run", "lines", "-p", "nope=1"]).await;
    assert_eq!(d.code, 65, "{}", d.stderr);
    assert!(d.stderr.contains("parameters.nope"), "{}", d.stderr);
    let d = cli(s, &["run", "lines", "-p", "n=four"]).await;
    assert_eq!(d.code, 2, "{}", d.stderr);
    assert!(runs_of(&app, "lines").await.len() == 1);

    // --detach: the id, at once.
    let d = cli(s, &["run", "sleep", "-p", "s=0.2", "--detach"]).await;
    assert_eq!(d.code, 0);
    let id = String::from_utf8(d.stdout).unwrap().trim().to_owned();
    assert_eq!(app.wait_finished(&id).await["status"], "succeeded");

    // Nobody listening: 69.
    let d = cli("http://127.0.0.1:1", &["run", "lines"]).await;
    assert_eq!(d.code, 69);
    assert!(d.stderr.contains("cannot reach"), "{}", d.stderr);
    app.stop().await;
}

/// `modules`, `runs`, `logs` (byte-exact, the two streams apart) and `cancel`.
#[tokio::test]
async fn the_other_commands() {
    let app = spawn_app_with(&format!("{}{BINARY}", base_config(""))).await;
    let s = app.base.as_str();
    let d = cli(s, &["modules"]).await;
    let text = String::from_utf8(d.stdout).unwrap();
    assert!(text.starts_with("ID "), "{text}");
    assert!(text.lines().any(|l| l.starts_with("lines ")), "{text}");
    let d = cli(s, &["modules", "lines"]).await;
    let text = String::from_utf8(d.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("n ") && l.contains("integer") && l.contains('3')),
        "{text}"
    );
    assert_eq!(cli(s, &["modules", "nope"]).await.code, 65);

    let run = app.start("binary", serde_json::json!({})).await;
    let id = run["id"].as_str().unwrap();
    app.wait_finished(id).await;
    let d = cli(s, &["logs", id]).await;
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(d.stdout, b"\x00\x01\x02\n\xff\x00x\ntail\x00\n");
    assert_eq!(d.stderr, "e\u{FFFD}\n");
    let d = cli(s, &["logs", "-f", id]).await;
    assert_eq!(d.stdout, b"\x00\x01\x02\n\xff\x00x\ntail\x00\n");

    let d = cli(s, &["runs", "--module", "binary"]).await;
    let text = String::from_utf8(d.stdout).unwrap();
    let row = text.lines().nth(1).unwrap_or("");
    assert!(row.starts_with(id) && row.contains("succeeded"), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
    let d = cli(s, &["runs", "--status", "bogus"]).await;
    assert_eq!(d.code, 65, "{}", d.stderr);

    let run = app.start("sleep", serde_json::json!({})).await;
    let id = run["id"].as_str().unwrap();
    app.wait_pid(id).await;
    let d = cli(s, &["cancel", id]).await;
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert!(String::from_utf8_lossy(&d.stdout).contains(id));
    assert_eq!(app.wait_finished(id).await["status"], "cancelled");
    assert_eq!(
        cli(s, &["cancel", "01a22bdb-18f0-7104-8161-516329705fe7"])
            .await
            .code,
        65
    );
    app.stop().await;
}

/// Wait for a line of the child's stdout that contains `what`.
async fn wait_for_line(child: &mut tokio::process::Child, what: &str) {
    let stdout = child.stdout.as_mut().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains(what) {
                return;
            }
        }
        panic!("stdout ended before `{what}`");
    })
    .await
    .expect("the line in time");
}

fn interrupt(child: &tokio::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
}

/// Ctrl-C cancels the run and waits for its end (its last words are printed); a second
/// Ctrl-C stops waiting and leaves the run to stop on its own.
#[tokio::test]
async fn ctrl_c_cancels_the_run() {
    // A long grace: the stubborn run below goes on stopping until the test ends it.
    let config = base_config("").replace("kill_grace = \"1s\"", "kill_grace = \"60s\"");
    let app = spawn_app_with(&config).await;
    let mut child = command(&app.base, &["run", "graceful"]).spawn().unwrap();
    wait_for_line(&mut child, "started").await;
    interrupt(&child);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stdout).contains("got-term"));
    let run = &runs_of(&app, "graceful").await[0];
    assert_eq!(run["status"], "cancelled");

    let mut child = command(&app.base, &["run", "stubborn"]).spawn().unwrap();
    wait_for_line(&mut child, "started").await;
    interrupt(&child);
    // The cancel has reached the server when the run says it is stopping... or has a
    // cancelled_by; then the second Ctrl-C.
    let id = runs_of(&app, "stubborn").await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    interrupt(&child);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not waiting"), "{err}");
    let run = app.get_run(&id).await;
    assert_eq!(run["status"], "running", "the run goes on stopping: {run}");
    let pid = run["pid"].as_i64().unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
    assert_eq!(app.wait_finished(&id).await["status"], "cancelled");
    app.stop().await;
}

/// A TCP proxy in front of `target` that cuts every connection once it has passed `cut`
/// bytes to the client, and drops the answer to the first `POST /runs` (the request reaches
/// the server, the client sees the connection close).
/// Its URL, how many connections it took, and whether the POST's answer is still to drop.
async fn cutting_proxy(target: String, cut: usize) -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drop_post = Arc::new(AtomicBool::new(true));
    let connections = Arc::new(AtomicUsize::new(0));
    let (count, to_drop) = (connections.clone(), drop_post.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let target = target.clone();
            let drop_post = drop_post.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let doomed = Arc::new(AtomicBool::new(false));
                let mark = doomed.clone();
                let up = async move {
                    let mut buf = vec![0u8; 16384];
                    loop {
                        let n = cr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        if buf[..n].starts_with(b"POST /runs")
                            && drop_post.swap(false, Ordering::SeqCst)
                        {
                            mark.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 4096];
                    let mut passed = 0;
                    loop {
                        let n = sr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 || doomed.load(Ordering::SeqCst) {
                            // The answer to the doomed POST is read and never passed on.
                            return;
                        }
                        let n = n.min(cut - passed);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        passed += n;
                        if passed >= cut {
                            return;
                        }
                    }
                };
                // Either side ending ends the connection: both halves are dropped.
                tokio::select! {
                    () = up => {}
                    () = down => {}
                }
            });
        }
    });
    (format!("http://{addr}"), connections, to_drop)
}

/// Through a proxy that loses the answer to the POST and cuts the event stream every 8 KiB:
/// one run is started (the retried POST carries the same Idempotency-Key), and every one of
/// its 3,000 lines is printed once, in order.
#[tokio::test]
async fn a_lost_answer_and_a_cut_stream_lose_nothing() {
    let app = spawn_app_with(&base_config("")).await;
    let (proxy, connections, to_drop) =
        cutting_proxy(app.base.trim_start_matches("http://").to_owned(), 8192).await;
    let d = cli(
        &proxy,
        &["run", "big", "-p", "lines=3000", "-p", "width=40"],
    )
    .await;
    assert_eq!(d.code, 0, "{}", d.stderr);
    let text = String::from_utf8(d.stdout).unwrap();
    assert_eq!(text.lines().count(), 3000);
    assert!(text.lines().all(|l| l == "0".repeat(40)));
    assert_eq!(text.len(), 3000 * 41);
    assert!(
        !to_drop.load(Ordering::SeqCst),
        "the POST's answer was dropped"
    );
    assert_eq!(
        runs_of(&app, "big").await.len(),
        1,
        "one run for the retried POST"
    );
    // 3,000 lines of about 100 bytes of events, cut every 8 KiB.
    assert!(connections.load(Ordering::SeqCst) > 20, "{connections:?}");
    app.stop().await;
}

/// On a terminal (a pty, through `script`), `modrun run` shows the run's place in the queue
/// until it starts, then wipes that line and prints the output.
#[tokio::test]
async fn a_terminal_sees_the_queue_position() {
    let app =
        spawn_app_with(&base_config("").replace("max_concurrent = 4", "max_concurrent = 1")).await;
    let blocker = app.start("sleep", serde_json::json!({"s": 60})).await;
    let blocker = blocker["id"].as_str().unwrap().to_owned();
    app.wait_pid(&blocker).await;
    let cmd = format!("{} run lines -p n=2", binary().display());
    let mut child = tokio::process::Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("MODRUN_URL", &app.base)
        .env_remove("MODRUN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("script(1), from util-linux");
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(20), async {
        while !String::from_utf8_lossy(&seen).contains("queued (position 1)") {
            let n = out.read(&mut buf).await.unwrap();
            assert!(n > 0, "ended early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the queue position in time");
    app.cancel_run(&blocker).await;
    tokio::time::timeout(Duration::from_secs(20), out.read_to_end(&mut seen))
        .await
        .unwrap()
        .unwrap();
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{status:?}");
    let text = String::from_utf8_lossy(&seen);
    let after = &text[text.rfind("queued (position 1)").unwrap()..];
    assert!(after.contains("\r\x1b[K"), "the line is wiped: {after:?}");
    assert!(after.contains("line 1\r\nline 2\r\n"), "{after:?}");
    app.stop().await;
}
