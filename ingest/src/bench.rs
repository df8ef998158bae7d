//! The text-ingest benchmark shared by `motley bench ingest` and `examples/bench_text.rs`:
//! the same documents go through `motley ingest` end to end (JSONL files → finished shards)
//! and through HF Python `tokenizers` `encode_batch` alone (scripts/bench/ingest_hf.py).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::recipe::{Recipe, RecipeOptions, SourceKind, SourceSpec, TokenizerPaths};
use crate::run::{IngestConfig, ingest};

/// Benchmark input written to disk: JSONL files for the ingest, one JSONL for Python.
#[derive(Debug, Clone)]
pub struct TextBenchInput {
    pub documents: usize,
    pub bytes: usize,
    pub input_dir: PathBuf,
    pub all_jsonl: PathBuf,
}

/// One side's best time.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

fn bench_err(e: impl std::fmt::Display) -> Error {
    Error::Options(format!("benchmark: {e}"))
}

/// Cuts `files` into documents of about `doc_bytes` (at line ends), repeats them `copies`
/// times, and writes them to `work` as `files` JSONL files plus one combined JSONL.
pub fn prepare_text(
    files: &[PathBuf],
    copies: usize,
    doc_bytes: usize,
    n_files: usize,
    work: &Path,
) -> Result<TextBenchInput> {
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io("read", f, e))?;
        let mut cur = String::new();
        for line in text.split_inclusive('\n') {
            cur.push_str(line);
            if cur.len() >= doc_bytes {
                docs.push(std::mem::take(&mut cur));
            }
        }
        if !cur.trim().is_empty() {
            docs.push(cur);
        }
    }
    let one = docs.clone();
    for _ in 1..copies.max(1) {
        docs.extend(one.iter().cloned());
    }
    let input_dir = work.join("input");
    std::fs::create_dir_all(&input_dir).map_err(|e| Error::io("create", &input_dir, e))?;
    let per = docs.len().div_ceil(n_files.max(1)).max(1);
    let mut all = String::new();
    for (i, chunk) in docs.chunks(per).enumerate() {
        let mut s = String::new();
        for d in chunk {
            s.push_str(&serde_json::json!({ "text": d }).to_string());
            s.push('\n');
        }
        let p = input_dir.join(format!("{i:03}.jsonl"));
        std::fs::write(&p, &s).map_err(|e| Error::io("write", &p, e))?;
        all.push_str(&s);
    }
    let all_jsonl = work.join("all.jsonl");
    std::fs::write(&all_jsonl, &all).map_err(|e| Error::io("write", &all_jsonl, e))?;
    Ok(TextBenchInput { documents: docs.len(), bytes: docs.iter().map(String::len).sum(), input_dir, all_jsonl })
}

/// `motley ingest` of the JSONL files into `work/corpus`, best of `repeat`.
pub fn run_ingest(
    input: &TextBenchInput,
    tokenizer: &Path,
    workers: usize,
    repeat: usize,
    work: &Path,
) -> Result<Timing> {
    let mut best = f64::INFINITY;
    let mut tokens = 0;
    for _ in 0..repeat.max(1) {
        let recipe = Recipe {
            tokenizers: TokenizerPaths { text: Some(tokenizer.to_path_buf()), image: None, speech: None },
            options: RecipeOptions { task_mib: 1.0, ..Default::default() },
            sources: vec![SourceSpec::new(SourceKind::Text, vec![input.input_dir.display().to_string()])],
        };
        let cfg = IngestConfig {
            recipe,
            out: work.join("corpus"),
            workers: Some(workers),
            limit: None,
            part: Default::default(),
            max_errors: None,
            overwrite: true,
            progress: false,
        };
        let t0 = std::time::Instant::now();
        let s = ingest(&cfg)?;
        best = best.min(t0.elapsed().as_secs_f64());
        tokens = s.tokens.text;
    }
    Ok(Timing { tokens, seconds: best, tokens_per_s: tokens as f64 / best })
}

/// HF Python `encode_batch` alone on the same documents (reading excluded), best of `repeat`.
pub fn run_python(
    python: &Path,
    script: &Path,
    input: &TextBenchInput,
    tokenizer: &Path,
    workers: usize,
    repeat: usize,
) -> Result<Timing> {
    let out = Command::new(python)
        .arg(script)
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--input")
        .arg(&input.all_jsonl)
        .arg("--threads")
        .arg(workers.to_string())
        .arg("--repeat")
        .arg(repeat.max(1).to_string())
        .env("RAYON_NUM_THREADS", workers.to_string())
        .output()
        .map_err(|e| bench_err(format!("run {} {}: {e}", python.display(), script.display())))?;
    if !out.status.success() {
        return Err(bench_err(format!("python baseline failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| bench_err(format!("python output: {e}")))?;
    let tokens = v["tokens"].as_u64().ok_or_else(|| bench_err("python output lacks tokens"))?;
    let seconds = v["seconds"].as_f64().ok_or_else(|| bench_err("python output lacks seconds"))?;
    Ok(Timing { tokens, seconds, tokens_per_s: tokens as f64 / seconds })
}
