//! `motley bench loader`: the streaming loader's tokens/s as finished batches (all fields),
//! against a memcpy of the same bytes and a numpy.memmap packer doing the same packing
//! (scripts/bench/loader_numpy.py), zstd against raw under the default (block) shuffle, rank 0's
//! time per batch at simulated world sizes through the row index against the skip mode, the
//! row index's build time, the open time of a 10,000-shard / 10M-document corpus and
//! first-batch latency. The body lives in `motley_shards::bench`.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use motley_shards::bench::{self, LoaderBenchConfig, LoaderBenchReport};

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents in the synthetic text corpus.
    #[arg(long, default_value_t = 40_000)]
    docs: u64,
    /// Mean tokens per document (uniform between a tenth and ~twice this).
    #[arg(long, default_value_t = 1000)]
    mean_len: u32,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens each throughput measurement delivers.
    #[arg(long, default_value_t = 50_000_000)]
    tokens: u64,
    /// Shards in the open-time corpus.
    #[arg(long, default_value_t = 10_000)]
    open_shards: usize,
    /// Documents per shard in the open-time corpus.
    #[arg(long, default_value_t = 1000)]
    open_docs_per_shard: u64,
    /// Python with numpy (default: MOTLEY_PYTHON, else <repo>/.venv/bin/python, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The numpy baseline (default: MOTLEY_LOADER_NUMPY, else scripts/bench/loader_numpy.py
    /// under the current directory or the repository this binary was built from).
    #[arg(long)]
    python_script: Option<PathBuf>,
    /// Skip the numpy baseline.
    #[arg(long)]
    no_python: bool,
    /// Scratch directory (default: a fresh one under the system temp dir, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Simulated world sizes for rank 0's time per batch (comma-separated; empty skips).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,512")]
    worlds: Vec<usize>,
    /// Batches timed per world size.
    #[arg(long, default_value_t = 20)]
    rank_batches: usize,
    /// Also time the row index build of a corpus of this many short documents (0: skip).
    #[arg(long, default_value_t = 0)]
    index_docs: u64,
    /// Mean tokens per document of that corpus.
    #[arg(long, default_value_t = 32)]
    index_mean_len: u32,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn find_script(arg: Option<PathBuf>) -> Option<PathBuf> {
    let rel = Path::new("scripts/bench/loader_numpy.py");
    arg.or_else(|| std::env::var_os("MOTLEY_LOADER_NUMPY").map(PathBuf::from))
        .or_else(|| Some(rel.to_path_buf()).filter(|p| p.is_file()))
        .or_else(|| Some(repo_root().join(rel)).filter(|p| p.is_file()))
}

fn find_python(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("MOTLEY_PYTHON").map(PathBuf::from))
        .or_else(|| Some(PathBuf::from(".venv/bin/python")).filter(|p| p.is_file()))
        .or_else(|| Some(repo_root().join(".venv/bin/python")).filter(|p| p.is_file()))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        tracing::warn!(
            "debug build: motley-shards is unoptimized, so the loader figures mean nothing; build with --release"
        );
    }
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("motley-bench-loader-{}", std::process::id())), true),
    };
    let python = if args.no_python {
        None
    } else {
        let script = find_script(args.python_script.clone())
            .ok_or_else(|| anyhow::anyhow!("scripts/bench/loader_numpy.py not found: pass --python-script or set MOTLEY_LOADER_NUMPY (or --no-python)"))?;
        Some((find_python(args.python.clone()), script))
    };
    let cfg = LoaderBenchConfig {
        dir: dir.clone(),
        docs: args.docs,
        mean_len: args.mean_len.max(2),
        text_vocab: 32_000,
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        tokens: args.tokens,
        open_shards: args.open_shards.max(1),
        open_docs_per_shard: args.open_docs_per_shard.max(1),
        python,
        worlds: args.worlds.clone(),
        rank_batches: args.rank_batches,
        index_docs: args.index_docs,
        index_mean_len: args.index_mean_len,
    };
    let spinner = ProgressBar::new_spinner();
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let result = bench::run(&cfg, &|m| spinner.set_message(m.to_string()));
    spinner.finish_and_clear();
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let r = result?;
    if ctx.json {
        return output::json(&r);
    }
    print_human(&r)
}

fn print_human(r: &LoaderBenchReport) -> anyhow::Result<()> {
    let m = |x: f64| x / 1e6;
    output::line(format!(
        "corpus: {} docs, {:.1}M tokens, raw {:.1} MiB, zstd {:.1} MiB (ratio {:.2}); written at {:.1}M tokens/s",
        r.docs,
        m(r.corpus_tokens as f64),
        r.raw_bytes as f64 / 1048576.0,
        r.zstd_bytes as f64 / 1048576.0,
        r.zstd_ratio,
        m(r.write_raw_tokens_per_s)
    ))?;
    let one = &r.loader_one_core_raw;
    let per_cpu = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{:.1}M", m(v)));
    output::line(format!(
        "loader, 1 core, raw:   {:.1}M tokens/s ({} per CPU-second) as finished [{}, {}] batches ({:.2} GB/s of batch fields, padding {:.4})",
        m(one.tokens_per_s),
        per_cpu(one.tokens_per_cpu_s),
        r.batch_size,
        r.seq_len,
        one.batch_bytes_per_s / 1e9,
        one.padding_fraction
    ))?;
    output::line(format!(
        "loader, 1 core, zstd:  {:.1}M tokens/s ({} per CPU-second of the loader's thread; decode-ahead thread on) -> {:.2}x raw under the default block shuffle, {:.0}% of raw's bytes",
        m(r.loader_one_core_zstd.tokens_per_s),
        per_cpu(r.loader_one_core_zstd.tokens_per_cpu_s),
        r.zstd_over_raw,
        100.0 / r.zstd_ratio
    ))?;
    output::line(format!(
        "  zstd with the decode on the loader's thread alone (no decode-ahead thread): {:.1}M tokens/s -> {:.2}x raw",
        m(r.loader_one_core_zstd_inline.tokens_per_s),
        r.zstd_inline_over_raw
    ))?;
    output::line(format!(
        "  at the scale of a corpus past the cache (window {} docs, cache {:.1} MiB): raw {:.1}M, zstd {:.1}M tokens/s -> {:.2}x",
        r.scaled_window,
        r.scaled_cache_bytes as f64 / 1048576.0,
        m(r.loader_one_core_raw_scaled.tokens_per_s),
        m(r.loader_one_core_zstd_scaled.tokens_per_s),
        r.zstd_over_raw_scaled
    ))?;
    output::line(format!(
        "  zstd under the global document shuffle, same cache (a chunk decoded per document): {:.2}M tokens/s",
        m(r.loader_one_core_zstd_documents.tokens_per_s)
    ))?;
    output::line(format!("loader, prefetch, raw: {:.1}M tokens/s", m(r.loader_prefetch_raw.tokens_per_s)))?;
    output::line(format!(
        "memcpy of the same bytes: {:.2} GB/s ({} per CPU-second) -> loader at {:.0}% of memcpy ({} over CPU time)",
        r.memcpy_bytes_per_s / 1e9,
        r.memcpy_bytes_per_cpu_s.map_or_else(|| "-".to_string(), |v| format!("{:.2} GB/s", v / 1e9)),
        100.0 * r.loader_fraction_of_memcpy,
        r.loader_fraction_of_memcpy_cpu.map_or_else(|| "-".to_string(), |v| format!("{:.0}%", 100.0 * v))
    ))?;
    match (r.numpy_tokens_per_s, r.ratio_vs_numpy, &r.numpy_error) {
        (Some(n), Some(x), _) => output::line(format!(
            "numpy.memmap packer (same packing, same fields): {:.1}M tokens/s ({} per CPU-second) -> loader {x:.2}x ({} over CPU time)",
            m(n),
            per_cpu(r.numpy_tokens_per_cpu_s),
            r.ratio_vs_numpy_cpu.map_or_else(|| "-".to_string(), |v| format!("{v:.2}x"))
        ))?,
        (_, _, Some(e)) => output::line(format!("numpy.memmap packer: not measured ({e})"))?,
        _ => output::line("numpy.memmap packer: skipped")?,
    }
    if let Some(s) = r.numpy_stream_tokens_per_s {
        output::line(format!(
            "numpy flat-slice reference (no document structure, an upper bound): {:.1}M tokens/s ({} per CPU-second) -> loader {} over CPU time",
            m(s),
            per_cpu(r.numpy_stream_tokens_per_cpu_s),
            r.ratio_vs_numpy_stream_cpu.map_or_else(|| "-".to_string(), |v| format!("{v:.2}x"))
        ))?;
    }
    output::line(format!("first batch: {:.1} ms", r.first_batch_seconds * 1e3))?;
    if !r.rank_scaling.is_empty() {
        output::line(format!(
            "row index of the world-size corpus ({} raw documents, epoch 0): built in {:.2} s, {:.1} KiB",
            r.rank_docs,
            r.index_build_seconds,
            r.index_bytes as f64 / 1024.0
        ))?;
        output::line("rank 0, ms per batch:  world  row index  skip mode (baseline)  skip / index")?;
        for s in &r.rank_scaling {
            output::line(format!(
                "                       {:>5}  {:>9.3}  {:>20.3}  {:>11.1}x",
                s.world,
                s.index_batch_ms,
                s.skip_batch_ms,
                s.skip_batch_ms / s.index_batch_ms
            ))?;
        }
    }
    if let Some(b) = &r.index_build {
        output::line(format!(
            "row index of {} documents ({:.0}M tokens, {:.0} MiB of shards): {} rows, {:.2} MiB, built in {:.1} s (corpus written in {:.1} s)",
            b.docs,
            m(b.tokens as f64),
            b.corpus_bytes as f64 / 1048576.0,
            b.rows,
            b.index_bytes as f64 / 1048576.0,
            b.build_seconds,
            b.corpus_write_seconds
        ))?;
    }
    output::line(format!(
        "open {} shards / {} docs: {:.1} ms; random get with first shard touches: {:.1} us",
        r.open_shards,
        r.open_docs,
        r.open_seconds * 1e3,
        r.open_random_get_us
    ))
}
