//! The ingest benchmarks shared by `motley bench ingest` and `examples/bench_text.rs`. Text:
//! the same documents go through `motley ingest` end to end (JSONL files → finished shards)
//! and through HF Python `tokenizers` `encode_batch` alone (scripts/bench/ingest_hf.py).
//! WebDataset: motley's tar reader against Python's `tarfile` grouping the same samples
//! (scripts/bench/wds_tarfile.py), and image ingest from tars against the same images as files.

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
    run_ingest_from(&input.input_dir.display().to_string(), tokenizer, workers, repeat, work, 0)
}

/// `motley ingest` of the JSONL files at `source` (a folder, or an object-store location
/// when the binary registered a store) into `work/corpus`, each task fetching `fetch_ahead`
/// objects ahead; best of `repeat`.
pub fn run_ingest_from(
    source: &str,
    tokenizer: &Path,
    workers: usize,
    repeat: usize,
    work: &Path,
    fetch_ahead: usize,
) -> Result<Timing> {
    let recipe = Recipe {
        tokenizers: TokenizerPaths { text: Some(tokenizer.to_path_buf()), image: None, speech: None },
        options: RecipeOptions { task_mib: 1.0, ..Default::default() },
        sources: vec![SourceSpec::new(SourceKind::Text, vec![source.to_string()])],
    };
    let (s, best) = timed_ingest(recipe, work.join("corpus"), workers, repeat, fetch_ahead)?;
    let tokens = s.tokens.text;
    Ok(Timing { tokens, seconds: best, tokens_per_s: tokens as f64 / best })
}

/// `motley ingest` of `recipe` into `out` (overwritten), best of `repeat`: the last summary and
/// the best time in seconds.
fn timed_ingest(
    recipe: Recipe,
    out: PathBuf,
    workers: usize,
    repeat: usize,
    fetch_ahead: usize,
) -> Result<(crate::run::Summary, f64)> {
    let cfg = IngestConfig {
        recipe,
        out,
        workers: Some(workers),
        limit: None,
        part: Default::default(),
        max_errors: None,
        overwrite: true,
        progress: false,
        upload: None,
        fetch_ahead,
    };
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t0 = std::time::Instant::now();
        last = Some(ingest(&cfg)?);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let summary = last.ok_or_else(|| bench_err("no run"))?;
    Ok((summary, best))
}

/// The one JSON object a baseline script printed on stdout.
fn python_json(out: std::io::Result<std::process::Output>, python: &Path, script: &Path) -> Result<serde_json::Value> {
    let out = out.map_err(|e| bench_err(format!("run {} {}: {e}", python.display(), script.display())))?;
    if !out.status.success() {
        return Err(bench_err(format!("python baseline failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| bench_err(format!("python output: {e}")))
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
        .output();
    let v = python_json(out, python, script)?;
    let tokens = v["tokens"].as_u64().ok_or_else(|| bench_err("python output lacks tokens"))?;
    let seconds = v["seconds"].as_f64().ok_or_else(|| bench_err("python output lacks seconds"))?;
    Ok(Timing { tokens, seconds, tokens_per_s: tokens as f64 / seconds })
}

/// WebDataset benchmark input: the same captioned images as tars (`KEY.png`, `KEY.txt`,
/// `KEY.json`, as img2dataset writes them) and as image files listed in a JSONL.
#[derive(Debug, Clone)]
pub struct WdsBenchInput {
    pub samples: usize,
    /// Bytes of the tars.
    pub tar_bytes: u64,
    pub tars: Vec<PathBuf>,
    pub jsonl: PathBuf,
}

/// Reads `images_jsonl` (`{"image": path relative to it, "caption": …}` lines), repeats its
/// records `copies` times, and writes them to `work` as `n_tars` tars and as files + JSONL.
pub fn prepare_webdataset(images_jsonl: &Path, copies: usize, n_tars: usize, work: &Path) -> Result<WdsBenchInput> {
    let base = images_jsonl.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(images_jsonl).map_err(|e| Error::io("read", images_jsonl, e))?;
    let mut records = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(bench_err)?;
        let (Some(img), Some(cap)) = (v["image"].as_str(), v["caption"].as_str()) else { continue };
        let p = base.join(img);
        let bytes = std::fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
        records.push((bytes, cap.to_string(), line.to_string()));
    }
    let files_dir = work.join("files");
    std::fs::create_dir_all(&files_dir).map_err(|e| Error::io("create", &files_dir, e))?;
    let n = records.len() * copies.max(1);
    let per_tar = n.div_ceil(n_tars.max(1)).max(1);
    let (mut tars, mut jsonl, mut tar_bytes) = (Vec::new(), String::new(), 0u64);
    let mut builder: Option<tar::Builder<Vec<u8>>> = None;
    let flush = |b: tar::Builder<Vec<u8>>, tars: &mut Vec<PathBuf>, tar_bytes: &mut u64| -> Result<()> {
        let bytes = b.into_inner().map_err(bench_err)?;
        let p = work.join(format!("shard-{:06}.tar", tars.len()));
        std::fs::write(&p, &bytes).map_err(|e| Error::io("write", &p, e))?;
        *tar_bytes += bytes.len() as u64;
        tars.push(p);
        Ok(())
    };
    for k in 0..n {
        let (img, cap, meta) = &records[k % records.len()];
        let key = format!("{k:09}");
        let b = builder.get_or_insert_with(|| tar::Builder::new(Vec::new()));
        for (ext, data) in [("png", img.as_slice()), ("txt", cap.as_bytes()), ("json", meta.as_bytes())] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{key}.{ext}"), data).map_err(bench_err)?;
        }
        let file = files_dir.join(format!("{key}.png"));
        std::fs::write(&file, img).map_err(|e| Error::io("write", &file, e))?;
        jsonl.push_str(&serde_json::json!({"image": file, "caption": cap}).to_string());
        jsonl.push('\n');
        if (k + 1) % per_tar == 0
            && let Some(b) = builder.take()
        {
            flush(b, &mut tars, &mut tar_bytes)?;
        }
    }
    if let Some(b) = builder.take() {
        flush(b, &mut tars, &mut tar_bytes)?;
    }
    let jsonl_path = work.join("files.jsonl");
    std::fs::write(&jsonl_path, jsonl).map_err(|e| Error::io("write", &jsonl_path, e))?;
    Ok(WdsBenchInput { samples: n, tar_bytes, tars, jsonl: jsonl_path })
}

/// One side's best time at reading samples.
#[derive(Debug, Clone, Serialize)]
pub struct ReadTiming {
    pub samples: u64,
    pub seconds: f64,
    pub samples_per_s: f64,
    pub mb_per_s: f64,
}

/// motley's WebDataset reader alone (tar → grouped samples with their bytes), one thread,
/// best of `repeat`.
pub fn read_webdataset_alone(input: &WdsBenchInput, repeat: usize) -> Result<ReadTiming> {
    let spec = SourceSpec::new(SourceKind::Image, vec![]);
    let options = RecipeOptions::default();
    let ctx = crate::source::ReadCtx { spec: &spec, options: &options };
    let (mut best, mut samples) = (f64::INFINITY, 0u64);
    for _ in 0..repeat.max(1) {
        let t0 = std::time::Instant::now();
        let mut ok = 0u64;
        for t in &input.tars {
            let unit = crate::plan::Unit {
                file: t.clone(),
                format: crate::plan::FileFormat::WebDataset,
                bytes: 0,
                row_groups: None,
                first_row: 0,
                remote: None,
            };
            let _ = crate::source::read_unit(&ctx, &unit, &mut |item| {
                ok += u64::from(item.is_ok());
                std::ops::ControlFlow::Continue(())
            });
        }
        best = best.min(t0.elapsed().as_secs_f64());
        samples = ok;
    }
    if samples != input.samples as u64 {
        return Err(bench_err(format!("read {samples} of {} samples", input.samples)));
    }
    Ok(ReadTiming {
        samples,
        seconds: best,
        samples_per_s: samples as f64 / best,
        mb_per_s: input.tar_bytes as f64 / 1e6 / best,
    })
}

/// Python's `tarfile` reading the same tars into samples grouped by key, as the `webdataset`
/// library does (scripts/bench/wds_tarfile.py), best of `repeat`.
pub fn read_webdataset_python(
    python: &Path,
    script: &Path,
    input: &WdsBenchInput,
    repeat: usize,
) -> Result<ReadTiming> {
    let out =
        Command::new(python).arg(script).arg("--repeat").arg(repeat.max(1).to_string()).args(&input.tars).output();
    let v = python_json(out, python, script)?;
    let samples = v["samples"].as_u64().ok_or_else(|| bench_err("python output lacks samples"))?;
    let seconds = v["seconds"].as_f64().ok_or_else(|| bench_err("python output lacks seconds"))?;
    Ok(ReadTiming {
        samples,
        seconds,
        samples_per_s: samples as f64 / seconds,
        mb_per_s: input.tar_bytes as f64 / 1e6 / seconds,
    })
}

/// `motley ingest` of the images (VQ `image_tokenizer`, captions with `text_tokenizer`) from
/// the tars or from the files + JSONL into `work/corpus-*`, best of `repeat`: images/s.
pub fn run_image_ingest(
    input: &WdsBenchInput,
    from_tars: bool,
    text_tokenizer: &Path,
    image_tokenizer: &Path,
    workers: usize,
    repeat: usize,
    work: &Path,
) -> Result<ReadTiming> {
    let paths = if from_tars {
        input.tars.iter().map(|p| p.display().to_string()).collect()
    } else {
        vec![input.jsonl.display().to_string()]
    };
    let mut spec = SourceSpec::new(SourceKind::Image, paths);
    spec.text_first = Some(1.0);
    let recipe = Recipe {
        tokenizers: TokenizerPaths {
            text: Some(text_tokenizer.to_path_buf()),
            image: Some(image_tokenizer.to_path_buf()),
            speech: None,
        },
        options: RecipeOptions { task_mib: 1.0, ..Default::default() },
        sources: vec![spec],
    };
    let out = work.join(if from_tars { "corpus-tars" } else { "corpus-files" });
    let (s, best) = timed_ingest(recipe, out, workers, repeat, 0)?;
    let samples = s.documents;
    Ok(ReadTiming {
        samples,
        seconds: best,
        samples_per_s: samples as f64 / best,
        mb_per_s: input.tar_bytes as f64 / 1e6 / best,
    })
}
