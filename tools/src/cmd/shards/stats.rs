//! `motley shards stats`: corpus totals from the manifest alone (instant on any size), and with
//! `--deep` a streaming scan of every document for length histograms and vocabulary usage.
//! The JSON schema (`motley.shards.stats/1`) is documented in docs/CLI.md.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use motley_shards::{Corpus, Manifest, Modality, SegmentView, Vocab};
use rayon::prelude::*;
use serde::Serialize;

use motley_tokenizers::TextTokenizer;

use super::{Found, find_tokenizer, seconds};
use crate::output::{self, Ctx};

/// Version tag of the JSON output; bump on any incompatible change.
pub const SCHEMA: &str = "motley.shards.stats/1";
/// Most frequent ids listed per modality.
const TOP_IDS: usize = 10;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Corpus directory (holds manifest.json).
    dir: PathBuf,
    /// Also scan every document: length histograms and vocabulary usage.
    #[arg(long)]
    deep: bool,
}

#[derive(Debug, Serialize)]
struct Stats {
    schema: &'static str,
    documents: u64,
    shards: usize,
    bytes: Bytes,
    /// Shard count per compression (`raw`, `zstd`).
    compression: BTreeMap<String, u64>,
    modalities: BTreeMap<String, ModalityTotals>,
    vocab_total_size: u32,
    tokenizers: BTreeMap<String, serde_json::Value>,
    /// Present only with `--deep`.
    deep: Option<Deep>,
}

#[derive(Debug, Serialize)]
struct Bytes {
    /// Shard files on disk (compressed when the shards are zstd).
    compressed: u64,
    /// Uncompressed document records.
    raw: u64,
}

#[derive(Debug, Serialize)]
struct ModalityTotals {
    documents: u64,
    segments: u64,
    tokens: u64,
    vocab_size: u32,
    latent_dim: Option<u32>,
}

#[derive(Debug, Serialize)]
struct Deep {
    histograms: BTreeMap<&'static str, HistogramOut>,
    vocabulary: BTreeMap<String, VocabUsage>,
}

#[derive(Debug, Serialize)]
struct VocabUsage {
    vocab_size: u32,
    /// Distinct ids that occur at least once.
    used: u64,
    fraction_used: f64,
    /// Most frequent ids, most frequent first (ties: smaller id first).
    top: Vec<IdCount>,
}

#[derive(Debug, Serialize)]
struct IdCount {
    id: u32,
    count: u64,
    /// The token's string (text, when the corpus's tokenizer is available), else null.
    token: Option<String>,
}

/// A streaming histogram over fixed bin edges; the last bin is open-ended.
#[derive(Debug, Clone)]
struct Histogram {
    edges: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct HistogramOut {
    count: u64,
    min: Option<f64>,
    max: Option<f64>,
    mean: Option<f64>,
    /// Non-empty bins only: `lo <= x < hi` (`hi` null for the last, open bin).
    bins: Vec<Bin>,
}

#[derive(Debug, Serialize)]
struct Bin {
    lo: f64,
    hi: Option<f64>,
    count: u64,
}

/// 0, 1, 2, 4, ... 2^31: lengths in tokens.
const POW2_EDGES: [f64; 33] = {
    let mut e = [0.0; 33];
    let mut i = 1;
    while i < 33 {
        e[i] = (1u64 << (i - 1)) as f64;
        i += 1;
    }
    e
};
const COUNT_EDGES: [f64; 12] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 16.0, 32.0, 64.0];
const SECONDS_EDGES: [f64; 11] = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

impl Histogram {
    fn new(edges: &'static [f64]) -> Self {
        Histogram {
            edges,
            counts: vec![0; edges.len()],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn add(&mut self, x: f64) {
        let bin = self.edges.partition_point(|&e| e <= x).saturating_sub(1);
        self.counts[bin] += 1;
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    fn out(&self) -> HistogramOut {
        let bins = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| Bin { lo: self.edges[i], hi: self.edges.get(i + 1).copied(), count: *c })
            .collect();
        let some = self.count > 0;
        HistogramOut {
            count: self.count,
            min: some.then_some(self.min),
            max: some.then_some(self.max),
            mean: some.then(|| round6(self.sum / self.count as f64)),
            bins,
        }
    }
}

/// Rounded so the JSON does not depend on summation order's last bits.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// The histograms of the deep scan: one per rayon worker at a time, merged as they finish.
#[derive(Debug, Clone)]
struct Acc {
    text_run: Histogram,
    images_per_doc: Histogram,
    speech_seconds: Histogram,
    doc_positions: Histogram,
    segments_per_doc: Histogram,
}

impl Acc {
    fn new() -> Self {
        Acc {
            text_run: Histogram::new(&POW2_EDGES),
            images_per_doc: Histogram::new(&COUNT_EDGES),
            speech_seconds: Histogram::new(&SECONDS_EDGES),
            doc_positions: Histogram::new(&POW2_EDGES),
            segments_per_doc: Histogram::new(&POW2_EDGES),
        }
    }

    fn merge(mut self, o: Acc) -> Acc {
        self.text_run.merge(&o.text_run);
        self.images_per_doc.merge(&o.images_per_doc);
        self.speech_seconds.merge(&o.speech_seconds);
        self.doc_positions.merge(&o.doc_positions);
        self.segments_per_doc.merge(&o.segments_per_doc);
        self
    }
}

/// Occurrences of each local id, per modality: one shared counter per vocabulary id for the
/// whole scan, so memory does not grow with the number of shards or workers.
#[derive(Debug)]
struct IdCounts([Vec<AtomicU64>; 3]);

impl IdCounts {
    fn new(vocab: &Vocab) -> Self {
        let counters = |m| {
            let n = vocab.modality(m).map_or(0, |v| v.vocab_size as usize);
            (0..n).map(|_| AtomicU64::new(0)).collect()
        };
        IdCounts([counters(Modality::Text), counters(Modality::Image), counters(Modality::Speech)])
    }

    fn add(&self, m: Modality, id: u32) {
        if let Some(c) = self.0[m.index()].get(id as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counts(&self, m: Modality) -> impl Iterator<Item = u64> + '_ {
        self.0[m.index()].iter().map(|c| c.load(Ordering::Relaxed))
    }
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let manifest = if crate::remote::is_remote(&args.dir) {
        Corpus::open(&args.dir)?.manifest().clone()
    } else {
        Manifest::read(&args.dir).with_context(|| format!("reading the corpus at {}", args.dir.display()))?
    };
    let mut stats = from_manifest(&manifest);
    if args.deep {
        let corpus = Corpus::open(&args.dir)?;
        let mut deep = deep_scan(&corpus)?;
        if let (Found::Loaded(tok), Some(usage)) = (
            find_tokenizer(corpus.dir(), corpus.manifest(), Modality::Text, |p| TextTokenizer::from_file(p)),
            deep.vocabulary.get_mut(Modality::Text.as_str()),
        ) {
            for t in &mut usage.top {
                t.token = tok.inner().id_to_token(t.id);
            }
        }
        stats.deep = Some(deep);
    }
    if ctx.json {
        return output::json(&stats);
    }
    print_human(&stats)
}

fn from_manifest(m: &Manifest) -> Stats {
    let mut compression = BTreeMap::new();
    for s in &m.shards {
        *compression.entry(s.compression.as_str().to_string()).or_insert(0) += 1;
    }
    let modalities = Modality::ALL
        .iter()
        .map(|&md| {
            let t = m.totals.get(md);
            let v = m.vocab.modality(md);
            let totals = ModalityTotals {
                documents: t.docs,
                segments: t.segments,
                tokens: t.tokens,
                vocab_size: v.map_or(0, |v| v.vocab_size),
                latent_dim: v.and_then(|v| v.latent_dim),
            };
            (md.as_str().to_string(), totals)
        })
        .collect();
    Stats {
        schema: SCHEMA,
        documents: m.num_docs,
        shards: m.shards.len(),
        bytes: Bytes { compressed: m.bytes, raw: m.shards.iter().map(|s| s.payload_bytes).sum() },
        compression,
        modalities,
        vocab_total_size: m.vocab.total_size,
        tokenizers: m.tokenizers.clone(),
        deep: None,
    }
}

/// Scans every document once, shards in parallel; memory is the id counters plus one
/// histogram set per worker, whatever the corpus size.
fn deep_scan(corpus: &Corpus) -> anyhow::Result<Deep> {
    let vocab = corpus.vocab().clone();
    let pb = ProgressBar::new(corpus.num_docs());
    pb.set_style(
        ProgressStyle::with_template("stats --deep {bar:30} {pos}/{len} docs {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let ids = IdCounts::new(&vocab);
    // fold/reduce: each worker keeps one Acc across the shards it scans and merges as it
    // finishes; nothing is kept per shard.
    let total = (0..corpus.num_shards())
        .into_par_iter()
        .try_fold(Acc::new, |acc, i| {
            let r = scan_shard(corpus, i, acc, &ids, &pb);
            // A remote corpus's cache may evict the shard now.
            corpus.release(i);
            r
        })
        .try_reduce(Acc::new, |a, b| Ok(a.merge(b)));
    pb.finish_and_clear();
    let total = total?;
    let mut histograms = BTreeMap::new();
    histograms.insert("text_run_tokens", total.text_run.out());
    histograms.insert("images_per_document", total.images_per_doc.out());
    histograms.insert("speech_seconds", total.speech_seconds.out());
    histograms.insert("document_positions", total.doc_positions.out());
    histograms.insert("segments_per_document", total.segments_per_doc.out());
    let mut vocabulary = BTreeMap::new();
    for m in Modality::ALL {
        let Some(v) = vocab.modality(m) else { continue };
        if v.vocab_size == 0 {
            continue;
        }
        let used = ids.counts(m).filter(|&c| c > 0).count() as u64;
        let top = top_ids(ids.counts(m), TOP_IDS);
        vocabulary.insert(
            m.as_str().to_string(),
            VocabUsage {
                vocab_size: v.vocab_size,
                used,
                fraction_used: round6(used as f64 / v.vocab_size as f64),
                top,
            },
        );
    }
    Ok(Deep { histograms, vocabulary })
}

/// Scans shard `i` into `acc` (histograms) and `ids` (shared counters).
fn scan_shard(corpus: &Corpus, i: usize, mut acc: Acc, ids: &IdCounts, pb: &ProgressBar) -> anyhow::Result<Acc> {
    let shard = corpus.shard(i)?;
    let name = &corpus.manifest().shards[i].name;
    for local in 0..shard.num_docs() {
        let doc =
            shard.get(local).with_context(|| format!("shard {name}, document {local} (run `motley shards verify`)"))?;
        let mut images = 0u64;
        for seg in doc.segments() {
            match seg.modality() {
                Modality::Text => acc.text_run.add(seg.len() as f64),
                Modality::Image => images += 1,
                Modality::Speech => {
                    if let Some(s) = seconds(seg.len(), seg.frame_rate()) {
                        acc.speech_seconds.add(s);
                    }
                }
            }
            if let SegmentView::Tokens(tokens) = seg.data() {
                for j in 0..tokens.len() {
                    if let Some(id) = tokens.get(j) {
                        ids.add(seg.modality(), id);
                    }
                }
            }
        }
        acc.images_per_doc.add(images as f64);
        acc.doc_positions.add(doc.num_positions() as f64);
        acc.segments_per_doc.add(doc.num_segments() as f64);
        if local % 4096 == 4095 {
            pb.inc(4096);
        }
    }
    pb.inc(shard.num_docs() % 4096);
    Ok(acc)
}

/// The `k` most frequent ids (count > 0), most frequent first, ties to the smaller id, in
/// O(k) memory: a vocabulary of millions is never copied.
fn top_ids(counts: impl Iterator<Item = u64>, k: usize) -> Vec<IdCount> {
    // Min-heap on (count, Reverse(id)): its top is the entry the next candidate must beat.
    let mut heap: BinaryHeap<Reverse<(u64, Reverse<u32>)>> = BinaryHeap::with_capacity(k + 1);
    for (id, count) in counts.enumerate() {
        if count == 0 || k == 0 {
            continue;
        }
        heap.push(Reverse((count, Reverse(id as u32))));
        if heap.len() > k {
            heap.pop();
        }
    }
    let mut top: Vec<IdCount> =
        heap.into_iter().map(|Reverse((count, Reverse(id)))| IdCount { id, count, token: None }).collect();
    top.sort_by(|a, b| b.count.cmp(&a.count).then(a.id.cmp(&b.id)));
    top
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{x:.1} {}", UNITS[u]) }
}

fn print_human(s: &Stats) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let comp: Vec<String> = s.compression.iter().map(|(k, v)| format!("{v} {k}")).collect();
    writeln!(out, "documents  {}", s.documents)?;
    writeln!(out, "shards     {} ({})", s.shards, comp.join(", "))?;
    writeln!(out, "bytes      {} on disk, {} raw records", human_bytes(s.bytes.compressed), human_bytes(s.bytes.raw))?;
    writeln!(out, "vocab      {} global ids", s.vocab_total_size)?;
    writeln!(out, "{:<8} {:>12} {:>12} {:>14} {:>10}", "modality", "documents", "segments", "tokens", "vocab")?;
    // Modality order (text, image, speech), not the JSON map's alphabetical order.
    for (name, m) in Modality::ALL.iter().filter_map(|md| s.modalities.get_key_value(md.as_str())) {
        let vocab = match m.latent_dim {
            Some(d) => format!("latent {d}"),
            None => m.vocab_size.to_string(),
        };
        writeln!(out, "{name:<8} {:>12} {:>12} {:>14} {vocab:>10}", m.documents, m.segments, m.tokens)?;
    }
    if let Some(d) = &s.deep {
        for (name, h) in &d.histograms {
            writeln!(out)?;
            let mean = h.mean.map_or("-".to_string(), |m| format!("{m:.2}"));
            let (min, max) = (h.min.unwrap_or(0.0), h.max.unwrap_or(0.0));
            writeln!(out, "{name}: n={} min={min} max={max} mean={mean}", h.count)?;
            let peak = h.bins.iter().map(|b| b.count).max().unwrap_or(1).max(1);
            for b in &h.bins {
                let hi = b.hi.map_or("inf".to_string(), |h| h.to_string());
                let bar = "#".repeat(((b.count * 40).div_ceil(peak)) as usize);
                writeln!(out, "  [{:>8}, {hi:>8}) {:>10} {bar}", b.lo, b.count)?;
            }
        }
        for (name, v) in &d.vocabulary {
            writeln!(out)?;
            writeln!(out, "{name} vocabulary: {}/{} ids used ({:.1}%)", v.used, v.vocab_size, 100.0 * v.fraction_used)?;
            let top: Vec<String> = v
                .top
                .iter()
                .map(|t| match &t.token {
                    Some(tok) => format!("{}={tok:?}×{}", t.id, t.count),
                    None => format!("{}×{}", t.id, t.count),
                })
                .collect();
            writeln!(out, "  most frequent: {}", top.join(" "))?;
        }
    } else {
        writeln!(out, "(histograms and vocabulary usage: --deep)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_and_merge() {
        let mut h = Histogram::new(&POW2_EDGES);
        for x in [0.0, 1.0, 3.0, 4.0, 1000.0] {
            h.add(x);
        }
        let mut g = Histogram::new(&POW2_EDGES);
        g.add(3.5);
        h.merge(&g);
        let o = h.out();
        assert_eq!(o.count, 6);
        let bins: Vec<(f64, u64)> = o.bins.iter().map(|b| (b.lo, b.count)).collect();
        assert_eq!(bins, vec![(0.0, 1), (1.0, 1), (2.0, 2), (4.0, 1), (512.0, 1)]);
        assert_eq!(o.max, Some(1000.0));
        let mut s = Histogram::new(&SECONDS_EDGES);
        s.add(500.0);
        assert_eq!(s.out().bins[0].hi, None, "past the last edge lands in the open bin");
    }

    #[test]
    fn top_ids_keep_the_most_frequent_smaller_id_first() {
        let counts = [0u64, 5, 2, 5, 0, 9, 1];
        let top: Vec<(u32, u64)> = top_ids(counts.iter().copied(), 3).iter().map(|t| (t.id, t.count)).collect();
        assert_eq!(top, [(5, 9), (1, 5), (3, 5)]);
        assert!(top_ids([0u64, 0].into_iter(), 10).is_empty());
    }

    /// Peak heap of `deep_scan` over a corpus of `shards` one-document shards whose text
    /// vocabulary has `vocab` ids, on a 2-thread pool.
    fn deep_scan_peak(shards: u64, vocab: u32) -> anyhow::Result<usize> {
        use motley_shards::{CorpusWriter, Document, Segment, WriterProperties};
        let dir = tempfile::tempdir()?;
        let props = WriterProperties::builder().max_shard_bytes(1).build();
        let mut w = CorpusWriter::create(dir.path(), &Vocab::build(vocab, 16, 8, None), props, "s")?;
        for i in 0..shards {
            w.add_document(&Document::new(vec![Segment::tokens(Modality::Text, vec![100 + i as u32, 7, 7])]))?;
        }
        assert_eq!(w.finish_with_manifest()?.shards.len() as u64, shards);
        let corpus = Corpus::open(dir.path())?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .start_handler(|_| crate::test_alloc::track_this_thread())
            .build()?;
        let (deep, peak) = crate::test_alloc::measure(|| pool.install(|| deep_scan(&corpus)));
        let text = &deep?.vocabulary["text"];
        assert_eq!((text.used, text.top[0].id, text.top[0].count), (shards + 1, 7, 2 * shards));
        Ok(peak)
    }

    #[test]
    fn deep_scan_memory_does_not_grow_with_the_shard_count() -> anyhow::Result<()> {
        // 1 M ids: 8 MB of counters. One counter set for the scan, not one per shard (40 shards
        // made that 320 MB) or per worker.
        let counters = 8usize << 20;
        let few = deep_scan_peak(2, 1 << 20)?;
        let many = deep_scan_peak(40, 1 << 20)?;
        assert!(few >= counters, "the measurement sees the counters ({few} bytes)");
        assert!(many < 2 * counters, "40 shards peaked at {many} bytes, 2 shards at {few}");
        Ok(())
    }
}
