//! Code the tracer puts into a traced process: the in-process sampler (`sampler`), and what
//! finds and checks its pieces in the built object (`image`).
pub mod image;
pub mod sampler;
