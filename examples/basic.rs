//! Guide, "Basic Usage": run a module once and handle its result.
//!
//! `cargo run --example basic`

use std::path::Path;

use modrun::{RunMode, execute_module};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scripts/main.py");
    let args = ["--param1", "value1", "--param2", "value2"];
    let cwd = script_path.parent().expect("the script has a folder");

    let (exit_code, stdout, stderr) = execute_module(&script_path, args, cwd, RunMode::default())
        .await?
        .into();

    if exit_code == 0 {
        println!("Module executed successfully!");
        println!("Output: {}", stdout.trim_end());
    } else {
        println!("Module failed with exit code {exit_code}");
        println!("Error: {stderr}");
    }
    assert_eq!(stdout, "module ran with --param1 value1 --param2 value2\n");
    Ok(())
}
