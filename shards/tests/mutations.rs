//! Deterministic mutation testing of the parser (a fast, always-on cousin of the cargo-fuzz
//! targets in fuzz/): mangled shards, with and without recomputed checksums, never panic.

mod common;

use motley_shards::{Compression, SegmentView, ShardReader, ShardWriter, WriterProperties, format::fixup_checksums};
use rand::{Rng, SeedableRng};

fn exercise(bytes: &[u8]) -> bool {
    let Ok(r) = ShardReader::from_bytes("mutant.mshard", bytes) else { return false };
    let _ = r.vocab();
    let mut ok = true;
    for d in 0..r.num_docs().min(64) {
        match r.get(d) {
            Ok(doc) => {
                for s in doc.segments() {
                    match s.data() {
                        SegmentView::Tokens(ids) => assert_eq!(ids.len(), s.len()),
                        SegmentView::Latent { dim, data } => assert_eq!(data.len(), s.len() * dim as usize),
                    }
                    let _ = s.meta();
                }
                let _ = doc.to_owned();
            }
            Err(_) => ok = false,
        }
    }
    ok
}

#[test]
fn mangled_shards_never_panic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for compression in [Compression::Raw, Compression::Zstd] {
        let path = dir.path().join("s.mshard");
        let props = WriterProperties::builder().compression(compression).chunk_size(200).build();
        let mut w = ShardWriter::create(&path, &common::vocab(), props)?;
        for i in 0..12 {
            w.add_document(&common::doc(i))?;
        }
        w.finish()?;
        let good = std::fs::read(&path)?;
        assert!(exercise(&good));
        let mut parsed_after_fixup = 0;
        for _ in 0..1500 {
            let mut b = good.clone();
            match rng.random_range(0..4) {
                0 => {
                    for _ in 0..rng.random_range(1..5) {
                        let i = rng.random_range(0..b.len());
                        b[i] ^= 1 << rng.random_range(0..8);
                    }
                }
                1 => {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
                2 => b.truncate(rng.random_range(0..b.len())),
                _ => {
                    let i = rng.random_range(0..b.len());
                    let v: u32 = rng.random_range(0..u32::MAX);
                    let end = (i + 4).min(b.len());
                    b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
                }
            }
            // Without fixing checksums almost everything must be rejected...
            exercise(&b);
            // ... with them fixed the structural checks behind them get exercised.
            fixup_checksums(&mut b);
            if ShardReader::from_bytes("m", &b).is_ok() {
                parsed_after_fixup += 1;
            }
            exercise(&b);
        }
        assert!(parsed_after_fixup > 100, "fixup lets mutants reach the structural parser ({parsed_after_fixup})");
    }
    Ok(())
}
