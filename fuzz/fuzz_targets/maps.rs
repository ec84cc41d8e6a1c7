//! Fuzz target `maps`: see `tracer::fuzzing::maps`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer::fuzzing::maps(data));
