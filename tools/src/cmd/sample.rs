//! `motley sample`: generation from a checkpoint — text, images (Chameleon setting: VQ codes
//! sampled under the grid constraint and decoded to PNG; Transfusion setting: latent patches
//! denoised by DDPM/DDIM and decoded to PNG) and speech (units → mel → Griffin-Lim WAV).
//!
//! Images are produced through [`ImageBackend`], the one place the two settings differ.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use motley_shards::{Modality, Segment, SegmentMeta, Vocab};
use motley_tokenizers::{AudioTokenizer, ImageTokenizer, TextTokenizer};
use motley_trainer::diffusion::{self, GenerateOptions as DiffusionOptions, Sampler as DiffusionSampler};
use motley_trainer::sample::{
    Constraints, GenSegment, GenerateOptions, Generation, LoadedRun, Sampler, SamplingConfig, generate, load_run,
};
use serde::Serialize;

use crate::cmd::shards::tokenizer_path;
use crate::output::{self, Ctx};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  motley sample --checkpoint runs/demo/train/mot --prompt \"a handwritten digit seven\" \
                  --image --seed 1 --out runs/demo/samples\n  motley sample --checkpoint runs/demo/train/mot --prompt \
                  \"In the beginning\" --max-tokens 64 --temperature 0.8 --top-p 0.9\n  motley sample --checkpoint \
                  runs/demo/train/mot --prompt \"the digit\" --json"
)]
pub struct Args {
    /// Run directory (its latest checkpoint) or one checkpoint folder; either may be in an
    /// object store (its weights and tokenizers are fetched into the cache first).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text the generation continues (BOS is put in front).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Append BOI to the prompt: the model draws an image right away (and stops after it).
    #[arg(long)]
    pub image: bool,
    /// Append BOSP to the prompt: the model speaks first (units until EOSP or
    /// --max-speech-units), then goes on in text until EOS or --max-tokens.
    #[arg(long, conflicts_with = "image")]
    pub speech: bool,
    /// Tokens to generate at most (an image once begun is always completed).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample among the k most likely ids only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: the most likely ids up to this total probability (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where PNG and WAV files go (default: RUN/samples).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Tokenizer folder laid out like the demo's (text.json, image/ or image.safetensors,
    /// speech/ or speech.safetensors); default: the run's copies of its corpus's tokenizers
    /// (RUN/tokenizers/), else the ones the run's corpus records.
    #[arg(long)]
    pub tokenizers: Option<PathBuf>,
    /// A corpus whose vocabulary and tokenizers to use instead of the run's own (runs whose
    /// checkpoints predate recording them need it when their corpus has moved).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Speech units after which a speech segment is closed (the fitted units: 25 per second;
    /// Mimi: 12.5 frames per second x codebooks).
    #[arg(long, default_value_t = 250)]
    pub max_speech_units: usize,
    /// Recompute the whole sequence for every token instead of using the KV cache (baseline).
    #[arg(long)]
    pub no_cache: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Transfusion setting: denoising steps, evenly spaced over the training schedule.
    #[arg(long, default_value_t = 100)]
    pub diffusion_steps: usize,
    /// Transfusion setting: `ddpm` (ancestral) or `ddim`.
    #[arg(long, default_value = "ddpm", value_parser = ["ddpm", "ddim"])]
    pub sampler: String,
    /// Transfusion setting: DDIM noise scale (0 = deterministic DDIM, 1 = DDPM-like).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Transfusion setting: clamp the predicted clean latents to ±this (in units where the
    /// training latents have RMS 1) at every step; 0 = no clamp. Without it the noisiest steps
    /// (1/sqrt(alpha_bar) ~ 10^4) turn small noise errors into huge latents.
    #[arg(long, default_value_t = 4.0)]
    pub clip_x0: f64,
}

/// The tokenizers a generation is rendered with.
pub struct Tokenizers {
    pub text: TextTokenizer,
    pub image: Option<ImageBackend>,
    pub speech: Option<Box<dyn AudioTokenizer>>,
    /// Why a tokenizer is unavailable (reported when its modality is generated).
    pub missing: Vec<String>,
}

/// How images are generated and turned into pictures. Chameleon: discrete VQ codes sampled
/// by the LM under the grid constraint, decoded through the codebook. Transfusion: continuous
/// latent patches generated by iterative denoising, decoded by the latent tokenizer.
pub enum ImageBackend {
    Vq(Box<dyn ImageTokenizer>),
    Latent(Box<dyn ImageTokenizer>),
}

impl ImageBackend {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let tok = motley_tokenizers::load_image(path)?;
        Ok(if tok.latent_dim().is_some() { ImageBackend::Latent(tok) } else { ImageBackend::Vq(tok) })
    }

    fn tokenizer(&self) -> &dyn ImageTokenizer {
        match self {
            ImageBackend::Vq(t) | ImageBackend::Latent(t) => t.as_ref(),
        }
    }

    /// Codes (or latent patches) per image.
    pub fn tokens_per_image(&self) -> usize {
        let (h, w) = self.tokenizer().grid();
        h as usize * w as usize
    }

    /// Codes the LM samples per image: none for latent images (they are denoised instead).
    fn lm_codes_per_image(&self) -> usize {
        match self {
            ImageBackend::Vq(_) => self.tokens_per_image(),
            ImageBackend::Latent(_) => 0,
        }
    }

    /// PNG of one generated image segment (discrete codes).
    pub fn render(&self, seg: &GenSegment) -> anyhow::Result<Vec<u8>> {
        match self {
            ImageBackend::Vq(t) => {
                let s = Segment::tokens(Modality::Image, seg.ids.clone())
                    .with_meta(SegmentMeta { grid: Some(t.grid()), ..SegmentMeta::default() });
                Ok(t.decode_to_png(&s)?)
            }
            ImageBackend::Latent(_) => bail!("latent images are denoised, not sampled as codes"),
        }
    }
}

/// `DIR/name.safetensors`, else the safetensors files inside `DIR/name/` (sorted).
fn in_dir_all(dir: &Path, name: &str) -> Vec<PathBuf> {
    let file = dir.join(format!("{name}.safetensors"));
    if file.is_file() {
        return vec![file];
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join(name))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn in_dir(dir: &Path, name: &str) -> Option<PathBuf> {
    in_dir_all(dir, name).into_iter().next()
}

/// The image tokenizer in `DIR/image/` that fits the run: a latent one for a run with a
/// diffusion head (Transfusion), a VQ codebook otherwise (the demo keeps both side by side).
fn image_in_dir(dir: &Path, run: &LoadedRun) -> Option<PathBuf> {
    let all = in_dir_all(dir, "image");
    let want_latent = run.model.cfg.latent_dim > 0;
    all.iter()
        .find(|p| motley_tokenizers::load_image(p).is_ok_and(|t| t.latent_dim().is_some() == want_latent))
        .or(all.first())
        .cloned()
}

/// Finds the tokenizers: `--tokenizers DIR`, else the files the run's corpus manifest records.
pub fn open_tokenizers(run: &LoadedRun, dir: Option<&Path>) -> anyhow::Result<Tokenizers> {
    let (text, image, speech) = match dir {
        Some(d) => {
            anyhow::ensure!(d.is_dir(), "--tokenizers {}: not a directory", d.display());
            (Some(d.join("text.json")), image_in_dir(d, run), in_dir(d, "speech"))
        }
        None => {
            let Some(corpus) = &run.corpus else {
                bail!("the run trained on synthetic data; pass --tokenizers DIR");
            };
            let manifest = motley_shards::Manifest::read(corpus)
                .with_context(|| format!("reading the manifest of {}", corpus.display()))?;
            let p = |m| tokenizer_path(corpus, &manifest, m);
            (p(Modality::Text), p(Modality::Image), p(Modality::Speech))
        }
    };
    let where_ = || dir.map_or("the corpus manifest".to_string(), |d| d.display().to_string());
    let text = text.with_context(|| format!("{} names no text tokenizer", where_()))?;
    let text = TextTokenizer::from_file(&text).with_context(|| format!("loading text tokenizer {}", text.display()))?;
    let mut missing = Vec::new();
    let image = match image {
        Some(p) => match ImageBackend::open(&p) {
            Ok(b) => Some(b),
            Err(e) => {
                missing.push(format!("image: {e:#}"));
                None
            }
        },
        None => {
            missing.push(format!("image: {} names no image tokenizer", where_()));
            None
        }
    };
    let speech = match speech {
        Some(p) => match motley_tokenizers::load_speech(&p) {
            Ok(t) => Some(t),
            Err(e) => {
                missing.push(format!("speech: {e}"));
                None
            }
        },
        None => {
            missing.push(format!("speech: {} names no speech tokenizer", where_()));
            None
        }
    };
    Ok(Tokenizers { text, image, speech, missing })
}

/// Global ids of `BOS + prompt (+ BOI)`; text ids are the text block's local ids (offset 0).
pub fn prompt_ids(vocab: &Vocab, text: &TextTokenizer, prompt: &str, image: bool) -> anyhow::Result<Vec<u32>> {
    let sp = |n: &str| vocab.special(n).with_context(|| format!("the corpus vocabulary has no `{n}` special"));
    let text_block = vocab.modality(Modality::Text).map_or(0, |v| v.offset);
    let mut ids = vec![sp("bos")?];
    if !prompt.is_empty() {
        ids.extend(text.encode(prompt)?.into_iter().map(|i| i + text_block));
    }
    if image {
        ids.push(sp("boi")?);
    }
    Ok(ids)
}

/// One file written.
#[derive(Debug, Serialize)]
struct FileOut {
    modality: Modality,
    path: PathBuf,
    tokens: usize,
    complete: bool,
}

#[derive(Debug, Serialize)]
struct Summary<'a> {
    checkpoint: &'a Path,
    step: u64,
    prompt: &'a str,
    prompt_tokens: usize,
    sampling: &'a SamplingConfig,
    kv_cache: bool,
    /// Decoded text of the generated text segments, joined.
    text: String,
    files: Vec<FileOut>,
    generated_tokens: usize,
    stop: motley_trainer::sample::StopReason,
    prefill_seconds: f64,
    decode_seconds: f64,
    tokens_per_second: f64,
    /// Generated global ids.
    tokens: &'a [u32],
    /// The prompt's global ids (BOS, text, and BOI / BOSP when generation starts inside one).
    prompt_ids: &'a [u32],
    /// Each generated id's log-probability under the model (raw logits, whole vocabulary).
    logprobs: &'a [f32],
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let checkpoint = crate::remote_run::localize(&args.checkpoint, &ctx.remote)?;
    let run = load_run(&checkpoint, &args.device, args.data.as_deref())?;
    // --tokenizers, else the corpus --data names, else the run's copies, else its corpus's.
    let dir = args.tokenizers.clone().or_else(|| run.tokenizers.clone().filter(|_| args.data.is_none()));
    let toks = open_tokenizers(&run, dir.as_deref())?;
    tracing::info!(
        "loaded {} (step {}, {} {}) in {:.1}s",
        run.checkpoint.display(),
        run.step,
        run.config.model.arch,
        if run.vs.device().is_cuda() { "cuda" } else { "cpu" },
        t0.elapsed().as_secs_f64()
    );
    if args.image && toks.image.is_none() {
        bail!("--image needs an image tokenizer: {}", toks.missing.join("; "));
    }
    if args.image
        && let Some(ImageBackend::Latent(tok)) = &toks.image
    {
        return diffuse_image(&args, ctx, &run, tok.as_ref(), &toks.text, t0);
    }
    let grid = toks.image.as_ref().map_or(0, ImageBackend::lm_codes_per_image);
    let constraints = Constraints::new(&run.vocab, grid, args.max_speech_units)?;
    let mut prompt = prompt_ids(&run.vocab, &toks.text, &args.prompt, args.image)?;
    if args.speech {
        prompt.push(run.vocab.special("bosp").context("the corpus vocabulary has no `bosp` special")?);
    }
    let sampling =
        SamplingConfig { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    let mut sampler = Sampler::new(sampling.clone())?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        stop_at_eos: true,
        stop_after_image: args.image,
        use_cache: !args.no_cache,
    };
    let bar = indicatif::ProgressBar::new(if args.image { grid as u64 + 1 } else { args.max_tokens as u64 });
    bar.set_style(
        indicatif::ProgressStyle::with_template("generating {pos}/{len} tokens [{elapsed_precise}] {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let g =
        generate(&run.model, &run.vocab, &constraints, &prompt, &mut sampler, &opts, |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    let out_dir = out_dir(&args, &run);
    let (text, files) = write_outputs(&g, &toks, &out_dir, args.seed)?;
    eprintln!(
        "{} tokens in {:.2}s ({:.1} tokens/s, prefill {} tokens {:.3}s, {}), stop: {:?}",
        g.tokens.len(),
        g.decode_seconds,
        g.tokens_per_second(),
        g.prompt_tokens,
        g.prefill_seconds,
        if args.no_cache { "no cache" } else { "KV cache" },
        g.stop
    );
    if ctx.json {
        return output::json(&Summary {
            checkpoint: &run.checkpoint,
            step: run.step,
            prompt: &args.prompt,
            prompt_tokens: g.prompt_tokens,
            sampling: &sampling,
            kv_cache: !args.no_cache,
            text,
            files,
            generated_tokens: g.tokens.len(),
            stop: g.stop,
            prefill_seconds: g.prefill_seconds,
            decode_seconds: g.decode_seconds,
            tokens_per_second: g.tokens_per_second(),
            tokens: &g.tokens,
            prompt_ids: &prompt,
            logprobs: &g.logprobs,
        });
    }
    if !text.is_empty() {
        output::line(format!("{}{}", args.prompt, text))?;
    }
    for f in &files {
        output::line(format!(
            "wrote {} ({} {} tokens{})",
            f.path.display(),
            f.tokens,
            f.modality,
            if f.complete { "" } else { ", cut short" }
        ))?;
    }
    Ok(())
}

/// `--out`, else `RUN/samples` (the checkpoint is `RUN/checkpoints/step-N`), or `samples/`
/// here for a run in an object store (not inside the cache).
fn out_dir(args: &Args, run: &LoadedRun) -> PathBuf {
    if crate::remote::is_remote(&args.checkpoint) && args.out.is_none() {
        return PathBuf::from("samples");
    }
    args.out
        .clone()
        .unwrap_or_else(|| run.checkpoint.parent().and_then(Path::parent).unwrap_or(Path::new(".")).join("samples"))
}

#[derive(Debug, Serialize)]
struct DiffusionSummary<'a> {
    checkpoint: &'a Path,
    step: u64,
    setting: &'static str,
    prompt: &'a str,
    prompt_tokens: usize,
    sampler: &'a str,
    diffusion_steps: usize,
    seed: u64,
    seconds: f64,
    files: Vec<FileOut>,
}

/// Transfusion setting: BOS + prompt + BOI, then the image's latent patches by iterative
/// denoising (every step re-runs the whole sequence: the image attends to itself
/// bidirectionally, so its keys change every step), decoded to PNG.
fn diffuse_image(
    args: &Args,
    ctx: &Ctx,
    run: &LoadedRun,
    tok: &dyn ImageTokenizer,
    text: &TextTokenizer,
    t0: Instant,
) -> anyhow::Result<()> {
    if run.model.cfg.latent_dim <= 0 {
        bail!(
            "{} was trained without latent images (no diffusion head), but the image tokenizer is continuous; \
             pass the run's own tokenizers with --tokenizers",
            run.checkpoint.display()
        );
    }
    let prompt = prompt_ids(&run.vocab, text, &args.prompt, true)?;
    let sampler = match args.sampler.as_str() {
        "ddim" => DiffusionSampler::Ddim { eta: args.eta },
        _ => DiffusionSampler::Ddpm,
    };
    let opts = DiffusionOptions {
        steps: args.diffusion_steps.max(1),
        sampler,
        seed: args.seed,
        // 0 = no clamp; anything else (negative and NaN too) goes to the sampler's check.
        clip_x0: (args.clip_x0 != 0.0).then_some(args.clip_x0),
    };
    let grid = tok.grid();
    let n_patches = grid.0 as usize * grid.1 as usize;
    let started = Instant::now();
    let x = diffusion::generate_image(&run.model, &run.vocab, &prompt, n_patches, &opts, run.vs.device())?;
    let seconds = started.elapsed().as_secs_f64();
    let seg = diffusion::latents_to_segment(&x, grid)?;
    let png = tok.decode_to_png(&seg)?;
    let dir = out_dir(args, run);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("sample-seed{}-image0.png", args.seed));
    std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "{n_patches} latent patches by {} {} steps in {seconds:.2}s (loaded in {:.1}s)",
        opts.steps,
        args.sampler,
        (started - t0).as_secs_f64()
    );
    let files = vec![FileOut { modality: Modality::Image, path, tokens: n_patches, complete: true }];
    if ctx.json {
        return output::json(&DiffusionSummary {
            checkpoint: &run.checkpoint,
            step: run.step,
            setting: "transfusion",
            prompt: &args.prompt,
            prompt_tokens: prompt.len(),
            sampler: &args.sampler,
            diffusion_steps: opts.steps,
            seed: args.seed,
            seconds,
            files,
        });
    }
    for f in &files {
        output::line(format!("wrote {} ({} latent patches, denoised)", f.path.display(), f.tokens))?;
    }
    Ok(())
}

/// Decodes text segments and writes images / speech into `dir`; returns the text and files.
fn write_outputs(g: &Generation, toks: &Tokenizers, dir: &Path, seed: u64) -> anyhow::Result<(String, Vec<FileOut>)> {
    let mut text = String::new();
    let mut files = Vec::new();
    let mut counts = [0usize; Modality::COUNT];
    for seg in &g.segments {
        let n = counts[seg.modality.index()];
        counts[seg.modality.index()] += 1;
        let (bytes, ext) = match seg.modality {
            Modality::Text => {
                text.push_str(&toks.text.decode(&seg.ids)?);
                continue;
            }
            Modality::Image => {
                let Some(b) = &toks.image else {
                    tracing::warn!("image generated but not rendered: {}", toks.missing.join("; "));
                    continue;
                };
                if !seg.complete {
                    tracing::warn!("image {n} was cut short ({} codes); not rendered", seg.ids.len());
                    continue;
                }
                (b.render(seg)?, "png")
            }
            Modality::Speech => {
                let Some(t) = &toks.speech else {
                    tracing::warn!("speech generated but not rendered: {}", toks.missing.join("; "));
                    continue;
                };
                if seg.ids.is_empty() {
                    continue;
                }
                let s = Segment::tokens(Modality::Speech, seg.ids.clone())
                    .with_meta(SegmentMeta { frame_rate: Some(t.frame_rate()), ..SegmentMeta::default() });
                match t.decode_to_wav(&s) {
                    Ok(wav) => (wav, "wav"),
                    // Too short to decode (less than one codec frame): said, not fatal.
                    Err(e) => {
                        tracing::warn!("speech segment {n} not rendered: {e}");
                        continue;
                    }
                }
            }
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("sample-seed{seed}-{}{n}.{ext}", seg.modality));
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        files.push(FileOut { modality: seg.modality, path, tokens: seg.ids.len(), complete: seg.complete });
    }
    Ok((text, files))
}
