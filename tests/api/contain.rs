//! Nothing escapes a run: processes that leave the run's process group (setsid, a double fork
//! into a new session) are gone when the run succeeds, is cancelled or times out, in every
//! spawning mode, with a cgroup per run and with the subreaper fallback; and after a crash,
//! start-up finds them too.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    base_config, binary, marked, signal, start_command, start_server_at, start_server_with,
    write_config,
};

const ESCAPES: &str = r#"
[[modules]]
id = "escape"
name = "Leaves processes behind"
command = ["sh", "-c", 'setsid sleep 300 & setsid sh -c "sleep 301 & exit" & (setsid -f sleep 302); echo started; sleep "$1"', "escape"]
[[modules.parameters]]
name = "s"
type = "number"
default = 0.3
positional = true
"#;

async fn finished(c: &Client, base: &str, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let run: Value = c
            .get(format!("{base}/runs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !matches!(run["status"].as_str(), Some("queued" | "running")) {
            return run;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{run}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every mode x every ending on one server; `containment` names the mechanism.
async fn no_escape_with(containment: &str) {
    let toml = format!(
        "{}{ESCAPES}",
        base_config(&format!(
            "containment = \"{containment}\"\nrequest_modes = [\"async\", \"threaded\", \"local\"]"
        ))
    );
    let (_dir, path) = write_config(&toml);
    let mut server = start_server_with(&path, "127.0.0.1:0", &[("RUST_LOG", "info")]).await;
    let c = Client::new();
    for mode in ["async", "threaded", "local"] {
        for ending in ["success", "cancel", "timeout"] {
            let body = match ending {
                "success" => json!({"module_id": "escape", "mode": mode}),
                "cancel" => json!({"module_id": "escape", "mode": mode, "parameters": {"s": 30}}),
                _ => {
                    json!({"module_id": "escape", "mode": mode, "parameters": {"s": 30}, "timeout_s": 1})
                }
            };
            let res = c
                .post(server.url("/runs"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            let run: Value = res.json().await.unwrap();
            let id = run["id"].as_str().unwrap().to_owned();
            // Let the escapes happen.
            let start = Instant::now();
            while marked(&id).len() < 4 && start.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if ending == "cancel" {
                let res = c
                    .delete(server.url(&format!("/runs/{id}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::ACCEPTED);
            }
            let run = finished(&c, &server.base, &id).await;
            let expect = match ending {
                "success" => "succeeded",
                "cancel" => "cancelled",
                _ => "timed_out",
            };
            assert_eq!(
                run["status"], expect,
                "{containment} {mode} {ending}: {run}"
            );
            let left = marked(&id);
            assert!(
                left.is_empty(),
                "{containment} {mode} {ending}: processes outlived the run: {left:?}"
            );
        }
    }
    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
}

/// With a cgroup per run (the default where one can be made, as on CI's machines).
#[tokio::test]
async fn nothing_escapes_a_run_with_cgroups() {
    if !std::path::Path::new("/proc/self/cgroup").exists() {
        eprintln!("skipped: no cgroups here");
        return;
    }
    no_escape_with("auto").await;
}

/// The folder of this process's cgroup (v2), if it has one it can make cgroups under.
fn own_cgroup() -> Option<std::path::PathBuf> {
    let path = std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })?
        .split_whitespace()
        .nth(4)?;
    Some(std::path::Path::new(mount).join(path.trim_start_matches('/')))
}

/// A server started in a cgroup that was killed once before (its kill count is not 0, as
/// after a restart in a reused service cgroup) still runs every module in a cgroup of its
/// own: where the kernel kills a child born into a cgroup whose kill count differs from its
/// parent's (Linux 6.18), modrun notices and joins children to their cgroup the other way.
#[tokio::test]
async fn runs_work_from_a_cgroup_that_was_killed_before() {
    let Some(base) = own_cgroup() else {
        eprintln!("skipped: no cgroup v2 here");
        return;
    };
    let killed = base.join(format!("modrun-test-killed-{}", std::process::id()));
    if std::fs::create_dir(&killed).is_err() {
        eprintln!("skipped: cannot make cgroups here");
        return;
    }
    std::fs::write(killed.join("cgroup.kill"), "1").unwrap();
    let modules = r#"
[[modules]]
id = "where"
name = "Says its cgroup"
command = ["cat", "/proc/self/cgroup"]
"#;
    let (_dir, path) = write_config(&format!(
        "{}{modules}",
        base_config("containment = \"cgroup\"")
    ));
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$1" serve --bind 127.0.0.1:0 --config "$2""#)
        .arg(&killed)
        .arg(binary())
        .arg(&path);
    let mut server = start_command(cmd).await;
    for _ in 0..3 {
        let run: Value = server.post_run("where").await.json().await.unwrap();
        let id = run["id"].as_str().unwrap();
        let run = server.wait_done(id).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let out = server.output_text(id).await;
        assert!(out.contains("/modrun/pool-"), "in a run cgroup: {out}");
    }
    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
    // What is left once the pool's guard has exited too: the pools' folder, then ours.
    let gone = crate::helpers::wait_until(Duration::from_secs(5), || {
        let _ = std::fs::remove_dir(killed.join("modrun"));
        std::fs::remove_dir(&killed).is_ok()
    })
    .await;
    assert!(gone, "the test's cgroup is left empty");
}

/// With the subreaper fallback.
#[tokio::test]
async fn nothing_escapes_a_run_with_the_subreaper() {
    no_escape_with("subreaper").await;
}

/// kill -9 of the server while a run's escaped processes live: with cgroups, the pool's guard
/// kills them at once; with the subreaper, the restart does.
#[tokio::test]
async fn a_crash_leaves_no_escaped_process() {
    for containment in ["cgroup", "subreaper"] {
        let toml = format!(
            "{}{ESCAPES}",
            base_config(&format!("containment = \"{containment}\""))
        );
        let (_dir, path) = write_config(&toml);
        let mut server = start_server_at(&path).await;
        let c = Client::new();
        let run: Value = c
            .post(server.url("/runs"))
            .json(&json!({"module_id": "escape", "parameters": {"s": 60}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = run["id"].as_str().unwrap().to_owned();
        let start = Instant::now();
        while marked(&id).len() < 4 && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(marked(&id).len() >= 4, "the escapes ran");
        signal(&server.child, Signal::SIGKILL);
        server.child.wait().await.unwrap();
        if containment == "cgroup" {
            assert!(
                crate::helpers::wait_until(Duration::from_secs(5), || marked(&id).is_empty()).await,
                "the guard killed the run's cgroup: {:?}",
                marked(&id)
            );
        } else {
            // The escaped ones outlive the crash (that is the point of the test)...
            assert!(
                !marked(&id).is_empty(),
                "{containment}: escapes survived the crash"
            );
        }
        // ...until the restart.
        let mut again = start_server_at(&path).await;
        let left = marked(&id);
        assert!(
            left.is_empty(),
            "{containment}: after the restart: {left:?}"
        );
        let run = finished(&c, &again.base, &id).await;
        assert_eq!(run["status"], "lost");
        signal(&again.child, Signal::SIGTERM);
        again.child.wait().await.unwrap();
    }
}

/// A module's limits are set in the child before exec (with core dumps off and no new
/// privileges for every run), and a run ended by one is failed with an error naming it.
#[tokio::test]
async fn module_limits_apply_and_name_themselves() {
    let modules = r#"
[[modules]]
id = "show"
name = "Shows its limits"
command = ["sh", "-c", 'grep -E "^Max (address space|open files|processes|file size|core file size) " /proc/self/limits; grep NoNewPrivs /proc/self/status']
limits = { memory = "256MiB", open_files = 64, processes = 4096, file_size = "1MiB" }

[[modules]]
id = "defaults"
name = "No limits set"
command = ["sh", "-c", 'grep -E "^Max (open files|core file size) " /proc/self/limits; grep NoNewPrivs /proc/self/status']

[[modules]]
id = "spin"
name = "Burns CPU"
command = ["sh", "-c", 'while :; do :; done']
limits = { cpu = "1s" }

[[modules]]
id = "writer"
name = "Writes a big file"
command = ["sh", "-c", 'head -c 100000 /dev/zero > big.out']
limits = { file_size = "1KiB" }

[[modules]]
id = "hungry"
name = "Allocates 512 MiB"
command = ["python3", "-c", 'x = bytearray(512 << 20); print("allocated")']
limits = { memory = "128MiB" }
"#;
    let (_dir, path) = write_config(&format!("{}{modules}", base_config("")));
    let mut server = start_server_at(&path).await;
    let c = Client::new();
    let run = |module: &'static str| {
        let c = c.clone();
        let url = server.url("/runs?wait=30");
        async move {
            let res = c
                .post(url)
                .json(&json!({"module_id": module}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{module}");
            res.json::<Value>().await.unwrap()
        }
    };
    let lines = |run: &Value| {
        let c = c.clone();
        let url = server.url(&format!("/runs/{}/output", run["id"].as_str().unwrap()));
        async move {
            let page: Value = c.get(url).send().await.unwrap().json().await.unwrap();
            page["lines"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["line"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let show = run("show").await;
    assert_eq!(show["status"], "succeeded", "{show}");
    let out = lines(&show).await;
    // "Max open files  64  64  files" -> ("Max open files", soft, hard)
    let limit = |out: &[String], name: &str| -> (String, String) {
        let line = out
            .iter()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {out:?}"));
        let f: Vec<&str> = line[name.len()..].split_whitespace().collect();
        (f[0].to_owned(), f[1].to_owned())
    };
    let both = |v: &str| (v.to_owned(), v.to_owned());
    assert_eq!(
        limit(&out, "Max address space"),
        both(&(256u64 << 20).to_string())
    );
    assert_eq!(limit(&out, "Max open files"), both("64"));
    assert_eq!(limit(&out, "Max processes"), both("4096"));
    assert_eq!(
        limit(&out, "Max file size"),
        both(&(1u64 << 20).to_string())
    );
    assert_eq!(limit(&out, "Max core file size"), both("0"));
    assert!(
        out.iter()
            .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])),
        "{out:?}"
    );
    let defaults = run("defaults").await;
    let out = lines(&defaults).await;
    assert_eq!(limit(&out, "Max core file size").0, "0");
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .0;
    assert_eq!(
        limit(&out, "Max open files").0,
        nofile.to_string(),
        "children get the open-files limit modrun was started with, not the raised one"
    );
    assert!(
        out.iter()
            .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])),
        "{out:?}"
    );

    let spin = run("spin").await;
    assert_eq!(spin["status"], "failed", "{spin}");
    assert!(
        spin["error"].as_str().unwrap().contains("cpu (1s) limit"),
        "{spin}"
    );
    let writer = run("writer").await;
    assert_eq!(writer["status"], "failed", "{writer}");
    assert!(
        writer["error"].as_str().unwrap().contains("file_size"),
        "{writer}"
    );
    let hungry = run("hungry").await;
    assert_eq!(hungry["status"], "failed", "{hungry}");
    let out = lines(&hungry).await.join("\n");
    assert!(
        out.contains("MemoryError") && !out.contains("allocated"),
        "{out}"
    );
    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
}

/// `user` / `group`: when modrun runs as root, the child drops to that user and group (no
/// supplementary groups) before exec; a config naming an unknown user is refused.
#[tokio::test]
async fn runs_drop_to_the_modules_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: modrun can switch users only as root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user `nobody` here");
        return;
    };
    let modules = r#"
[[modules]]
id = "who"
name = "Who am I"
cwd = "/"
user = "nobody"
command = ["sh", "-c", 'echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"']
"#;
    let (_dir, path) = write_config(&format!("{}{modules}", base_config("")));
    let mut server = start_server_at(&path).await;
    let c = Client::new();
    let run: Value = c
        .post(server.url("/runs?wait=30"))
        .json(&json!({"module_id": "who"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    let page: Value = c
        .get(server.url(&format!("/runs/{}/output", run["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gid = nobody.gid.as_raw();
    assert_eq!(
        page["lines"][0]["line"],
        format!("uid={} gid={gid} groups={gid}", nobody.uid.as_raw())
    );
    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();

    let (_dir, bad) = write_config(&format!(
        "{}{}",
        base_config(""),
        modules.replace("\"nobody\"", "\"no-such-user-xyz\"")
    ));
    let out = tokio::process::Command::new(crate::helpers::binary())
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("modules["),
        "names the key"
    );
}
