//! The fuzz targets' body (fuzz/fuzz_targets/common.rs; the targets themselves need cargo-fuzz
//! and are not built by the workspace) replayed by `cargo test` on the stable toolchain, with
//! the overflow checks of a test build: over the committed seeds, the hostile corpora and, when
//! a local fuzzing run left one, fuzz/corpus/. Each input runs as is (`shard_bytes`) and with
//! its checksums recomputed (`shard_fixed`).

#[path = "../../fuzz/fuzz_targets/common.rs"]
mod fuzz_common;

use std::path::{Path, PathBuf};

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files_under(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

#[test]
fn fuzz_targets_replay_seeds_and_hostile_shards() -> anyhow::Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut inputs = Vec::new();
    files_under(&here.join("../fuzz/seeds"), &mut inputs)?;
    let seeds = inputs.len();
    files_under(&here.join("tests/hostile"), &mut inputs)?;
    inputs.retain(|p| p.extension().is_none_or(|e| e != "rs"));
    let hostile = inputs.iter().filter(|p| p.extension().is_some_and(|e| e == "mshard")).count() - seeds;
    assert!(seeds >= 2 && hostile >= 10, "{seeds} seeds, {hostile} hostile shards");
    files_under(&here.join("../fuzz/corpus"), &mut inputs)?;
    for p in &inputs {
        let bytes = std::fs::read(p)?;
        fuzz_common::exercise(&bytes);
        let mut fixed = bytes;
        motley_shards::format::fixup_checksums(&mut fixed);
        fuzz_common::exercise(&fixed);
    }
    Ok(())
}
