//! Fuzz target `perfmap`: see `tracer::fuzzing::perfmap`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer::fuzzing::perfmap(data));
