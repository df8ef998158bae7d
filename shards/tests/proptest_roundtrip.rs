//! Property test: any document of any segment kind round-trips writer → reader, raw and zstd,
//! at every id width, through a single shard and through a rolled corpus.

use half::f16;
use motley_shards::{
    Compression, Corpus, CorpusWriter, Document, Modality, Segment, SegmentData, SegmentMeta, ShardReader, ShardWriter,
    Vocab, WriterProperties,
};
use proptest::prelude::*;

fn vocab_strategy() -> impl Strategy<Value = Vocab> {
    // Sizes straddle the u8 / u16 / u32 width boundaries.
    let size = prop_oneof![Just(1u32), Just(256), Just(257), Just(65_536), Just(65_537), Just(1 << 20)];
    (size.clone(), size.clone(), size, prop::option::of(1u32..9)).prop_map(|(t, i, s, d)| Vocab::build(t, i, s, d))
}

fn segment_strategy(v: &Vocab) -> BoxedStrategy<Segment> {
    let mut options: Vec<BoxedStrategy<Segment>> = Vec::new();
    for m in Modality::ALL {
        let Some(mv) = v.modality(m) else { continue };
        let n = mv.vocab_size;
        options.push(prop::collection::vec(0..n, 0..40).prop_map(move |ids| Segment::tokens(m, ids)).boxed());
        if let Some(dim) = mv.latent_dim {
            options.push(
                prop::collection::vec(any::<u16>().prop_map(f16::from_bits), 0..6)
                    .prop_map(move |rows| {
                        let data: Vec<f16> = rows.iter().flat_map(|&x| std::iter::repeat_n(x, dim as usize)).collect();
                        Segment::latent(m, dim, data)
                    })
                    .boxed(),
            );
        }
    }
    let meta = (
        prop::option::of((any::<u16>(), any::<u16>())),
        prop::option::of(0.0f32..1000.0),
        prop::option::of("\\PC{0,12}"),
    )
        .prop_map(|(grid, frame_rate, source)| SegmentMeta { grid, frame_rate, source });
    (prop::sample::select((0..options.len()).collect::<Vec<_>>()), meta)
        .prop_flat_map(move |(i, meta)| options[i].clone().prop_map(move |s| s.with_meta(meta.clone())))
        .boxed()
}

fn case() -> impl Strategy<Value = (Vocab, Vec<Document>, bool, usize)> {
    vocab_strategy().prop_flat_map(|v| {
        let docs =
            prop::collection::vec(prop::collection::vec(segment_strategy(&v), 0..5).prop_map(Document::new), 1..12);
        (Just(v), docs, any::<bool>(), 1usize..600)
    })
}

fn nan_safe_eq(a: &Document, b: &Document) -> bool {
    // f16 NaN payloads must survive bit-exactly; compare latents by bits.
    a.segments.len() == b.segments.len()
        && a.segments.iter().zip(&b.segments).all(|(x, y)| {
            x.modality == y.modality
                && x.meta == y.meta
                && match (&x.data, &y.data) {
                    (SegmentData::Tokens(p), SegmentData::Tokens(q)) => p == q,
                    (SegmentData::Latent { dim: d1, data: p }, SegmentData::Latent { dim: d2, data: q }) => {
                        d1 == d2 && p.iter().map(|h| h.to_bits()).eq(q.iter().map(|h| h.to_bits()))
                    }
                    _ => false,
                }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn roundtrip((vocab, docs, zstd, chunk) in case()) {
        let compression = if zstd { Compression::Zstd } else { Compression::Raw };
        let props = WriterProperties::builder().compression(compression).chunk_size(chunk).max_shard_bytes(2048).build();
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;

        // One shard.
        let path = dir.path().join("one.mshard");
        let mut w = ShardWriter::create(&path, &vocab, props.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for d in &docs {
            w.add_document(d).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let stats = w.finish().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(stats.num_docs, docs.len() as u64);
        let r = ShardReader::open(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (i, d) in docs.iter().enumerate() {
            let got = r.get(i as u64).map_err(|e| TestCaseError::fail(e.to_string()))?.to_owned();
            prop_assert!(nan_safe_eq(&got, d), "doc {}: {:?} != {:?}", i, got, d);
        }

        // A rolled corpus.
        let cdir = dir.path().join("corpus");
        let mut cw = CorpusWriter::create(&cdir, &vocab, props, "p").map_err(|e| TestCaseError::fail(e.to_string()))?;
        for d in &docs {
            cw.add_document(d).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        cw.finish_with_manifest().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let c = Corpus::open(&cdir).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(c.num_docs(), docs.len() as u64);
        for (i, d) in docs.iter().enumerate() {
            let got = c.get(i as u64).map_err(|e| TestCaseError::fail(e.to_string()))?.to_owned();
            prop_assert!(nan_safe_eq(&got, d));
        }
        let report = c.verify();
        prop_assert!(report.is_ok(), "{:?}", report.problems);
    }
}

#[test]
fn writer_rejects_ids_outside_the_vocabulary() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let v = Vocab::build(100, 10, 10, Some(4));
    let mut w = ShardWriter::create(dir.path().join("x.mshard"), &v, WriterProperties::default())?;
    let bad = Document::new(vec![Segment::tokens(Modality::Text, vec![1, 2, 100])]);
    let err = w.add_document(&bad).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("id 100 at position 2"), "{err}");
    let bad_dim = Document::new(vec![Segment::latent(Modality::Image, 3, vec![f16::ZERO; 6])]);
    assert!(w.add_document(&bad_dim).is_err());
    let no_latent = Document::new(vec![Segment::latent(Modality::Speech, 4, vec![f16::ZERO; 4])]);
    assert!(w.add_document(&no_latent).is_err());
    assert_eq!(w.num_docs(), 0);
    Ok(())
}
