//! `motley bench tokenizers`: text BPE encode throughput against HF Python `encode_batch`
//! (same tokenizer.json, same input, same thread count), speech real-time factor per core,
//! and image VQ images/s and tokens/s per core at the sample resolution and at 256×256;
//! `--only vae` / `vq-model`: a diffusers AutoencoderKL's / VQModel's images/s in motley
//! (candle) against diffusers (PyTorch); `--only mimi`: a transformers MimiModel's audio
//! real-time factor in motley against transformers — each in the same run, on the same model
//! file, inputs, batch, threads and device (`--encoder-device`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use indicatif::ProgressBar;
use motley_tokenizers::{
    AudioTokenizer, ImageTokenizer, SpeechConfig, SpeechTokenizer, TextTokenizer, TextTrainConfig, VqConfig,
    VqImageTokenizer,
};
use rayon::prelude::*;
use serde_json::json;

use crate::cmd::tokenizer::collect_inputs;
use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which parts to run.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["text".to_string(), "speech".to_string(), "image".to_string()])]
    only: Vec<String>,
    /// Text corpus (one document per line); default: data/sample text files, else a generated corpus.
    #[arg(long)]
    text: Option<PathBuf>,
    /// tokenizer.json for the text benchmark; default: train one (--vocab-size) on the corpus.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 8192)]
    vocab_size: u32,
    /// Repeat the corpus until it has at least this many MiB.
    #[arg(long, default_value_t = 8.0)]
    text_mib: f64,
    /// Threads for the text comparison (both sides).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Python with HF `tokenizers`.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    #[arg(long, default_value = "scripts/bench/text_hf.py")]
    python_script: PathBuf,
    /// Audio files or directories; default: data/sample audio, else generated clips.
    #[arg(long)]
    audio: Option<PathBuf>,
    /// Image files or directories; default: data/sample images, else generated images.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Seconds to spend timing each speech / image measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// `--only vae`: a diffusers AutoencoderKL folder; default: one of Stable Diffusion's VAE
    /// geometry, randomly initialized by diffusers for the run (no download).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// `--only vae`: image side and batch size, the same for motley and diffusers.
    #[arg(long, default_value_t = 256)]
    vae_resolution: u32,
    #[arg(long, default_value_t = 4)]
    vae_batch: usize,
    #[arg(long, default_value = "scripts/bench/vae_diffusers.py")]
    vae_script: PathBuf,
    /// `--only vq-model`: a diffusers VQModel folder; default: a VQ-GAN of Chameleon's geometry
    /// (16x downsampling, 8192 codes), randomly initialized by diffusers for the run.
    #[arg(long)]
    vq_model: Option<PathBuf>,
    /// `--only mimi`: a transformers MimiModel folder; default: the released kyutai/mimi
    /// geometry, randomly initialized by transformers for the run (no download).
    #[arg(long)]
    mimi: Option<PathBuf>,
    /// `--only mimi`: codebooks kept per frame, the same on both sides (Moshi keeps 8).
    #[arg(long, default_value_t = 8)]
    mimi_codebooks: usize,
    #[arg(long, default_value = "scripts/bench/mimi_transformers.py")]
    mimi_script: PathBuf,
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let tmp = std::env::temp_dir().join(format!("motley-bench-tokenizers-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut results = serde_json::Map::new();
    let wants = |s: &str| args.only.iter().any(|o| o == s);
    if wants("text") {
        results.insert("text".into(), bench_text(&args, &tmp, ctx)?);
    }
    if wants("speech") {
        results.insert("speech".into(), bench_speech(&args, &tmp, ctx)?);
    }
    if wants("image") {
        results.insert("image".into(), bench_image(&args, &tmp, ctx)?);
    }
    if wants("vae") {
        results.insert("vae".into(), bench_vae(&args, &tmp, ctx, false)?);
    }
    if wants("vq-model") {
        results.insert("vq_model".into(), bench_vae(&args, &tmp, ctx, true)?);
    }
    if wants("mimi") {
        results.insert("mimi".into(), bench_mimi(&args, &tmp, ctx)?);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if ctx.json {
        output::json(&serde_json::Value::Object(results))?;
    }
    Ok(())
}

fn sample_dir() -> PathBuf {
    PathBuf::from("data/sample")
}

fn find_inputs(given: &Option<PathBuf>, exts: &[&str]) -> Option<Vec<PathBuf>> {
    let root = given.clone().unwrap_or_else(sample_dir);
    collect_inputs(&[root], exts).ok().filter(|v| !v.is_empty())
}

/// `cpu` or `cuda:N`: where `--encoder-device` puts the pretrained encoders.
fn encoder_device_name() -> anyhow::Result<String> {
    use motley_tokenizers::pretrained::{device_name, encoder_device};
    Ok(device_name(&encoder_device()?))
}

fn pool(threads: usize) -> anyhow::Result<rayon::ThreadPool> {
    Ok(rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build()?)
}

/// Runs `f` repeatedly for about `secs` seconds (at least twice); returns (calls, seconds).
fn time_for(secs: f64, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(usize, f64)> {
    f()?; // warm-up
    let start = Instant::now();
    let mut n = 0;
    while n < 2 || start.elapsed().as_secs_f64() < secs {
        f()?;
        n += 1;
    }
    Ok((n, start.elapsed().as_secs_f64()))
}

fn bench_text(args: &Args, tmp: &Path, ctx: &Ctx) -> anyhow::Result<serde_json::Value> {
    // Corpus: given file, sample text files, or generated text; repeated to the target size.
    let mut base = String::new();
    let sources = match &args.text {
        Some(p) => vec![p.clone()],
        None => find_inputs(&None, &["txt"]).unwrap_or_default(),
    };
    for s in &sources {
        base.push_str(&std::fs::read_to_string(s).with_context(|| format!("reading {}", s.display()))?);
        base.push('\n');
    }
    if base.trim().is_empty() {
        base = generated_text(20_000);
    }
    let mut corpus = String::new();
    while (corpus.len() as f64) < args.text_mib * (1 << 20) as f64 {
        corpus.push_str(&base);
        if !base.ends_with('\n') {
            corpus.push('\n');
        }
    }
    let corpus_path = tmp.join("corpus.txt");
    std::fs::write(&corpus_path, &corpus)?;
    let lines: Vec<&str> = corpus.lines().filter(|l| !l.is_empty()).collect();

    let tok_path = match &args.tokenizer {
        Some(p) => p.clone(),
        None => {
            let train_path = tmp.join("train.txt");
            std::fs::write(&train_path, &base)?;
            let cfg = TextTrainConfig { vocab_size: args.vocab_size, ..Default::default() };
            let (t, _) = TextTokenizer::train(&[train_path], &cfg)?;
            let p = tmp.join("tokenizer.json");
            t.save(&p)?;
            p
        }
    };
    let tok = TextTokenizer::from_file(&tok_path)?;
    let pool = pool(args.threads)?;
    let batches: Vec<&[&str]> = lines.chunks(args.batch_size.max(1)).collect();
    let mut best = f64::INFINITY;
    let (mut tokens, mut id_sum) = (0usize, 0u64);
    for _ in 0..args.repeat.max(1) {
        let start = Instant::now();
        let out: Vec<Vec<Vec<u32>>> =
            pool.install(|| batches.iter().map(|b| tok.encode_batch(b)).collect::<Result<_, _>>())?;
        best = best.min(start.elapsed().as_secs_f64());
        tokens = out.iter().flatten().map(Vec::len).sum();
        id_sum = out.iter().flatten().flatten().map(|&i| i as u64).sum();
    }
    let bytes: usize = lines.iter().map(|l| l.len()).sum();

    let py = std::process::Command::new(&args.python)
        .arg(&args.python_script)
        .arg("--tokenizer")
        .arg(&tok_path)
        .arg("--input")
        .arg(&corpus_path)
        .arg("--batch-size")
        .arg(args.batch_size.to_string())
        .arg("--repeat")
        .arg(args.repeat.to_string())
        .env("RAYON_NUM_THREADS", args.threads.to_string())
        .env("RAYON_RS_NUM_CPUS", args.threads.to_string())
        .env("TOKENIZERS_PARALLELISM", "true")
        .output()
        .with_context(|| format!("running {} {}", args.python.display(), args.python_script.display()))?;
    if !py.status.success() {
        anyhow::bail!("Python baseline failed: {}", String::from_utf8_lossy(&py.stderr));
    }
    let pj: serde_json::Value = serde_json::from_slice(&py.stdout).context("parsing the Python baseline's JSON")?;
    let py_secs = pj["seconds"].as_f64().unwrap_or(f64::NAN);
    let same_ids = pj["tokens"].as_u64() == Some(tokens as u64) && pj["id_sum"].as_u64() == Some(id_sum);
    let ratio = py_secs / best;
    let r = json!({
        "tokenizer": tok_path, "threads": args.threads, "lines": lines.len(), "bytes": bytes, "tokens": tokens,
        "rust_seconds": best, "python_seconds": py_secs,
        "rust_mib_per_s": bytes as f64 / best / (1 << 20) as f64,
        "python_mib_per_s": bytes as f64 / py_secs / (1 << 20) as f64,
        "rust_tokens_per_s": tokens as f64 / best,
        "ratio_vs_hf_python": ratio, "same_ids_as_python": same_ids,
    });
    if !ctx.json {
        output::line(format!(
            "text BPE encode ({} threads, {:.1} MiB, {} lines, {} tokens): motley {:.1} MiB/s, HF Python encode_batch {:.1} MiB/s, ratio {:.2}x (goal >= 1.0); ids identical: {}",
            args.threads,
            bytes as f64 / (1 << 20) as f64,
            lines.len(),
            tokens,
            bytes as f64 / best / (1 << 20) as f64,
            bytes as f64 / py_secs / (1 << 20) as f64,
            ratio,
            same_ids
        ))?;
    }
    Ok(r)
}

fn generated_text(lines: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "of",
        "and",
        "model",
        "tokens",
        "image",
        "speech",
        "mixture",
        "transformer",
        "modality",
        "shard",
        "loader",
        "training",
        "sparse",
        "dense",
        "attention",
        "global",
        "tower",
        "Zürich",
        "naïve",
        "日本語",
        "🙂",
        "2026",
        "x=1+2;",
    ];
    let mut s = String::new();
    let mut state = 12345u64;
    for _ in 0..lines {
        let n = 6 + state % 20;
        for i in 0..n {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if i > 0 {
                s.push(' ');
            }
            s.push_str(WORDS[((state >> 33) % WORDS.len() as u64) as usize]);
        }
        s.push('\n');
    }
    s
}

fn bench_speech(args: &Args, tmp: &Path, ctx: &Ctx) -> anyhow::Result<serde_json::Value> {
    let files = match find_inputs(&args.audio, &["wav", "flac", "mp3", "ogg"]) {
        Some(f) => f,
        None => {
            // Generated harmonic "babble" at 22.05 kHz so the resampler is exercised too.
            (0..8)
                .map(|i| -> anyhow::Result<PathBuf> {
                    let p = tmp.join(format!("clip{i}.wav"));
                    let rate = 22_050u32;
                    let samples: Vec<f32> = (0..rate * 4)
                        .map(|n| {
                            let t = n as f32 / rate as f32;
                            let f0 = 100.0 + 40.0 * ((t * 2.0 + i as f32).sin());
                            (1..8)
                                .map(|h| (2.0 * std::f32::consts::PI * f0 * h as f32 * t).sin() / h as f32)
                                .sum::<f32>()
                                * 0.2
                        })
                        .collect();
                    std::fs::write(&p, motley_tokenizers::speech::audio::wav_bytes(&samples, rate)?)?;
                    Ok(p)
                })
                .collect::<anyhow::Result<_>>()?
        }
    };
    let pb = ProgressBar::hidden();
    let probe = SpeechConfig { units: 2, max_iter: 1, ..SpeechConfig::default() };
    let (_, s0) = SpeechTokenizer::fit_files(&files, &probe, &pb)?;
    let units = 500.min((s0.frames / 2) as u32).max(2);
    let cfg = SpeechConfig { units, max_iter: 10, ..SpeechConfig::default() };
    let (tok, fit) = SpeechTokenizer::fit_files(&files, &cfg, &pb)?;
    let bytes: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| Ok((p.display().to_string(), std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)))
        .collect::<anyhow::Result<_>>()?;
    let one = pool(1)?;
    // Per core: everything on one thread, from file bytes (decode + resample + features + units).
    let (n, secs) = one.install(|| {
        time_for(args.seconds, || {
            for (name, b) in &bytes {
                let hint = Path::new(name).extension().and_then(|e| e.to_str());
                tok.encode_bytes(b, hint, name)?;
            }
            Ok(())
        })
    })?;
    let audio_secs = fit.audio_seconds * n as f64;
    let rtf = audio_secs / secs;
    // Decode-only reference (symphonia + resample) to show where time goes.
    let (nd, dsecs) = one.install(|| {
        time_for(args.seconds / 2.0, || {
            for (name, b) in &bytes {
                let hint = Path::new(name).extension().and_then(|e| e.to_str());
                let a = motley_tokenizers::speech::audio::decode_bytes(b, hint, name)?;
                motley_tokenizers::speech::audio::resample(&a, 16_000, name)?;
            }
            Ok(())
        })
    })?;
    let decode_rtf = fit.audio_seconds * nd as f64 / dsecs;
    let r = json!({
        "files": files.len(), "audio_seconds": fit.audio_seconds, "units": units,
        "real_time_factor_per_core": rtf, "goal": 500.0, "ratio_vs_goal": rtf / 500.0,
        "decode_resample_only_rtf": decode_rtf, "fit_seconds": fit.seconds,
    });
    if !ctx.json {
        output::line(format!(
            "speech units ({} files, {:.1} s audio, {} units, 1 core): real-time factor {:.0}x (goal 500x, ratio {:.2}); \
             decode+resample alone {:.0}x; fit took {:.2} s",
            files.len(),
            fit.audio_seconds,
            units,
            rtf,
            rtf / 500.0,
            decode_rtf,
            fit.seconds
        ))?;
    }
    Ok(r)
}

fn bench_image(args: &Args, tmp: &Path, ctx: &Ctx) -> anyhow::Result<serde_json::Value> {
    let files = match find_inputs(&args.images, &["png", "jpg", "jpeg"]) {
        Some(f) => f,
        None => (0..64)
            .map(|i| -> anyhow::Result<PathBuf> {
                let p = tmp.join(format!("img{i}.png"));
                let img = image::RgbImage::from_fn(320, 256, |x, y| {
                    image::Rgb([
                        ((x * 3 + i * 17) % 256) as u8,
                        ((y * 5 + i * 29) % 256) as u8,
                        (((x ^ y) + i) % 256) as u8,
                    ])
                });
                img.save(&p)?;
                Ok(p)
            })
            .collect::<anyhow::Result<_>>()?,
    };
    // A fixed subset keeps each timing pass short at 256x256.
    let bytes: Vec<(String, Vec<u8>)> = files
        .iter()
        .take(128)
        .map(|p| Ok((p.display().to_string(), std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)))
        .collect::<anyhow::Result<_>>()?;
    let decoded: Vec<image::DynamicImage> =
        bytes.par_iter().map(|(n, b)| motley_tokenizers::decode_image_bytes(b, n)).collect::<Result<_, _>>()?;
    let sample_res = decoded.first().map_or(32, |i| i.width().min(i.height())).clamp(8, 256) / 4 * 4;
    let one = pool(1)?;
    let mut out = Vec::new();
    for (res, patch, k) in [(sample_res.max(8), 4u32, 256u32), (256, 8, 256)] {
        // The codebook only needs to exist to time encoding; a bounded fit keeps the run short.
        let fit_on = &decoded[..decoded.len().min(256)];
        let patches = (fit_on.len() * (res / patch).pow(2) as usize).max(1);
        let k = k.min(patches as u32 / 2).max(2);
        let cfg = VqConfig {
            resolution: res,
            patch,
            codebook_size: k,
            max_iter: 5,
            max_patches: 50_000,
            ..VqConfig::default()
        };
        let (tok, fit) = VqImageTokenizer::fit_images(fit_on, &cfg, &ProgressBar::hidden())?;
        let (n, secs) = one.install(|| {
            time_for(args.seconds, || {
                for (name, b) in &bytes {
                    tok.encode_bytes(b, name)?;
                }
                Ok(())
            })
        })?;
        let (nd, dsecs) = one.install(|| {
            time_for(args.seconds / 2.0, || {
                for (name, b) in &bytes {
                    motley_tokenizers::decode_image_bytes(b, name)?;
                }
                Ok(())
            })
        })?;
        let (ne, esecs) = one.install(|| {
            time_for(args.seconds / 2.0, || {
                for img in &decoded {
                    tok.encode_image(img, None)?;
                }
                Ok(())
            })
        })?;
        let ips = (n * bytes.len()) as f64 / secs;
        let tokens_per_image = (res / patch).pow(2) as f64;
        let decode_ips = (nd * bytes.len()) as f64 / dsecs;
        let encode_only_ips = (ne * decoded.len()) as f64 / esecs;
        let r = json!({
            "resolution": res, "patch": patch, "codebook_size": k, "images": bytes.len(),
            "images_per_s_per_core": ips, "tokens_per_s_per_core": ips * tokens_per_image,
            "encode_only_images_per_s": encode_only_ips, "image_decode_only_images_per_s": decode_ips,
            "ratio_vs_image_decode": ips / decode_ips, "psnr_holdout": fit.psnr_holdout,
        });
        if !ctx.json {
            output::line(format!(
                "image VQ {res}x{res}, {patch}px patches, {k} codes ({} images, 1 core): {:.0} images/s, {:.0} tokens/s from file bytes; \
                 {:.0} images/s from decoded images; PNG/JPEG decode alone {:.0} images/s (ratio {:.2}); held-out PSNR {:.2} dB",
                bytes.len(),
                ips,
                ips * tokens_per_image,
                encode_only_ips,
                decode_ips,
                ips / decode_ips,
                fit.psnr_holdout
            ))?;
        }
        out.push(r);
    }
    Ok(serde_json::Value::Array(out))
}

/// Runs a Python bench script; its last stdout line is JSON.
fn python_json(args: &Args, script: &Path, cmd_args: &[std::ffi::OsString]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(&args.python)
        .arg(script)
        .args(cmd_args)
        .output()
        .with_context(|| format!("running {} {}", args.python.display(), script.display()))?;
    anyhow::ensure!(out.status.success(), "{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(line.lines().last().unwrap_or_default())?)
}

/// A diffusers AutoencoderKL (`vq = false`) or VQModel: images/s, motley against diffusers.
fn bench_vae(args: &Args, tmp: &Path, ctx: &Ctx, vq: bool) -> anyhow::Result<serde_json::Value> {
    use motley_tokenizers::pretrained::{AutoencoderKlTokenizer, VaeOptions, VqModelTokenizer};
    let res = args.vae_resolution;
    let files = find_inputs(&args.images, &["png", "jpg", "jpeg"]).context("no images to encode")?;
    // Both sides read the same squared PNGs, so neither resizes.
    let mut squared = Vec::new();
    let mut paths = Vec::new();
    for (i, f) in files.iter().take(args.vae_batch.max(1)).enumerate() {
        let img = motley_tokenizers::image::read_image(f)?;
        let sq = motley_tokenizers::image::square(&img, res, None)?;
        let p = tmp.join(format!("vae{i}.png"));
        sq.save(&p)?;
        squared.push(sq);
        paths.push(p);
    }
    let (given, default_dir, arch) = if vq { (&args.vq_model, "vq-gan", "vq") } else { (&args.vae, "vae-sd", "kl") };
    let model = given.clone().unwrap_or_else(|| tmp.join(default_dir));
    // Both sides on the device motley's encoders use (--encoder-device).
    let device = encoder_device_name()?;
    let mut py_args: Vec<std::ffi::OsString> = vec!["--out".into(), model.clone().into(), "--images".into()];
    py_args.extend(paths.iter().map(|p| p.clone().into_os_string()));
    for (k, v) in [
        ("--resolution", res.to_string()),
        ("--batch", args.vae_batch.to_string()),
        ("--threads", args.threads.to_string()),
        ("--seconds", args.seconds.to_string()),
        ("--arch", arch.to_string()),
        ("--device", device.clone()),
    ] {
        py_args.extend([k.into(), v.into()]);
    }
    if given.is_none() {
        py_args.push("--save".into());
    }
    // diffusers builds (or reads) the model first; motley then loads the very same files.
    let torch = python_json(args, &args.vae_script, &py_args)?;
    let refs: Vec<&image::RgbImage> = squared.iter().collect();
    let threads = pool(args.threads)?;
    let (name, (n, secs)) = if vq {
        let t = VqModelTokenizer::from_folder(&model, Some(res))?;
        let timed = threads.install(|| {
            time_for(args.seconds, || {
                // One image per forward pass, rayon across images (as ingest does).
                refs.par_iter().map(|img| t.encode_codes(img).map(|_| ())).collect::<Result<Vec<()>, _>>()?;
                Ok(())
            })
        })?;
        (t.model_name().to_string(), timed)
    } else {
        let t = AutoencoderKlTokenizer::from_folder(&model, VaeOptions { resolution: Some(res), patch: 2 })?;
        let timed = threads.install(|| {
            time_for(args.seconds, || {
                t.encode_latents(&refs)?;
                Ok(())
            })
        })?;
        (t.model_name().to_string(), timed)
    };
    let motley_ips = (n * refs.len()) as f64 / secs;
    let torch_ips = torch["images_per_s"].as_f64().unwrap_or(f64::NAN);
    let what = if vq { "vq-model" } else { "vae" };
    if !ctx.json {
        output::line(format!(
            "{what} {name} ({res}x{res} px, batch {}, {} threads, {device}): motley {motley_ips:.2} images/s, diffusers {torch_ips:.2} images/s: {:.2}x",
            refs.len(),
            args.threads,
            motley_ips / torch_ips
        ))?;
    }
    Ok(json!({
        "model": name,
        "resolution": res,
        "batch": refs.len(),
        "threads": args.threads,
        "device": device,
        "motley_images_per_s": motley_ips,
        "diffusers_images_per_s": torch_ips,
        "ratio": motley_ips / torch_ips,
        "diffusers": torch,
    }))
}

/// A transformers MimiModel: the real-time factor (encode seconds per audio second) of the
/// sample clips at 24 kHz, one clip per call, motley against transformers.
fn bench_mimi(args: &Args, tmp: &Path, ctx: &Ctx) -> anyhow::Result<serde_json::Value> {
    use motley_tokenizers::AudioTokenizer;
    use motley_tokenizers::pretrained::MimiTokenizer;
    let files = find_inputs(&args.audio, &["wav", "flac", "mp3", "ogg"]).context("no audio to encode")?;
    // Both sides read the same 24 kHz WAVs (resampled once here), so neither resamples.
    let mut clips = Vec::new();
    let mut paths = Vec::new();
    let mut audio_s = 0.0;
    for (i, f) in files.iter().take(16).enumerate() {
        let a = motley_tokenizers::speech::audio::decode_file(f)?;
        let x = motley_tokenizers::speech::audio::resample(&a, 24_000, &f.display().to_string())?;
        let p = tmp.join(format!("clip{i}.wav"));
        std::fs::write(&p, motley_tokenizers::speech::audio::wav_bytes(&x, 24_000)?)?;
        // What the WAV holds (16-bit), so both sides encode the same samples.
        let x = motley_tokenizers::speech::audio::decode_file(&p)?.samples;
        audio_s += x.len() as f64 / 24_000.0;
        clips.push(x);
        paths.push(p);
    }
    let model = args.mimi.clone().unwrap_or_else(|| tmp.join("mimi"));
    let device = encoder_device_name()?;
    let mut py_args: Vec<std::ffi::OsString> = vec!["--out".into(), model.clone().into(), "--clips".into()];
    py_args.extend(paths.iter().map(|p| p.clone().into_os_string()));
    for (k, v) in [
        ("--codebooks", args.mimi_codebooks.to_string()),
        ("--threads", args.threads.to_string()),
        ("--seconds", args.seconds.to_string()),
        ("--device", device.clone()),
    ] {
        py_args.extend([k.into(), v.into()]);
    }
    if args.mimi.is_none() {
        py_args.push("--save".into());
    }
    let torch = python_json(args, &args.mimi_script, &py_args)?;
    let mimi = MimiTokenizer::from_folder(&model, Some(args.mimi_codebooks))?;
    let threads = pool(args.threads)?;
    // One clip per call, serially: the same work as the PyTorch side, whose threads go inside.
    let (n, secs) = threads.install(|| {
        time_for(args.seconds, || {
            for c in &clips {
                mimi.encode_codes(c)?;
            }
            Ok(())
        })
    })?;
    let motley_rtf = secs / (n as f64 * audio_s);
    let torch_rtf = torch["rtf"].as_f64().unwrap_or(f64::NAN);
    if !ctx.json {
        output::line(format!(
            "mimi {} ({} clips, {audio_s:.1} s of audio, {} codebooks, {} threads, {device}): real-time factor motley {motley_rtf:.3}, transformers {torch_rtf:.3}: motley {:.2}x as fast",
            mimi.model_name(),
            clips.len(),
            mimi.codebooks(),
            args.threads,
            torch_rtf / motley_rtf
        ))?;
    }
    Ok(json!({
        "model": mimi.model_name(),
        "clips": clips.len(),
        "audio_seconds": audio_s,
        "codebooks": mimi.codebooks(),
        "tokens_per_second_of_audio": mimi.frame_rate(),
        "threads": args.threads,
        "device": device,
        "motley_rtf": motley_rtf,
        "transformers_rtf": torch_rtf,
        "speedup": torch_rtf / motley_rtf,
        "transformers": torch,
    }))
}
