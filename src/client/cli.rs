//! The client commands of the `modrun` binary: `run`, `runs`, `logs`, `cancel`, `modules`.
//!
//! Output lines go to stdout and stderr as the program wrote them (bytes, each line ended by
//! `\n`); modrun's own messages go to stderr, prefixed `modrun:`, one line each. Exit codes
//! are [`exit`]'s.

use std::cell::Cell;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt as _;

use super::{Client, ClientError, OutLine, Seen, enc, is_final};

/// Exit codes of the client commands, besides a run's own exit code (0-255), which
/// `modrun run` and `modrun logs -f` exit with when the program exited.
pub mod exit {
    /// The command line is wrong (as clap reports it).
    pub const USAGE: u8 = 2;
    /// The server refused the request: unknown module or run, invalid parameters (sysexits
    /// `EX_DATAERR`).
    pub const REJECTED: u8 = 65;
    /// The server cannot be reached (`EX_UNAVAILABLE`).
    pub const UNREACHABLE: u8 = 69;
    /// The run did not run: it could not start (a spawn error), or it was lost with its node
    /// (`EX_SOFTWARE`).
    pub const NOT_RUN: u8 = 70;
    /// The output could not be written here (`EX_IOERR`).
    pub const OUTPUT: u8 = 74;
    /// The server is busy: its queue is full, or it is shutting down (`EX_TEMPFAIL`).
    pub const BUSY: u8 = 75;
    /// The server's answer made no sense (`EX_PROTOCOL`).
    pub const PROTOCOL: u8 = 76;
    /// No token, or one without the scope or module (`EX_NOPERM`).
    pub const DENIED: u8 = 77;
    /// The run timed out (as `timeout(1)`).
    pub const TIMED_OUT: u8 = 124;
    /// The run was cancelled (by this Ctrl-C or anyone), or the command stopped waiting.
    pub const CANCELLED: u8 = 130;
    /// The run was killed by signal N (one modrun did not send): 128 + N, as a shell says it.
    pub const SIGNAL_BASE: u8 = 128;
}

/// Which server, and who is asking.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The server's URL. Default: the `server.bind` address of --config (https when it has
    /// `[server.tls]`), else http://127.0.0.1:8080. The token comes from MODRUN_TOKEN.
    #[arg(long, env = "MODRUN_URL")]
    pub server: Option<String>,
    /// The configuration file whose address is the default server.
    #[arg(long, default_value = "config/modrun.toml")]
    pub config: PathBuf,
}

impl Target {
    fn client(&self) -> Result<Client, ClientError> {
        let base = match &self.server {
            Some(s) => s.clone(),
            None => default_server(&self.config),
        };
        Client::new(&base, std::env::var("MODRUN_TOKEN").ok())
    }
}

/// The server a config file's `serve` listens on, as a URL a client on this host can use.
fn default_server(config: &std::path::Path) -> String {
    let fallback = "http://127.0.0.1:8080".to_owned();
    let Ok(text) = std::fs::read_to_string(config) else {
        return fallback;
    };
    let Ok(doc) = text.parse::<toml::Table>() else {
        return fallback;
    };
    let server = doc.get("server").and_then(|s| s.as_table());
    let tls = server.is_some_and(|s| s.contains_key("tls"));
    let bind = std::env::var("MODRUN_SERVER__BIND").ok().or_else(|| {
        server
            .and_then(|s| s.get("bind"))
            .and_then(|b| b.as_str())
            .map(str::to_owned)
    });
    let Some(Ok(mut addr)) = bind.map(|b| b.parse::<std::net::SocketAddr>()) else {
        return fallback;
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

/// `modrun run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The module's id.
    pub module: String,
    /// A parameter as NAME=VALUE (repeat for several); the value is typed as the module
    /// declares the parameter (integer, number, boolean, string or choice).
    #[arg(short = 'p', long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Lower the module's timeout for this run, in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Print the run's id and return at once; the run goes on.
    #[arg(long)]
    pub detach: bool,
    /// Which server.
    #[command(flatten)]
    pub target: Target,
}

/// `modrun runs`.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only runs of this module.
    #[arg(long)]
    pub module: Option<String>,
    /// Only runs with this status (several: comma-separated).
    #[arg(long)]
    pub status: Option<String>,
    /// At most this many runs, newest first.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Which server.
    #[command(flatten)]
    pub target: Target,
}

/// `modrun logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The run's id.
    pub id: String,
    /// Follow the run until it ends (and exit as `modrun run` does).
    #[arg(short, long)]
    pub follow: bool,
    /// Which server.
    #[command(flatten)]
    pub target: Target,
}

/// `modrun cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The run's id.
    pub id: String,
    /// Which server.
    #[command(flatten)]
    pub target: Target,
}

/// `modrun modules`.
#[derive(Debug, Args)]
pub struct ModulesArgs {
    /// Show this module with its parameters.
    pub id: Option<String>,
    /// Which server.
    #[command(flatten)]
    pub target: Target,
}

/// A message of the client's own on stderr.
fn say(msg: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "modrun: {msg}");
}

/// The exit code for a failed request, after saying why.
fn failed(what: &str, e: &ClientError) -> u8 {
    say(format_args!("{what}: {e}"));
    code_of(e)
}

fn code_of(e: &ClientError) -> u8 {
    use reqwest::StatusCode as S;
    match e {
        ClientError::Unreachable { .. } => exit::UNREACHABLE,
        ClientError::Protocol(_) => exit::PROTOCOL,
        ClientError::Output(_) => exit::OUTPUT,
        ClientError::Rejected { status, .. } => match *status {
            S::UNAUTHORIZED | S::FORBIDDEN => exit::DENIED,
            S::TOO_MANY_REQUESTS | S::SERVICE_UNAVAILABLE => exit::BUSY,
            s if s.is_client_error() => exit::REJECTED,
            _ => exit::PROTOCOL,
        },
    }
}

/// A current-thread runtime for one command.
fn block_on<F: std::future::Future<Output = u8>>(f: F) -> u8 {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            say(format_args!("cannot start the async runtime: {e}"));
            exit::PROTOCOL
        }
    }
}

/// Writes output lines to stdout and stderr, as the program wrote them.
struct Out {
    stdout: tokio::io::Stdout,
    stderr: tokio::io::Stderr,
    buf: Vec<u8>,
}

impl Out {
    fn new() -> Self {
        Self {
            stdout: tokio::io::stdout(),
            stderr: tokio::io::stderr(),
            buf: Vec::new(),
        }
    }

    /// Each run of lines of one stream in one write, flushed, so that stdout and stderr keep
    /// their order on a terminal.
    async fn lines(&mut self, lines: &[OutLine]) -> std::io::Result<()> {
        let mut i = 0;
        while i < lines.len() {
            let stderr = lines[i].stderr;
            self.buf.clear();
            while i < lines.len() && lines[i].stderr == stderr {
                self.buf.extend_from_slice(&lines[i].bytes);
                self.buf.push(b'\n');
                i += 1;
            }
            if stderr {
                self.stderr.write_all(&self.buf).await?;
                self.stderr.flush().await?;
            } else {
                self.stdout.write_all(&self.buf).await?;
                self.stdout.flush().await?;
            }
        }
        Ok(())
    }
}

/// The exit code a finished run gives, and what to say about it (nothing when the program's
/// own exit code tells it).
fn run_exit(run: &Value) -> (u8, Option<String>) {
    let id = run["id"].as_str().unwrap_or("?");
    let error = run["error"].as_str().unwrap_or("no reason given");
    match run["status"].as_str().unwrap_or("") {
        "succeeded" => (0, None),
        "failed" => {
            if let Some(code) = run["exit_code"].as_i64() {
                ((code & 0xff) as u8, None)
            } else if let Some(sig) = run["signal"].as_i64() {
                (
                    exit::SIGNAL_BASE.saturating_add(sig.clamp(0, 127) as u8),
                    Some(format!("run {id} was killed by signal {sig}")),
                )
            } else {
                (exit::NOT_RUN, Some(format!("run {id} failed: {error}")))
            }
        }
        "timed_out" => (
            exit::TIMED_OUT,
            Some(format!("run {id} timed out: {error}")),
        ),
        "cancelled" => (exit::CANCELLED, Some(format!("run {id}: {error}"))),
        "lost" => (exit::NOT_RUN, Some(format!("run {id} was lost: {error}"))),
        other => (
            exit::PROTOCOL,
            Some(format!("run {id} ended with an unknown status `{other}`")),
        ),
    }
}

/// Typed parameters from `NAME=VALUE` pairs, as the module declares them (`module` is its
/// JSON; `None` when it cannot be read: values then go as strings and the server judges).
fn parameters(pairs: &[String], module: Option<&Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for pair in pairs {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(format!("`{pair}` is not NAME=VALUE"));
        };
        let kind = module
            .and_then(|m| m["parameters"].as_array())
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .and_then(|p| p["type"].as_str());
        let typed = match kind {
            Some("integer") => value
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("parameter {name}: `{value}` is not an integer"))?,
            Some("number") => value
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("parameter {name}: `{value}` is not a number"))?,
            Some("boolean") => match value.trim() {
                "true" | "yes" | "1" | "on" => Value::Bool(true),
                "false" | "no" | "0" | "off" => Value::Bool(false),
                _ => return Err(format!("parameter {name}: `{value}` is not true or false")),
            },
            _ => Value::String(value.to_owned()),
        };
        if out.insert(name.to_owned(), typed).is_some() {
            return Err(format!("parameter {name} is given twice"));
        }
    }
    Ok(out)
}

/// `modrun run`: start the run, print its output as it comes, exit as it did.
pub fn run(args: RunArgs) -> u8 {
    block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> u8 {
    let client = match args.target.client() {
        Ok(c) => c,
        Err(e) => return failed("cannot start", &e),
    };
    let module = match client.get(&format!("/modules/{}", enc(&args.module))).await {
        Ok(m) => Some(m),
        // A token that may run but not read the catalog: the server types the values.
        Err(ClientError::Rejected { status, .. }) if status == reqwest::StatusCode::FORBIDDEN => {
            None
        }
        Err(e) => return failed(&format!("module {}", args.module), &e),
    };
    let params = match parameters(&args.params, module.as_ref()) {
        Ok(p) => p,
        Err(why) => {
            say(why);
            return exit::USAGE;
        }
    };
    let mut body = json!({"module_id": args.module, "parameters": params});
    if let Some(t) = args.timeout {
        body["timeout_s"] = json!(t);
    }
    // One key per invocation: a POST retried after a lost answer never starts a second run.
    let key = format!("modrun-cli-{}", uuid::Uuid::now_v7());
    let run = match client.create_run(&body, &key).await {
        Ok(run) => run,
        Err(e) => return failed(&format!("cannot start {}", args.module), &e),
    };
    let Some(id) = run["id"].as_str().map(str::to_owned) else {
        say("the server's answer has no run id");
        return exit::PROTOCOL;
    };
    if args.detach {
        println!("{id}");
        return 0;
    }
    follow_run(&client, &id, true).await
}

/// Follow run `id` to its end, printing its output; with `cancel_on_interrupt`, a first
/// Ctrl-C cancels the run (and the output goes on until it ends), a second stops waiting.
async fn follow_run(client: &Client, id: &str, cancel_on_interrupt: bool) -> u8 {
    use tokio::signal::unix::{SignalKind, signal};
    let tty = std::io::stderr().is_terminal();
    let queued = Cell::new(false);
    let shown = Cell::new(false);
    let mut out = Out::new();
    let follow = client.follow(id, 0, Duration::from_secs(300), async |seen| match seen {
        Seen::Lines(lines) => {
            clear_position(&shown);
            out.lines(&lines).await
        }
        Seen::Status(run) => {
            queued.set(run["status"] == "queued");
            if !queued.get() {
                clear_position(&shown);
            }
            Ok(())
        }
        Seen::End(_) => {
            clear_position(&shown);
            Ok(())
        }
    });
    tokio::pin!(follow);
    let mut interrupts = match cancel_on_interrupt.then(|| signal(SignalKind::interrupt())) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            say(format_args!(
                "cannot catch Ctrl-C ({e}); it will not cancel the run"
            ));
            None
        }
        None => None,
    };
    let mut asked = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            r = &mut follow => break r,
            Some(()) = async { interrupts.as_mut()?.recv().await } => {
                asked += 1;
                clear_position(&shown);
                if asked > 1 {
                    say(format_args!(
                        "not waiting any longer; run {id} goes on (modrun logs {id} -f)"
                    ));
                    return exit::CANCELLED;
                }
                say(format_args!(
                    "cancelling run {id}; its output goes on until it ends (Ctrl-C again to stop waiting)"
                ));
                if let Err(e) = client.cancel(id).await {
                    say(format_args!("cannot cancel run {id}: {e}"));
                }
            }
            // Enabled on a terminal whatever the status: a precondition is only looked at
            // when the select starts again, which the stream does not make it do.
            _ = tick.tick(), if tty => {
                if queued.get()
                    && let Some(n) = queue_position(client, id).await
                    && queued.get()
                {
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!("\r\x1b[Kqueued (position {n})").as_bytes(),
                    );
                    shown.set(true);
                }
            }
        }
    };
    match result {
        Ok(run) => {
            let (code, message) = run_exit(&run);
            if let Some(m) = message {
                say(m);
            }
            code
        }
        Err(e @ ClientError::Output(_)) => failed(&format!("run {id}"), &e),
        Err(e) => {
            let code = failed(&format!("run {id}"), &e);
            say(format_args!(
                "the run may go on; follow it with `modrun logs {id} -f`"
            ));
            code
        }
    }
}

/// Wipe the "queued (position N)" line of a terminal, if one is shown.
fn clear_position(shown: &Cell<bool>) {
    if shown.replace(false) {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), b"\r\x1b[K");
    }
}

/// Where run `id` is in the queue: 1 + the queued runs (that this caller can see) created
/// before it; `None` when it is no longer queued or the list cannot be read.
async fn queue_position(client: &Client, id: &str) -> Option<usize> {
    let page = client.get("/runs?status=queued&limit=1000").await.ok()?;
    let runs = page["runs"].as_array()?;
    // Run ids are UUIDv7: in the order they were created.
    runs.iter().any(|r| r["id"] == id).then(|| {
        runs.iter()
            .filter(|r| r["id"].as_str().is_some_and(|other| other < id))
            .count()
            + 1
    })
}

/// `modrun logs`.
pub fn logs(args: LogsArgs) -> u8 {
    block_on(async move {
        let client = match args.target.client() {
            Ok(c) => c,
            Err(e) => return failed("cannot start", &e),
        };
        if args.follow {
            return follow_run(&client, &args.id, false).await;
        }
        let mut out = Out::new();
        match client
            .output(&args.id, 0, async |lines| out.lines(&lines).await)
            .await
        {
            Ok(()) => 0,
            Err(e) => failed(&format!("run {}", args.id), &e),
        }
    })
}

/// `modrun cancel`.
pub fn cancel(args: CancelArgs) -> u8 {
    block_on(async move {
        let client = match args.target.client() {
            Ok(c) => c,
            Err(e) => return failed("cannot start", &e),
        };
        match client.cancel(&args.id).await {
            Ok(run) => {
                let status = run["status"].as_str().unwrap_or("?");
                let text = if is_final(&run) {
                    format!("run {}: {status}\n", args.id)
                } else {
                    format!("run {}: {status}, stopping\n", args.id)
                };
                print(&text).await
            }
            Err(e) => failed(&format!("cannot cancel run {}", args.id), &e),
        }
    })
}

async fn print(text: &str) -> u8 {
    let mut stdout = tokio::io::stdout();
    match async {
        stdout.write_all(text.as_bytes()).await?;
        stdout.flush().await
    }
    .await
    {
        Ok(()) => 0,
        Err(e) => failed("output", &ClientError::Output(e.to_string())),
    }
}

/// `modrun runs`: a table, newest first.
pub fn runs(args: RunsArgs) -> u8 {
    block_on(async move {
        let client = match args.target.client() {
            Ok(c) => c,
            Err(e) => return failed("cannot start", &e),
        };
        let mut query = format!("/runs?limit={}", args.limit);
        if let Some(m) = &args.module {
            query.push_str(&format!("&module_id={}", enc(m)));
        }
        if let Some(s) = &args.status {
            query.push_str(&format!("&status={}", enc(s)));
        }
        let page = match client.get(&query).await {
            Ok(p) => p,
            Err(e) => return failed("cannot list runs", &e),
        };
        let runs = page["runs"].as_array().cloned().unwrap_or_default();
        let rows: Vec<[String; 6]> = runs
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
                let exit = match (r["exit_code"].as_i64(), r["signal"].as_i64()) {
                    (Some(c), _) => c.to_string(),
                    (None, Some(sig)) => format!("signal {sig}"),
                    _ => String::new(),
                };
                [
                    s("id"),
                    s("module_id"),
                    s("status"),
                    exit,
                    s("created_at"),
                    duration(r),
                ]
            })
            .collect();
        print(&table(
            ["ID", "MODULE", "STATUS", "EXIT", "CREATED", "DURATION"],
            &rows,
        ))
        .await
    })
}

/// How long a run ran (or has been running), e.g. `1.25s`, `3m 2s`.
fn duration(run: &Value) -> String {
    let at = |k: &str| {
        run[k]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
    };
    let Some(start) = at("started_at") else {
        return String::new();
    };
    let end = at("finished_at").unwrap_or_else(std::time::SystemTime::now);
    let d = end.duration_since(start).unwrap_or_default();
    if d < Duration::from_secs(60) {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

/// Columns padded to their widest cell, two spaces apart.
fn table<const N: usize>(head: [&str; N], rows: &[[String; N]]) -> String {
    let mut width = head.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 < N {
                l.push_str(&format!("{c:w$}  ", w = width[i]));
            } else {
                l.push_str(c);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut head.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// `modrun modules`: the catalog, or one module with its parameters.
pub fn modules(args: ModulesArgs) -> u8 {
    block_on(async move {
        let client = match args.target.client() {
            Ok(c) => c,
            Err(e) => return failed("cannot start", &e),
        };
        let Some(id) = &args.id else {
            let list = match client.get("/modules").await {
                Ok(l) => l,
                Err(e) => return failed("cannot list modules", &e),
            };
            let list = list["modules"]
                .as_array()
                .or(list.as_array())
                .cloned()
                .unwrap_or_default();
            let rows: Vec<[String; 3]> = list
                .iter()
                .map(|m| {
                    let s = |k: &str| m[k].as_str().unwrap_or("").replace('\n', " ");
                    [s("id"), s("name"), s("description")]
                })
                .collect();
            return print(&table(["ID", "NAME", "DESCRIPTION"], &rows)).await;
        };
        let m = match client.get(&format!("/modules/{}", enc(id))).await {
            Ok(m) => m,
            Err(e) => return failed(&format!("module {id}"), &e),
        };
        let mut text = format!(
            "{}: {}\n",
            m["id"].as_str().unwrap_or(id),
            m["name"].as_str().unwrap_or("")
        );
        if let Some(d) = m["description"].as_str() {
            text.push_str(&format!("{d}\n"));
        }
        text.push_str(&format!("timeout: {}s", m["timeout_s"]));
        if let Some(n) = m["max_concurrent"].as_u64() {
            text.push_str(&format!(", at most {n} at once"));
        }
        text.push('\n');
        let params = m["parameters"].as_array().cloned().unwrap_or_default();
        if params.is_empty() {
            text.push_str("no parameters\n");
        } else {
            let rows: Vec<[String; 4]> = params.iter().map(parameter_row).collect();
            text.push_str(&table(["PARAMETER", "TYPE", "DEFAULT", "RULES"], &rows));
        }
        print(&text).await
    })
}

fn parameter_row(p: &Value) -> [String; 4] {
    let mut rules = Vec::new();
    if p["required"] == true {
        rules.push("required".to_owned());
    }
    match (p["min"].as_f64(), p["max"].as_f64()) {
        (Some(a), Some(b)) => rules.push(format!("{a}..{b}")),
        (Some(a), None) => rules.push(format!(">= {a}")),
        (None, Some(b)) => rules.push(format!("<= {b}")),
        _ => {}
    }
    if let Some(c) = p["choices"].as_array() {
        let c: Vec<&str> = c.iter().filter_map(Value::as_str).collect();
        rules.push(format!("one of {}", c.join(", ")));
    }
    if let Some(re) = p["pattern"].as_str() {
        rules.push(format!("matches {re}"));
    }
    if let Some(n) = p["max_length"].as_u64() {
        rules.push(format!("at most {n} characters"));
    }
    if p["secret"] == true {
        rules.push("secret".to_owned());
    }
    if let Some(d) = p["description"].as_str() {
        rules.push(d.replace('\n', " "));
    }
    [
        p["name"].as_str().unwrap_or("").to_owned(),
        p["type"].as_str().unwrap_or("").to_owned(),
        match &p["default"] {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            v => v.to_string(),
        },
        rules.join("; "),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values are typed as the module declares them; a bad one is said, not sent.
    #[test]
    fn parameters_are_typed_by_the_module() {
        let m = json!({"parameters": [
            {"name": "n", "type": "integer"}, {"name": "x", "type": "number"},
            {"name": "b", "type": "boolean"}, {"name": "s", "type": "string"},
        ]});
        let p = parameters(
            &[
                "n=3".into(),
                "x=2.5".into(),
                "b=yes".into(),
                "s=a=b".into(),
                "other=7".into(),
            ],
            Some(&m),
        )
        .unwrap();
        assert_eq!(
            Value::Object(p),
            json!({"n": 3, "x": 2.5, "b": true, "s": "a=b", "other": "7"})
        );
        assert!(parameters(&["n=three".into()], Some(&m)).is_err());
        assert!(parameters(&["n".into()], Some(&m)).is_err());
        assert!(parameters(&["s=1".into(), "s=2".into()], Some(&m)).is_err());
        // Without the module, values go as strings (the server says what is wrong).
        assert_eq!(
            Value::Object(parameters(&["n=3".into()], None).unwrap()),
            json!({"n": "3"})
        );
    }

    /// Each final status has its documented exit code.
    #[test]
    fn exit_codes_follow_the_run() {
        let code = |v: Value| run_exit(&v).0;
        assert_eq!(code(json!({"status": "succeeded", "exit_code": 0})), 0);
        assert_eq!(code(json!({"status": "failed", "exit_code": 3})), 3);
        assert_eq!(code(json!({"status": "failed", "signal": 9})), 137);
        assert_eq!(code(json!({"status": "failed"})), exit::NOT_RUN);
        assert_eq!(code(json!({"status": "timed_out"})), exit::TIMED_OUT);
        assert_eq!(code(json!({"status": "cancelled"})), exit::CANCELLED);
        assert_eq!(code(json!({"status": "lost"})), exit::NOT_RUN);
    }

    /// The default server is the config's bind address, reachable from this host.
    #[test]
    fn the_default_server_comes_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.toml");
        std::fs::write(&f, "[server]\nbind = \"0.0.0.0:9123\"\n").unwrap();
        assert_eq!(default_server(&f), "http://127.0.0.1:9123");
        assert_eq!(
            default_server(&dir.path().join("missing.toml")),
            "http://127.0.0.1:8080"
        );
    }
}
