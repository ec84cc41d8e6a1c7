//! Fuzz target `smaps`: see `tracer::fuzzing::smaps`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer::fuzzing::smaps(data));
