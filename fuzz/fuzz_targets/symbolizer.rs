//! Fuzz target `symbolizer`: see `tracer::fuzzing::symbolizer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer::fuzzing::symbolizer(data));
