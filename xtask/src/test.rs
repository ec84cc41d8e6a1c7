//! `cargo xtask test`: the README's test command. Builds tracer, then runs every test in the
//! workspace (the integration tests find the binary through TRACER_BIN), then replays the fuzz
//! corpus once more with overflow checks on.

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
    // The fuzz corpus again, built as the fuzzer builds it: with overflow checks and debug
    // assertions, which the release build above leaves out.
    let replay = util::status(util::command("cargo").args([
        "test",
        "--profile",
        "replay",
        "-p",
        "tracer",
        "--test",
        "fuzz_corpus",
    ]))?;
    Ok(if status.success() {
        util::exit_code(replay)
    } else {
        util::exit_code(status)
    })
}
