//! Guide, "Test with DRY_RUN Mode": nothing is spawned; the command line comes back as stdout.
//!
//! `cargo run --example dry_run`

use std::path::Path;

use modrun::{RunMode, execute_module};

#[tokio::main]
async fn main() -> Result<(), modrun::ExecError> {
    let out = execute_module(
        Path::new("module.py"),
        ["--test", "a value"],
        ".",
        RunMode::DryRun,
    )
    .await?;
    assert_eq!(out.exit_code, 0);
    println!("would run: {}", out.stdout.trim_end());
    Ok(())
}
