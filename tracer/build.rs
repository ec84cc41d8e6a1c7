//! Compiles the BPF programs (tracer-ebpf, for bpfel-unknown-none with nightly and
//! bpf-linker) and the in-process sampler (tracer-sampler, a position-independent shared
//! object) so that the tracer binary can embed them. `cargo xtask prereqs` installs what the
//! BPF build needs.
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

#[path = "src/inject/image.rs"]
mod image;

fn main() -> anyhow::Result<()> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The BPF programs and the sampler are built from tracer-common's types too; aya-build
    // watches only the BPF crate, and a layout change must not leave a stale object behind.
    let common_dir = manifest_dir.join("../tracer-common").canonicalize()?;
    println!("cargo:rerun-if-changed={}", common_dir.display());

    build_sampler(manifest_dir)?;

    let ebpf_dir = manifest_dir.join("../tracer-ebpf").canonicalize()?;
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Builds tracer-sampler as a shared object with no start files, no imports and no
/// relocations, checks it, and leaves it at `$OUT_DIR/tracer_sampler.so`
/// (tracer/src/inject/sampler.rs embeds it).
///
/// A nested `cargo rustc` in the same workspace, with its own target directory (the outer
/// cargo holds the lock on the workspace's), on the stable toolchain and the host target. The
/// crate is a plain library in its manifest, so the workspace checks and tests it like any
/// other; only here does it become a cdylib, with:
/// - `panic=abort` (no unwinding runtime; the image check proves no panic path is left),
/// - `relocation-model=pic`, and `-Bsymbolic` with fat LTO so that every reference to its own
///   symbols is resolved at link time (no GOT entries, no dynamic relocations at all),
/// - `-nostdlib`: no crt files (they bring init arrays and weak imports),
/// - frame pointers and unwind tables: the tracer's stack walker passes through the hooks.
fn build_sampler(manifest_dir: &Path) -> anyhow::Result<()> {
    let sampler_dir = manifest_dir.join("../tracer-sampler").canonicalize()?;
    println!("cargo:rerun-if-changed={}", sampler_dir.display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target_dir = out_dir.join("sampler-target");
    const TARGET: &str = "x86_64-unknown-linux-gnu";

    let mut cmd = match which_rustup() {
        Some(rustup) => {
            let mut cmd = Command::new(rustup);
            cmd.args(["run", "stable", "cargo"]);
            cmd
        }
        None => Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())),
    };
    cmd.current_dir(&sampler_dir)
        .args([
            "rustc",
            "--package",
            "tracer-sampler",
            "--lib",
            "--release",
            "--target",
            TARGET,
        ])
        .args(["--crate-type", "cdylib", "--target-dir"])
        .arg(&target_dir);
    let flags = [
        "--cfg=tracer_sampler_so",
        "-Cpanic=abort",
        "-Crelocation-model=pic",
        "-Cforce-frame-pointers=yes",
        "-Cforce-unwind-tables=yes",
        "-Copt-level=3",
        "-Cdebuginfo=0",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-Wl,-Bsymbolic",
        "-Clink-arg=-Wl,--build-id=sha1",
    ];
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env("CARGO_PROFILE_RELEASE_LTO", "fat")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0");
    // The outer build's compiler and wrappers (clippy-driver under `cargo clippy`) are not this
    // build's; nor are its flags.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(key);
    }
    let output = cmd
        .output()
        .with_context(|| format!("could not start the sampler's build: {cmd:?}"))?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building tracer-sampler failed ({}): {cmd:?}",
            output.status
        );
    }
    let built = target_dir.join(TARGET).join("release/libtracer_sampler.so");
    let bytes = std::fs::read(&built).with_context(|| format!("read {}", built.display()))?;
    let image = image::SamplerImage::parse(&bytes)
        .with_context(|| format!("{} cannot be injected", built.display()))?;
    if !image.relative.is_empty() {
        println!(
            "cargo:warning=tracer-sampler has {} relative relocations: loaders must apply them",
            image.relative.len()
        );
    }
    std::fs::write(out_dir.join("tracer_sampler.so"), &bytes)?;
    Ok(())
}

fn which_rustup() -> Option<OsString> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join("rustup"))
        .find(|p| p.is_file())
        .map(PathBuf::into_os_string)
}
