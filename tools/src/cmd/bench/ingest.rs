//! `motley bench ingest`: text ingest end to end (JSONL files → finished shards, tokens/s)
//! against HF Python `tokenizers` `encode_batch` alone on the same documents and cores,
//! measured in the same run and printed as a ratio (goal ≥ 1.0).

use std::path::{Path, PathBuf};

use anyhow::Context;
use motley_ingest::bench;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Text files the benchmark documents are cut from (default: data/sample/text/*.txt).
    #[arg(long)]
    input: Vec<PathBuf>,
    /// HF tokenizer.json to use (default: an 8,192-token BPE trained on the input first).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Times the input is repeated (more data, steadier numbers).
    #[arg(long, default_value_t = 4)]
    copies: usize,
    /// Bytes per document.
    #[arg(long, default_value_t = 4096)]
    doc_bytes: usize,
    /// Input JSONL files the documents are spread over (tasks run in parallel).
    #[arg(long, default_value_t = 8)]
    files: usize,
    /// Threads for both sides (default: all cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Python with `tokenizers` installed.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Best of N runs on each side.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Scratch directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let inputs = if args.input.is_empty() { txt_files(Path::new("data/sample/text"))? } else { args.input.clone() };
    anyhow::ensure!(!inputs.is_empty(), "no input text files (pass --input)");
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("motley-bench-ingest-{}", std::process::id())));
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let tokenizer = match &args.tokenizer {
        Some(t) => t.clone(),
        None => {
            let path = work.join("text.json");
            let cfg = motley_tokenizers::TextTrainConfig { vocab_size: 8192, ..Default::default() };
            let (t, _) = motley_tokenizers::TextTokenizer::train(&inputs, &cfg)?;
            t.save(&path)?;
            path
        }
    };
    let input = bench::prepare_text(&inputs, args.copies, args.doc_bytes, args.files, &work)?;
    let rust = bench::run_ingest(&input, &tokenizer, workers, args.repeat, &work)?;
    let py = bench::run_python(
        &args.python,
        Path::new("scripts/bench/ingest_hf.py"),
        &input,
        &tokenizer,
        workers,
        args.repeat,
    )?;
    let ratio = rust.tokens_per_s / py.tokens_per_s;
    if args.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    if ctx.json {
        return output::json(&serde_json::json!({
            "documents": input.documents,
            "input_bytes": input.bytes,
            "workers": workers,
            "rust_ingest_end_to_end": rust,
            "python_encode_batch_alone": py,
            "ratio": ratio,
            "same_tokens": rust.tokens == py.tokens,
        }));
    }
    output::line(format!(
        "input: {} documents, {:.1} MB, {workers} threads",
        input.documents,
        input.bytes as f64 / 1e6
    ))?;
    output::line(format!(
        "motley ingest (JSONL -> shards, end to end): {} tokens in {:.3} s = {:.0} tokens/s",
        rust.tokens, rust.seconds, rust.tokens_per_s
    ))?;
    output::line(format!(
        "HF Python encode_batch (alone):              {} tokens in {:.3} s = {:.0} tokens/s",
        py.tokens, py.seconds, py.tokens_per_s
    ))?;
    output::line(format!(
        "ratio: {ratio:.2}x (goal >= 1.0){}",
        if rust.tokens == py.tokens { "" } else { "  [token counts differ]" }
    ))
}

fn txt_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "txt") {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}
