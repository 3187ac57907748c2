//! Guide, "Cancellation Support": run a module as a task and abort it; aborting drops the
//! future, which kills the module's process group.
//!
//! `cargo run --example cancellation`

use std::path::Path;
use std::time::Duration;

use modrun::{RunMode, execute_module};

#[tokio::main]
async fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scripts");
    let task = tokio::spawn(execute_module(
        dir.join("slow.sh"),
        ["60"],
        dir.clone(),
        RunMode::Auto,
    ));

    // Simulate doing other work.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let should_cancel = true;
    if should_cancel {
        println!("Cancelling execution...");
        task.abort();
        match task.await {
            Err(e) if e.is_cancelled() => println!("Execution cancelled successfully"),
            other => println!("unexpected: {other:?}"),
        }
    } else {
        let out = task.await.expect("not cancelled").expect("ran");
        println!("Completed with exit code {}", out.exit_code);
    }
}
