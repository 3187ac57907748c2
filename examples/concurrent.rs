//! Guide, "Concurrent Execution": several modules at once, each result on its own.
//!
//! `cargo run --example concurrent`

use std::path::Path;

use futures_util::future::join_all;
use modrun::{RunMode, execute_module};

#[tokio::main]
async fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scripts");
    let modules = [
        (dir.join("main.py"), vec!["--arg1", "val1"]),
        (dir.join("main.py"), vec!["--fail"]),
        (dir.join("missing.py"), vec!["--arg3", "val3"]),
    ];
    let tasks = modules
        .iter()
        .map(|(script, args)| execute_module(script, args, &dir, RunMode::Auto));
    for (i, result) in join_all(tasks).await.into_iter().enumerate() {
        match result {
            Err(e) => println!("Module {i} failed with an error: {e}"),
            Ok(out) => println!("Module {i} completed with exit code {}", out.exit_code),
        }
    }
}
