//! Logging setup: `tracing` to a sink of the caller's choice, filtered by `RUST_LOG`
//! (default `info`).

use tracing_subscriber::EnvFilter;

/// Install a global subscriber writing human-readable lines to `sink` (with colours when
/// `ansi`, i.e. when it is a terminal). Does nothing if one is already installed (tests call it
/// more than once).
pub fn init<W>(default_filter: &str, sink: W, ansi: bool)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_ansi(ansi)
        .with_target(true)
        .try_init();
}
