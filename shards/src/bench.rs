//! Loader benchmark body behind `motley bench loader`: builds a synthetic corpus, measures
//! finished-batch throughput against a memcpy of the same bytes and a numpy.memmap packer run
//! in the same process tree, the open time of a 10,000-shard corpus and first-batch latency.
//! Lives here (not in the CLI) so it runs without building libtorch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Result, ShardError};
use crate::format::Compression;
use crate::loader::{Loader, LoaderConfig, Source};
use crate::manifest::Manifest;
use crate::order::Shuffle;
use crate::perm::mix64;
use crate::reader::Corpus;
use crate::rowindex::RowIndexMode;
use crate::types::{Document, Modality, Segment, Vocab};
use crate::writer::{CorpusWriter, ShardWriter, WriterProperties};

/// Bytes of one position in a finished [`crate::Batch`]: inputs, targets, positions, doc_ids,
/// segment_ids (u32 each) and modality, target_modality, loss_mask (u8 each).
pub const BATCH_BYTES_PER_TOKEN: u64 = 5 * 4 + 3;

#[derive(Debug, Clone)]
pub struct LoaderBenchConfig {
    /// Scratch directory (created; the caller removes it).
    pub dir: PathBuf,
    pub docs: u64,
    pub mean_len: u32,
    pub text_vocab: u32,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Tokens each throughput measurement delivers.
    pub tokens: u64,
    /// The open-time corpus: this many shards of `open_docs_per_shard` documents.
    pub open_shards: usize,
    pub open_docs_per_shard: u64,
    /// `(python, script)` for the numpy.memmap baseline; None skips it.
    pub python: Option<(PathBuf, PathBuf)>,
    /// Simulated world sizes for rank 0's time per batch (empty skips that part).
    pub worlds: Vec<usize>,
    /// Batches timed per world size.
    pub rank_batches: usize,
    /// Documents of the corpus whose row index build is timed (0 skips it).
    pub index_docs: u64,
    pub index_mean_len: u32,
}

/// Rank 0's time for one batch at a simulated world size.
#[derive(Debug, Clone, Serialize)]
pub struct RankScale {
    pub world: usize,
    /// Through the row index (only this rank's rows packed), wall clock and thread CPU time.
    pub index_batch_ms: f64,
    pub index_batch_cpu_ms: Option<f64>,
    /// Skip mode (every rank walks all world × batch rows), the baseline.
    pub skip_batch_ms: f64,
    pub skip_batch_cpu_ms: Option<f64>,
}

/// Building the row index of a large corpus.
#[derive(Debug, Clone, Serialize)]
pub struct IndexBuild {
    pub docs: u64,
    pub tokens: u64,
    pub corpus_bytes: u64,
    pub rows: u64,
    pub index_bytes: u64,
    pub build_seconds: f64,
    pub corpus_write_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Per second of this thread's CPU time (Linux schedstat; robust on a shared machine).
    pub tokens_per_cpu_s: Option<f64>,
    /// Bytes of finished batch fields written per second.
    pub batch_bytes_per_s: f64,
    pub padding_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoaderBenchReport {
    pub docs: u64,
    pub corpus_tokens: u64,
    pub seq_len: usize,
    pub batch_size: usize,
    pub raw_bytes: u64,
    pub zstd_bytes: u64,
    pub zstd_ratio: f64,
    pub write_raw_tokens_per_s: f64,
    /// Loader on the caller's thread (prefetch 0), raw shards: the one-core figure.
    pub loader_one_core_raw: Throughput,
    /// zstd under the default (block) shuffle and cache; the loader's thread plus the
    /// decode-ahead thread, which decodes the next window's chunks.
    pub loader_one_core_zstd: Throughput,
    /// loader_one_core_zstd ÷ loader_one_core_raw tokens/s (the goal is at least 0.5).
    pub zstd_over_raw: f64,
    /// zstd with the whole decode on the loader's thread (no decode-ahead thread).
    pub loader_one_core_zstd_inline: Throughput,
    pub zstd_inline_over_raw: f64,
    /// Raw and zstd with windows of a tenth of the corpus and a cache of a quarter of its
    /// decoded bytes: a corpus much larger than the cache.
    pub loader_one_core_raw_scaled: Throughput,
    pub loader_one_core_zstd_scaled: Throughput,
    pub zstd_over_raw_scaled: f64,
    pub scaled_window: u64,
    pub scaled_cache_bytes: u64,
    /// zstd under the global document shuffle with the scaled cache (what every shuffled
    /// read cost before the block shuffle: a chunk decoded per document).
    pub loader_one_core_zstd_documents: Throughput,
    /// Loader with its prefetch thread (what the trainer sees; 2 threads).
    pub loader_prefetch_raw: Throughput,
    /// memcpy of the same number of batch bytes, batch-sized pieces from a 256 MiB source.
    pub memcpy_bytes_per_s: f64,
    /// Per second of CPU time.
    pub memcpy_bytes_per_cpu_s: Option<f64>,
    /// loader_one_core_raw batch bytes/s ÷ memcpy bytes/s.
    pub loader_fraction_of_memcpy: f64,
    /// The same ratio over CPU time.
    pub loader_fraction_of_memcpy_cpu: Option<f64>,
    /// The numpy.memmap packer (same corpus, same fields), when run.
    pub numpy_tokens_per_s: Option<f64>,
    pub numpy_padding_fraction: Option<f64>,
    pub numpy_tokens_per_cpu_s: Option<f64>,
    /// loader_one_core_raw tokens/s ÷ numpy tokens/s.
    pub ratio_vs_numpy: Option<f64>,
    /// The same ratio over CPU time.
    pub ratio_vs_numpy_cpu: Option<f64>,
    /// Reference, not the same work: numpy filling every field from one flat slice per batch
    /// with no document structure at all (an upper bound for any numpy packer).
    pub numpy_stream_tokens_per_s: Option<f64>,
    pub numpy_stream_tokens_per_cpu_s: Option<f64>,
    /// loader tokens per CPU second ÷ that upper bound's.
    pub ratio_vs_numpy_stream_cpu: Option<f64>,
    pub numpy_error: Option<String>,
    pub first_batch_seconds: f64,
    pub open_shards: usize,
    pub open_docs: u64,
    pub open_seconds: f64,
    /// Mean time of a random `get` on the big corpus, first touches of shards included.
    pub open_random_get_us: f64,
    /// Rank 0's time per batch at each simulated world size.
    pub rank_scaling: Vec<RankScale>,
    /// Documents of the raw corpus those were timed on: the bench corpus, or a larger one of
    /// the same documents when the largest world's timed batches would cross an epoch.
    pub rank_docs: u64,
    /// Building epoch 0's row index of that corpus: seconds and file bytes.
    pub index_build_seconds: f64,
    pub index_bytes: u64,
    /// The large-corpus build, when asked for.
    pub index_build: Option<IndexBuild>,
}

/// CPU time of the calling thread in seconds (Linux `/proc/thread-self/schedstat`).
fn thread_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

fn rng_next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(1);
    mix64(*state)
}

/// Zipf-like ids (small ids frequent), so zstd sees something like real BPE output.
fn synth_doc(i: u64, mean: u32, vocab: u32) -> Document {
    let mut s = mix64(i ^ 0xB0C5);
    let lo = (mean / 10).max(1) as u64;
    let len = lo + rng_next(&mut s) % (2 * mean as u64 - 2 * lo + 1);
    let ids = (0..len)
        .map(|_| {
            let u = (rng_next(&mut s) >> 11) as f64 / (1u64 << 53) as f64;
            ((u * u * u) * vocab as f64) as u32 % vocab
        })
        .collect();
    Document::new(vec![Segment::tokens(Modality::Text, ids)])
}

fn write_synth(dir: &Path, cfg: &LoaderBenchConfig, vocab: &Vocab, c: Compression) -> Result<(Manifest, f64)> {
    let props = WriterProperties::builder().compression(c).max_shard_bytes(64 << 20).build();
    let t0 = Instant::now();
    let mut w = CorpusWriter::create(dir, vocab, props, "bench")?;
    for i in 0..cfg.docs {
        w.add_document(&synth_doc(i, cfg.mean_len, cfg.text_vocab))?;
    }
    let m = w.finish_with_manifest()?;
    Ok((m, t0.elapsed().as_secs_f64()))
}

/// Delivers `cfg.tokens` tokens of batches, or fewer when `max_seconds` runs out first.
fn measure(
    corpus: &std::sync::Arc<Corpus>,
    cfg: &LoaderBenchConfig,
    prefetch: usize,
    max_seconds: f64,
) -> Result<Throughput> {
    measure_with(corpus, cfg, LoaderConfig { prefetch, ..Default::default() }, max_seconds)
}

/// [`measure`] under the shuffle settings of `base` (its sizes and seed are the bench's).
fn measure_with(
    corpus: &std::sync::Arc<Corpus>,
    cfg: &LoaderBenchConfig,
    base: LoaderConfig,
    max_seconds: f64,
) -> Result<Throughput> {
    let prefetch = base.prefetch;
    let lc = LoaderConfig { seq_len: cfg.seq_len, batch_size: cfg.batch_size, seed: 1, ..base };
    let mut l = Loader::new(vec![Source::new(corpus.clone(), 1.0)], lc)?;
    l.next_batch()?; // warm-up: first touches of the shards
    let per = (cfg.seq_len * cfg.batch_size) as u64;
    let n = cfg.tokens.div_ceil(per).max(1);
    let t0 = Instant::now();
    let c0 = thread_cpu_seconds();
    let mut pad = 0.0f64;
    let mut done = 0u64;
    while done < n {
        let b = l.next_batch()?;
        pad += b.padding_fraction as f64;
        std::hint::black_box(&b);
        done += 1;
        if t0.elapsed().as_secs_f64() > max_seconds {
            break;
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds().zip(c0).map(|(a, b)| a - b).filter(|&c| c > 0.0);
    let (n, tokens) = (done, done * per);
    Ok(Throughput {
        tokens,
        seconds: dt,
        tokens_per_s: tokens as f64 / dt,
        // With prefetch the work runs on another thread: only the inline figure is CPU-timed.
        tokens_per_cpu_s: cpu.filter(|_| prefetch == 0).map(|c| tokens as f64 / c),
        batch_bytes_per_s: (tokens * BATCH_BYTES_PER_TOKEN) as f64 / dt,
        padding_fraction: pad / n as f64,
    })
}

/// memcpy bandwidth for the loader's access pattern: `total` bytes copied in batch-sized
/// pieces (`block` bytes, the size of one finished batch) from a 256 MiB source ring, larger
/// than the caches, into one reused batch-sized destination (as the allocator hands the loader
/// recycled batch buffers).
fn memcpy_bytes_per_s(total: u64, block: usize) -> (f64, Option<f64>) {
    let size = 256usize << 20;
    let block = block.clamp(1, size);
    let src = vec![1u8; size];
    let mut dst = vec![0u8; block];
    let t0 = Instant::now();
    let c0 = thread_cpu_seconds();
    let (mut done, mut at) = (0u64, 0usize);
    while done < total.max(block as u64) {
        if at + block > size {
            at = 0;
        }
        dst.copy_from_slice(&src[at..at + block]);
        std::hint::black_box(&mut dst);
        at += block;
        done += block as u64;
    }
    let cpu = thread_cpu_seconds().zip(c0).map(|(a, b)| a - b).filter(|&c| c > 0.0);
    (done as f64 / t0.elapsed().as_secs_f64(), cpu.map(|c| done as f64 / c))
}

/// The 10,000-shard corpus: one real shard of tiny documents, hard-linked under every name.
fn build_open_corpus(dir: &Path, cfg: &LoaderBenchConfig, vocab: &Vocab) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ShardError::io(dir, "create dir", e))?;
    let first = dir.join("open-00000.mshard");
    let mut w = ShardWriter::create(&first, vocab, WriterProperties::default())?;
    for i in 0..cfg.open_docs_per_shard {
        w.add_document(&Document::new(vec![Segment::tokens(Modality::Text, vec![(i % 100) as u32])]))?;
    }
    let stats = w.finish()?;
    let mut shards = Vec::with_capacity(cfg.open_shards);
    for s in 0..cfg.open_shards {
        let name = format!("open-{s:05}.mshard");
        if s > 0 {
            let p = dir.join(&name);
            std::fs::hard_link(&first, &p)
                .or_else(|_| std::fs::copy(&first, &p).map(|_| ()))
                .map_err(|e| ShardError::io(&p, "link", e))?;
        }
        shards.push(crate::writer::ShardStats { name, ..stats.clone() });
    }
    Manifest::from_stats(vocab.clone(), shards).write(dir)
}

/// Runs the whole benchmark; `progress` receives a line per phase.
pub fn run(cfg: &LoaderBenchConfig, progress: &dyn Fn(&str)) -> Result<LoaderBenchReport> {
    let vocab = Vocab::build(cfg.text_vocab, 0, 0, None);
    let raw_dir = cfg.dir.join("raw");
    let zstd_dir = cfg.dir.join("zstd");
    progress("writing the synthetic corpus (raw)");
    let (raw_m, raw_s) = write_synth(&raw_dir, cfg, &vocab, Compression::Raw)?;
    progress("writing the synthetic corpus (zstd)");
    let (zstd_m, _) = write_synth(&zstd_dir, cfg, &vocab, Compression::Zstd)?;
    let corpus_tokens = raw_m.totals.text.tokens;

    progress("first-batch latency");
    let t0 = Instant::now();
    {
        let lc = LoaderConfig { seq_len: cfg.seq_len, batch_size: cfg.batch_size, seed: 1, ..Default::default() };
        let mut l = Loader::from_dir(&raw_dir, lc)?;
        std::hint::black_box(l.next_batch()?);
    }
    let first_batch_seconds = t0.elapsed().as_secs_f64();

    let raw = std::sync::Arc::new(Corpus::open(&raw_dir)?);
    let zstd = std::sync::Arc::new(Corpus::open(&zstd_dir)?);
    progress("loader, one core, raw");
    let one_raw = measure(&raw, cfg, 0, 60.0)?;
    progress("loader, one core, zstd");
    let one_zstd = measure(&zstd, cfg, 0, 60.0)?;
    progress("loader, one core, zstd, no decode-ahead thread");
    let zstd_inline_corpus = std::sync::Arc::new(Corpus::open(&zstd_dir)?);
    let inline_zstd = measure_with(
        &zstd_inline_corpus,
        cfg,
        LoaderConfig { prefetch: 0, decode_ahead: false, ..Default::default() },
        60.0,
    )?;
    // The same two at the proportions of a corpus far larger than the cache: windows of a
    // tenth of the corpus, a decoded-chunk cache of a quarter of it.
    let scaled_window = (cfg.docs / 10).max(1);
    let scaled_cache = zstd_m.shards.iter().map(|s| s.payload_bytes).sum::<u64>() / 4;
    let scaled = LoaderConfig { prefetch: 0, shuffle_window: scaled_window, ..Default::default() };
    progress("loader, one core, raw, scaled window");
    let scaled_raw = measure_with(&raw, cfg, scaled.clone(), 60.0)?;
    progress("loader, one core, zstd, scaled window and cache");
    let zstd_small = std::sync::Arc::new(Corpus::open(&zstd_dir)?);
    zstd_small.chunk_cache().set_limit(scaled_cache);
    let scaled_zstd = measure_with(&zstd_small, cfg, scaled, 60.0)?;
    progress("loader, one core, zstd, global document shuffle (the previous default)");
    // Every document read decodes its chunk once the cache holds less than the corpus: capped.
    let zstd_docs = std::sync::Arc::new(Corpus::open(&zstd_dir)?);
    zstd_docs.chunk_cache().set_limit(scaled_cache);
    let docs_zstd = measure_with(
        &zstd_docs,
        cfg,
        LoaderConfig { prefetch: 0, shuffle: Shuffle::Documents, ..Default::default() },
        3.0,
    )?;
    progress("loader with prefetch thread, raw");
    let pre_raw = measure(&raw, cfg, 4, 60.0)?;
    progress("memcpy of the same batch bytes");
    let (memcpy, memcpy_cpu) = memcpy_bytes_per_s(
        one_raw.tokens * BATCH_BYTES_PER_TOKEN,
        cfg.seq_len * cfg.batch_size * BATCH_BYTES_PER_TOKEN as usize,
    );

    let (mut numpy_tps, mut numpy_pad, mut numpy_error) = (None, None, None);
    let (mut numpy_cpu, mut stream, mut stream_cpu) = (None, None, None);
    if let Some((python, script)) = &cfg.python {
        progress("numpy.memmap baseline");
        let out = std::process::Command::new(python)
            .arg(script)
            .arg(&raw_dir)
            .args(["--seq-len", &cfg.seq_len.to_string(), "--batch-size", &cfg.batch_size.to_string()])
            .args(["--tokens", &cfg.tokens.to_string(), "--json"])
            .output();
        match out {
            Ok(o) if o.status.success() => match serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                Ok(v) => {
                    numpy_tps = v.get("tokens_per_s").and_then(|x| x.as_f64());
                    numpy_pad = v.get("padding_fraction").and_then(|x| x.as_f64());
                    numpy_cpu = v.get("tokens_per_cpu_s").and_then(|x| x.as_f64());
                    stream = v.get("stream_tokens_per_s").and_then(|x| x.as_f64());
                    stream_cpu = v.get("stream_tokens_per_cpu_s").and_then(|x| x.as_f64());
                }
                Err(e) => numpy_error = Some(format!("bad JSON from {}: {e}", script.display())),
            },
            Ok(o) => {
                numpy_error =
                    Some(format!("{} failed: {}", script.display(), String::from_utf8_lossy(&o.stderr).trim()))
            }
            Err(e) => numpy_error = Some(format!("cannot run {}: {e}", python.display())),
        }
    }

    let (mut rank_scaling, mut index_build_seconds, mut index_bytes) = (Vec::new(), 0.0, 0);
    let mut rank_docs = cfg.docs;
    if !cfg.worlds.is_empty() {
        // The timed batches of the largest world stay inside one epoch: on a corpus of fewer
        // rows every few steps open the next epoch (its order and index file), a cost a
        // corpus of millions of rows per epoch pays once, which would show as growth with the
        // world size. A larger raw corpus of the same documents is written when needed.
        let rows = |docs: u64| docs * u64::from(cfg.mean_len) / cfg.seq_len.max(1) as u64;
        let need = rank_rows_needed(cfg);
        let rank_corpus = if rows(cfg.docs) >= need {
            raw.clone()
        } else {
            rank_docs = need.saturating_mul(cfg.seq_len as u64).div_ceil(u64::from(cfg.mean_len.max(1))) * 11 / 10;
            progress(&format!("writing a {rank_docs}-document raw corpus for the world sizes ({need} rows needed)"));
            let rank_cfg = LoaderBenchConfig { docs: rank_docs, ..cfg.clone() };
            write_synth(&cfg.dir.join("rank"), &rank_cfg, &vocab, Compression::Raw)?;
            std::sync::Arc::new(Corpus::open(cfg.dir.join("rank"))?)
        };
        let ix = cfg.dir.join("row-index");
        progress("row index of the world-size corpus");
        let t0 = Instant::now();
        let lc = LoaderConfig {
            seq_len: cfg.seq_len,
            batch_size: cfg.batch_size,
            seed: 1,
            prefetch: 0,
            world_size: 2,
            row_index: RowIndexMode::Always,
            index_dir: Some(ix.clone()),
            ..Default::default()
        };
        Loader::new(vec![Source::new(rank_corpus.clone(), 1.0)], lc)?.next_batch()?;
        index_build_seconds = t0.elapsed().as_secs_f64();
        index_bytes = dir_bytes(&ix);
        for &w in &cfg.worlds {
            progress(&format!("rank 0's batch at world size {w}"));
            let (index_batch_ms, index_batch_cpu_ms) = rank_batch_ms(&rank_corpus, cfg, w, RowIndexMode::Always, &ix)?;
            let (skip_batch_ms, skip_batch_cpu_ms) = rank_batch_ms(&rank_corpus, cfg, w, RowIndexMode::Never, &ix)?;
            rank_scaling.push(RankScale {
                world: w,
                index_batch_ms,
                index_batch_cpu_ms,
                skip_batch_ms,
                skip_batch_cpu_ms,
            });
        }
    }
    let index_build = if cfg.index_docs > 0 {
        progress(&format!("row index of a {}-document corpus", cfg.index_docs));
        let r = index_build_at_scale(cfg, &vocab, progress);
        let _ = std::fs::remove_dir_all(cfg.dir.join("index-scale"));
        Some(r?)
    } else {
        None
    };

    progress("open time of the 10,000-shard corpus");
    let open_dir = cfg.dir.join("open");
    build_open_corpus(&open_dir, cfg, &vocab)?;
    let t0 = Instant::now();
    let big = Corpus::open(&open_dir)?;
    let open_seconds = t0.elapsed().as_secs_f64();
    let probes = 2000u64;
    let t0 = Instant::now();
    let mut s = 7u64;
    for _ in 0..probes {
        let d = rng_next(&mut s) % big.num_docs().max(1);
        std::hint::black_box(big.get(d)?.num_positions());
    }
    let open_random_get_us = t0.elapsed().as_secs_f64() * 1e6 / probes as f64;

    Ok(LoaderBenchReport {
        docs: cfg.docs,
        corpus_tokens,
        seq_len: cfg.seq_len,
        batch_size: cfg.batch_size,
        raw_bytes: raw_m.bytes,
        zstd_bytes: zstd_m.bytes,
        zstd_ratio: raw_m.bytes as f64 / zstd_m.bytes.max(1) as f64,
        write_raw_tokens_per_s: corpus_tokens as f64 / raw_s,
        loader_fraction_of_memcpy: one_raw.batch_bytes_per_s / memcpy,
        loader_fraction_of_memcpy_cpu: one_raw
            .tokens_per_cpu_s
            .zip(memcpy_cpu)
            .map(|(l, m)| l * BATCH_BYTES_PER_TOKEN as f64 / m),
        memcpy_bytes_per_cpu_s: memcpy_cpu,
        ratio_vs_numpy: numpy_tps.map(|n| one_raw.tokens_per_s / n),
        ratio_vs_numpy_cpu: one_raw.tokens_per_cpu_s.zip(numpy_cpu).map(|(l, n)| l / n),
        numpy_tokens_per_cpu_s: numpy_cpu,
        numpy_stream_tokens_per_s: stream,
        numpy_stream_tokens_per_cpu_s: stream_cpu,
        ratio_vs_numpy_stream_cpu: one_raw.tokens_per_cpu_s.zip(stream_cpu).map(|(l, n)| l / n),
        zstd_over_raw: one_zstd.tokens_per_s / one_raw.tokens_per_s,
        zstd_inline_over_raw: inline_zstd.tokens_per_s / one_raw.tokens_per_s,
        loader_one_core_zstd_inline: inline_zstd,
        zstd_over_raw_scaled: scaled_zstd.tokens_per_s / scaled_raw.tokens_per_s,
        scaled_window,
        scaled_cache_bytes: scaled_cache,
        loader_one_core_raw: one_raw,
        loader_one_core_zstd: one_zstd,
        loader_one_core_raw_scaled: scaled_raw,
        loader_one_core_zstd_scaled: scaled_zstd,
        loader_one_core_zstd_documents: docs_zstd,
        loader_prefetch_raw: pre_raw,
        memcpy_bytes_per_s: memcpy,
        numpy_tokens_per_s: numpy_tps,
        numpy_padding_fraction: numpy_pad,
        numpy_error,
        first_batch_seconds,
        open_shards: big.num_shards(),
        open_docs: big.num_docs(),
        open_seconds,
        open_random_get_us,
        rank_scaling,
        rank_docs,
        index_build_seconds,
        index_bytes,
        index_build,
    })
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Rows per epoch the world-size part needs: the largest world's steps (a warm-up batch, the
/// timed ones and one more) of `batch_size` rows per rank, inside one epoch.
pub fn rank_rows_needed(cfg: &LoaderBenchConfig) -> u64 {
    let world = cfg.worlds.iter().copied().max().unwrap_or(0) as u64;
    world * cfg.batch_size as u64 * (cfg.rank_batches.max(1) as u64 + 2)
}

/// Rank 0's mean time per batch (wall, thread CPU) at world size `world`. Index files the timed
/// batches need are built by a first pass, so only the per-batch work is timed.
fn rank_batch_ms(
    corpus: &std::sync::Arc<Corpus>,
    cfg: &LoaderBenchConfig,
    world: usize,
    mode: RowIndexMode,
    index_dir: &Path,
) -> Result<(f64, Option<f64>)> {
    let batches = cfg.rank_batches.max(1);
    let lc = LoaderConfig {
        seq_len: cfg.seq_len,
        batch_size: cfg.batch_size,
        seed: 1,
        prefetch: 0,
        rank: 0,
        world_size: world,
        row_index: mode,
        index_dir: Some(index_dir.to_path_buf()),
        ..Default::default()
    };
    if mode == RowIndexMode::Always {
        let mut l = Loader::new(vec![Source::new(corpus.clone(), 1.0)], lc.clone())?;
        for _ in 0..=batches {
            l.next_batch()?;
        }
    }
    let mut l = Loader::new(vec![Source::new(corpus.clone(), 1.0)], lc)?;
    l.next_batch()?;
    let t0 = Instant::now();
    let c0 = thread_cpu_seconds();
    for _ in 0..batches {
        std::hint::black_box(l.next_batch()?);
    }
    let cpu = thread_cpu_seconds().zip(c0).map(|(a, b)| a - b);
    let per = |s: f64| s * 1e3 / batches as f64;
    Ok((per(t0.elapsed().as_secs_f64()), cpu.map(per)))
}

/// Writes `index_docs` short documents (raw) and times epoch 0's row index build.
fn index_build_at_scale(cfg: &LoaderBenchConfig, vocab: &Vocab, progress: &dyn Fn(&str)) -> Result<IndexBuild> {
    let dir = cfg.dir.join("index-scale");
    let corpus_dir = dir.join("corpus");
    let props = WriterProperties::builder().max_shard_bytes(256 << 20).build();
    let t0 = Instant::now();
    let mut w = CorpusWriter::create(&corpus_dir, vocab, props, "big")?;
    for i in 0..cfg.index_docs {
        if i % 1_000_000 == 0 {
            progress(&format!("writing the {}-document corpus: {i}", cfg.index_docs));
        }
        w.add_document(&synth_doc(i, cfg.index_mean_len.max(2), cfg.text_vocab))?;
    }
    let m = w.finish_with_manifest()?;
    let corpus_write_seconds = t0.elapsed().as_secs_f64();
    progress(&format!("building the row index of {} documents", cfg.index_docs));
    let ix = dir.join("row-index");
    let lc = LoaderConfig {
        seq_len: cfg.seq_len,
        batch_size: cfg.batch_size,
        seed: 1,
        prefetch: 0,
        world_size: 2,
        row_index: RowIndexMode::Always,
        index_dir: Some(ix.clone()),
        ..Default::default()
    };
    let c = std::sync::Arc::new(Corpus::open(&corpus_dir)?);
    let t0 = Instant::now();
    Loader::new(vec![Source::new(c, 1.0)], lc)?.next_batch()?;
    let build_seconds = t0.elapsed().as_secs_f64();
    let index_bytes = dir_bytes(&ix);
    Ok(IndexBuild {
        docs: m.num_docs,
        tokens: m.totals.text.tokens,
        corpus_bytes: m.bytes,
        rows: index_bytes.saturating_sub(crate::rowindex::HEADER_LEN as u64) / crate::rowindex::ENTRY_LEN as u64,
        index_bytes,
        build_seconds,
        corpus_write_seconds,
    })
}
