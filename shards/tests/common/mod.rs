//! Shared helpers for the integration tests: a small vocabulary and synthetic corpora.
#![allow(dead_code)]

use std::path::Path;

use half::f16;
use motley_shards::{
    Compression, CorpusWriter, Document, Manifest, Modality, Segment, SegmentMeta, Vocab, WriterProperties,
};

pub const LATENT_DIM: u32 = 4;

/// Text 1000 (u16), image 256 codes (u8) with 4-d latents, speech 70000 units (u32).
pub fn vocab() -> Vocab {
    Vocab::build(1000, 256, 70_000, Some(LATENT_DIM))
}

/// A deterministic document mixing every segment kind, shaped by `i`.
pub fn doc(i: u64) -> Document {
    let mut segs = Vec::new();
    let n = 3 + (i * 7 % 23) as usize;
    segs.push(Segment::tokens(Modality::Text, (0..n as u32).map(|k| (k * 31 + i as u32) % 1000).collect()));
    match i % 4 {
        0 => segs.push(
            Segment::tokens(Modality::Image, (0..16u32).map(|k| (k + i as u32) % 256).collect())
                .with_meta(SegmentMeta { grid: Some((4, 4)), frame_rate: None, source: Some(format!("img/{i}.png")) }),
        ),
        1 => segs.push(
            Segment::tokens(
                Modality::Speech,
                (0..(5 + i as u32 % 9)).map(|k| (k * 4099 + i as u32) % 70_000).collect(),
            )
            .with_meta(SegmentMeta { grid: None, frame_rate: Some(50.0), source: None }),
        ),
        2 => {
            let patches = 2 + (i % 3) as usize;
            let data = (0..patches * LATENT_DIM as usize).map(|k| f16::from_f32(k as f32 * 0.5 + i as f32)).collect();
            segs.push(Segment::latent(Modality::Image, LATENT_DIM, data).with_meta(SegmentMeta {
                grid: Some((1, patches as u16)),
                frame_rate: None,
                source: None,
            }));
        }
        _ => {}
    }
    if i.is_multiple_of(3) {
        segs.push(Segment::tokens(Modality::Text, vec![(i % 1000) as u32, 7, 9]));
    }
    Document::new(segs)
}

/// Writes `n` documents `doc(0..n)` into `dir` with a manifest; returns it.
pub fn write_corpus(dir: &Path, n: u64, compression: Compression, max_shard_bytes: u64) -> anyhow::Result<Manifest> {
    let props =
        WriterProperties::builder().compression(compression).chunk_size(512).max_shard_bytes(max_shard_bytes).build();
    let mut w = CorpusWriter::create(dir, &vocab(), props, "part")?;
    for i in 0..n {
        w.add_document(&doc(i))?;
    }
    Ok(w.finish_with_manifest()?)
}
