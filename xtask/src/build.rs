//! `cargo xtask build`: prerequisites, then the release build of tracer (its build script
//! compiles the BPF crate with nightly and bpf-linker).

use std::path::PathBuf;

use anyhow::{Result, ensure};

use crate::{prereqs, util};

/// Builds tracer and returns the path of the binary.
pub fn build() -> Result<PathBuf> {
    prereqs::prereqs()?;
    util::run(util::command("cargo").args(["build", "--release", "-p", "tracer"]))?;
    let tracer = util::target_dir().join("release/tracer");
    ensure!(
        tracer.is_file(),
        "`cargo build --release -p tracer` succeeded but {} does not exist",
        tracer.display()
    );
    Ok(tracer)
}
