//! `cargo xtask test`: the README's test command. Builds tracer, then runs every test in the
//! workspace (the integration tests find the binary through TRACER_BIN).

use anyhow::Result;

use crate::{build, util};

/// Returns the exit code of `cargo test`, which is passed through.
pub fn test() -> Result<u8> {
    let tracer = build::build()?;
    let status = util::status(
        util::command("cargo")
            .args([
                "test",
                "--release",
                // Every test binary runs even when one fails: one CI run shows every failure.
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
            ])
            .env("TRACER_BIN", &tracer),
    )?;
    Ok(util::exit_code(status))
}
