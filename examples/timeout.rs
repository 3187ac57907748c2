//! Guide, "With Timeout": `tokio::time::timeout` stops the module; its whole process group is
//! killed when the future is dropped.
//!
//! `cargo run --example timeout`

use std::path::Path;
use std::time::Duration;

use modrun::{RunMode, execute_module};

#[tokio::main]
async fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scripts");
    let run = execute_module(dir.join("slow.sh"), ["60"], &dir, RunMode::Auto);
    match tokio::time::timeout(Duration::from_secs(1), run).await {
        Ok(Ok(out)) => println!("finished: exit {}", out.exit_code),
        Ok(Err(e)) => println!("could not run: {e}"),
        Err(_) => println!("Module execution timed out after 1 second (and was killed)"),
    }
}
