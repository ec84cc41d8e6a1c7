//! The in-process sampler's injection (issue 13) will live here: mapping the sampler into a
//! live target and redirecting the allocator's entries to it. For now, the pure planning of
//! an entry redirect.
pub mod entry;
