//! The systems under test, each in its own process: modrun (release build) and webhook.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A server process and where it listens.
pub struct Server {
    pub child: Child,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGTERM, then wait (SIGKILL after 10 s).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Start modrun with `toml` as its config (written into a fresh folder, where its store lives).
pub async fn modrun(bin: &Path, toml: &str) -> Server {
    modrun_with_env(bin, toml, &[]).await
}

/// [`modrun`], with more environment variables (`MODRUN_STORAGE_URL` for a cluster node).
pub async fn modrun_with_env(bin: &Path, toml: &str, env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("modrun.toml");
    std::fs::write(&config, toml).expect("write config");
    let mut child = Command::new(bin)
        .args(["serve", "--bind", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn,modrun=info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return rest.split_whitespace().next().map(str::to_owned);
            }
            if line.contains("ERROR") || line.contains("cannot") {
                eprintln!("modrun: {line}");
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("modrun did not start");
    // Keep draining stderr (modrun logs each run at info; we keep only warnings here).
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server {
        child,
        base: format!("http://{addr}"),
        _dir: dir,
    }
}

/// Start adnanh/webhook with one hook per `(id, command)`, each run synchronously (the response
/// waits for the command and carries its output).
pub async fn webhook(hooks: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("hooks.json");
    let json: Vec<serde_json::Value> = hooks
        .iter()
        .map(|(id, cmd)| {
            serde_json::json!({
                "id": id,
                "execute-command": cmd,
                "include-command-output-in-response": true,
                "http-methods": ["POST"],
            })
        })
        .collect();
    std::fs::write(&file, serde_json::to_vec(&json).expect("json")).expect("write hooks");
    let port = free_port();
    let child = Command::new("webhook")
        .args(["-hooks"])
        .arg(&file)
        .args(["-ip", "127.0.0.1", "-port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot start webhook (bench/run installs it)");
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "webhook did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory now, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory, KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// True while any process of the group exists (zombies excluded).
pub fn group_alive(pgid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let rest = stat.rsplit_once(')')?.1.to_owned();
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.len() > 2 && f[0] != "Z" && f[2].parse::<u32>().ok() == Some(pgid))
            })
            .unwrap_or(false)
    })
}

/// Where the system's `true` lives.
pub fn true_path() -> PathBuf {
    ["/bin/true", "/usr/bin/true"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("/bin/true")
}

/// What one `wrk` load measured.
pub struct WrkResult {
    /// Answers that passed the check.
    pub ok: u64,
    /// Wrong answers (status, or body without the needle) and socket errors.
    pub errors: u64,
    pub elapsed: Duration,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Drive `url` with `wrk` (2 threads, `connections` connections, for `dur`): POST `body` as
/// JSON when given. An answer counts as right when its status is 200 and, with a `needle`, its
/// body contains it (checked in wrk's Lua `response` hook, for every answer).
pub async fn wrk(
    url: &str,
    body: Option<&str>,
    needle: Option<&str>,
    connections: usize,
    dur: Duration,
) -> WrkResult {
    wrk_with(url, body, needle, &[], connections, dur).await
}

/// [`wrk`], with more request headers.
pub async fn wrk_with(
    url: &str,
    body: Option<&str>,
    needle: Option<&str>,
    headers: &[(&str, &str)],
    connections: usize,
    dur: Duration,
) -> WrkResult {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("load.lua");
    let lua_str = |s: Option<&str>| match s {
        Some(s) => format!("{:?}", s), // a Rust-escaped string is a valid Lua string here
        None => "nil".to_owned(),
    };
    let lua = format!(
        r#"local body = {body}
local needle = {needle}
if body then
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
else
  wrk.method = "POST"
end
{headers}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, b)
  if status ~= 200 or (needle and not string.find(b, needle, 1, true)) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format("MODRUN_BENCH %d %d %d %d %d %d\n", summary.requests, summary.duration,
    b, e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"#,
        body = lua_str(body),
        needle = lua_str(needle),
        headers = headers
            .iter()
            .map(|(k, v)| format!("wrk.headers[{k:?}] = {v:?}\n"))
            .collect::<String>(),
    );
    std::fs::write(&script, lua).expect("write wrk script");
    let out = Command::new("wrk")
        .args(["-t2", "--timeout", "30s"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", dur.as_secs().max(1))) // wrk takes whole seconds
        .arg("-s")
        .arg(&script)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("cannot run wrk (bench/run installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let f: Vec<u64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MODRUN_BENCH "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no result: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .split_whitespace()
        .map(|v| v.parse().expect("wrk figure"))
        .collect();
    let [requests, micros, bad, socket, p50, p99] = f[..] else {
        panic!("wrk result: {stdout}");
    };
    WrkResult {
        ok: requests.saturating_sub(bad),
        errors: bad + socket,
        elapsed: Duration::from_micros(micros),
        p50_ms: p50 as f64 / 1000.0,
        p99_ms: p99 as f64 / 1000.0,
    }
}
