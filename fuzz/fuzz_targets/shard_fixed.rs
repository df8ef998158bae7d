//! Fuzz target: mutated shards with every checksum recomputed, so the structural parser
//! (footer regions, chunk table, index entries, record descriptors) sees the mutations.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut v = data.to_vec();
    motley_shards::format::fixup_checksums(&mut v);
    common::exercise(&v);
});
