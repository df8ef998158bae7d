//! Loader contract: packed content equals the flattened documents, determinism, exact resume,
//! elastic resume (W=2 → W=3) covering the epoch exactly once, edited states refused (never a
//! panic), mixing proportions, eval split.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use motley_shards::{
    Batch, Compression, Corpus, DocSpan, Loader, LoaderConfig, LoaderState, Modality, Source, Split, Vocab,
};

/// Reference flattening: global ids, per-position latent flag, and keep-whole units.
struct Flat {
    ids: Vec<u32>,
    latent: Vec<bool>,
    units: Vec<(usize, usize)>,
}

fn flatten(c: &Corpus, doc: u64) -> anyhow::Result<Flat> {
    let v: &Vocab = c.vocab();
    let sp = |n: &str| v.special(n).unwrap_or(u32::MAX);
    let d = c.get(doc)?.to_owned();
    let mut f = Flat { ids: vec![sp("bos")], latent: vec![false], units: Vec::new() };
    for s in &d.segments {
        let off = v.modality(s.modality).map_or(0, |m| m.offset);
        let marks = match s.modality {
            Modality::Text => None,
            Modality::Image => Some((sp("boi"), sp("eoi"))),
            Modality::Speech => Some((sp("bosp"), sp("eosp"))),
        };
        let start = f.ids.len();
        if let Some((o, _)) = marks {
            f.ids.push(o);
            f.latent.push(false);
        }
        match &s.data {
            motley_shards::SegmentData::Tokens(t) => {
                f.ids.extend(t.iter().map(|&x| x + off));
                f.latent.extend(t.iter().map(|_| false));
            }
            motley_shards::SegmentData::Latent { .. } => {
                let n = s.data.len();
                f.ids.extend(std::iter::repeat_n(off, n));
                f.latent.extend(std::iter::repeat_n(true, n));
            }
        }
        if let Some((_, e)) = marks {
            f.ids.push(e);
            f.latent.push(false);
            f.units.push((start, f.ids.len() - start));
        }
    }
    f.ids.push(sp("eos"));
    f.latent.push(false);
    Ok(f)
}

/// Checks every span of a batch against the reference flattening.
fn check_batch(corpora: &[Arc<Corpus>], b: &Batch, split_segments: bool) -> anyhow::Result<()> {
    let t = b.seq_len;
    for s in &b.spans {
        let c = &corpora[s.source as usize];
        let f = flatten(c, s.doc)?;
        let (start, end) = (s.start as usize, s.end as usize);
        assert!(end <= f.ids.len() && start < end, "span {s:?} of a {}-token doc", f.ids.len());
        for j in 0..end - start {
            let q = s.at as usize + j;
            let want = f.ids[start + j];
            if q < t {
                assert_eq!(b.inputs[s.row as usize * t + q], want, "input {s:?} +{j}");
                assert_eq!(b.positions[s.row as usize * t + q] as usize, j);
            }
            if q >= 1 {
                assert_eq!(b.targets[s.row as usize * t + q - 1], want, "target {s:?} +{j}");
                let lm = b.loss_mask[s.row as usize * t + q - 1];
                if j >= 1 {
                    assert_eq!(lm, u8::from(!f.latent[start + j]), "loss mask {s:?} +{j}");
                } else {
                    assert_eq!(lm, 0, "no loss across documents {s:?}");
                }
            }
        }
        if !split_segments && end < f.ids.len() {
            for &(u, len) in &f.units {
                if len <= t && u < end && end < u + len && !(s.at == 0 && u <= start + 1) {
                    panic!("unit {u}+{len} cut at {end} in {s:?}");
                }
            }
        }
    }
    for (i, &p) in b.latents.positions.iter().enumerate() {
        assert_eq!(b.modality[p as usize], Modality::Image as u8);
        assert_eq!(b.latents.data.len(), b.latents.positions.len() * b.latents.dim);
        let _ = i;
    }
    Ok(())
}

/// Walks spans in global row order; returns the documents completed, checking that each
/// document's pieces chain (0..c1, c1-1..c2, ..., ..len) with nothing in between.
fn completed_docs(corpora: &[Arc<Corpus>], rows: &BTreeMap<u64, Vec<DocSpan>>) -> anyhow::Result<Vec<(u32, u64)>> {
    let mut done = Vec::new();
    let mut open: BTreeMap<u32, (u64, u32)> = BTreeMap::new(); // per source: doc, next start
    for spans in rows.values() {
        for s in spans {
            let len = flatten(&corpora[s.source as usize], s.doc)?.ids.len() as u32;
            match open.remove(&s.source) {
                Some((d, next)) => {
                    assert_eq!((d, next), (s.doc, s.start), "continuation expected, got {s:?}");
                }
                None => assert_eq!(s.start, 0, "document must start at 0: {s:?}"),
            }
            if s.end == len {
                done.push((s.source, s.doc));
            } else {
                open.insert(s.source, (s.doc, s.end - 1));
            }
        }
    }
    Ok(done)
}

fn spans_by_row(batches: &[Batch]) -> BTreeMap<u64, Vec<DocSpan>> {
    let mut m = BTreeMap::new();
    for b in batches {
        for (slot, &r) in b.row_ids.iter().enumerate() {
            let v: Vec<DocSpan> =
                b.spans.iter().filter(|s| s.row as usize == slot).map(|s| DocSpan { row: 0, ..*s }).collect();
            assert!(m.insert(r, v).is_none(), "row {r} delivered twice");
        }
    }
    m
}

fn corpus(n: u64, compression: Compression) -> anyhow::Result<(tempfile::TempDir, Arc<Corpus>)> {
    let dir = tempfile::tempdir()?;
    common::write_corpus(dir.path(), n, compression, 16 << 10)?;
    let c = Arc::new(Corpus::open(dir.path())?);
    Ok((dir, c))
}

fn cfg() -> LoaderConfig {
    LoaderConfig { seq_len: 32, batch_size: 4, seed: 9, prefetch: 0, ..Default::default() }
}

#[test]
fn packed_content_matches_documents_and_one_epoch_covers_each_doc_once() -> anyhow::Result<()> {
    for (split_segments, compression) in [(false, Compression::Raw), (true, Compression::Zstd)] {
        let (_d, c) = corpus(120, compression)?;
        let mut l = Loader::new(vec![Source::new(c.clone(), 1.0)], LoaderConfig { split_segments, ..cfg() })?;
        let mut batches = Vec::new();
        while l.state().epoch == 0 {
            let b = l.next_batch()?;
            check_batch(std::slice::from_ref(&c), &b, split_segments)?;
            batches.push(b);
        }
        let done = completed_docs(std::slice::from_ref(&c), &spans_by_row(&batches))?;
        let first: Vec<u64> = done.iter().take(120).map(|&(_, d)| d).collect();
        let set: HashSet<u64> = first.iter().copied().collect();
        assert_eq!(set.len(), 120, "each document exactly once in the epoch");
        let pad: f32 = batches.iter().map(|b| b.padding_fraction).sum::<f32>() / batches.len() as f32;
        assert!(pad < 0.5, "padding fraction {pad}");
    }
    Ok(())
}

#[test]
fn deterministic_and_seed_dependent() -> anyhow::Result<()> {
    let (_d, c) = corpus(60, Compression::Raw)?;
    let run = |seed: u64, prefetch: usize| -> anyhow::Result<Vec<Batch>> {
        let mut l = Loader::new(vec![Source::new(c.clone(), 1.0)], LoaderConfig { seed, prefetch, ..cfg() })?;
        (0..6).map(|_| Ok(l.next_batch()?)).collect()
    };
    assert_eq!(run(1, 0)?, run(1, 3)?);
    assert_ne!(run(1, 0)?, run(2, 0)?);
    Ok(())
}

#[test]
fn resume_mid_epoch_equals_uninterrupted_stream() -> anyhow::Result<()> {
    let (_d, c) = corpus(80, Compression::Raw)?;
    let src = || vec![Source::new(c.clone(), 1.0)];
    let cfg = LoaderConfig { prefetch: 3, ..cfg() };
    let mut full = Loader::new(src(), cfg.clone())?;
    let all: Vec<Batch> = (0..12).map(|_| full.next_batch()).collect::<Result<_, _>>()?;
    let mut first = Loader::new(src(), cfg.clone())?;
    for _ in 0..5 {
        first.next_batch()?;
    }
    // The state reflects the 5 returned batches even though more were prefetched.
    let json = serde_json::to_string(&first.state())?;
    drop(first);
    let st: LoaderState = serde_json::from_str(&json)?;
    assert_eq!(st.step, 5);
    let mut resumed = Loader::resume(src(), cfg.clone(), st.clone())?;
    for (i, want) in all.iter().enumerate().skip(5) {
        assert_eq!(&resumed.next_batch()?, want, "batch {i} after resume");
    }
    // A different seed is refused.
    assert!(Loader::resume(src(), LoaderConfig { seed: 1234, ..cfg }, st).is_err());
    Ok(())
}

/// Every leaf path of a JSON value (`/sources/0/epoch`, ...).
fn leaves(v: &serde_json::Value, path: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| leaves(x, format!("{path}/{k}"), out)),
        serde_json::Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| leaves(x, format!("{path}/{i}"), out)),
        _ => out.push(path),
    }
}

#[test]
fn an_edited_state_resumes_or_is_refused_never_a_panic() -> anyhow::Result<()> {
    // A checkpoint's loader_state is a JSON file a person can edit: every leaf set to a
    // boundary value either resumes and streams, or is refused; before the counter check,
    // step / rows / epoch = 2^64-1 overflowed on the next batch.
    let (_d, a) = corpus(60, Compression::Raw)?;
    let (_e, b) = corpus(25, Compression::Zstd)?;
    let src = || vec![Source::new(a.clone(), 0.7), Source::new(b.clone(), 0.3)];
    let cfg = LoaderConfig { world_size: 2, rank: 1, eval_fraction: 0.1, ..cfg() };
    let mut l = Loader::new(src(), cfg.clone())?;
    for _ in 0..7 {
        l.next_batch()?;
    }
    let good = serde_json::to_value(l.state())?;
    let mut paths = Vec::new();
    leaves(&good, String::new(), &mut paths);
    assert!(paths.len() > 15, "{paths:?}");
    let values: [serde_json::Value; 5] =
        [0.into(), 1.into(), (1u64 << 53).into(), ((1u64 << 53) + 1).into(), u64::MAX.into()];
    let mut refused = 0;
    for path in &paths {
        for v in &values {
            let mut st = good.clone();
            if let Some(leaf) = st.pointer_mut(path) {
                *leaf = v.clone();
            }
            let Ok(st) = serde_json::from_value::<LoaderState>(st) else { continue };
            let run = || -> motley_shards::Result<()> {
                let mut l = Loader::resume(src(), cfg.clone(), st.clone())?;
                for _ in 0..40 {
                    l.next_batch()?;
                }
                Ok(())
            };
            refused += run().is_err() as usize;
        }
    }
    assert!(refused > 0);
    let mut st: LoaderState = serde_json::from_value(good)?;
    st.step = u64::MAX;
    let e = Loader::resume(src(), cfg, st).expect_err("step 2^64-1 resumed");
    assert!(e.to_string().contains("step"), "{e}");
    Ok(())
}

#[test]
fn elastic_resume_two_to_three_ranks_covers_epoch_exactly_once() -> anyhow::Result<()> {
    let (_d, c) = corpus(150, Compression::Raw)?;
    let src = || vec![Source::new(c.clone(), 1.0)];
    let at = |rank, world_size| LoaderConfig { rank, world_size, batch_size: 2, ..cfg() };
    // Reference: one rank, batch 1, the same global row stream.
    let mut reference = Loader::new(src(), LoaderConfig { batch_size: 1, ..at(0, 1) })?;
    let mut ref_batches = Vec::new();
    while reference.state().epoch == 0 {
        ref_batches.push(reference.next_batch()?);
    }
    let ref_rows = spans_by_row(&ref_batches);

    let mut got = Vec::new();
    let mut w2: Vec<Loader> = (0..2).map(|r| Loader::new(src(), at(r, 2))).collect::<Result<_, _>>()?;
    for _ in 0..5 {
        for l in &mut w2 {
            got.push(l.next_batch()?);
        }
    }
    let st = w2[0].state();
    assert_eq!(st, w2[1].state(), "all ranks share one state");
    assert_eq!(st.rows, 5 * 2 * 2);
    assert_eq!(st.epoch, 0, "still mid-epoch");
    let mut w3: Vec<Loader> = (0..3).map(|r| Loader::resume(src(), at(r, 3), st.clone())).collect::<Result<_, _>>()?;
    while w3[0].state().epoch == 0 {
        for l in &mut w3 {
            got.push(l.next_batch()?);
        }
    }
    let rows = spans_by_row(&got);
    let n = rows.len() as u64;
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), (0..n).collect::<Vec<_>>(), "rows 0..{n} exactly once");
    for (r, spans) in &rows {
        if let Some(want) = ref_rows.get(r) {
            assert_eq!(spans, want, "row {r} differs from the single-rank stream");
        }
    }
    let done = completed_docs(std::slice::from_ref(&c), &rows)?;
    let set: HashSet<u64> = done.iter().take(150).map(|&(_, d)| d).collect();
    assert_eq!(set.len(), 150);
    Ok(())
}

#[test]
fn mixing_follows_weights() -> anyhow::Result<()> {
    let (_a, ca) = corpus(40, Compression::Raw)?;
    let (_b, cb) = corpus(90, Compression::Zstd)?;
    let sources = vec![Source::new(ca.clone(), 0.7), Source::new(cb.clone(), 0.3)];
    let mut l = Loader::new(sources, LoaderConfig { batch_size: 5, ..cfg() })?;
    let mut counts = [0u64; 2];
    for _ in 0..40 {
        let b = l.next_batch()?;
        check_batch(&[ca.clone(), cb.clone()], &b, false)?;
        for slot in 0..5u32 {
            if let Some(s) = b.spans.iter().find(|s| s.row == slot) {
                counts[s.source as usize] += 1;
            }
        }
    }
    let st = l.state();
    assert_eq!(st.rows, 200);
    assert!((st.sources[0].rows as f64 - 140.0).abs() <= 1.0, "{:?}", st.sources);
    assert!((counts[0] as f64 / 200.0 - 0.7).abs() < 0.02, "{counts:?}");
    assert!(st.sources[0].epoch >= 1, "small source cycles on its own");
    Ok(())
}

#[test]
fn eval_split_is_disjoint_and_stable() -> anyhow::Result<()> {
    let (_d, c) = corpus(200, Compression::Raw)?;
    let docs_of = |split| -> anyhow::Result<HashSet<u64>> {
        let mut l =
            Loader::new(vec![Source::new(c.clone(), 1.0)], LoaderConfig { split, eval_fraction: 0.2, ..cfg() })?;
        let mut s = HashSet::new();
        while l.state().epoch == 0 {
            s.extend(l.next_batch()?.spans.iter().map(|x| x.doc));
        }
        Ok(s)
    };
    let train = docs_of(Split::Train)?;
    let eval = docs_of(Split::Eval)?;
    assert!(train.is_disjoint(&eval));
    assert_eq!(train.len() + eval.len(), 200);
    assert!(eval.len() > 15 && eval.len() < 70, "{} eval docs", eval.len());
    for d in &eval {
        assert!(motley_shards::is_eval_doc(*d, 0.2));
    }
    Ok(())
}

#[test]
fn edge_sequence_lengths_and_world_sizes_cover_the_epoch() -> anyhow::Result<()> {
    let (_d, c) = corpus(30, Compression::Raw)?;
    for seq_len in [1usize, 2, 3, 5, 17, 64] {
        for split_segments in [false, true] {
            for world_size in [1usize, 3] {
                let cfg = |rank| LoaderConfig { seq_len, batch_size: 2, rank, world_size, split_segments, ..cfg() };
                let mut ranks: Vec<Loader> = (0..world_size)
                    .map(|r| Loader::new(vec![Source::new(c.clone(), 1.0)], cfg(r)))
                    .collect::<Result<_, _>>()?;
                let mut got = Vec::new();
                while ranks[0].state().epoch == 0 {
                    for l in &mut ranks {
                        let b = l.next_batch()?;
                        check_batch(std::slice::from_ref(&c), &b, split_segments)?;
                        got.push(b);
                    }
                }
                let done = completed_docs(std::slice::from_ref(&c), &spans_by_row(&got))?;
                let set: HashSet<u64> = done.iter().take(30).map(|&(_, d)| d).collect();
                assert_eq!(set.len(), 30, "seq_len {seq_len} split {split_segments} world {world_size}");
            }
        }
    }
    Ok(())
}
