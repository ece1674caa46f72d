//! Fuzz target `pixel_decode`: the body is `fc_fuzzing`'s (replayed by `node/fuzzing/tests/replay.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fc_fuzzing::run("pixel_decode", data);
});
