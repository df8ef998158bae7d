//! Writer → reader round trips over every segment kind, raw and zstd, across shard rolls.

mod common;

use motley_shards::{Compression, Corpus, Ids, SegmentView};

#[test]
fn corpus_roundtrip_raw_and_zstd() -> anyhow::Result<()> {
    for compression in [Compression::Raw, Compression::Zstd] {
        let dir = tempfile::tempdir()?;
        let m = common::write_corpus(dir.path(), 200, compression, 8 << 10)?;
        assert!(m.shards.len() > 1, "expected several shards, got {}", m.shards.len());
        assert!(m.shards.iter().all(|s| s.name.starts_with("part-") && s.name.ends_with(".mshard")));
        let c = Corpus::open(dir.path())?;
        assert_eq!(c.num_docs(), 200);
        assert_eq!(c.vocab(), &common::vocab());
        for i in 0..200 {
            assert_eq!(c.get(i)?.to_owned(), common::doc(i), "doc {i} ({compression:?})");
        }
        let seq: Vec<u64> = c.iter().map(|r| r.map(|(id, _)| id)).collect::<Result<_, _>>()?;
        assert_eq!(seq, (0..200).collect::<Vec<_>>());
        let mut shuffled: Vec<u64> = c.iter_shuffled(7, 0).map(|r| r.map(|(id, _)| id)).collect::<Result<_, _>>()?;
        assert_ne!(shuffled, seq);
        shuffled.sort_unstable();
        assert_eq!(shuffled, seq);
        let report = c.verify();
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(report.docs, 200);
    }
    Ok(())
}

#[test]
fn ids_use_narrowest_width_zero_copy() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    common::write_corpus(dir.path(), 8, Compression::Raw, 1 << 20)?;
    let c = Corpus::open(dir.path())?;
    let d0 = c.get(0)?; // text + image codes
    let segs: Vec<_> = d0.segments().collect();
    assert!(matches!(segs[0].ids(), Some(Ids::U16(_))));
    assert!(matches!(segs[1].ids(), Some(Ids::U8(_))));
    assert_eq!(segs[1].grid(), Some((4, 4)));
    assert_eq!(segs[1].source(), Some("img/0.png"));
    let d1 = c.get(1)?; // speech, 70k vocab
    assert!(matches!(d1.segment(1).and_then(|s| s.ids()), Some(Ids::U32(_))));
    let d2 = c.get(2)?;
    assert!(matches!(d2.segment(1).map(|s| s.data()), Some(SegmentView::Latent { dim: 4, .. })));
    // Zero-copy: the borrowed ids point into the shard's mapping.
    let shard = c.shard(0)?;
    let range = shard.bytes().as_ptr_range();
    if let Some(Ids::U16(s)) = segs[0].ids() {
        assert!(range.contains(&(s.as_ptr() as *const u8)));
    }
    Ok(())
}
