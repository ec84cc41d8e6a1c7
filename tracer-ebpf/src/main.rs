//! BPF programs of the tracer. The allocator probes live in `allocator.rs`, stack capture
//! in `stack.rs`; this file holds the maps they share and the small helpers around them.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on map values: see `allocator::add`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", expect(internal_features, reason = "atomic_xadd is the only atomic add core offers for BPF"))]

#[cfg(target_arch = "bpf")]
mod allocator;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mmap;
#[cfg(target_arch = "bpf")]
mod sampler;
#[cfg(target_arch = "bpf")]
mod stack;
#[cfg(target_arch = "bpf")]
mod v8;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; there is nothing to unwind to.
    loop {}
}

/// Built for the host only so that `cargo check --workspace` works; the real object is the
/// bpfel-unknown-none build made by tracer's build script.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
