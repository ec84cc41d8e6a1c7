//! `cargo xtask demo`: traces the bundled leaky C program and prints tracer's report.

use std::fs;

use anyhow::{Context, Result};

use crate::{build, util};

/// Returns the tracer's exit code, which is passed through.
pub fn demo() -> Result<u8> {
    let tracer = build::build()?;

    let out_dir = util::target_dir().join("xtask");
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let leaky = out_dir.join("leaky");
    util::run(
        util::command("cc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&leaky)
            .arg("examples/leaky.c"),
    )?;

    let status = util::status(
        util::command(&tracer)
            .args(["record", "--top", "10", "--"])
            .arg(&leaky),
    )?;
    Ok(util::exit_code(status))
}
