//! Writes the tiny seed shards committed under fuzz/seeds/ (raw and zstd, every segment kind).
//! Usage: cargo run -p motley-shards --example make_fuzz_seeds -- fuzz/seeds

use half::f16;
use motley_shards::{Compression, Document, Modality, Segment, SegmentMeta, ShardWriter, Vocab, WriterProperties};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into());
    std::fs::create_dir_all(&out)?;
    let vocab = Vocab::build(300, 16, 70_000, Some(2));
    let docs = vec![
        Document::new(vec![Segment::tokens(Modality::Text, vec![1, 299, 7])]),
        Document::new(vec![
            Segment::tokens(Modality::Image, vec![0, 15, 3, 4]).with_meta(SegmentMeta {
                grid: Some((2, 2)),
                frame_rate: None,
                source: Some("a.png".into()),
            }),
            Segment::tokens(Modality::Speech, vec![69_999, 5]).with_meta(SegmentMeta {
                grid: None,
                frame_rate: Some(50.0),
                source: None,
            }),
        ]),
        Document::new(vec![Segment::latent(Modality::Image, 2, vec![f16::ONE, f16::ZERO, f16::NEG_ONE, f16::MAX])]),
        Document::default(),
    ];
    for (name, c) in [("raw.mshard", Compression::Raw), ("zstd.mshard", Compression::Zstd)] {
        let props = WriterProperties::builder().compression(c).chunk_size(64).build();
        let mut w = ShardWriter::create(format!("{out}/{name}"), &vocab, props)?;
        for d in &docs {
            w.add_document(d)?;
        }
        w.finish()?;
    }
    Ok(())
}
