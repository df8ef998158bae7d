//! Text-ingest benchmark without the `motley` binary (no libtorch build needed):
//! `cargo run --release -p motley-ingest --example bench_text -- TOKENIZER.json [COPIES] [WORKERS]`
//! from the repository root (TOKENIZER `-` trains an 8,192-token BPE on the input first).
//! Same measurement as `motley bench ingest`.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tokenizer_arg =
        args.first().ok_or_else(|| anyhow::anyhow!("usage: bench_text TOKENIZER.json|- [COPIES] [WORKERS]"))?;
    let copies: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let workers: usize = match args.get(2) {
        Some(s) => s.parse()?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut inputs: Vec<PathBuf> = std::fs::read_dir("data/sample/text")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    inputs.sort();
    let work = std::env::temp_dir().join(format!("motley-bench-text-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let tokenizer = if tokenizer_arg == "-" {
        let path = work.join("text.json");
        let cfg = motley_tokenizers::TextTrainConfig { vocab_size: 8192, ..Default::default() };
        motley_tokenizers::TextTokenizer::train(&inputs, &cfg)?.0.save(&path)?;
        path
    } else {
        PathBuf::from(tokenizer_arg)
    };
    let input = motley_ingest::bench::prepare_text(&inputs, copies, 4096, 8, &work)?;
    let rust = motley_ingest::bench::run_ingest(&input, &tokenizer, workers, 3, &work)?;
    let py = motley_ingest::bench::run_python(
        Path::new(".venv/bin/python"),
        Path::new("scripts/bench/ingest_hf.py"),
        &input,
        &tokenizer,
        workers,
        3,
    )?;
    let _ = std::fs::remove_dir_all(&work);
    println!("input: {} documents, {:.1} MB, {workers} threads", input.documents, input.bytes as f64 / 1e6);
    println!(
        "motley ingest (end to end): {} tokens in {:.3} s = {:.0} tokens/s",
        rust.tokens, rust.seconds, rust.tokens_per_s
    );
    println!(
        "HF Python encode_batch:     {} tokens in {:.3} s = {:.0} tokens/s",
        py.tokens, py.seconds, py.tokens_per_s
    );
    println!(
        "ratio: {:.2}x (goal >= 1.0), same tokens: {}",
        rust.tokens_per_s / py.tokens_per_s,
        rust.tokens == py.tokens
    );
    Ok(())
}
