//! Fuzz target `schema_text`: the body is `node::fuzzing`'s (replayed by `node/tests/fuzz.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    node::fuzzing::run("schema_text", data);
});
