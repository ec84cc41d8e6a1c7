//! Fuzz target `report`: see `tracer::fuzzing::report`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer::fuzzing::report(data));
