//! Runs the loader benchmark without the CLI (no libtorch build needed):
//! cargo run --release -p motley-shards --example bench_loader [DOCS] [TOKENS] [INDEX_DOCS]
//! The `motley bench loader` subcommand runs the same code with more options.

use motley_shards::bench::{LoaderBenchConfig, run};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let docs = args.next().map(|s| s.parse()).transpose()?.unwrap_or(40_000);
    let tokens = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100_000_000);
    let index_docs = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("motley-bench-loader-{}", std::process::id()));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cfg = LoaderBenchConfig {
        dir: dir.clone(),
        docs,
        mean_len: 1000,
        text_vocab: 32_000,
        seq_len: 2048,
        batch_size: 8,
        tokens,
        open_shards: 10_000,
        open_docs_per_shard: 1000,
        python: Some((root.join(".venv/bin/python"), root.join("scripts/bench/loader_numpy.py"))),
        worlds: vec![1, 8, 64, 512],
        rank_batches: 20,
        index_docs,
        index_mean_len: 32,
    };
    let r = run(&cfg, &|m| eprintln!("... {m}"));
    let _ = std::fs::remove_dir_all(&dir);
    #[allow(clippy::print_stdout)] // an example binary: the report is its output
    {
        println!("{}", serde_json::to_string_pretty(&r?)?);
    }
    Ok(())
}
