//! Guide, "With Explicit Run Mode": the same module in each mode that spawns.
//!
//! `cargo run --example run_mode`

use std::path::Path;

use modrun::{RunMode, execute_module};

#[tokio::main]
async fn main() -> Result<(), modrun::ExecError> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scripts");
    for mode in [
        RunMode::Auto,
        RunMode::Async,
        RunMode::Threaded,
        RunMode::Local,
    ] {
        let out = execute_module(dir.join("main.py"), ["--param", "value"], &dir, mode).await?;
        println!(
            "{mode:>8}: exit {} -> {}",
            out.exit_code,
            out.stdout.trim_end()
        );
        assert_eq!(out.exit_code, 0);
    }
    // Modes parse from and print as their config/API names.
    let mode: RunMode = "threaded".parse().expect("a known mode");
    assert_eq!(mode.to_string(), "threaded");
    Ok(())
}
