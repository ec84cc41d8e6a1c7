//! `cargo xtask prereqs`: installs what building and testing tracer need, and only what is
//! missing, so a second run is quick and prints nothing.

use std::path::Path;

use anyhow::{Result, bail};

use crate::util::{command, describe, output, run_quiet};

/// bpf-linker 0.11+ wants a system LLVM 21-23, which Debian 12 lacks; 0.10.1 loads the
/// nightly rustc's own LLVM.
const BPF_LINKER_VERSION: &str = "0.10.1";

/// Debian packages the tests use: gcc builds their C fixtures, bpftool checks that no BPF
/// program is left behind, binutils splits debug files (objcopy, strip), golang-go brings
/// `go tool pprof`, which reads the pprof export back, and tmux runs `tracer top` in a real
/// terminal. g++ builds the C++ unwind fixture, whose stacks are compared with gdb's `bt`
/// (with its Python), which names glibc's frames and inlined functions from libc6-dbg.
const DEBIAN_PACKAGES: &[&str] = &[
    "gcc",
    "bpftool",
    "binutils",
    "golang-go",
    "tmux",
    "g++",
    "gdb",
    "libc6-dbg",
];

/// The tests trace the official Node build at this path.
const NODE: &str = "/usr/bin/node";

pub fn prereqs() -> Result<()> {
    if !Path::new(NODE).exists() {
        bail!(
            "{NODE} is missing: the tests trace the official Node 20 build installed there \
             (preinstalled on these machines); install it and rerun"
        );
    }
    ensure_rust_src()?;
    ensure_debian_packages()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let mut list = command("rustup");
    list.args(["component", "list", "--toolchain", "nightly", "--installed"]);
    let out = output(&mut list)?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {} (is the nightly toolchain installed?)\n{}",
            describe(&list),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    let installed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|line| line.trim() == "rust-src" || line.starts_with("rust-src-"));
    if !installed {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        run_quiet(command("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn ensure_debian_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &package in DEBIAN_PACKAGES {
        // dpkg-query exits 1 for a package it has never heard of; the status line is then empty.
        let out = output(command("dpkg-query").args(["-W", "-f=${Status}", package]))?;
        if String::from_utf8_lossy(&out.stdout).trim() != "install ok installed" {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    for package in &missing {
        eprintln!("xtask: installing {package} (apt-get)");
    }
    run_quiet(command("apt-get").args(["update", "-q"]))?;
    run_quiet(
        command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )?;
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (cargo install, about a minute)");
    run_quiet(command("cargo").args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
    ]))?;
    match bpf_linker_version() {
        Some(version) if version == BPF_LINKER_VERSION => Ok(()),
        found => bail!(
            "after `cargo install bpf-linker --version {BPF_LINKER_VERSION}`, `bpf-linker --version` \
             reports {found:?}: is another bpf-linker earlier on PATH?"
        ),
    }
}

/// The version `bpf-linker --version` reports ("bpf-linker 0.10.1"), or `None` if it does
/// not run.
fn bpf_linker_version() -> Option<String> {
    let out = output(command("bpf-linker").arg("--version")).ok()?;
    if !out.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.split_whitespace().nth(1).map(str::to_owned)
}
