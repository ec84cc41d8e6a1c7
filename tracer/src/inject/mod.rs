//! Code the tracer puts into a traced process (issue 13): the in-process sampler (`sampler`),
//! what finds and checks its pieces in the built object (`image`), the pure planning of an
//! allocator entry's redirect to it (`entry`), its injection into a live process
//! (`inject`), and the tracer's end of the ring it hands sampled events to when no probe
//! can take them (`ring`, the ptrace fallback).
pub mod entry;
pub mod image;
#[expect(
    clippy::module_inception,
    reason = "the brief names the module inject::inject: the injection, next to its parts"
)]
pub mod inject;
pub mod ring;
pub mod sampler;
pub mod stub;
