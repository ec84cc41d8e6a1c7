//! Code the tracer puts into a traced process (issue 13, not yet injected): the in-process
//! sampler (`sampler`), what finds and checks its pieces in the built object (`image`), and the
//! pure planning of an allocator entry's redirect to it (`entry`).
pub mod entry;
pub mod image;
pub mod sampler;
