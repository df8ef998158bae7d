//! Fuzz target: arbitrary bytes as a shard (checksums mostly reject them early).
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::exercise(data));
