//! `motley sample`: generation from a checkpoint — text, and in the Chameleon setting images
//! (VQ codes decoded to PNG) and speech (units → mel → Griffin-Lim WAV).
//!
//! Images are produced through [`ImageBackend`], the one place another image generator (the
//! Transfusion setting's latent diffusion) plugs in.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use motley_shards::{Modality, Segment, SegmentMeta, Vocab};
use motley_tokenizers::{ImageTokenizer, SpeechTokenizer, TextTokenizer};
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
    /// Run directory (its latest checkpoint) or one checkpoint folder.
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
    /// speech/ or speech.safetensors); default: the ones the run's corpus records.
    #[arg(long)]
    pub tokenizers: Option<PathBuf>,
    /// Corpus the run trained on (for its vocabulary and tokenizers), when it has moved.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Speech units after which a speech segment is closed (25 units per second).
    #[arg(long, default_value_t = 250)]
    pub max_speech_units: usize,
    /// Recompute the whole sequence for every token instead of using the KV cache (baseline).
    #[arg(long)]
    pub no_cache: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// The tokenizers a generation is rendered with.
pub struct Tokenizers {
    pub text: TextTokenizer,
    pub image: Option<ImageBackend>,
    pub speech: Option<SpeechTokenizer>,
    /// Why a tokenizer is unavailable (reported when its modality is generated).
    pub missing: Vec<String>,
}

/// How images are generated and turned into pictures. Chameleon: discrete VQ codes sampled
/// by the LM under the grid constraint, decoded through the codebook. A continuous backend
/// (Transfusion) becomes a second variant here and in [`ImageBackend::render`].
pub enum ImageBackend {
    Vq(Box<dyn ImageTokenizer>),
}

impl ImageBackend {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let tok = motley_tokenizers::load_image(path)?;
        if tok.latent_dim().is_some() {
            bail!(
                "image tokenizer {} is continuous (Transfusion setting); `motley sample` generates discrete \
                 (VQ) images only so far",
                path.display()
            );
        }
        Ok(ImageBackend::Vq(tok))
    }

    /// Codes per image.
    pub fn tokens_per_image(&self) -> usize {
        match self {
            ImageBackend::Vq(t) => {
                let (h, w) = t.grid();
                h as usize * w as usize
            }
        }
    }

    /// PNG of one generated image segment.
    pub fn render(&self, seg: &GenSegment) -> anyhow::Result<Vec<u8>> {
        match self {
            ImageBackend::Vq(t) => {
                let s = Segment::tokens(Modality::Image, seg.ids.clone())
                    .with_meta(SegmentMeta { grid: Some(t.grid()), ..SegmentMeta::default() });
                Ok(t.decode_to_png(&s)?)
            }
        }
    }
}

/// `DIR/name.ext`, or the single safetensors file inside `DIR/name/`.
fn in_dir(dir: &Path, name: &str) -> Option<PathBuf> {
    let file = dir.join(format!("{name}.safetensors"));
    if file.is_file() {
        return Some(file);
    }
    let sub = dir.join(name);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&sub)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Finds the tokenizers: `--tokenizers DIR`, else the files the run's corpus manifest records.
pub fn open_tokenizers(run: &LoadedRun, dir: Option<&Path>) -> anyhow::Result<Tokenizers> {
    let (text, image, speech) = match dir {
        Some(d) => {
            anyhow::ensure!(d.is_dir(), "--tokenizers {}: not a directory", d.display());
            (Some(d.join("text.json")), in_dir(d, "image"), in_dir(d, "speech"))
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
        Some(p) => match SpeechTokenizer::load(&p) {
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
}

pub fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let run = load_run(&args.checkpoint, &args.device, args.data.as_deref())?;
    let toks = open_tokenizers(&run, args.tokenizers.as_deref())?;
    tracing::info!(
        "loaded {} (step {}, {} {}) in {:.1}s",
        run.checkpoint.display(),
        run.step,
        run.config.model.arch,
        if run.vs.device().is_cuda() { "cuda" } else { "cpu" },
        t0.elapsed().as_secs_f64()
    );
    if args.image && toks.image.is_none() {
        bail!("--image needs a discrete image tokenizer: {}", toks.missing.join("; "));
    }
    let grid = toks.image.as_ref().map_or(0, ImageBackend::tokens_per_image);
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
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| run.checkpoint.parent().and_then(Path::parent).unwrap_or(Path::new(".")).join("samples"));
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
                (t.decode_to_wav(&s)?, "wav")
            }
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("sample-seed{seed}-{}{n}.{ext}", seg.modality));
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        files.push(FileOut { modality: seg.modality, path, tokens: seg.ids.len(), complete: seg.complete });
    }
    Ok((text, files))
}
