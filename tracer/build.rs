//! Compiles the BPF programs (tracer-ebpf, for bpfel-unknown-none with nightly and
//! bpf-linker) so that the tracer binary can embed them. `cargo xtask prereqs` installs
//! what this needs.
fn main() -> anyhow::Result<()> {
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tracer-ebpf")
        .canonicalize()?;
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    // The BPF programs are built from tracer-common's types too; aya-build watches only the
    // BPF crate, and a layout change must not leave a stale object behind.
    let common_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tracer-common")
        .canonicalize()?;
    println!("cargo:rerun-if-changed={}", common_dir.display());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
