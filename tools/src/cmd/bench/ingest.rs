//! `motley bench ingest`: text ingest end to end (JSONL files → finished shards, tokens/s)
//! against HF Python `tokenizers` `encode_batch` alone on the same documents and cores,
//! measured in the same run and printed as a ratio (goal ≥ 1.0). `--webdataset`: the
//! WebDataset tar reader against Python's `tarfile` on the same tars, and image ingest from
//! tars against the same images as files.

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
    /// Benchmark WebDataset input instead of text: the sample digits (data/sample/images.jsonl)
    /// `--copies` times as `--files` tars.
    #[arg(long)]
    webdataset: bool,
    /// Benchmark text ingest from an object store: the `--files` JSONL inputs are uploaded to
    /// this location (`s3://bucket/prefix`; credentials and endpoint from the environment) and
    /// ingested from there one object at a time and with `--fetch-ahead`, against the same
    /// files on disk.
    #[arg(long, value_name = "URI")]
    remote: Option<String>,
    /// Objects each task fetches ahead in the `--remote` run.
    #[arg(long, default_value_t = 8)]
    fetch_ahead: usize,
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
    if args.webdataset {
        let r = webdataset(&args, &inputs, workers, &work, ctx);
        if args.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&work);
        }
        return r;
    }
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
    if let Some(uri) = &args.remote {
        let r = remote(&args, uri, &input, &tokenizer, workers, &work, ctx);
        if args.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&work);
        }
        return r;
    }
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

/// `--remote URI`: the JSONL inputs uploaded there, then ingested from the files on disk (the
/// baseline), from the bucket one object at a time as each task reaches it, and from the
/// bucket with `--fetch-ahead` objects fetched ahead in parallel; tokens must agree.
fn remote(
    args: &Args,
    uri: &str,
    input: &bench::TextBenchInput,
    tokenizer: &Path,
    workers: usize,
    work: &Path,
    ctx: &Ctx,
) -> anyhow::Result<()> {
    let uri = uri.trim_end_matches('/');
    let mut objects = 0;
    for e in std::fs::read_dir(&input.input_dir)? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        motley_remote::put_file(&format!("{uri}/{name}"), &p, &ctx.remote)?;
        objects += 1;
    }
    let local = bench::run_ingest(input, tokenizer, workers, args.repeat, work)?;
    let one = bench::run_ingest_from(uri, tokenizer, workers, args.repeat, work, 0)?;
    let ahead = bench::run_ingest_from(uri, tokenizer, workers, args.repeat, work, args.fetch_ahead)?;
    let same = local.tokens == one.tokens && one.tokens == ahead.tokens;
    let (vs_one, vs_local) = (ahead.tokens_per_s / one.tokens_per_s, ahead.tokens_per_s / local.tokens_per_s);
    if ctx.json {
        return output::json(&serde_json::json!({
            "documents": input.documents,
            "input_bytes": input.bytes,
            "objects": objects,
            "workers": workers,
            "fetch_ahead": args.fetch_ahead,
            "local_files": local,
            "remote_one_at_a_time": one,
            "remote_fetch_ahead": ahead,
            "ratio_fetch_ahead_vs_one_at_a_time": vs_one,
            "ratio_fetch_ahead_vs_local": vs_local,
            "same_tokens": same,
        }));
    }
    output::line(format!(
        "input: {} documents, {:.1} MB in {objects} objects at {uri}, {workers} threads",
        input.documents,
        input.bytes as f64 / 1e6
    ))?;
    for (what, t) in [
        ("local files (baseline)", &local),
        ("object store, one at a time", &one),
        (&*format!("object store, {} ahead", args.fetch_ahead), &ahead),
    ] {
        output::line(format!("{what:<30} {} tokens in {:.3} s = {:.0} tokens/s", t.tokens, t.seconds, t.tokens_per_s))?;
    }
    output::line(format!(
        "fetch-ahead: {vs_one:.2}x one at a time, {vs_local:.2}x the local files{}",
        if same { "" } else { "  [token counts differ]" }
    ))
}

/// `--webdataset`: reader alone vs Python `tarfile`, then image ingest from tars vs files.
fn webdataset(args: &Args, text_inputs: &[PathBuf], workers: usize, work: &Path, ctx: &Ctx) -> anyhow::Result<()> {
    let input = bench::prepare_webdataset(Path::new("data/sample/images.jsonl"), args.copies, args.files, work)?;
    let reader = bench::read_webdataset_alone(&input, args.repeat)?;
    let py =
        bench::read_webdataset_python(&args.python, Path::new("scripts/bench/wds_tarfile.py"), &input, args.repeat)?;
    // Tokenizers for the end-to-end runs: a BPE on the text inputs, a VQ codebook on 200 digits.
    let text = work.join("text.json");
    let cfg = motley_tokenizers::TextTrainConfig { vocab_size: 2048, ..Default::default() };
    motley_tokenizers::TextTokenizer::train(text_inputs, &cfg)?.0.save(&text)?;
    let images: Vec<PathBuf> = (0..200).map(|i| PathBuf::from(format!("data/sample/images/{i:05}.png"))).collect();
    let vq_cfg = motley_tokenizers::VqConfig { codebook_size: 256, max_iter: 10, ..Default::default() };
    let (vq, _) = <motley_tokenizers::VqImageTokenizer as motley_tokenizers::Fit>::fit(
        &images,
        &vq_cfg,
        &indicatif::ProgressBar::hidden(),
    )?;
    let vq_path = work.join("vq.safetensors");
    motley_tokenizers::ImageTokenizer::save(&vq, &vq_path)?;
    let tars = bench::run_image_ingest(&input, true, &text, &vq_path, workers, args.repeat, work)?;
    let files = bench::run_image_ingest(&input, false, &text, &vq_path, workers, args.repeat, work)?;
    let (read_ratio, ingest_ratio) =
        (reader.samples_per_s / py.samples_per_s, tars.samples_per_s / files.samples_per_s);
    if ctx.json {
        return output::json(&serde_json::json!({
            "samples": input.samples,
            "tars": input.tars.len(),
            "tar_bytes": input.tar_bytes,
            "workers": workers,
            "motley_reader_alone": reader,
            "python_tarfile_alone": py,
            "read_ratio": read_ratio,
            "ingest_from_tars": tars,
            "ingest_from_files": files,
            "ingest_ratio": ingest_ratio,
        }));
    }
    output::line(format!(
        "input: {} captioned digits in {} tars, {:.1} MB (png + txt + json per sample)",
        input.samples,
        input.tars.len(),
        input.tar_bytes as f64 / 1e6
    ))?;
    output::line(format!(
        "motley WebDataset reader (1 thread):  {:.0} samples/s, {:.0} MB/s",
        reader.samples_per_s, reader.mb_per_s
    ))?;
    output::line(format!(
        "Python tarfile grouping (1 thread):   {:.0} samples/s, {:.0} MB/s",
        py.samples_per_s, py.mb_per_s
    ))?;
    output::line(format!("read ratio: {read_ratio:.2}x (goal >= 1.0)"))?;
    output::line(format!(
        "image ingest end to end, {workers} threads: from tars {:.0} images/s, from files + JSONL {:.0} images/s: {ingest_ratio:.2}x",
        tars.samples_per_s, files.samples_per_s
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
