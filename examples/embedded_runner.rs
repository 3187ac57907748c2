//! Guide, "Integration with ModuleRunner": embed the runner the HTTP service uses, with its
//! limits, live output from any position, waiting and cancellation.
//!
//! `cargo run --example embedded_runner`

use std::time::Duration;

use futures_util::StreamExt;
use modrun::runner::{ModuleRunner, RunRequest, RunnerSettings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runner = ModuleRunner::new(RunnerSettings {
        kill_grace: Duration::from_secs(1),
        ..RunnerSettings::default()
    });

    // Stream a run's lines as they are printed.
    let mut req = RunRequest::new(
        "my-module",
        [
            "sh",
            "-c",
            "for i in 1 2 3; do echo step $i; sleep 0.2; done; echo done >&2",
        ],
    );
    req.module_name = "My Module".into();
    req.timeout = Duration::from_secs(30);
    let handle = runner.submit(req).await?.into_handle();
    let mut lines = std::pin::pin!(handle.lines(0));
    while let Some(line) = lines.next().await {
        println!("[{}] {:>6}: {}", line.seq, line.stream.as_str(), line.text);
    }
    let run = handle.wait().await.expect("still retained");
    println!(
        "{} finished: {} (exit {:?})",
        run.id,
        run.status(),
        run.exit_code()
    );

    // Cancel a long one: SIGTERM to its process group, SIGKILL after the grace period.
    let long = runner
        .submit(RunRequest::new("sleeper", ["sleep", "60"]))
        .await?
        .into_handle();
    tokio::time::sleep(Duration::from_millis(200)).await;
    long.cancel().await?;
    let run = long.wait().await.expect("still retained");
    println!(
        "{} finished: {} ({})",
        run.id,
        run.status(),
        run.error().unwrap_or_default()
    );
    Ok(())
}
