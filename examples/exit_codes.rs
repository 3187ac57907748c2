//! Guide, "Handle Exit Codes Appropriately": success, module errors, signals (negative codes)
//! and other failures.
//!
//! `cargo run --example exit_codes`

use std::path::Path;

use modrun::{RunMode, execute_module};

#[tokio::main]
async fn main() -> Result<(), modrun::ExecError> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scripts");
    for arg in ["0", "1", "signal", "3"] {
        let out = execute_module(dir.join("exit.sh"), [arg], &dir, RunMode::Auto).await?;
        match out.exit_code {
            0 => println!("{arg}: success"),
            1 => println!("{arg}: module-specific error: {}", out.stderr.trim_end()),
            code if code < 0 => println!("{arg}: terminated by signal {}", -code),
            code => println!("{arg}: other error {code}: {}", out.stderr.trim_end()),
        }
    }
    Ok(())
}
