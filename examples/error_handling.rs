//! Guide, "Error Handling": a non-zero exit is a result; a missing script, a permission
//! problem or a failed spawn are typed errors.
//!
//! `cargo run --example error_handling`

use std::path::Path;

use modrun::{ExecError, RunMode, execute_module};

async fn run(script: &Path, args: &[&str]) {
    let cwd = script.parent().unwrap_or(Path::new("/"));
    match execute_module(script, args, cwd, RunMode::Auto).await {
        Ok(out) if out.exit_code != 0 => println!("Module failed: {}", out.stderr.trim_end()),
        Ok(out) => println!("Module succeeded: {}", out.stdout.trim_end()),
        Err(ExecError::NotFound { path }) => println!("Script not found: {}", path.display()),
        Err(e @ ExecError::PermissionDenied { .. }) => println!("Permission denied: {e}"),
        Err(e @ ExecError::Spawn { .. }) => println!("Execution failed: {e}"),
    }
}

#[tokio::main]
async fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scripts");
    run(&dir.join("main.py"), &["--mode", "process"]).await;
    run(&dir.join("main.py"), &["--fail"]).await;
    run(&dir.join("does-not-exist.py"), &[]).await;
    // A folder is not something that can be executed.
    run(&dir, &[]).await;
}
