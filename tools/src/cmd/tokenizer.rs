//! `motley tokenizer ...`: train the text BPE, fit the image VQ / latent patches and the
//! speech units, and encode / decode single inputs to see what the model sees.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use motley_shards::{Modality, Segment, SegmentData, SegmentMeta};
use motley_tokenizers::{
    AudioTokenizer, ImageTokenizer, LatentConfig, LatentImageTokenizer, MelConfig, ModalityTokenizer, SpeechConfig,
    SpeechTokenizer, TextTokenizer, TextTrainConfig, VqConfig, VqImageTokenizer,
};
use serde_json::json;

use crate::output::{self, Ctx};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Train a byte-level BPE (HF tokenizers) on text files; writes tokenizer.json.
    TrainText(TrainTextArgs),
    /// Fit an image tokenizer: VQ codebook (k-means++) or latent patches (optional PCA).
    FitImage(FitImageArgs),
    /// Fit discrete speech units (k-means++ over log-mel frames).
    FitSpeech(FitSpeechArgs),
    /// Import a pretrained model folder (diffusers AutoencoderKL or VQModel, transformers
    /// MimiModel: config.json + safetensors) as one tokenizer file that ingest, `shards decode`
    /// and `sample` use like a fitted one.
    Import(ImportArgs),
    /// Encode one input with any tokenizer file; prints the ids (or latent shape).
    Encode(EncodeArgs),
    /// Decode ids back to text, PNG or WAV + spectrogram PNG.
    Decode(DecodeArgs),
}

#[derive(Debug, clap::Args)]
pub struct TrainTextArgs {
    /// Text files or directories (searched for .txt, .md, .jsonl).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Where to write tokenizer.json.
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long, default_value_t = 8192)]
    vocab_size: u32,
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Reserved special tokens (ids 0, 1, ... in order). Repeat the flag for several.
    #[arg(long = "special", default_values_t = vec!["<|endoftext|>".to_string()])]
    specials: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ImageKind {
    Vq,
    Latent,
}

#[derive(Debug, clap::Args)]
pub struct FitImageArgs {
    /// Image files or directories (searched for .png, .jpg, .jpeg).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Where to write the tokenizer (.safetensors).
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = ImageKind::Vq)]
    kind: ImageKind,
    /// Images are centre-cropped and resized to this square side.
    #[arg(long, default_value_t = 32)]
    resolution: u32,
    /// Patch side in pixels (grid = resolution / patch).
    #[arg(long, default_value_t = 4)]
    patch: u32,
    /// VQ codebook size.
    #[arg(long, default_value_t = 256)]
    codebook_size: u32,
    /// Latent: PCA output dimension (0 keeps all patch values).
    #[arg(long, default_value_t = 16)]
    latent_dim: u32,
    /// Fraction of images held out for the reconstruction PSNR.
    #[arg(long, default_value_t = 0.1)]
    holdout: f32,
    #[arg(long, default_value_t = 25)]
    max_iter: usize,
    #[arg(long, default_value_t = 500_000)]
    max_patches: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip undecodable images (logged) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Write a few original / reconstruction PNG pairs here.
    #[arg(long)]
    preview: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct FitSpeechArgs {
    /// Audio files or directories (searched for .wav, .flac, .mp3, .ogg).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[arg(long, short)]
    out: PathBuf,
    /// Number of discrete units.
    #[arg(long, default_value_t = 500)]
    units: u32,
    /// Hop in samples at 16 kHz (640 = 25 units per second).
    #[arg(long, default_value_t = 640)]
    hop: usize,
    /// Analysis window in samples (≤ n_fft).
    #[arg(long, default_value_t = 1024)]
    window: usize,
    #[arg(long, default_value_t = 1024)]
    n_fft: usize,
    #[arg(long, default_value_t = 80)]
    n_mels: usize,
    /// Collapse runs of the same unit.
    #[arg(long)]
    collapse: bool,
    #[arg(long, default_value_t = 25)]
    max_iter: usize,
    #[arg(long, default_value_t = 500_000)]
    max_frames: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    skip_bad: bool,
    /// Write a WAV + spectrogram of the first clip's units here.
    #[arg(long)]
    preview: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The model folder as `save_pretrained` writes it (config.json + the safetensors), e.g. a
    /// downloaded SD / SDXL / FLUX `vae/` folder or `kyutai/mimi`.
    model: PathBuf,
    /// Where to write the tokenizer (.safetensors): the model's weights, unchanged, plus a header.
    #[arg(long, short)]
    out: PathBuf,
    /// Images are centre-cropped and resized to this square side (default: the config's
    /// sample_size).
    #[arg(long)]
    resolution: Option<u32>,
    /// AutoencoderKL: latent cells per patch side (each patch vector is latent_channels x patch²
    /// values). A VQModel has one code per latent cell.
    #[arg(long, default_value_t = 2)]
    patch: u32,
    /// MimiModel: codebooks kept per frame (default: all of the model's `num_quantizers`;
    /// Moshi keeps 8 of Mimi's 32). Tokens per second = 12.5 x codebooks.
    #[arg(long)]
    codebooks: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct EncodeArgs {
    /// Tokenizer file: tokenizer.json, or an image / speech .safetensors.
    #[arg(long, short)]
    tokenizer: PathBuf,
    /// The input file (text, image or audio).
    input: PathBuf,
    /// Also decode the result into this directory (what the model sees, as files).
    #[arg(long)]
    preview: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    #[arg(long, short)]
    tokenizer: PathBuf,
    /// Ids separated by spaces or commas (a JSON array works too).
    #[arg(long)]
    ids: String,
    /// Directory for the rendered files (decoded.txt / decoded.png / decoded.wav).
    #[arg(long, short)]
    out: PathBuf,
}

pub fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Command::TrainText(a) => train_text(a, ctx),
        Command::FitImage(a) => fit_image(a, ctx),
        Command::FitSpeech(a) => fit_speech(a, ctx),
        Command::Import(a) => import(a, ctx),
        Command::Encode(a) => encode(a, ctx),
        Command::Decode(a) => decode(a, ctx),
    }
}

/// A progress bar on stderr (hidden automatically when stderr is not a terminal).
pub fn progress_bar() -> ProgressBar {
    let pb = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({elapsed})") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// Expands files and directories (recursively, sorted) into files with one of `exts`.
pub fn collect_inputs(inputs: &[PathBuf], exts: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, exts, out)?;
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for i in inputs {
        if i.is_dir() {
            walk(i, exts, &mut out)?;
        } else if i.exists() {
            out.push(i.clone());
        } else {
            anyhow::bail!("input {} does not exist", i.display());
        }
    }
    if out.is_empty() {
        anyhow::bail!("no input files with extension {} found in {:?}", exts.join("/"), inputs);
    }
    Ok(out)
}

fn train_text(a: TrainTextArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let files = collect_inputs(&a.inputs, &["txt", "md", "jsonl", "text"])?;
    let cfg = TextTrainConfig {
        vocab_size: a.vocab_size,
        min_frequency: a.min_frequency,
        special_tokens: a.specials,
        show_progress: true,
    };
    let (tok, summary) = TextTokenizer::train(&files, &cfg)?;
    tok.save(&a.out)?;
    if ctx.json {
        return output::json(&json!({ "out": a.out, "summary": summary }));
    }
    output::line(format!(
        "text BPE: vocabulary {} from {} files ({:.1} MiB) in {:.2} s -> {}",
        summary.vocab_size,
        summary.files,
        summary.bytes as f64 / (1 << 20) as f64,
        summary.seconds,
        a.out.display()
    ))
}

fn fit_image(a: FitImageArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let files = collect_inputs(&a.inputs, &["png", "jpg", "jpeg"])?;
    let pb = progress_bar();
    let tok: Box<dyn ImageTokenizer> = match a.kind {
        ImageKind::Vq => {
            let cfg = VqConfig {
                resolution: a.resolution,
                patch: a.patch,
                codebook_size: a.codebook_size,
                holdout: a.holdout,
                max_patches: a.max_patches,
                max_iter: a.max_iter,
                seed: a.seed,
                skip_bad: a.skip_bad,
            };
            let (tok, s) = VqImageTokenizer::fit_files(&files, &cfg, &pb)?;
            pb.finish_and_clear();
            tok.save(&a.out)?;
            if ctx.json {
                output::json(&json!({ "out": a.out, "kind": "vq", "summary": s }))?;
            } else {
                output::line(format!(
                    "image VQ: {} codes, {}x{} grid of {}px patches at {}px; PSNR held-out {:.2} dB ({} images), train {:.2} dB; \
                     quantization error {:.4} ({:.1}% of variance), {} empty codes; {} images, {} patches, {} iterations, {:.2} s -> {}",
                    s.codebook_size,
                    s.grid.0,
                    s.grid.1,
                    s.patch,
                    s.resolution,
                    s.psnr_holdout,
                    s.holdout_images,
                    s.psnr_train,
                    s.quantization_error,
                    100.0 * s.relative_error,
                    s.empty_codewords,
                    s.train_images,
                    s.patches,
                    s.iterations,
                    s.seconds,
                    a.out.display()
                ))?;
            }
            Box::new(tok)
        }
        ImageKind::Latent => {
            let cfg = LatentConfig {
                resolution: a.resolution,
                patch: a.patch,
                dim: (a.latent_dim > 0).then_some(a.latent_dim),
                holdout: a.holdout,
                max_patches: a.max_patches,
                seed: a.seed,
                skip_bad: a.skip_bad,
            };
            let (tok, s) = LatentImageTokenizer::fit_files(&files, &cfg, &pb)?;
            pb.finish_and_clear();
            tok.save(&a.out)?;
            if ctx.json {
                output::json(&json!({ "out": a.out, "kind": "latent", "summary": s }))?;
            } else {
                output::line(format!(
                    "image latent patches: {}x{} grid, {} -> {} dims ({:.1}% variance kept); PSNR held-out {:.2} dB (f16); {} images, {:.2} s -> {}",
                    s.grid.0,
                    s.grid.1,
                    s.input_dim,
                    s.latent_dim,
                    100.0 * s.explained_variance,
                    s.psnr_holdout,
                    s.train_images,
                    s.seconds,
                    a.out.display()
                ))?;
            }
            Box::new(tok)
        }
    };
    if let Some(dir) = a.preview {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, f) in files.iter().take(8).enumerate() {
            let img = motley_tokenizers::image::read_image(f)?;
            let sq = motley_tokenizers::image::square(&img, tok.resolution(), None)?;
            sq.save(dir.join(format!("{i:02}_original.png")))
                .with_context(|| format!("writing preview in {}", dir.display()))?;
            let seg = tok.encode_image(&img, Some(&f.display().to_string()))?;
            std::fs::write(dir.join(format!("{i:02}_decoded.png")), tok.decode_to_png(&seg)?)?;
        }
        tracing::info!("previews written to {}", dir.display());
    }
    Ok(())
}

fn import(a: ImportArgs, ctx: &Ctx) -> anyhow::Result<()> {
    use motley_tokenizers::pretrained::{
        Architecture, AutoencoderKlTokenizer, ModelFolder, VaeOptions, VqModelTokenizer,
    };
    let start = Instant::now();
    let arch = ModelFolder::open(&a.model)?.architecture()?;
    let model = a.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if arch == Architecture::Mimi {
        let t = motley_tokenizers::pretrained::MimiTokenizer::from_folder(&a.model, a.codebooks)?;
        AudioTokenizer::save(&t, &a.out)?;
        if ctx.json {
            return output::json(&json!({
                "out": a.out,
                "kind": t.kind(),
                "model": model,
                "codebooks": t.codebooks(),
                "codebook_size": t.codebook_size(),
                "vocab_size": t.vocab_size(),
                "sample_rate": t.sample_rate(),
                "frames_per_second": t.frames_per_second(),
                "tokens_per_second": t.frame_rate(),
                "seconds": start.elapsed().as_secs_f64(),
            }));
        }
        return output::line(format!(
            "mimi {model}: {} Hz -> {} codebooks x {} codes at {} frames/s ({} tokens/s) -> {}",
            t.sample_rate(),
            t.codebooks(),
            t.codebook_size(),
            t.frames_per_second(),
            t.frame_rate(),
            a.out.display()
        ));
    }
    if a.codebooks.is_some() {
        anyhow::bail!("--codebooks is for a speech codec (MimiModel); {} is an image model", a.model.display());
    }
    let (tok, factors): (Box<dyn ImageTokenizer>, Option<(f64, f64)>) = match arch {
        Architecture::AutoencoderKl => {
            let t =
                AutoencoderKlTokenizer::from_folder(&a.model, VaeOptions { resolution: a.resolution, patch: a.patch })?;
            let f = t.factors();
            (Box::new(t), Some(f))
        }
        Architecture::VqModel => (Box::new(VqModelTokenizer::from_folder(&a.model, a.resolution)?), None),
        Architecture::Mimi => unreachable!("handled above"),
    };
    tok.save(&a.out)?;
    let (gh, gw) = tok.grid();
    if ctx.json {
        return output::json(&json!({
            "out": a.out,
            "kind": tok.kind(),
            "model": model,
            "resolution": tok.resolution(),
            "grid": [gh, gw],
            "latent_dim": tok.latent_dim(),
            "codes": tok.vocab_size(),
            "scaling_factor": factors.map(|f| f.0),
            "shift_factor": factors.map(|f| f.1),
            "seconds": start.elapsed().as_secs_f64(),
        }));
    }
    let what = match (tok.latent_dim(), factors) {
        (Some(d), Some((scale, shift))) => format!("patches of {d} values, scaling {scale}, shift {shift}"),
        _ => format!("codes of {}", tok.vocab_size()),
    };
    output::line(format!("{} {model}: {} px -> {gh}x{gw} {what} -> {}", tok.kind(), tok.resolution(), a.out.display()))
}

fn fit_speech(a: FitSpeechArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let files = collect_inputs(&a.inputs, &["wav", "flac", "mp3", "ogg"])?;
    let mel =
        MelConfig { n_fft: a.n_fft, win_length: a.window, hop_length: a.hop, n_mels: a.n_mels, ..MelConfig::default() };
    let cfg = SpeechConfig {
        mel,
        units: a.units,
        collapse_repeats: a.collapse,
        max_frames: a.max_frames,
        max_iter: a.max_iter,
        seed: a.seed,
        skip_bad: a.skip_bad,
    };
    let pb = progress_bar();
    let (tok, s) = SpeechTokenizer::fit_files(&files, &cfg, &pb)?;
    pb.finish_and_clear();
    tok.save(&a.out)?;
    if ctx.json {
        output::json(&json!({ "out": a.out, "summary": s }))?;
    } else {
        output::line(format!(
            "speech units: {} units at {} Hz; quantization error {:.4} ({:.1}% of variance), {} empty units; \
             {} files ({:.1} s of audio, {} frames), {} iterations, {:.2} s -> {}",
            s.units,
            s.frame_rate,
            s.quantization_error,
            100.0 * s.relative_error,
            s.empty_units,
            s.files,
            s.audio_seconds,
            s.frames,
            s.iterations,
            s.seconds,
            a.out.display()
        ))?;
    }
    if let Some(dir) = a.preview
        && let Some(first) = files.first()
    {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let seg = tok.encode_file(first)?;
        std::fs::write(dir.join("units.wav"), tok.decode_to_wav(&seg)?)?;
        std::fs::write(dir.join("units.png"), tok.spectrogram_png(&seg)?)?;
        std::fs::write(dir.join("original.png"), tok.audio_spectrogram_png(first)?)?;
        tracing::info!("preview of {} written to {}", first.display(), dir.display());
    }
    Ok(())
}

fn segment_json(seg: &Segment) -> serde_json::Value {
    match &seg.data {
        SegmentData::Tokens(ids) => json!({ "modality": seg.modality, "ids": ids, "meta": seg.meta }),
        SegmentData::Latent { dim, data } => {
            json!({ "modality": seg.modality, "latent_dim": dim, "vectors": data.len() / (*dim).max(1) as usize, "meta": seg.meta })
        }
    }
}

fn write_renders(tok: &dyn ModalityTokenizer, seg: &Segment, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for r in tok.render(seg)? {
        let p = dir.join(format!("decoded.{}", r.extension));
        std::fs::write(&p, &r.bytes).with_context(|| format!("writing {}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

fn encode(a: EncodeArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let tok = motley_tokenizers::load_any(&a.tokenizer)?;
    let bytes = std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let start = Instant::now();
    let seg = tok.encode_raw(&bytes, &a.input.display().to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let written = match &a.preview {
        Some(dir) => write_renders(tok.as_ref(), &seg, dir)?,
        None => Vec::new(),
    };
    if ctx.json {
        return output::json(&json!({ "segment": segment_json(&seg), "seconds": secs, "preview": written }));
    }
    match &seg.data {
        SegmentData::Tokens(ids) => {
            let s: Vec<String> = ids.iter().map(u32::to_string).collect();
            output::line(s.join(" "))?;
        }
        SegmentData::Latent { dim, data } => {
            output::line(format!("{} latent vectors of dimension {dim}", data.len() / (*dim).max(1) as usize))?;
        }
    }
    for p in written {
        tracing::info!("wrote {}", p.display());
    }
    Ok(())
}

fn decode(a: DecodeArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let tok = motley_tokenizers::load_any(&a.tokenizer)?;
    let ids: Vec<u32> = a
        .ids
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().with_context(|| format!("`{s}` is not a token id")))
        .collect::<anyhow::Result<_>>()?;
    let modality = tok.modality();
    let meta = SegmentMeta { source: Some("command line".into()), ..SegmentMeta::default() };
    let seg = Segment::tokens(modality, ids).with_meta(meta);
    if modality == Modality::Image && tok.vector_dim().is_some() {
        anyhow::bail!("{} is a latent image tokenizer: it has no discrete ids to decode", a.tokenizer.display());
    }
    let written = write_renders(tok.as_ref(), &seg, &a.out)?;
    if ctx.json {
        return output::json(&json!({ "written": written }));
    }
    for p in written {
        output::line(p.display())?;
    }
    Ok(())
}
