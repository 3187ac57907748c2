//! The `modrun` command: `modrun serve [--config FILE] [--bind ADDR]` (SIGINT or SIGTERM stop
//! it, SIGHUP reloads the configuration file), `modrun check-config [--config FILE]`,
//! `modrun token new`, and the client commands (`modrun::client::cli`): `run`, `runs`, `logs`,
//! `cancel`, `modules`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use modrun::client::cli;
use modrun::config::Config;

#[derive(Parser)]
#[command(
    name = "modrun",
    version,
    about = "Run declared modules over HTTP and watch them live"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve {
        /// The configuration file.
        #[arg(long, default_value = "config/modrun.toml")]
        config: PathBuf,
        /// Listen here instead of `server.bind` (port 0 picks a free port).
        #[arg(long, env = "MODRUN_BIND")]
        bind: Option<SocketAddr>,
    },
    /// Check a configuration as `serve` would, and that every module's program can be
    /// started; print a line per module. Exit 0 when all is well, 2 otherwise.
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = "config/modrun.toml")]
        config: PathBuf,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run a module on a server: print its output as it comes (stdout to stdout, stderr to
    /// stderr, byte for byte) and exit with its exit code. Ctrl-C cancels the run.
    Run(cli::RunArgs),
    /// List runs on a server, newest first.
    Runs(cli::RunsArgs),
    /// Print a run's output (with -f, follow it until it ends).
    Logs(cli::LogsArgs),
    /// Cancel a run.
    Cancel(cli::CancelArgs),
    /// List a server's modules, or show one with its parameters.
    Modules(cli::ModulesArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token, and the `[[auth.tokens]]` entry (with its SHA-256, never the
    /// token) to add to the config or the tokens file.
    New {
        /// The token's name: shown as a run's created_by and in the log.
        #[arg(long)]
        name: String,
        /// A scope it gets (repeat for several); default: modules:read, runs:create, runs:read,
        /// runs:cancel.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// A module pattern it may see and run (repeat for several; `*` and `?` match); default
        /// every module.
        #[arg(long = "module")]
        modules: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Kept to the end of main: at exit it gives the log thread a moment to write what is
    // queued (bounded, whatever the sink does). `serve` starts it once its config (which
    // chooses the format) is read.
    let _log = match &cli.command {
        Command::CheckConfig { .. } | Command::Token { .. } => {
            modrun::telemetry::init("info", std::io::stderr(), ansi)
        }
        // `serve` starts it once it has read its config; the client commands say what they
        // have to say themselves.
        _ => None,
    };
    match cli.command {
        Command::Serve { config, bind } => serve(config, bind, ansi),
        Command::CheckConfig { config } => check_config(&config),
        Command::Token {
            command:
                TokenCommand::New {
                    name,
                    scopes,
                    modules,
                },
        } => new_token(&name, &scopes, &modules),
        Command::Run(args) => ExitCode::from(cli::run(args)),
        Command::Runs(args) => ExitCode::from(cli::runs(args)),
        Command::Logs(args) => ExitCode::from(cli::logs(args)),
        Command::Cancel(args) => ExitCode::from(cli::cancel(args)),
        Command::Modules(args) => ExitCode::from(cli::modules(args)),
    }
}

/// `modrun token new`: the token on stdout's first line, then the config entry.
fn new_token(name: &str, scopes: &[String], modules: &[String]) -> ExitCode {
    use modrun::auth::{ModulePattern, Scope};
    let scopes: Vec<String> = if scopes.is_empty() {
        Scope::DEFAULT
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect()
    } else {
        scopes.to_vec()
    };
    for s in &scopes {
        if let Err(e) = s.parse::<Scope>() {
            say(format_args!("{e}"));
            return ExitCode::from(2);
        }
    }
    let modules: Vec<String> = if modules.is_empty() {
        vec!["*".to_owned()]
    } else {
        modules.to_vec()
    };
    for m in &modules {
        if let Err(e) = ModulePattern::new(m) {
            say(format_args!("{e}"));
            return ExitCode::from(2);
        }
    }
    let valid_name = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if !valid_name {
        say(format_args!(
            "`{name}` is not a token name ([A-Za-z0-9._-]{{1,64}})"
        ));
        return ExitCode::from(2);
    }
    let token = match modrun::auth::new_token() {
        Ok(t) => t,
        Err(e) => {
            say(format_args!("cannot read random bytes: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        "{token}\n\n\
         # Give the line above to the client (Authorization: Bearer <token>); it is shown once.\n\
         # Add this to the config (or to auth.tokens_file, as [[tokens]]):\n\
         [[auth.tokens]]\n\
         name = \"{name}\"\n\
         sha256 = \"{}\"\n\
         scopes = [{}]\n\
         modules = [{}]\n",
        modrun::auth::hex(&modrun::auth::sha256(token.as_bytes())),
        list(&scopes),
        list(&modules)
    );
    use std::io::Write;
    if std::io::stdout().write_all(text.as_bytes()).is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `modrun check-config`: everything `serve` validates at start-up (the whole file, secrets
/// from the environment and files, tokens), then every module's program as its runs would find
/// it. Problems go to stderr, the summary to stdout.
fn check_config(path: &std::path::Path) -> ExitCode {
    use std::io::Write;
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            say(format_args!("invalid configuration: {e}"));
            return ExitCode::from(2);
        }
    };
    let base_env = modrun::app::inherited_env(&config.runner.env_allow);
    let mut out = String::new();
    let mut broken = 0;
    let width = config.modules.iter().map(|m| m.id.len()).max().unwrap_or(0);
    for m in &config.modules {
        match modrun::runner::check_module_program(m, &base_env) {
            Ok(program) => {
                let mut facts = vec![format!(
                    "{} parameter{}",
                    m.parameters.len(),
                    if m.parameters.len() == 1 { "" } else { "s" }
                )];
                if let Some(t) = m.timeout {
                    facts.push(format!("timeout {}", humantime::format_duration(t)));
                }
                if let Some(n) = m.max_concurrent {
                    facts.push(format!("max_concurrent {n}"));
                }
                if m.retry_on_lost {
                    facts.push(format!("retry_on_lost, {} attempts", m.max_attempts));
                }
                out.push_str(&format!(
                    "ok    {:width$}  {} ({})\n",
                    m.id,
                    program.display(),
                    facts.join(", ")
                ));
            }
            Err(why) => {
                broken += 1;
                out.push_str(&format!("FAIL  {:width$}  {why}\n", m.id));
            }
        }
    }
    let store = match (&config.storage.url, &config.storage.path) {
        (Some(url), _) => format!("PostgreSQL at {}", url.redacted()),
        (None, Some(dir)) => format!("SQLite in {}", dir.display()),
        (None, None) => "in memory only".to_owned(),
    };
    out.push_str(&format!(
        "{}: {} module{}, {} with a program that cannot be started; store: {store}; listens on {}\n",
        config.file.display(),
        config.modules.len(),
        if config.modules.len() == 1 { "" } else { "s" },
        broken,
        config.server.bind,
    ));
    if std::io::stdout().write_all(out.as_bytes()).is_err() {
        return ExitCode::FAILURE;
    }
    if broken > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// A message for the operator on stderr, straight (start-up errors, before or after the log
/// queue). A broken stderr is ignored rather than a panic.
fn say(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "modrun: {msg}");
}

fn serve(path: PathBuf, bind: Option<SocketAddr>, ansi: bool) -> ExitCode {
    let mut config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            say(format_args!("invalid configuration: {e}"));
            return ExitCode::from(2);
        }
    };
    let _log = modrun::telemetry::init_as(config.log.format, "info", std::io::stderr(), ansi);
    if let Some(addr) = bind {
        config.server.bind = addr;
    }
    raise_fd_limit();
    let runtime = match modrun::app::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            say(format_args!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Before anything slow: a SIGHUP during start-up must not end the process (its default).
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        // Bound first: the address a cluster node advertises defaults to the bound one.
        let listener = match tokio::net::TcpListener::bind(config.server.bind).await {
            Ok(l) => l,
            Err(e) => {
                say(format_args!("cannot listen on {}: {e}", config.server.bind));
                return ExitCode::FAILURE;
            }
        };
        if let Ok(a) = listener.local_addr() {
            config.server.bind = a;
        }
        let app = match modrun::app::App::build(config.clone()).await {
            Ok(app) => app,
            Err(e) => {
                say(format_args!("cannot start: {e}"));
                return ExitCode::FAILURE;
            }
        };
        let reload = app.reload_handle();
        let served = tokio::select! {
            served = app.serve(listener, shutdown_signal()) => served,
            never = reload_on_hangup(hangups, reload) => match never {},
        };
        // The process's cgroup pool goes with it (a crash leaves it to the next start).
        modrun::runner::jail::shutdown();
        match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say(format_args!("server error: {e}"));
                ExitCode::FAILURE
            }
        }
    })
}

/// Raise the soft limit on open files to the hard limit: connections, pipes and the store all
/// need descriptors, and the connection limit is derived from this one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        // Children get the limit modrun was given, not the raised one.
        modrun::runner::jail::set_child_open_files(soft);
        if soft < hard
            && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
        }
    }
}

/// Ask for a configuration reload at every SIGHUP; never returns.
async fn reload_on_hangup(
    hangups: std::io::Result<tokio::signal::unix::Signal>,
    reload: modrun::app::ReloadHandle,
) -> std::convert::Infallible {
    match hangups {
        Ok(mut hup) => {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received: reloading the configuration");
                reload.request();
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; the configuration cannot be reloaded")
        }
    }
    std::future::pending().await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops modrun");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
